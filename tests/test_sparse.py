"""The online engine: sparse FFNs from the sidecar's bundle store, through neuralink.Llama."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_llama_hook import DECODE_PREFIX, batch_logits, decode_logits, greedy, rel_max_abs, tokens_of

import neuralink
from neuralink import EngineIOError, EngineNumericError, ModelFileError, _engine
from neuralink.errors import MemoryBudgetError, OptionError
from neuralink.formats.checksum import records_checksums
from neuralink.formats.constants import SIDECAR_BUNDLE_HASH, SIDECAR_BUNDLES, SIDECAR_DOWN_COLUMNS, SIDECAR_DOWN_HASH
from neuralink.formats.ggml_types import ggml_type_name
from neuralink.formats.gguf_directory import read_gguf_directory
from neuralink.formats.sidecar import Sidecar
from neuralink.formats.sidecar_writer import seal_sidecar

CONTEXT = dict(n_ctx=256, logits_all=True, verbose=False)


def run_model(llm: neuralink.Llama) -> tuple[np.ndarray, np.ndarray, list[int]]:
    prompt = tokens_of(llm, 48)
    return (
        batch_logits(llm, prompt),
        decode_logits(llm, prompt[:DECODE_PREFIX], prompt[DECODE_PREFIX : DECODE_PREFIX + 16]),
        greedy(llm, prompt[:12], 16),
    )


FLOAT_CASES = [("llama", "f32"), ("gemma3", "f16"), ("arcee", "f32"), ("qwen2", "bf16"), ("arcee", "f16")]
# gated models' records with and without their gate rows (resident then)
LAYOUTS = ["gate-up-down", "up-down"]
ACTIVATION = {"llama": "silu", "qwen2": "silu", "gemma3": "gelu", "arcee": "relu_sqr"}


@pytest.mark.parametrize("bundle_parts", LAYOUTS)
@pytest.mark.parametrize(("arch", "weight_type"), FLOAT_CASES)
def test_dense_predictor_ffn_outputs_equal_the_dense_engine(
    converted_model, arch: str, weight_type: str, bundle_parts: str
) -> None:
    model, sidecar = converted_model(arch, weight_type, bundle_parts="up-down" if arch == "arcee" else bundle_parts)
    dense = _engine.Engine(str(model))
    sparse = _engine.Engine(str(model), sidecar=str(sidecar), predictor="dense", cache_policy="none")
    # 12 tokens: a prompt batch, through ggml's batched products and the token-tiled down projection
    x = np.random.default_rng(7).standard_normal((12, 256)).astype(np.float32)
    for il in range(2):
        want = dense.forward(il, x, ACTIVATION[arch])
        assert rel_max_abs(sparse.forward(il, x, ACTIVATION[arch]), want) <= 1e-4
        assert rel_max_abs(sparse.forward(il, x[:1], ACTIVATION[arch]), want[:1]) <= 1e-4


@pytest.mark.parametrize("bundle_parts", LAYOUTS)
@pytest.mark.parametrize(("arch", "weight_type"), FLOAT_CASES)
def test_dense_predictor_logits_and_text_match_the_dense_engine(
    converted_model, arch: str, weight_type: str, bundle_parts: str
) -> None:
    model, sidecar = converted_model(arch, weight_type, bundle_parts="up-down" if arch == "arcee" else bundle_parts)
    dense = neuralink.Llama(str(model), sidecar=False, **CONTEXT)
    want = run_model(dense)
    dense.close()
    sparse = neuralink.Llama(str(model), sidecar=str(sidecar), predictor="dense", **CONTEXT)
    assert sparse.engine.sparse and sparse.engine.predictor == "dense"
    got = run_model(sparse)
    stats = sparse.ffn_stats()
    sparse.close()
    # per-layer outputs agree to ~1e-6 (above); through the whole network summation order shows at ~1e-4
    assert rel_max_abs(got[0], want[0]) <= 1e-3
    assert rel_max_abs(got[1], want[1]) <= 1e-3
    assert got[2] == want[2]
    # every layer evaluation went through the bundle store: read from it, or from the copy preload made at load
    assert len(stats) > 0 and ((stats["bytes_read"] > 0) | (stats["cache_hits"] > 0)).all()


def read_ffn(model: Path, il: int) -> dict[str, np.ndarray]:
    """A converted model's FFN weights of layer il as float rows (gate/up: per neuron, down: per output)."""
    reader = gguf.GGUFReader(model)
    out = {}
    for part in ("gate", "up", "down"):
        t = next((t for t in reader.tensors if t.name == f"blk.{il}.ffn_{part}.weight"), None)
        if t is None:  # non-gated FFNs have no gate
            continue
        rows = int(t.shape[1])
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(rows, -1)
        out[part] = _engine.dequantize(ggml_type_name(gguf.GGMLQuantizationType(t.tensor_type)), raw, int(t.shape[0]))
    return out


