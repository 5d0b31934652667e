"""The contribution criterion end to end: profile, convert (split layout), and the engine's two read waves.

The engine must compute exactly the thresholded model: h = act(gate) * up for
the candidates |act(gate)| * scale > c (their up rows read in a first wave),
and y = down h over the neurons whose |h| * |down column| > t (their down
columns read in a second wave).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_sparse import read_ffn, rel_max_abs

import neuralink
from neuralink import _engine
from neuralink.formats.sidecar import Sidecar

from conftest import ModelFactory, carried_text, converted_on_carried_text

DENSITY = 0.3


@pytest.fixture(scope="module")
def contribution_pair(synthetic_model: ModelFactory, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return converted_on_carried_text(synthetic_model("llama", "f32"), tmp_path_factory.mktemp("contribution"), DENSITY)


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1 + np.exp(-v))


def test_conversion_writes_the_split_layout_and_measures_the_given_density(contribution_pair) -> None:
    model, sidecar = contribution_pair
    with Sidecar.open(sidecar, model) as opened:
        header = opened.header
        assert (header.criterion, header.layout, header.bundle_gate) == ("contribution", "split", False)
        q = header.quality
        # --density skips the search but is measured all the same; it runs by default only within the budget
        assert q["chosen"] == f"uniform {DENSITY} (given)" and q["heldout_tokens"] > 100
        assert q["validated"] == (q["perplexity_change"] <= q["budget"])
        assert header.default_predictor == ("gate" if q["validated"] else "dense")
        assert 0 < q["down_density"] < q["up_density"] <= 1.0
        # how far the measured setting moved the predictions from every neuron's, recorded with it
        assert q["kld"] > 0 and 0 < q["same_top"] <= 1 and q["measured"][-1]["kld"] == q["kld"]
        # and how far from the source model: every neuron (the re-encoding alone), and the default setting
        moved = q["against_source"]
        assert 0 < moved["every_neuron"]["kld"] and 0 < moved["every_neuron"]["same_top"] <= 1
        if header.default_predictor == "gate":
            assert moved["default"]["kld"] > moved["every_neuron"]["kld"]
        else:
            assert moved["default"] == moved["every_neuron"]
        for il in range(header.n_layer):
            opened.verify_records(il)


def test_the_record_says_what_the_down_columns_encoding_costs_against_the_source(
        synthetic_model: ModelFactory, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The quality search holds its budgets against the conversion's own every neuron, blind to the down columns'
    encoding; the record measures the conversion against the source model too, where q4_K columns move the
    predictions further than q8_0 ones."""
    source = synthetic_model("llama", "f32")
    moved = {}
    for down in ("q8_0", "q4_K"):
        model, sidecar = converted_on_carried_text(source, tmp_path_factory.mktemp(f"source-{down}"), DENSITY,
                                                   bundle_down_type=down)
        with Sidecar.open(sidecar, model) as opened:
            moved[down] = opened.header.quality["against_source"]["every_neuron"]
    assert 0 < moved["q8_0"]["kld"] < moved["q4_K"]["kld"]
    assert moved["q4_K"]["same_top"] <= moved["q8_0"]["same_top"]


