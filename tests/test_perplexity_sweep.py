"""Density sweep: threshold overrides in the engine, thresholds placed per density, the sweep table and its errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_llama_hook import rel_max_abs
from test_predictor import CALIBRATION, placement_for

import neuralink
from neuralink.cli import main as cli_main
from neuralink.convert.pipeline import fit_model_predictor
from neuralink.convert.writer import convert_model
from neuralink.errors import SweepError
from neuralink.evaluate.density_sweep import (
    SweepResult,
    SweepRow,
    density_thresholds,
    format_sweep,
    parse_budget,
    parse_densities,
    perplexity_sweep,
)
from neuralink.evaluate.perplexity import PerplexityResult

from conftest import ModelFactory

CONTEXT = dict(n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, verbose=False)
CALIBRATION_TOKENS = 400


@pytest.fixture(scope="module")
def lowrank_model(synthetic_model: ModelFactory, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A llama model converted with criterion gate_magnitude and a fitted low-rank predictor: (gguf, sidecar, text)."""
    root = tmp_path_factory.mktemp("sweep")
    calibration = root / "calibration.txt"
    calibration.write_text(CALIBRATION, encoding="utf-8")
    source = synthetic_model("llama", "f32")
    placement = placement_for(source, "gate_magnitude", 0.3)
    predictor = fit_model_predictor(source, [calibration], placement, rank=64, recall=0.99,
                                    max_tokens=CALIBRATION_TOKENS)
    result = convert_model(source, placement, root / "m.gguf", root / "m.sidecar", predictor=predictor,
                           bundle_parts="gate-up-down")
    return result.output, result.sidecar, calibration


def fractions(llm: neuralink.Llama) -> tuple[float, float]:
    """(computed, predicted) (token, neuron) pairs over all pairs, since the last call."""
    stats = llm.ffn_stats(reset=True)
    pairs = stats["n_tokens"].sum() * 512
    return stats["computed_pairs"].sum() / pairs, stats["predicted_pairs"].sum() / pairs


def run_on_calibration(model: Path, sidecar: Path, **options: object) -> tuple[np.ndarray, float, float, list[float]]:
    """Logits and active fractions of the calibration text's first tokens (the ones thresholds were placed on)."""
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), cache_policy="none", **CONTEXT, **options)
    try:
        tokens = llm.tokenize(CALIBRATION.encode("utf-8"))[:CALIBRATION_TOKENS]
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)])
        computed, predicted = fractions(llm)
        return logits, computed, predicted, list(llm.engine.thresholds)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def placed(lowrank_model: tuple[Path, Path, Path]):  # type: ignore[no-untyped-def]
    model, sidecar, calibration = lowrank_model
    return density_thresholds(model, sidecar, [calibration], [1.0, 0.5, 0.2], max_tokens=CALIBRATION_TOKENS)


def test_thresholds_are_placed_at_each_density_with_the_predictor_retuned(placed) -> None:  # type: ignore[no-untyped-def]
    one, half, fifth = placed
    assert np.all(one.thresholds == 0.0) and np.all(one.calibration_density > 0.999)
    np.testing.assert_allclose(half.calibration_density, 0.5, atol=1e-3)
    np.testing.assert_allclose(fifth.calibration_density, 0.2, atol=1e-3)
    assert np.all(fifth.thresholds > half.thresholds)
    for setting in placed:
        assert setting.predictor_thresholds is not None and setting.predictor_recall is not None
        assert np.all(setting.predictor_recall >= 0.99)
    # a sparser criterion lets the predictor be stricter
    assert np.all(fifth.predictor_thresholds > half.predictor_thresholds)


def test_threshold_override_sets_the_active_fraction(lowrank_model, placed) -> None:  # type: ignore[no-untyped-def]
    model, sidecar, _ = lowrank_model
    _, _, _, own_thresholds = run_on_calibration(model, sidecar, predictor="gate")
    assert own_thresholds == pytest.approx([0.3, 0.3])  # without an override: the sidecar's
    for setting in placed[1:]:
        _, computed, predicted, used = run_on_calibration(model, sidecar, predictor="gate",
                                                          thresholds=setting.thresholds)
        assert used == pytest.approx(setting.thresholds.tolist())
        # measured in the engine, on the tokens the thresholds were placed on: the target, up to float rounding
        assert computed == pytest.approx(setting.density, abs=0.01)
        assert predicted == computed  # gate is exact: it computes what it predicts