@pytest.mark.parametrize("n_tokens", [6, 20])  # one by one with vec_dot; a batch through ggml's mul_mat
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gate_predictor_equals_a_numpy_reference_of_the_thresholded_ffn(converted_model, arch: str,
                                                                        n_tokens: int) -> None:
    threshold = 0.08
    model, sidecar = converted_model(arch, "f32", threshold=threshold)
    from neuralink.formats.sidecar import Sidecar

    with Sidecar.open(sidecar, model) as opened:
        # a gate-only criterion: the records leave the gate rows out (they are resident)
        assert opened.header.bundle_gate is False and opened.layouts[0].gate is None
    engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="none")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n_tokens, 256)).astype(np.float32)
    act = {"llama": lambda v: v / (1 + np.exp(-v)),
           "gemma3": lambda v: 0.5 * v * (1 + np.tanh(0.7978845608 * v * (1 + 0.044715 * v * v)))}[arch]
    for il in range(2):
        w = read_ffn(model, il)
        g = x.astype(np.float64) @ w["gate"].T
        u = x.astype(np.float64) @ w["up"].T
        a = act(g)
        mask = np.abs(a) > threshold
        assert 0.05 < mask.mean() < 0.95, "the threshold must leave some neurons out and keep others"
        want = (a * u * mask) @ w["down"].T
        got = engine.forward(il, x, "silu")
        # gelu goes through ggml's fp16 table; everything else is float arithmetic
        assert rel_max_abs(got, want) <= (2e-3 if arch == "gemma3" else 1e-5)
        stats = engine.take_stats()
        assert stats[-1]["predicted"] == mask.any(axis=0).sum()


def thresholded_ffn(model: Path, il: int, x: np.ndarray, threshold: float) -> np.ndarray:
    """The dense FFN of a SiLU model with |act(gate)| <= threshold zeroed, in float64 from its weights."""
    w = read_ffn(model, il)
    g = x.astype(np.float64) @ w["gate"].T
    a = g / (1 + np.exp(-g))
    return (a * (x.astype(np.float64) @ w["up"].T) * (np.abs(a) > threshold)) @ w["down"].T


@pytest.mark.parametrize("n_tokens", [1, 6, 20])  # one by one with vec_dot; a batch through ggml's mul_mat
def test_down_rows_of_a_store_held_whole_compute_the_thresholded_ffn_and_its_columns_are_never_read(
        converted_model, n_tokens: int) -> None:
    # high enough that even 20 tokens leave neurons out of every token: h must be zero there, though the
    # prediction left act(g) in its place
    threshold = 1.2
    model, sidecar = converted_model("llama", "f32", threshold=threshold, bundle_layout="split")
    engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="none")
    engine.configure_cache("linking", 4 * engine.store_bytes)
    assert engine.cache_holds_store
    # f32 columns cost little more than f32 rows per byte: at these densities they are cheaper, so the rows
    # are chosen by hand here
    assert engine.down_row_layers() == ([], 0, 0)
    engine.use_down_rows([0, 1])
    assert engine.down_rows_layers_in_use == [0, 1]
    x = np.random.default_rng(3).standard_normal((n_tokens, 256)).astype(np.float32)
    for il in range(2):
        # f32 rows: h is not converted, so the rows give the thresholded FFN as exactly as the columns do
        assert rel_max_abs(engine.forward(il, x, "silu"), thresholded_ffn(model, il, x, threshold)) <= 1e-5
    stats = engine.take_stats()
    assert (stats["down_bytes_read"] == 0).all() and (stats["down_cache_hits"] == 0).all()
    assert (stats["final_neurons"] > 0).all() and (stats["final_neurons"] < 512).all()


def smallest_cache_holding_store(engine: _engine.Engine) -> int:
    low, high = engine.store_bytes, 8 * engine.store_bytes
    assert engine.cache_would_hold_store(high)
    while high - low > 1024:
        mid = (low + high) // 2
        low, high = (low, mid) if engine.cache_would_hold_store(mid) else (mid, high)
    return high