def test_a_divergence_budget_is_searched_recorded_and_said(synthetic_model: ModelFactory, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`convert --kld-budget`: a budget no sparse level keeps leaves every neuron as the default."""
    from neuralink.cli import main as cli_main

    text = tmp_path / "calibration.txt"
    text.write_text(carried_text(2500, seed=11))
    code = cli_main(["convert", str(synthetic_model("llama", "f32")), "--calibration", str(text), "-o",
                     str(tmp_path / "m.gguf"), "--max-tokens", "1024", "--heldout-tokens", "256", "--workers", "1",
                     "--ppl-budget", "50", "--kld-budget", "1e-9"])
    out = capsys.readouterr().out
    assert code == 0
    with Sidecar.open(tmp_path / "m.neuralink.sidecar", tmp_path / "m.gguf") as opened:
        q = opened.header.quality
        assert q["kld_budget"] == 1e-9 and q["budget"] == 0.5
        # every sparse level measured moved the predictions by more than the budget, though within +50 % perplexity
        sparse = [m for m in q["measured"] if m["label"].startswith("level")]
        assert sparse and all(m["kld"] > 1e-9 for m in sparse)
        assert any(m["upper_bound"] <= 0.5 for m in sparse)
        assert q["chosen"] == "level 1.0" and opened.header.default_predictor == "dense"
    assert "(budget 1e-09)" in out
    assert "against the source model on the same tokens: every neuron perplexity" in out
    # an f32 model's down weights stay f32: with every neuron the conversion predicts as the source does
    assert "warning: with every neuron" not in out


def test_convert_warns_where_the_reencoding_alone_exceeds_the_divergence_budget(
        synthetic_model: ModelFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from neuralink.cli import main as cli_main

    text = tmp_path / "calibration.txt"
    text.write_text(carried_text(2500, seed=11))
    assert cli_main(["convert", str(synthetic_model("llama", "f32")), "--calibration", str(text), "-o",
                     str(tmp_path / "m.gguf"), "--max-tokens", "1024", "--heldout-tokens", "256", "--workers", "1",
                     "--density", str(DENSITY), "--bundle-down-type", "q4_K", "--kld-budget", "1e-6"]) == 0
    out = capsys.readouterr().out
    with Sidecar.open(tmp_path / "m.neuralink.sidecar", tmp_path / "m.gguf") as opened:
        moved = opened.header.quality["against_source"]["every_neuron"]["kld"]
    assert moved > 1e-6
    assert f"warning: with every neuron the converted model's predictions are {moved:.4f} nats" in out
    assert "--bundle-down-type (q6_K, q8_0)" in out


def test_a_reencoding_beyond_the_divergence_budget_is_warned_of() -> None:
    from neuralink.convert.quality import reencoding_warning

    moved = {"perplexity_change": 0.01, "upper_bound": 0.02, "kld": 0.013, "same_top": 0.95}
    record = {"kld_budget": 0.01, "against_source": {"every_neuron": moved, "default": moved}}
    assert "0.0130 nats a token" in reencoding_warning(record) and "--kld-budget 0.01" in reencoding_warning(record)
    moved["kld"] = 0.009  # within the budget
    assert reencoding_warning(record) == ""
    moved["kld"] = 0.013
    assert reencoding_warning({k: v for k, v in record.items() if k != "kld_budget"}) == ""  # --kld-budget none
    assert reencoding_warning({"kld_budget": 0.01}) == ""  # not measured (other criteria, older sidecars)


@pytest.mark.parametrize("given", [None, "none"])
def test_the_divergence_is_budgeted_by_default(synthetic_model: ModelFactory, tmp_path: Path, given: str | None) -> None:
    """`convert` holds a level's divergence to 0.01 nats unless told `--kld-budget none`."""
    from neuralink.cli import main as cli_main
    from neuralink.convert.quality import DEFAULT_KLD_BUDGET

    text = tmp_path / "calibration.txt"
    text.write_text(carried_text(2500, seed=11))
    args = ["convert", str(synthetic_model("llama", "f32")), "--calibration", str(text), "-o", str(tmp_path / "m.gguf"),
            "--max-tokens", "1024", "--heldout-tokens", "256", "--workers", "1", "--ppl-budget", "50"]
    assert cli_main(args + (["--kld-budget", given] if given else [])) == 0
    with Sidecar.open(tmp_path / "m.neuralink.sidecar", tmp_path / "m.gguf") as opened:
        q = opened.header.quality
    if given == "none":
        assert "kld_budget" not in q
        # within +50 % perplexity alone a sparse level is chosen, one that moved the predictions beyond 0.01
        assert q["chosen"] != "level 1.0" and q["kld"] > DEFAULT_KLD_BUDGET
    else:
        assert DEFAULT_KLD_BUDGET == 0.01 and q["kld_budget"] == DEFAULT_KLD_BUDGET
        assert q["kld"] <= DEFAULT_KLD_BUDGET


def test_engine_equals_the_thresholded_ffn(contribution_pair) -> None:
    model, sidecar = contribution_pair
    engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="none")
    rng = np.random.default_rng(5)
    with Sidecar.open(sidecar, model) as opened:
        runtime = opened.header.runtime_thresholds
        tables = [(opened.candidate_scale(il), opened.down_norms(il)) for il in range(opened.header.n_layer)]
    checked = 0
    for il, ((final_t, candidate_t), (scale, down_norm)) in enumerate(zip(runtime, tables)):
        w = read_ffn(model, il)
        x = rng.standard_normal((64, w["up"].shape[1])).astype(np.float32) * 0.5
        g, u = x.astype(np.float64) @ w["gate"].T, x.astype(np.float64) @ w["up"].T
        a = silu(g)
        cand_score, final_score = np.abs(a) * scale, np.abs(a * u) * down_norm
        # tokens with a score within rounding of a threshold could go either way: leave them out
        clear = ((np.abs(cand_score - candidate_t) > 1e-4 * candidate_t) &
                 (np.abs(final_score - final_t) > 1e-4 * final_t)).all(axis=1)
        x, a, u = x[clear], a[clear], u[clear]
        candidates = np.abs(a) * scale > candidate_t
        finals = candidates & (np.abs(a * u) * down_norm > final_t)
        assert 0 < finals.mean() < candidates.mean() < 1, "the thresholds must leave neurons out at each step"
        want = (a * u * finals) @ w["down"].T
        got = engine.forward(il, x, "silu")
        assert rel_max_abs(got, want) <= 1e-5
        stats = engine.take_stats()[-1]
        # first wave: the candidates' up rows; second wave: the finals' down columns
        assert stats["predicted"] == candidates.any(axis=0).sum()
        assert stats["final_neurons"] == finals.any(axis=0).sum()
        assert stats["down_reads"] > 0 and stats["down_bytes_read"] < stats["bytes_read"]
        checked += len(x)
    assert checked > 64