def test_gate_at_density_one_equals_dense(lowrank_model, placed) -> None:  # type: ignore[no-untyped-def]
    model, sidecar, _ = lowrank_model
    dense, dense_computed, _, _ = run_on_calibration(model, sidecar, predictor="dense")
    gate, gate_computed, _, _ = run_on_calibration(model, sidecar, predictor="gate", thresholds=placed[0].thresholds)
    assert dense_computed == 1.0 and gate_computed > 0.999
    assert rel_max_abs(gate, dense) <= 1e-6
    sparse, _, _, _ = run_on_calibration(model, sidecar, predictor="gate", thresholds=placed[2].thresholds)
    assert rel_max_abs(sparse, dense) > 1e-3  # the override really changes the model


def test_retuned_lowrank_finds_the_gates_active_pairs(lowrank_model, placed) -> None:  # type: ignore[no-untyped-def]
    model, sidecar, _ = lowrank_model
    setting = placed[2]
    _, gate, _, _ = run_on_calibration(model, sidecar, predictor="gate", thresholds=setting.thresholds)
    _, computed, predicted, _ = run_on_calibration(model, sidecar, predictor="lowrank", thresholds=setting.thresholds,
                                                   predictor_thresholds=setting.predictor_thresholds)
    # computed = predicted and truly active: recall on the calibration tokens is computed / gate
    assert computed / gate >= 0.985
    assert computed < predicted < 0.95  # reads more than it keeps, but not everything


def fake_result(perplexity: float, n: int = 100) -> PerplexityResult:
    return PerplexityResult("m.gguf", 64, 32, 3, np.full(n, math.log(perplexity)), 0.0)


def fake_sweep(budget: float) -> SweepResult:
    rows = [SweepRow("stock llama.cpp", None, None, fake_result(10.0), 1.0, 1.0),
            SweepRow("engine dense", "dense", None, fake_result(10.01), 1.0, 1.0)]
    for density, ppl in [(1.0, 10.0), (0.5, 10.2), (0.3, 10.45), (0.2, 10.6), (0.1, 13.0)]:
        rows.append(SweepRow("gate", "gate", density, fake_result(ppl), density, density))
    for density, ppl in [(1.0, 10.9), (0.5, 10.95)]:
        rows.append(SweepRow("lowrank", "lowrank", density, fake_result(ppl), density, density + 0.1))
    return SweepResult("m.gguf", budget, tuple(rows))


def test_the_sparsest_density_within_the_budget_is_reported() -> None:
    assert fake_sweep(0.05).sparsest_within_budget("gate").density == 0.3  # 10.45 <= 10.5 < 10.6
    assert fake_sweep(0.06).sparsest_within_budget("gate").density == 0.2
    assert fake_sweep(0.0).sparsest_within_budget("gate").density == 1.0
    assert fake_sweep(0.05).sparsest_within_budget("lowrank") is None
    assert fake_sweep(0.10).sparsest_within_budget("lowrank").density == 0.5
    text = format_sweep(fake_sweep(0.05))
    assert "| setting | target density | active fraction | predicted fraction | PPL | Δ% vs stock | within +5 % " \
        "| KLD vs stock | top-1 same |" in text
    assert "| gate | 0.3 | 0.300 | 0.300 | 10.4500 | +4.50% | yes |  |  |" in text  # nothing compared: blank
    assert "| gate | 0.2 | 0.200 | 0.200 | 10.6000 | +6.00% | no |  |  |" in text
    assert "  gate     0.3 (measured active fraction 0.300, PPL 10.4500, +4.50%)" in text
    assert "  lowrank  none of the densities tried" in text