@pytest.mark.parametrize("n_tokens", [1, 6])
def test_down_rows_on_trial_keep_the_faster_way_and_every_token_is_the_thresholded_ffn(converted_model,
                                                                                     n_tokens: int) -> None:
    threshold = 1.2
    model, sidecar = converted_model("llama", "f32", threshold=threshold, bundle_layout="split")
    engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="none")
    engine.configure_cache("linking", 4 * engine.store_bytes)
    layers, row_bytes, _ = engine.down_row_trial_layers()
    assert layers == [0, 1] and row_bytes == 2 * 256 * 512 * 4
    engine.try_down_rows(layers)
    with pytest.raises(ValueError, match="in use or on trial"):
        engine.try_down_rows([0])
    with pytest.raises(ValueError, match="on trial"):  # rows on trial are not also put in use
        engine.use_down_rows([1])
    assert engine.down_trial == dict(layers=2, tokens=0, rows_ms=0.0, columns_ms=0.0, settled=False,
                                     rows_kept=False)
    rng = np.random.default_rng(5)
    # a prompt batch now and then: the columns, untimed; decoded tokens alternate, as many each way, then one
    # settles
    each = _engine.DOWN_TRIAL_TOKENS
    for step in range(2 * each + 2 + 2 * each // 9 + 2):
        x = rng.standard_normal((n_tokens if step % 9 == 4 else 1, 256)).astype(np.float32)
        for il in range(2):  # f32 rows and columns alike give the thresholded FFN
            assert rel_max_abs(engine.forward(il, x, "silu"), thresholded_ffn(model, il, x, threshold)) <= 1e-5
    trial = engine.down_trial
    assert trial["settled"] and trial["tokens"] == 2 * each and trial["rows_ms"] > 0 and trial["columns_ms"] > 0
    assert trial["rows_kept"] == (trial["rows_ms"] < (1 - _engine.DOWN_TRIAL_MARGIN) * trial["columns_ms"])
    assert engine.down_rows_layers_in_use == ([0, 1] if trial["rows_kept"] else [])
    stats = engine.take_stats()
    assert (stats[-2:]["down_cache_hits"] == 0).all() == trial["rows_kept"]
    if trial["rows_kept"]:  # the columns' memory went back: the arena holds at most the 2 x 512 up records
        assert engine.cache_stats()["entries"] <= 2 * 512
    with pytest.raises(ValueError, match="in use" if trial["rows_kept"] else "trial has ended"):
        engine.try_down_rows([0])


def test_neuralink_llama_times_down_rows_only_when_asked_so_that_its_text_does_not_depend_on_timing(
        converted_model) -> None:
    model, sidecar = converted_model("llama", "q8_0", threshold=0.05, bundle_layout="split", down_type="q8_0",
                                     bundle_down_type="q5_K")
    engine = _engine.Engine(str(model), sidecar=str(sidecar))
    _, row_bytes, _ = engine.down_row_trial_layers()
    with pytest.raises(OptionError, match="down_rows='rows'"):
        neuralink.Llama(str(model), sidecar=str(sidecar), down_rows="rows", **CONTEXT)
    # by default, room for the rows beside the store puts nothing on trial: q8_0 rows do not pay by the cost
    # model, so every process computes with the columns and greedy text is the same run after run
    runs = []
    for _ in range(2):
        llm = neuralink.Llama(str(model), sidecar=str(sidecar), predictor="gate", cache_bytes=4 * engine.store_bytes,
                              **CONTEXT)
        assert llm.engine.down_trial["layers"] == 0 and llm.engine.down_rows_layers_in_use == []
        runs.append(greedy(llm, tokens_of(llm, 12), 2 * _engine.DOWN_TRIAL_TOKENS + 4))
        llm.close()
    assert runs[0] == runs[1]
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), predictor="gate", cache_bytes=4 * engine.store_bytes,
                          down_rows="trial", **CONTEXT)
    assert llm.engine.down_trial["layers"] == 2 and llm.engine.down_rows_layers_in_use == []
    greedy(llm, tokens_of(llm, 12), 2 * _engine.DOWN_TRIAL_TOKENS + 4)
    assert llm.engine.down_trial["settled"]
    assert re.search(r"down projection by (rows|columns) \(a decoded token", llm.ffn_summary())
    llm.close()
    # no room for the rows beside the columns: no trial, and q8_0 rows (272 bytes a neuron against q5_K
    # columns of 176 at the profile's ~0.5) do not pay by the cost model
    room = smallest_cache_holding_store(engine)
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), cache_bytes=room, **CONTEXT)
    assert llm.engine.cache_holds_store and llm.engine.down_trial["layers"] == 0
    assert llm.engine.down_rows_layers_in_use == []
    llm.close()


def test_the_dense_predictor_counts_every_neurons_column_when_rows_are_weighed(converted_model) -> None:
    # q6_K rows (n_embd 256 rows of 512: 420 bytes a neuron) against q5_K columns of 176 bytes at 2x: more
    # than the profile's ~0.5 of the columns cost (no rows), less than every neuron's, which the dense
    # predictor reads
    model, sidecar = converted_model("llama", "q8_0", threshold=0.05, bundle_layout="split", down_type="q6_K",
                                     bundle_down_type="q5_K")
    assert _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate").down_row_layers()[0] == []
    assert _engine.Engine(str(model), sidecar=str(sidecar), predictor="dense").down_row_layers()[0] == [0, 1]


def test_neuralink_llama_holding_the_store_uses_down_rows_where_they_pay(converted_model) -> None:
    model, sidecar = converted_model("llama", "q8_0", threshold=0.05, bundle_layout="split", down_type="q4_K",
                                     bundle_down_type="q5_K")
    engine = _engine.Engine(str(model), sidecar=str(sidecar))
    layers, row_bytes, column_bytes = engine.down_row_layers()
    # 144 bytes of rows per neuron (256 rows of 512 in q4_K) against 176 of q5_K columns at ~0.5 x 2.5
    assert layers == [0, 1] and row_bytes == 2 * 256 * 288 and column_bytes == 2 * 512 * 176
    # room for the store, not for the rows beside its columns: the rows replace the columns without a trial
    room = smallest_cache_holding_store(engine)
    runs = {}
    for down_rows in (True, False):
        llm = neuralink.Llama(str(model), sidecar=str(sidecar), predictor="gate", cache_bytes=room,
                              down_rows=down_rows, **CONTEXT)
        assert llm.engine.cache_holds_store and llm.engine.down_trial["layers"] == 0
        runs[down_rows] = (llm.engine.down_rows_layers_in_use, run_model(llm), llm.ffn_stats())
        llm.close()
    assert runs[True][0] == [0, 1] and runs[False][0] == []
    assert (runs[True][2]["down_cache_hits"] == 0).all() and (runs[False][2]["down_cache_hits"] > 0).any()
    # the same thresholded model: q4_K rows of the converted GGUF (h in q8_K) against the sidecar's q5_K
    # columns, apart by quantization only (q4_K errs by several percent on these Gaussian weights: 7 % here,
    # where a wrong h or row would be of the order of the logits themselves)
    assert rel_max_abs(runs[True][1][0], runs[False][1][0]) <= 0.15
    assert rel_max_abs(runs[True][1][1], runs[False][1][1]) <= 0.15