@pytest.mark.parametrize("cache_share", [0.0, 0.5])
def test_streamed_regions_compute_what_collapsed_reads_compute(contribution_pair, cache_share: float) -> None:
    # cache_policy "stream": each layer's bundle and down regions read whole, ahead of the layer, into two buffers;
    # a cache's bytes hold the head of every region in DRAM, and the stream reads the rest
    model, sidecar = contribution_pair
    with Sidecar.open(sidecar, model) as opened:
        n_layer, n_ff, layouts = opened.header.n_layer, opened.header.n_ff, opened.layouts
    reads = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="none")
    cache_bytes = int(cache_share * reads.store_bytes)
    stream = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="stream",
                            cache_bytes=cache_bytes)
    assert stream.streams_regions and not reads.streams_regions and stream.cache_policy == "stream"
    largest = max(max(lay.record_bytes, lay.down_record_bytes) for lay in layouts) * n_ff
    if cache_bytes == 0:
        assert stream.stream_head_bytes == 0
        assert largest * 2 <= stream.stream_buffer_bytes <= (largest + 8192) * 2
    else:
        # the heads and the smaller buffers fit in the cache and the whole-region buffers they replace
        assert 0.4 * reads.store_bytes <= stream.stream_head_bytes
        assert stream.stream_head_bytes + stream.stream_buffer_bytes <= cache_bytes + (largest + 8192) * 2
        assert stream.stream_buffer_bytes < largest * 2
    rng = np.random.default_rng(7)
    # in order as a model runs them, twice (the second round from what was read ahead), then out of order
    for il in list(range(n_layer)) * 2 + [n_layer - 1, 0, 0]:
        x = rng.standard_normal((int(rng.integers(1, 4)), 256)).astype(np.float32) * 0.5
        assert np.array_equal(stream.forward(il, x, "silu"), reads.forward(il, x, "silu"))
        s, r = stream.take_stats()[-1], reads.take_stats()[-1]
        assert (s["predicted"], s["final_neurons"]) == (r["predicted"], r["final_neurons"])
        assert 0 < r["final_neurons"] < r["predicted"] < n_ff  # sparse, yet read whole
        assert (s["reads"], s["down_reads"]) == (2, 1)
        whole = n_ff * (layouts[il].record_bytes + layouts[il].down_record_bytes)
        if cache_bytes == 0:
            assert s["cache_hits"] == 0 and s["bytes_read"] >= whole
        else:
            assert 0 < s["cache_hits"] < s["predicted"] + s["final_neurons"]
            assert s["bytes_read"] <= 0.6 * whole + 2 * 8192
    # a failed read is the evaluation's error; the next one reads the region again
    x = rng.standard_normal((1, 256)).astype(np.float32)
    want = reads.forward(1, x, "silu")
    stream.inject_fault("eio", 0)
    with pytest.raises(neuralink.EngineIOError, match="Input/output error"):
        stream.forward(1, x, "silu")
    assert np.array_equal(stream.forward(1, x, "silu"), want)


