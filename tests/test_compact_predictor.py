"""The low-rank predictor under the contribution criterion: gate rows in the records instead of resident, the
predicted pairs finished exactly, thresholds fitted to the search's setting and their recall recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_sparse import read_ffn, rel_max_abs

import neuralink
from neuralink import _engine
from neuralink.errors import ModelFileError, SweepError
from neuralink.evaluate.density_sweep import perplexity_sweep
from neuralink.evaluate.predictor_quality import evaluate_predictor
from neuralink.formats.sidecar import Sidecar
from neuralink.formats.sidecar_writer import patch_predictor_thresholds

from conftest import ModelFactory, carried_text, converted_on_carried_text

DENSITY = 0.3
RANK = 16


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1 + np.exp(-v))


@pytest.fixture(scope="module")
def compact_pair(synthetic_model: ModelFactory, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # any measured perplexity validates (budget, no divergence budget): the test is of the mechanism
    return converted_on_carried_text(synthetic_model("llama", "f32"), tmp_path_factory.mktemp("compact"), DENSITY,
                                     lowrank_rank=RANK, budget=10.0, kld_budget=None)


def test_conversion_stores_gate_rows_in_records_and_records_the_recall(compact_pair) -> None:
    model, sidecar = compact_pair
    with Sidecar.open(sidecar, model) as opened:
        header = opened.header
        assert header.bundle_gate and header.predictor_rank == RANK and header.predictor_recall == pytest.approx(0.995)
        lowrank = header.quality["lowrank"]
        # fitted on the calibration tokens to find 99.5 % of the pairs the validated setting keeps (the default)
        assert lowrank["calibration"]["recall"] >= 0.995
        assert 0.9 <= lowrank["heldout"]["recall"] <= 1.0 and lowrank["heldout_tokens"] > 100
        assert lowrank["heldout"]["validated_density"] < lowrank["heldout"]["predicted_density"] <= 1.0
        assert lowrank["resident_bytes"] == header.n_layer * RANK * (header.n_embd + header.n_ff) * 4
        assert all(t > 0 for t in header.predictor_thresholds), "thresholds set after the search, not left at 0"
        # measured within the (test's) budget: the conversion's default is the predictor it measured
        assert lowrank["within_budget"] and header.default_predictor == "lowrank"
        assert 0 < lowrank["down_density"] < lowrank["up_density"] <= 1.0


def test_engine_finishes_the_predicted_pairs_by_the_exact_gate(compact_pair) -> None:
    model, sidecar = compact_pair
    engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="lowrank", cache_policy="none")
    gate_engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="none")
    # no gate row resident: the records hold them
    with Sidecar.open(sidecar, model) as opened:
        n_gate = opened.header.n_layer * opened.header.n_ff * opened.header.n_embd * 4  # f32 rows
        runtime = opened.header.runtime_thresholds
        thresholds = opened.header.predictor_thresholds
        tables = [(opened.candidate_scale(il), opened.down_norms(il), *map(np.array, opened.predictor(il)))
                  for il in range(opened.header.n_layer)]
    assert gate_engine.resident_bytes - engine.resident_bytes >= n_gate - sum(
        a.nbytes + b.nbytes for _, _, a, b in tables)
    rng = np.random.default_rng(5)
    for il, ((final_t, candidate_t), (scale, down_norm, a_f, b_f)) in enumerate(zip(runtime, tables)):
        w = read_ffn(model, il)
        x = rng.standard_normal((64, w["up"].shape[1])).astype(np.float32) * 0.5
        g, u = x.astype(np.float64) @ w["gate"].T, x.astype(np.float64) @ w["up"].T
        a = silu(g)
        score = np.abs(silu((x @ a_f.T) @ b_f.T)) * scale
        cand_score, final_score = np.abs(a) * scale, np.abs(a * u) * down_norm
        # tokens with a score within rounding of a threshold could go either way: leave them out
        clear = ((np.abs(cand_score - candidate_t) > 1e-4 * candidate_t) &
                 (np.abs(final_score - final_t) > 1e-4 * final_t) &
                 (np.abs(score - thresholds[il]) > 1e-4 * thresholds[il])).all(axis=1)
        x, a, u, score = x[clear], a[clear], u[clear], score[clear]
        validated = (np.abs(a) * scale > candidate_t) & (np.abs(a * u) * down_norm > final_t)
        predicted = score > thresholds[il]
        assert 0 < (validated & predicted).sum() and (validated & ~predicted).sum() <= 0.05 * validated.sum()
        want = (a * u * (validated & predicted)) @ w["down"].T
        got = engine.forward(il, x, "silu")
        assert rel_max_abs(got, want) <= 1e-5
        # never a pair outside the validated model: the gate predictor's output less what was missed
        assert rel_max_abs(gate_engine.forward(il, x, "silu"), (a * u * validated) @ w["down"].T) <= 1e-5


def test_every_pair_predicted_gives_the_gate_predictors_model(compact_pair, tmp_path: Path) -> None:
    model, sidecar = compact_pair
    copy = tmp_path / "m.sidecar"
    copy.write_bytes(Path(sidecar).read_bytes())
    with Sidecar.open(copy, model) as opened:
        n_layer = opened.header.n_layer
    patch_predictor_thresholds(copy, [0.0] * n_layer)
    with pytest.raises(ModelFileError, match="predictor thresholds"):
        patch_predictor_thresholds(copy, [0.0] * (n_layer + 1))
    outputs = {}
    for predictor in ("lowrank", "gate"):
        llm = neuralink.Llama(str(model), sidecar=str(copy), predictor=predictor, n_ctx=128, verbose=False)
        outputs[predictor] = llm("The quick brown fox", max_tokens=8, temperature=0.0)["choices"][0]["text"]
        llm.close()
    assert outputs["lowrank"] == outputs["gate"]


def test_the_predictor_command_measures_recall_of_the_validated_pairs(compact_pair, tmp_path: Path) -> None:
    model, sidecar = compact_pair
    text = tmp_path / "held_out.txt"
    text.write_text(carried_text(600, seed=3))
    reports = evaluate_predictor(model, sidecar, [text], max_tokens=256)
    with Sidecar.open(sidecar, model) as opened:
        assert len(reports) == opened.header.n_layer
    for r in reports:
        assert 0.9 <= r.recall <= 1.0 and 0 < r.true_density < r.predicted_density <= 1.0
        assert r.precision == pytest.approx(r.recall * r.true_density / r.predicted_density)
    # a sweep cannot vary its density: its thresholds follow the conversion's setting
    with pytest.raises(SweepError, match="chosen setting"):
        perplexity_sweep(model, text.read_text(), [text], sidecar=sidecar, densities=[0.5], predictors=["lowrank"],
                         max_tokens=64, calibration_tokens=64)


def test_the_runner_runs_the_compact_predictor_as_python_does(runner: Path, compact_pair) -> None:
    from test_runner import PROMPT, generated_tokens, python_greedy, run

    model, _ = compact_pair
    # the conversion validated it (the test's budget), so it is both programs' default
    result = run(runner, "-m", model, "-p", PROMPT, "-n", 12, "-t", 2, "--ignore-eos", "--io-backend", "pread")
    assert result.returncode == 0, result.stderr
    assert "predictor lowrank" in result.stderr
    assert generated_tokens(result) == python_greedy(model, io_backend="pread")[:12]


def test_the_convert_command_reports_the_compact_predictor(synthetic_model: ModelFactory, tmp_path: Path) -> None:
    import subprocess
    import sys

    text = tmp_path / "calibration.txt"
    text.write_text(carried_text(2500, seed=11))
    done = subprocess.run([sys.executable, "-m", "neuralink", "convert", str(synthetic_model("llama", "f32")),
                           "--calibration", str(text), "-o", str(tmp_path / "m.gguf"), "--density", "0.3",
                           "--max-tokens", "1024", "--heldout-tokens", "256", "--workers", "1", "--lowrank-rank", "16",
                           "--ppl-budget", "1000", "--kld-budget", "none"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "low-rank predictor (rank 16, 0.1 MiB resident, no gate row): held-out recall" in done.stdout
    assert "default predictor: lowrank" in done.stdout