def test_down_rows_that_fail_their_checksum_are_refused_naming_the_tensor(converted_model, tmp_path: Path) -> None:
    model, sidecar = converted_model("llama", "q8_0", threshold=0.05, bundle_layout="split", down_type="q4_K",
                                     bundle_down_type="q5_K")
    copy = tmp_path / model.name
    data = bytearray(model.read_bytes())
    down = read_gguf_directory(model).tensors["blk.1.ffn_down.weight"]
    data[down.offset + down.nbytes // 2] ^= 0x40
    copy.write_bytes(bytes(data))
    engine = _engine.Engine(str(model), sidecar=str(sidecar))
    store = engine.store_bytes
    engine.use_down_rows([0, 1])  # the file as converted
    engine = _engine.Engine(str(copy), sidecar=str(sidecar))
    with pytest.raises(ModelFileError, match=r"blk\.1\.ffn_down\.weight.*checksum"):
        engine.use_down_rows([0, 1])
    with pytest.raises(ModelFileError, match=r"blk\.1\.ffn_down\.weight.*checksum"):
        neuralink.Llama(str(copy), sidecar=str(sidecar), cache_bytes=4 * store, **CONTEXT)
    # the columns never read the changed bytes
    llm = neuralink.Llama(str(copy), sidecar=str(sidecar), cache_bytes=4 * store, down_rows=False, **CONTEXT)
    llm.close()


def test_down_rows_need_the_split_layout(converted_model) -> None:
    model, sidecar = converted_model("llama", "q8_0", threshold=0.05, bundle_layout="joint", down_type="q4_K",
                                     bundle_down_type="q5_K")
    engine = _engine.Engine(str(model), sidecar=str(sidecar))
    assert engine.down_row_layers() == ([], 0, 0)  # the joint records hold the down columns: nothing to replace
    with pytest.raises(ValueError, match="layer 0 has no down rows"):
        engine.use_down_rows([0])


def test_cache_collapse_and_queue_depth_never_change_outputs(converted_model) -> None:
    model, sidecar = converted_model("llama", "q8_0", threshold=0.05)
    outputs, reads = [], []
    for policy, cache_bytes, gap, depth, backend in [
        ("none", 0, 0, 1, "uring"), ("lru", 1 << 20, 0, 8, "pread"), ("s3fifo", 1 << 19, 1 << 20, 4, "uring"),
        ("linking", 1 << 20, 1 << 16, 2, "pread"), ("pinned", 1 << 20, None, 8, "auto"),
    ]:
        llm = neuralink.Llama(str(model), sidecar=str(sidecar), predictor="gate", cache_policy=policy,
                              cache_bytes=cache_bytes, collapse_gap=gap, queue_depth=depth, io_backend=backend,
                              **CONTEXT)
        outputs.append(run_model(llm))
        stats = llm.ffn_stats()
        reads.append((stats["reads"].sum(), stats["cache_hits"].sum()))
        llm.close()
    for out in outputs[1:]:
        assert np.array_equal(out[0], outputs[0][0])
        assert np.array_equal(out[1], outputs[0][1])
        assert out[2] == outputs[0][2]
    # and they do change what is read
    assert len(set(reads)) > 1


def test_adaptive_collapse_fits_the_read_cost_while_running_and_changes_no_output(converted_model) -> None:
    model, sidecar = converted_model("llama", "q8_0", threshold=0.05)
    runs = {}
    for adaptive in (False, True):
        llm = neuralink.Llama(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="none",
                              collapse_gap=8192, adaptive_collapse=adaptive, **CONTEXT)
        # before any read both plan with the given gap (the adaptive fit starts from it)
        assert abs(llm.engine.collapse_gap_bytes - 8192) <= 1
        runs[adaptive] = (run_model(llm), llm.engine.collapse_gap_bytes, llm.engine.read_cost)
        llm.close()
    (fixed_out, fixed_gap, _), (adaptive_out, adaptive_gap, (latency, bandwidth)) = runs[False], runs[True]
    assert np.array_equal(adaptive_out[0], fixed_out[0]) and np.array_equal(adaptive_out[1], fixed_out[1])
    assert adaptive_out[2] == fixed_out[2]
    # the fixed gap stays; the adaptive one moved with what the reads took, and is its fit's latency x bandwidth
    assert fixed_gap == 8192 and adaptive_gap != 8192
    assert latency >= 0 and bandwidth > 0 and abs(adaptive_gap - latency * bandwidth) <= 1


def test_verbose_completions_print_their_ffn_statistics(converted_model, capfd: pytest.CaptureFixture[str]) -> None:
    model, sidecar = converted_model("llama", "q8_0", threshold=0.05)
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), predictor="gate", **{**CONTEXT, "verbose": True})
    try:
        llm.create_completion("the quick brown fox", max_tokens=4, temperature=0.0)
        first = [line for line in capfd.readouterr().err.splitlines() if line.startswith("neuralink FFN:")]
        assert len(first) == 1 and " reads and " in first[0] and "cache hits/token" in first[0]
        assert llm.ffn_summary() == "neuralink FFN: no layer evaluated"  # each summary covers what is new
        for _ in llm.create_completion("the lazy dog", max_tokens=3, temperature=0.0, stream=True):
            pass
        assert sum(line.startswith("neuralink FFN:") for line in capfd.readouterr().err.splitlines()) == 1
    finally:
        llm.close()