def test_auto_streams_when_collapsed_reads_would_cover_the_layers(contribution_pair) -> None:
    model, sidecar = contribution_pair
    engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="none")
    dense = _engine.Engine(str(model), sidecar=str(sidecar), predictor="dense", cache_policy="none")
    store = engine.store_bytes
    # the same bytes pin the hottest records for collapsed reads and hold the regions' heads for the stream
    assert all(engine.collapsed_read_cost_ratio(int(f * store)) > 0.0 for f in (0.0, 0.5, 0.9))
    for bytes_ in (0, store // 2):
        ratio = engine.collapsed_read_cost_ratio(bytes_)
        assert engine.auto_cache_policy(bytes_) == ("stream" if ratio >= _engine.STREAM_COST_RATIO else "pinned")
    # every neuron: the regions are read whole anyway; a cache holding the store takes it all
    assert dense.auto_cache_policy(0) == "stream"
    assert engine.auto_cache_policy(2 * store) == dense.auto_cache_policy(2 * store) == "linking"


def test_llama_runs_the_validated_setting_by_default(contribution_pair) -> None:
    model, sidecar = contribution_pair
    with Sidecar.open(sidecar, model) as opened:
        default = opened.header.default_predictor
    llm = neuralink.Llama(str(model), n_ctx=128, verbose=False, ffn="engine")
    assert llm.engine.predictor == default
    llm.close()


def test_a_corrupt_record_is_an_io_error_naming_layer_and_neuron(contribution_pair, tmp_path: Path) -> None:
    model, sidecar = contribution_pair
    copy_model, copy_sidecar = tmp_path / model.name, tmp_path / sidecar.name
    copy_model.write_bytes(model.read_bytes())
    data = bytearray(sidecar.read_bytes())
    with Sidecar.open(sidecar, model) as opened:
        offset = opened.down_store_offset(1) + 5 * opened.layouts[1].down_record_bytes + 3
    data[offset] ^= 0x40
    copy_sidecar.write_bytes(bytes(data))
    engine = _engine.Engine(str(copy_model), sidecar=str(copy_sidecar), predictor="dense", cache_policy="none")
    x = np.ones((1, 256), dtype=np.float32)
    engine.forward(0, x, "silu")  # layer 0 is intact
    with pytest.raises(neuralink.EngineIOError, match=r"layer 1.*neuron 5\b.*checksum"):
        engine.forward(1, x, "silu")


@pytest.mark.parametrize("where", ["head", "tail"])
def test_a_corrupt_record_under_the_stream_is_an_io_error(contribution_pair, tmp_path: Path, where: str) -> None:
    # the stream's heads are checked once, when read at load; the streamed rest as each record is used
    model, sidecar = contribution_pair
    copy_model, copy_sidecar = tmp_path / model.name, tmp_path / sidecar.name
    copy_model.write_bytes(model.read_bytes())
    data = bytearray(sidecar.read_bytes())
    with Sidecar.open(sidecar, model) as opened:
        n_ff, layout = opened.header.n_ff, opened.layouts[1]
        neuron = 0 if where == "head" else n_ff - 1
        offset = opened.down_store_offset(1) + neuron * layout.down_record_bytes + 3
    data[offset] ^= 0x40
    copy_sidecar.write_bytes(bytes(data))
    reads = _engine.Engine(str(model), sidecar=str(sidecar), predictor="dense", cache_policy="none")

    def stream() -> _engine.Engine:
        return _engine.Engine(str(copy_model), sidecar=str(copy_sidecar), predictor="dense", cache_policy="stream",
                              cache_bytes=reads.store_bytes // 2)

    if where == "head":
        with pytest.raises(neuralink.EngineIOError, match=r"layer 1.*neuron 0\b.*checksum"):
            stream()
        return
    engine = stream()
    assert engine.stream_head_bytes > 0
    x = np.ones((1, 256), dtype=np.float32)
    assert np.array_equal(engine.forward(0, x, "silu"), reads.forward(0, x, "silu"))  # layer 0 is intact
    with pytest.raises(neuralink.EngineIOError, match=rf"layer 1.*neuron {n_ff - 1}\b.*checksum"):
        engine.forward(1, x, "silu")


def test_sweep_varies_both_thresholds_of_a_contribution_sidecar(contribution_pair, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from neuralink.convert.quality import ContributionScorer
    from neuralink.evaluate.density_sweep import density_thresholds, perplexity_sweep

    model, sidecar = contribution_pair
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(carried_text(1500, seed=12))
    thresholds = density_thresholds(model, sidecar, [calibration], [1.0, 0.5, 0.2], max_tokens=512)
    # denser targets: lower thresholds at both steps; the measured fraction follows the target
    finals = [t.thresholds.mean() for t in thresholds]
    candidates = [t.candidate_thresholds.mean() for t in thresholds]
    assert finals[0] == candidates[0] == 0.0 and finals[1] < finals[2] and candidates[1] < candidates[2]
    assert thresholds[2].calibration_density.mean() < thresholds[1].calibration_density.mean() <= 0.5 + 0.02
    text = carried_text(600, seed=13)
    passes = []
    token_nll = ContributionScorer.token_nll
    monkeypatch.setattr(ContributionScorer, "token_nll",
                        lambda self, *a, **k: passes.append(1) or token_nll(self, *a, **k))
    sweep = perplexity_sweep(model, text, [calibration], densities=[1.0, 0.5, 0.2], thresholds=thresholds,
                             max_tokens=256, n_ctx=128)
    rows = {r.density: r for r in sweep.rows if r.predictor == "gate"}
    # every neuron: thresholds 0 zero no activation that is not 0 already, so stock llama.cpp's pass counts it
    # and stands for it: stock's numbers on the same windows, one pass fewer (stock, 0.5, 0.2)
    assert len(passes) == 3
    assert np.array_equal(rows[1.0].result.token_nll, sweep.reference.result.token_nll)
    assert rows[1.0].active_fraction > 0.99 and sweep.reference.active_fraction == 1.0
    # up rows are read for the candidates, down columns for fewer: the finals
    assert rows[0.2].active_fraction < rows[0.5].active_fraction < rows[1.0].active_fraction
    assert rows[0.2].active_fraction < rows[0.2].predicted_fraction < 1.0
    # the predictions against stock's: the engine reading every bundle and density 1 (stock's own pass) do not
    # move them, sparser settings do, more the sparser
    dense_row = next(r for r in sweep.rows if r.label == "engine dense")
    assert dense_row.result.divergence is not None and dense_row.result.divergence.mean_kld < 1e-3
    assert rows[1.0].result.divergence.mean_kld == 0.0 and rows[1.0].result.divergence.top_agreement == 1.0
    assert 0 < rows[0.5].result.divergence.mean_kld < rows[0.2].result.divergence.mean_kld


def test_the_search_scores_what_the_engine_computes(contribution_pair) -> None:
    from neuralink.convert.quality import ContributionScorer, Setting, ThresholdScorer

    model, sidecar = contribution_pair
    with Sidecar.open(sidecar, model) as opened:
        runtime = opened.header.runtime_thresholds
    setting = Setting(finals=(DENSITY,) * len(runtime), thresholds=tuple(t for t, _ in runtime),
                      candidates=tuple(c for _, c in runtime))
    text = carried_text(200, seed=14)
    # the same tokens in the same windows (BOS, then 120 more in windows of 64): the same scored tokens
    fast = ContributionScorer(model, sidecar, text, max_tokens=121, n_ctx=64)
    engine = ThresholdScorer(model, sidecar, text, max_tokens=121, n_ctx=64)
    dense = Setting(finals=(1.0,) * len(runtime), thresholds=(0.0,) * len(runtime), candidates=(0.0,) * len(runtime))
    try:
        # llama.cpp with h zeroed in place, and the engine reading the bundles: the same thresholded model. Both
        # take the same neurons; the NLLs agree as closely as llama.cpp's and the engine's dense logits do (their
        # float sums differ in order: ~1e-3 of the logits on this random model), and so do the changes
        (nll_fast, dens_fast), (nll_engine, dens_engine) = fast.nll(setting), engine.nll(setting)
        assert dens_fast["down_density"] == pytest.approx(dens_engine["down_density"], abs=1e-3)
        assert dens_fast["up_density"] == pytest.approx(dens_engine["up_density"], abs=1e-3)
        assert 0 < dens_fast["down_density"] < dens_fast["up_density"] < 1
        # counting only: stock llama.cpp's NLLs, and what the setting would have read and changed (each layer
        # seeing stock's inputs, not the thresholded layers' before it: close to the applied densities, not equal)
        stock, _ = fast.token_nll(None)
        counted_nlls, counted = fast.token_nll(setting, count_only=True)
        assert np.array_equal(counted_nlls, stock) and counted["changed_pairs"] > 0
        assert counted["up_density"] == pytest.approx(dens_fast["up_density"], abs=0.01)
        assert counted["down_density"] == pytest.approx(dens_fast["down_density"], abs=0.01)
        change_fast, change_engine = nll_fast - fast.nll(dense)[0], nll_engine - engine.nll(dense)[0]
        assert change_engine > 0.002 and abs(change_fast - change_engine) < 0.25 * change_engine
        assert abs(nll_fast - nll_engine) < 1e-4 * nll_engine
        # the predictions' divergence from every neuron's, as the search records it: none for every neuron
        # itself, some for the thresholded model
        fast.token_nll(dense, keep_top=8)
        reference = fast.top
        assert reference is not None and reference.tokens.shape == (stock.size, 8)
        _, itself = fast.token_nll(dense, reference=reference)
        assert itself["kld"] < 1e-9 and itself["same_top"] == 1.0
        _, moved = fast.token_nll(setting, reference=reference)
        assert moved["kld"] > 1e-4 and 0.0 < moved["same_top"] <= 1.0
    finally:
        fast.close()
        engine.close()


def test_zero_dropped_pairs_applies_the_criterion_in_place() -> None:
    # what the quality search and the sweep apply to llama.cpp's h: the engine's rule, counted, on two threads
    rng = np.random.default_rng(5)
    gate = rng.normal(0, 2, (37, 300)).astype(np.float32)
    h = rng.normal(0, 1, (37, 300)).astype(np.float32)
    h[0, :7] = 0.0  # activations already zero: dropping them changes nothing
    scale = rng.uniform(0.5, 2, 300).astype(np.float32)
    norm = rng.uniform(0.5, 2, 300).astype(np.float32)
    a = silu(gate.astype(np.float64))
    cand_score, final_score = np.abs(a) * scale, np.abs(h.astype(np.float64)) * norm
    candidates = cand_score > 0.4
    finals = candidates & (final_score > 0.5)
    # pairs this close to a threshold may round either way in float32: left out of the comparison
    clear = (np.abs(cand_score - 0.4) > 1e-4) & (np.abs(final_score - 0.5) > 1e-4)
    out = h.copy()
    n_candidates, n_finals, n_changed = _engine.zero_dropped_pairs("silu", gate, out, scale, norm, 0.4, 0.5,
                                                                   threads=2)
    assert np.array_equal((out != 0)[clear], finals[clear])
    assert np.array_equal(out[finals & clear], h[finals & clear])  # kept pairs untouched
    assert abs(n_candidates - candidates.sum()) <= (~clear).sum() and abs(n_finals - finals.sum()) <= (~clear).sum()
    assert 0 < n_finals < n_candidates < gate.size
    assert n_changed == np.count_nonzero(h[out == 0])  # the pairs whose non-zero h was zeroed
    # counting only: h as it was, the same counts
    untouched = h.copy()
    assert _engine.zero_dropped_pairs("silu", gate, untouched, scale, norm, 0.4, 0.5, threads=2,
                                      apply=False) == (n_candidates, n_finals, n_changed)
    assert np.array_equal(untouched, h)
    with pytest.raises(ValueError, match="one shape"):
        _engine.zero_dropped_pairs("silu", gate[:5], out, scale, norm, 0.4, 0.5)
    with pytest.raises(ValueError, match="n_ff"):
        _engine.zero_dropped_pairs("silu", gate, out, scale[:9], norm, 0.4, 0.5)