def test_cli_sweep_prints_the_table_and_draws_the_curve(
    lowrank_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]  # type: ignore[no-untyped-def]
) -> None:
    model, _, calibration = lowrank_model
    text = tmp_path / "held_out.txt"
    text.write_text("Once upon a time there was a dog that could read tokens faster than any fox. " * 12)
    png = tmp_path / "curve.png"
    code = cli_main(["perplexity", "--sweep", "--model", str(model), "--text", str(text), "--calibration",
                     str(calibration), "--densities", "1,0.3", "--budget", "50%", "--max-tokens", "160",
                     "--n-ctx", "64", "--calibration-tokens", str(CALIBRATION_TOKENS), "--png", str(png)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line.split("|")
            for line in captured.out.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {("setting", "target density"), ("stock llama.cpp", ""), ("engine dense", ""),
                         ("gate", "1"), ("gate", "0.3"), ("lowrank", "1"), ("lowrank", "0.3")}
    ppl = {key: float(cells[5]) for key, cells in rows.items() if key[0] != "setting"}
    kld = {key: float(cells[8]) for key, cells in rows.items() if key[0] not in ("setting", "stock llama.cpp")}
    same = {key: float(cells[9]) for key, cells in rows.items() if key[0] not in ("setting", "stock llama.cpp")}
    # every row's predictions against stock's: every neuron barely moves them, density 0.3 moves them more
    assert kld[("engine dense", "")] < 1e-4 and same[("engine dense", "")] == 1.0
    assert kld[("gate", "0.3")] > 10 * max(kld[("gate", "1")], 1e-5) and same[("gate", "0.3")] <= 1.0
    active = {key: float(cells[3]) for key, cells in rows.items() if key[0] != "setting"}
    # f32 model: the engine reading every bundle is llama.cpp's model, and gate at density 1 is dense
    assert ppl[("engine dense", "")] == pytest.approx(ppl[("stock llama.cpp", "")], rel=1e-4)
    assert ppl[("gate", "1")] == pytest.approx(ppl[("engine dense", "")], rel=1e-5)
    assert active[("gate", "1")] > 0.999 and 0.15 < active[("gate", "0.3")] < 0.45
    assert "sparsest density (lowest target) whose perplexity is within +50 %" in captured.out
    assert "note: oracle is not run on gated models" in captured.out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_settings_are_refused(
    lowrank_model, converted_model, synthetic_model: ModelFactory, tmp_path: Path,  # type: ignore[no-untyped-def]
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, sidecar, calibration = lowrank_model
    with pytest.raises(SweepError, match=r"densities must lie in \(0, 1\]"):
        parse_densities("1,0.5,0")
    with pytest.raises(SweepError, match="comma-separated"):
        parse_densities("1;0.5")
    with pytest.raises(SweepError, match="repeat"):
        parse_densities("0.5,0.5")
    assert parse_budget("5") == parse_budget("+5 %") == pytest.approx(0.05)
    with pytest.raises(SweepError, match="non-negative"):
        parse_budget("-1")
    with pytest.raises(SweepError, match="percentage"):
        parse_budget("five")
    with pytest.raises(SweepError, match="names no sidecar"):
        perplexity_sweep(synthetic_model("llama", "f32"), "some text", [calibration])
    magnitude_model, magnitude_sidecar = converted_model("llama", "f32", criterion="magnitude")
    with pytest.raises(SweepError, match="criterion 'magnitude'"):
        perplexity_sweep(magnitude_model, "some text", [calibration])
    arcee_model, _ = converted_model("arcee", "f32")
    with pytest.raises(SweepError, match="predictor 'lowrank' does not apply"):
        perplexity_sweep(arcee_model, "some text", [calibration], predictors=["lowrank"])
    with pytest.raises(SweepError, match="unknown predictors"):
        perplexity_sweep(model, "some text", [calibration], predictors=["magic"])

    # the engine checks what it is given
    with pytest.raises(ValueError, match="1 activity thresholds given for 2 layers"):
        neuralink.Llama(str(model), sidecar=str(sidecar), thresholds=[0.1], **CONTEXT)
    with pytest.raises(ValueError, match="threshold of layer 1 is NaN"):
        neuralink.Llama(str(model), sidecar=str(sidecar), thresholds=[0.1, math.nan], **CONTEXT)
    with pytest.raises(ValueError, match="sidecar has no low-rank predictor"):
        neuralink.Llama(str(arcee_model), predictor_thresholds=[0.1, 0.1], **CONTEXT)
    with pytest.raises(ValueError, match="used without one"):
        neuralink.Llama(str(model), sidecar=False, thresholds=[0.1, 0.1], **CONTEXT)

    text = tmp_path / "t.txt"
    text.write_text("a few words of text " * 20)
    for argv, message in [
        (["--sweep", "--model", str(model)], "--sweep needs --calibration TEXT"),
        (["--sweep", "--model", str(model), "--model", str(model), "--calibration", str(calibration)],
         "give --model once"),
        (["--sweep", "--model", str(model), "--calibration", str(tmp_path / "absent.txt")],
         "absent.txt: no such calibration text"),
        (["--sweep", "--model", str(model), "--calibration", str(calibration), "--budget", "x"], "--budget"),
        (["--model", str(model), "--calibration", str(calibration)], "--calibration: only with --sweep"),
    ]:
        assert cli_main(["perplexity", "--text", str(text), *argv]) == 1
        assert message in capsys.readouterr().err