@pytest.mark.parametrize(("io_backend", "cache_policy"), [("uring", "none"), ("pread", "none"), ("pread", "stream")])
def test_injected_read_faults_raise_and_the_model_keeps_working(converted_model, io_backend: str,
                                                                cache_policy: str) -> None:
    # (stream: the regions read ahead on a thread of their own fail, and are read again)
    model, sidecar = converted_model("llama", "q4_1", threshold=0.05)
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), predictor="gate", cache_policy=cache_policy,
                          io_backend=io_backend, **CONTEXT)
    assert llm.engine.io_backend == io_backend
    prompt = tokens_of(llm, 12)
    llm.reset()
    llm.eval(prompt)
    want = np.array(llm.scores[: len(prompt)])
    for kind, message in [("eio", "Input/output error"), ("short_read", "short read")]:
        llm.engine.inject_fault(kind, 0)
        llm.reset()
        with pytest.raises(EngineIOError, match=message):
            llm.eval(prompt)
        assert llm.n_tokens == 0, "a failed evaluation leaves the context as it was"
    llm.engine.inject_fault("none")
    llm.reset()
    llm.eval(prompt)
    assert np.array_equal(np.array(llm.scores[: len(prompt)]), want)
    llm.close()


def test_a_sidecar_of_another_model_is_refused(converted_model) -> None:
    model, _ = converted_model("llama", "f32", seed=0)
    _, other_sidecar = converted_model("llama", "f32", seed=1)
    with pytest.raises(ModelFileError, match="belongs to model id"):
        neuralink.Llama(str(model), sidecar=str(other_sidecar), **CONTEXT)


def test_the_gate_predictor_needs_a_gate_criterion(converted_model) -> None:
    model, sidecar = converted_model("llama", "f32", criterion="magnitude")
    with pytest.raises(neuralink.UnsupportedModelError, match="gate predictor needs"):
        neuralink.Llama(str(model), sidecar=str(sidecar), predictor="gate", **CONTEXT)
    # the default predictor falls back to dense for such a sidecar
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), ffn="engine", **CONTEXT)
    assert llm.engine.predictor == "dense"
    llm.close()


def test_memory_budget_below_the_minimum_is_refused_with_the_minimum_named(converted_model) -> None:
    model, sidecar = converted_model("llama", "q8_0")
    with pytest.raises(MemoryBudgetError, match=r"below the minimum [0-9.]+ MiB"):
        neuralink.Llama(str(model), sidecar=str(sidecar), memory_budget="1MB", **CONTEXT)
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), memory_budget="2GiB", cache_policy="lru", **CONTEXT)
    plan = llm.memory_plan
    assert plan is not None and plan.minimum < plan.budget
    assert llm.engine.cache_stats()["capacity_bytes"] == plan.cache == plan.whole_store_cache > plan.store_bytes
    llm.close()
    with pytest.raises(MemoryBudgetError, match="cannot read memory size"):
        neuralink.Llama(str(model), sidecar=str(sidecar), memory_budget="lots", **CONTEXT)


