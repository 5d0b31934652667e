"""Who computes the FFNs (neuralink.Llama's ffn=): llama.cpp itself where the whole model fits the memory there is
and nobody asked for the engine, the engine otherwise."""

from __future__ import annotations

import pickle

import llama_cpp
import numpy as np
import pytest
from test_convert import random_placement

import neuralink
from neuralink import _engine
from neuralink.convert.writer import convert_model
from neuralink.errors import OptionError
from neuralink.runtime import memory_budget

PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def converted_smollm2(smollm2_path, tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2 converted (a random placement): real logits, unlike the synthetic models' near-zero ones."""
    output = tmp_path_factory.mktemp("ffn") / "smollm2.neuralink.gguf"
    convert_model(smollm2_path, random_placement(smollm2_path), output)
    return output


def greedy(llm: llama_cpp.Llama, n: int = 12) -> list[int]:
    llm.reset()
    llm.eval(llm.tokenize(PROMPT.encode()))
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def logits(llm: llama_cpp.Llama) -> np.ndarray:
    llm.reset()
    llm.eval(llm.tokenize(PROMPT.encode()))
    return np.array(llm.scores[llm.n_tokens - 1])


def test_a_converted_model_that_fits_in_memory_runs_llama_cpps_ffn_as_stock_does(converted_smollm2) -> None:
    model = converted_smollm2
    # (logits_all: llama-cpp-python keeps the scores of the positions it evaluates only then)
    stock = llama_cpp.Llama(str(model), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    try:
        want_logits, want_tokens = logits(stock), greedy(stock)
    finally:
        stock.close()
    llm = neuralink.Llama(str(model), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    try:
        assert llm.ffn == "llama"
        got = logits(llm)
        assert np.abs(want_logits).max() > 1.0  # (real logits)
        np.testing.assert_array_equal(got, want_logits)  # no hook: llama.cpp's own graph, bit for bit
        assert greedy(llm) == want_tokens and len(set(want_tokens)) > 1
        stats = llm.ffn_stats()
        assert stats.size == 0 and "bytes_read" in stats.dtype.names  # the engine's fields, no rows
        assert "llama.cpp" in llm.ffn_summary()
        with pytest.raises(RuntimeError, match="ffn='engine'"):
            llm.engine  # noqa: B018
        again = pickle.loads(pickle.dumps(llm))  # llama-cpp-python's pickling loads it again, the same way
        try:
            assert again.ffn == "llama"
        finally:
            again.close()
    finally:
        llm.close()
    with pytest.raises(RuntimeError, match="closed"):
        llm.eval([1])


@pytest.mark.parametrize("option", [dict(ffn="engine"), dict(predictor="gate"), dict(memory_budget="4GB"),
                                    dict(cache_policy="pinned"), dict(prompt_lookup=2)])
def test_the_engine_runs_when_asked_for_or_given_its_own_options(converted_model, option: dict) -> None:
    model, _ = converted_model("llama", "q8_0")
    llm = neuralink.Llama(str(model), n_ctx=128, n_threads=2, verbose=False, **option)
    try:
        assert llm.ffn == "engine" and llm.engine.sparse
        llm.eval(llm.tokenize(PROMPT.encode()))
        assert llm.ffn_stats().size > 0
    finally:
        llm.close()


def test_a_model_larger_than_the_memory_there_is_runs_in_the_engine(converted_model, monkeypatch) -> None:
    model, _ = converted_model("llama", "q8_0")
    rss = memory_budget.resident_bytes()
    need = _engine.llama_whole_need(str(model), rss, 128)
    # what the process may use, just short of what stock llama.cpp would hold (from available memory, not a
    # cgroup's limit, which would also bound the engine), then just enough
    monkeypatch.setattr(memory_budget, "automatic_budget", lambda: (need - (8 << 20), "available memory", False))
    llm = neuralink.Llama(str(model), n_ctx=128, n_threads=2, verbose=False)
    try:
        assert llm.ffn == "engine"
    finally:
        llm.close()
    monkeypatch.setattr(memory_budget, "automatic_budget", lambda: (need + (64 << 20), "available memory", False))
    llm = neuralink.Llama(str(model), n_ctx=128, n_threads=2, verbose=False)
    try:
        assert llm.ffn == "llama"
    finally:
        llm.close()


def test_the_whole_model_need_counts_every_tensor_the_kv_cache_and_all_logits(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    from gguf import GGUFReader

    tensors = sum(int(t.n_bytes) for t in GGUFReader(str(model)).tensors)
    small, large = (_engine.llama_whole_need(str(model), 0, n) for n in (256, 4096))
    assert small >= tensors and large > small  # more context, more KV cache
    assert _engine.llama_whole_need(str(model), 0, 256, all_logits=True) > small


def test_llama_ffn_refuses_the_engines_options_and_unknown_values(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    with pytest.raises(OptionError, match="predictor, memory_budget"):
        neuralink.Llama(str(model), ffn="llama", predictor="gate", memory_budget="1GB", verbose=False)
    with pytest.raises(OptionError, match="ffn='fast'"):
        neuralink.Llama(str(model), ffn="fast", verbose=False)


def test_llama_ffn_runs_a_model_that_was_never_converted(synthetic_model) -> None:
    source = synthetic_model("llama", "q8_0")
    llm = neuralink.Llama(str(source), ffn="llama", n_ctx=128, n_threads=2, verbose=False)
    try:
        assert llm.ffn == "llama" and llm("the model", max_tokens=2, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