def test_planned_reads_are_aligned_and_cover_every_needed_neuron() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(
        n_records=st.integers(1, 3000), record_bytes=st.integers(1, 20000), offset_blocks=st.integers(0, 100),
        density=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1), max_gap=st.integers(0, 50),
        max_read=st.sampled_from([0, 4096, 65536, 1 << 20]),
    )
    def check(n_records, record_bytes, offset_blocks, density, seed, max_gap, max_read):
        rng = np.random.default_rng(seed)
        needed = np.flatnonzero(rng.random(n_records) < density).astype(np.uint32)
        offset = offset_blocks * 4096
        reads = _engine.plan_reads(needed, offset, record_bytes, n_records, max_gap, max_read)
        assert (reads[:, 0] % 4096 == 0).all() and (reads[:, 1] % 4096 == 0).all()
        covered = np.zeros(n_records, dtype=bool)
        for read_offset, length, first, count, _ in reads:
            assert read_offset <= offset + first * record_bytes
            assert offset + (first + count) * record_bytes <= read_offset + length
            covered[first : first + count] = True
        assert covered[needed].all()
        assert reads[:, 4].sum() == len(needed)

    check()


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_after_a_read_error_answers_as_a_fresh_model(converted_model, stream: bool) -> None:
    model, sidecar = converted_model("llama", "q4_1", threshold=0.05)
    settings = dict(sidecar=str(sidecar), predictor="gate", cache_policy="none", n_ctx=256, n_batch=8, verbose=False)
    prompt = "the quick brown fox jumps over the lazy dog and the model of the flash memory"

    def complete(llm: neuralink.Llama, max_tokens: int = 8) -> str:
        out = llm(prompt, max_tokens=max_tokens, temperature=0.0, stream=stream)
        return "".join(c["choices"][0]["text"] for c in out) if stream else out["choices"][0]["text"]

    fresh = neuralink.Llama(str(model), **settings)
    want = complete(fresh)
    fresh.reset()
    fresh.ffn_stats(reset=True)
    complete(fresh, max_tokens=1)  # the prompt only: its one token is sampled, never decoded
    prompt_reads = int(fresh.ffn_stats()["reads"].sum())
    fresh.close()
    assert prompt_reads > 4
    # a read of the first prompt batch, of a middle one, and of the first generated token fails
    for after in (0, prompt_reads // 2, prompt_reads):
        llm = neuralink.Llama(str(model), **settings)
        llm.engine.inject_fault("eio", after)
        with pytest.raises(EngineIOError, match="Input/output error"):
            complete(llm)
        assert complete(llm) == want, f"a read failing after {after} reads"
        llm.close()


def poison_down_column(sidecar: Path, il: int, position: int) -> None:
    """Fill one neuron's down column with 0xFF bytes (NaN in f32, f16 and a q8_0/q4 block's scale) and
    re-seal its record checksum: corruption the checksums cannot see, as a buggy writer would leave it."""
    with Sidecar.open(sidecar) as opened:
        layout = opened.layouts[il]
    store, table = (SIDECAR_DOWN_COLUMNS, SIDECAR_DOWN_HASH) if layout.split else (SIDECAR_BUNDLES, SIDECAR_BUNDLE_HASH)
    record_bytes = layout.down_record_bytes if layout.split else layout.record_bytes
    tensors = read_gguf_directory(sidecar).tensors
    records, hashes = (tensors[name.format(bid=il)] for name in (store, table))
    data = bytearray(sidecar.read_bytes())
    start = records.offset + position * record_bytes + layout.down.offset
    data[start:start + layout.down.nbytes] = b"\xff" * layout.down.nbytes
    first = records.offset + position * record_bytes
    record = np.frombuffer(bytes(data[first:first + record_bytes]), dtype=np.uint8)
    at = hashes.offset + 8 * position
    data[at:at + 8] = records_checksums(record.reshape(1, -1)).astype("<u8").tobytes()
    sidecar.write_bytes(bytes(data))
    seal_sidecar(sidecar)


def test_a_non_finite_ffn_output_is_refused_naming_the_layer(converted_model, tmp_path: Path) -> None:
    model, sidecar = converted_model("llama", "q8_0")
    poisoned = tmp_path / sidecar.name
    poisoned.write_bytes(sidecar.read_bytes())
    poison_down_column(poisoned, 1, 3)
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    engine = _engine.Engine(str(model), sidecar=str(poisoned), predictor="dense", cache_policy="none")
    assert np.all(np.isfinite(engine.forward(0, x, "silu")))
    with pytest.raises(EngineNumericError, match="layer 1: the FFN output of token 0 is not finite"):
        engine.forward(1, x, "silu")
    assert np.all(np.isfinite(engine.forward(0, x, "silu"))), "the engine keeps working after the refusal"

    llm = neuralink.Llama(str(model), sidecar=str(poisoned), predictor="dense", cache_policy="none", **CONTEXT)
    with pytest.raises(EngineNumericError, match="layer 1"):
        llm("the quick brown fox", max_tokens=4)
    llm.close()


def test_preload_reads_the_whole_store_at_load_and_changes_no_output(converted_model) -> None:
    model, sidecar = converted_model("llama", "f32")
    runs = {}
    for preload in (True, False):
        llm = neuralink.Llama(str(model), sidecar=str(sidecar), memory_budget="1GB", preload=preload, **CONTEXT)
        assert llm.engine.cache_holds_store
        held_at_load = llm.engine.cache_stats()["entries"]
        logits = batch_logits(llm, tokens_of(llm, 24))
        stats = llm.ffn_stats()
        runs[preload] = (held_at_load, int(stats["bytes_read"].sum()), logits)
        llm.close()
    n_records = 2 * 512  # 2 layers of 512 neurons, one record each
    assert runs[True][0] == n_records and runs[False][0] == 0  # every record at load, or none
    assert runs[True][1] == 0 and runs[False][1] > 0  # nothing left to read, or the store read on demand
    assert np.array_equal(runs[True][2], runs[False][2])


def test_the_auto_cache_policy_keeps_the_whole_store_or_pins_the_hottest_records(converted_model) -> None:
    model, sidecar = converted_model("llama", "f32")
    store = _engine.Engine(str(model), sidecar=str(sidecar)).store_bytes
    whole = neuralink.Llama(str(model), sidecar=str(sidecar), cache_bytes=2 * store, **CONTEXT)
    assert whole.engine.cache_holds_store  # the store arena, read at load
    assert whole.engine.cache_stats()["entries"] == 2 * 512
    whole.close()
    part = neuralink.Llama(str(model), sidecar=str(sidecar), cache_bytes=store // 4, **CONTEXT)
    assert part.engine.cache_policy == "pinned" and not part.engine.cache_holds_store
    stats = part.engine.cache_stats()
    assert stats["entries"] > 0 and stats["used_bytes"] <= store // 4  # pinned at load, within its bytes
    part.close()
    chosen = neuralink.Llama(str(model), sidecar=str(sidecar), cache_bytes=store // 4, cache_policy="lru", **CONTEXT)
    assert chosen.engine.cache_policy == "lru"
    chosen.close()


@pytest.mark.parametrize("predictor", ["gate", "dense"])
def test_streamed_gate_rows_leave_dram_and_change_no_output(converted_model, predictor: str) -> None:
    # the gate predictor is done with the rows after its prediction, the dense one computes the gate products
    # with the up products later: one buffer serves both, released after the last use
    model, sidecar = converted_model("llama", "q8_0", n_layer=4)
    options = dict(sidecar=str(sidecar), predictor=predictor, cache_policy="none")
    resident, streamed = _engine.Engine(str(model), **options), _engine.Engine(str(model), **options)
    gate_layer = 512 * (256 // 32 * 34)  # n_ff rows of n_embd in q8_0 (34-byte blocks of 32)
    streamed.stream_gate_rows(3)
    assert streamed.gate_layers_streamed == 3
    assert resident.resident_bytes - streamed.resident_bytes == 3 * gate_layer
    with pytest.raises(ValueError, match="streamed already"):
        streamed.stream_gate_rows(1)
    x = np.random.default_rng(3).standard_normal((12, 256)).astype(np.float32)
    streamed.take_stats(), resident.take_stats()
    # layers in order twice (the next layer's rows read ahead, wrapping to the first), then out of order
    for il in [0, 1, 2, 3, 0, 1, 2, 3, 2, 0, 0, 3]:
        for rows in (x, x[:1]):
            assert np.array_equal(streamed.forward(il, rows, "silu"), resident.forward(il, rows, "silu"))
    # each evaluation of a streamed layer counts its gate rows as one more read
    for s, r in zip(streamed.take_stats(), resident.take_stats(), strict=True):
        extra = gate_layer if s["il"] < 3 else 0
        assert (s["bytes_read"] - r["bytes_read"], s["reads"] - r["reads"]) == (extra, extra // gate_layer)
    # a failed read of the gate rows is an error of that evaluation only
    streamed.inject_fault("eio", 0)
    with pytest.raises(EngineIOError, match="Input/output error"):
        for il in range(4):
            streamed.forward(il, x, "silu")
    streamed.inject_fault("none")
    for il in [1, 0, 2]:
        assert np.array_equal(streamed.forward(il, x, "silu"), resident.forward(il, x, "silu"))


def test_waiting_for_streamed_gate_rows_counts_as_a_stall(converted_model) -> None:
    # The share of a token spent waiting for reads decides on prompt lookup drafts (55 %); a layer waiting for its
    # streamed gate rows waits for reads as much as one waiting for records (uncounted, Qwen2.5-Coder-1.5B under
    # 530MB showed a share under the rule and completions lost their drafts: 5.4 tok/s instead of 10.1).
    # With the whole store cached no record is waited for: what stall remains is the gate rows'.
    model, sidecar = converted_model("llama", "q8_0", n_layer=4)
    store = _engine.Engine(str(model), sidecar=str(sidecar)).store_bytes
    options = dict(sidecar=str(sidecar), predictor="gate", cache_policy="linking", cache_bytes=2 * store)
    resident, streamed = _engine.Engine(str(model), **options), _engine.Engine(str(model), **options)
    for engine in (resident, streamed):
        engine.fill_cache()
        assert engine.cache_holds_store
    streamed.stream_gate_rows(4)
    x = np.random.default_rng(6).standard_normal((1, 256)).astype(np.float32)
    for engine in (resident, streamed):
        engine.take_stats()
        for il in [0, 2, 1, 3]:  # out of order: the rows are read when the layer asks for them
            engine.forward(il, x, "silu")
    assert all(s["stall_ns"] == 0 for s in resident.take_stats())
    assert all(s["stall_ns"] > 0 for s in streamed.take_stats())


def test_reads_are_submitted_in_the_order_the_layers_need_them(converted_model) -> None:
    # With gate rows and split regions both streamed, a layer submits its down region's reads at its start and
    # the next layer's gate rows after its prediction: the down region it is about to wait for goes first. (When
    # the next gate rows went first, Qwen2.5-Coder-1.5B under 530MB decoded 4.7-5.1 tok/s instead of 5.5-5.7.)
    # The read submitted first after a layer is done fails on purpose: it must be the next layer's down region,
    # which that layer's evaluation then reports, not gate rows of the layer after it.
    model, sidecar = converted_model("llama", "q8_0", n_layer=4, bundle_layout="split")
    engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="stream")
    assert engine.cache_policy == "stream"
    engine.stream_gate_rows(4)
    x = np.random.default_rng(5).standard_normal((1, 256)).astype(np.float32)
    engine.forward(0, x, "silu")
    engine.forward(1, x, "silu")
    engine.inject_fault("eio", 0)
    with pytest.raises(EngineIOError, match=re.escape(sidecar.name)):
        engine.forward(2, x, "silu")
    engine.inject_fault("none")


BUDGETED_RUN = r"""
import json, sys
import numpy as np
import neuralink
model, sidecar, budget, out = sys.argv[1:5]
llm = neuralink.Llama(model, sidecar=sidecar, predictor="gate", cache_policy="none", n_ctx=256, logits_all=True,
                      memory_budget=int(budget) if budget.isdigit() else budget, verbose=False)
tokens = (llm.tokenize(b"the quick brown fox jumps over the lazy dog") * 8)[:24]
llm.eval(tokens)
np.save(out, np.array(llm.scores[: len(tokens)]))
plan = llm.memory_plan
print(json.dumps({"minimum": plan.minimum, "budget": plan.budget, "streamed": llm.engine.gate_layers_streamed}))
"""


def run_budgeted(model: Path, sidecar: Path, budget: str, out: Path) -> dict[str, int]:
    """A fresh process loading `model` under `budget` (gate predictor, no cache): its plan; logits into `out`."""
    result = subprocess.run([sys.executable, "-c", BUDGETED_RUN, str(model), str(sidecar), budget, str(out)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_budget_below_the_resident_gate_rows_streams_the_fewest_layers(converted_model, tmp_path: Path) -> None:
    model, sidecar = converted_model("llama", "f32", n_layer=8, n_ff=2048)
    engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate")
    gate_layer = 2048 * 256 * 4
    plan = _engine.plan_memory(engine, 0, 0, [], 2, 1, 256, 0)
    assert _engine.gate_layers_to_stream(plan, engine) == -1  # nothing fits a budget of 0
    at = lambda budget: _engine.plan_memory(engine, budget, 0, [], 2, 1, 256, 0)  # noqa: E731
    assert _engine.gate_layers_to_stream(at(plan.minimum), engine) == 0
    # one read buffer of a layer's rows and 8 KiB (released after each prediction), paid back by the second
    # streamed layer
    buffer = gate_layer + 8192
    assert _engine.gate_layers_to_stream(at(plan.minimum - 1), engine) == 2
    assert _engine.gate_layers_to_stream(at(plan.minimum - 3 * gate_layer), engine) == 5
    assert _engine.gate_layers_to_stream(at(plan.minimum - 7 * gate_layer), engine) == -1
    # under cache policy auto, where every region read whole pays, as many more as leave room for the region
    # stream's two buffers (which replace the one layer of read scratch the minimum counts)
    room = engine.stream_buffer_bytes - engine.layer_read_bytes
    assert room > 0 and engine.auto_cache_policy(engine.stream_buffer_bytes) == "stream"
    streams = lambda budget: _engine.gate_layers_to_stream(at(budget), engine, room_for_region_stream=True)  # noqa: E731
    assert streams(plan.minimum + room) == 0
    # fits as it is, but without the room: the layers that pay for the gate rows' buffer and the room
    assert streams(plan.minimum) == math.ceil((buffer + room) / gate_layer)
    assert streams(plan.minimum - 3 * gate_layer) == math.ceil((buffer + room) / gate_layer) + 3
    # where the room cannot be made, the fewest that fit
    all_streamed = plan.minimum - 8 * gate_layer + buffer
    assert streams(all_streamed + room - 1) == 8 - (room - 1) // gate_layer
    # what a refusal names: the minimum with every layer's rows streamed (one buffer of a layer and 8 KiB)
    lowest = _engine.minimum_with_gate_rows_streamed(plan, engine)
    assert lowest == plan.minimum - 8 * gate_layer + buffer
    # through neuralink.Llama: a budget the resident rows miss by two layers' worth is accepted, same outputs.
    # Each load in a fresh process, so that both measure the same process memory; no cache, so that both read,
    # and batch, the same records
    options = dict(sidecar=str(sidecar), predictor="gate", cache_policy="none")
    free = run_budgeted(model, sidecar, "2GiB", tmp_path / "free.npy")
    assert free["streamed"] == 0
    tight = run_budgeted(model, sidecar, str(free["minimum"] - 2 * gate_layer), tmp_path / "tight.npy")
    assert tight["streamed"] >= 3 and tight["minimum"] <= tight["budget"]
    assert np.array_equal(np.load(tmp_path / "tight.npy"), np.load(tmp_path / "free.npy"))
    minimum = free["minimum"]
    with pytest.raises(MemoryBudgetError, match=r"below the minimum [0-9.]+ MiB .* with every layer's gate rows"):
        neuralink.Llama(str(model), memory_budget=minimum - 7 * gate_layer, **options, **CONTEXT)
