"""A neuralink.Llama lives and dies as a llama_cpp.Llama does: freed when its last reference goes, collected in
any order with what it holds, refusing use after close() with an error rather than a crash."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import neuralink
from neuralink.errors import MemoryBudgetError
from neuralink.runtime.memory_budget import memory_budget_bytes


def _run(script: str, model: Path) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh interpreter (a crash must not take the test run with it), MODEL bound to `model`."""
    code = f"import gc, weakref, neuralink\nMODEL = {str(model)!r}\n" + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_each_completion_frees_the_sampler_it_replaced(converted_model) -> None:
    # llama-cpp-python's samplers are reference cycles holding the chain's C memory (0.5 MiB each on SmolLM2):
    # stock frees them only at a full collection, rare in a long-lived server, which grew by one per request
    model, _ = converted_model("llama", "q8_0")
    done = _run("""
        import llama_cpp
        from llama_cpp._internals import LlamaSampler
        gc.disable()
        def unfreed(): return sum(isinstance(o, LlamaSampler) and o.sampler is not None for o in gc.get_objects())
        for cls in (llama_cpp.Llama, neuralink.Llama):
            llm = cls(MODEL, n_ctx=128, verbose=False)
            for seed in range(6):
                llm("the quick brown fox", max_tokens=3, temperature=0.8, seed=seed)
            print(cls.__module__, unfreed(), end=" ")
            llm.close()
            print(unfreed())
            del llm
            gc.collect()
    """, model)
    assert done.returncode == 0, done.stderr[-2000:]
    stock, ours = done.stdout.splitlines()
    assert stock.split()[1:] == ["6", "6"], stock  # what the test guards against (5 dropped, the last one held)
    assert ours.split()[1:] == ["1", "0"], ours  # the last completion's, freed by close()


@pytest.mark.parametrize("budget", [None, "2GB"])
def test_the_last_reference_frees_the_model_at_once(converted_model, budget: str | None) -> None:
    model, _ = converted_model("llama", "q8_0")
    done = _run(f"""
        gc.disable()  # reference counting alone, as for a stock llama_cpp.Llama
        llm = neuralink.Llama(MODEL, n_ctx=128, verbose=False, memory_budget={budget!r})
        llm("the quick brown fox", max_tokens=4)
        alive = weakref.ref(llm)
        del llm
        assert alive() is None, "still alive after its last reference went: a reference cycle"
        print("freed")
    """, model)
    assert done.returncode == 0 and "freed" in done.stdout, done.stderr[-2000:]


def test_a_model_in_a_reference_cycle_is_collected_in_any_order(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    # the collector finalizes a cycle's objects in its own order: llama-cpp-python's context may be freed before
    # the Llama detaches the hook from it (a detach from the freed context ended the process with SIGSEGV);
    # first that order, forced, then cycles left to the collector
    done = _run("""
        llm = neuralink.Llama(MODEL, n_ctx=128, verbose=False)
        llm("the quick brown fox", max_tokens=2)
        llm._ctx.close()
        llm.close()
        for _ in range(3):
            llm = neuralink.Llama(MODEL, n_ctx=128, verbose=False)
            llm("the quick brown fox", max_tokens=2)
            llm.me = llm
            del llm
            assert gc.collect() > 0
        print("collected")
    """, model)
    assert done.returncode == 0 and "collected" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_using_a_closed_model_is_an_error_not_a_crash(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    done = _run("""
        llm = neuralink.Llama(MODEL, n_ctx=128, verbose=False)
        tokens = llm.tokenize(b"the quick brown fox")
        llm.close()
        llm.close()  # twice: nothing more to do
        try:
            llm.create_completion(tokens, max_tokens=4)
        except RuntimeError as e:
            print("refused:", e)
    """, model)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "refused: this Llama is closed" in done.stdout


def test_a_tokenizer_only_model_tokenizes_as_stock_and_refuses_to_generate(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    # vocab_only=True (a tokenizer, a chat template): the engine's hook attached to a context without compute
    # backends had ended the process in llama.cpp (GGML_ASSERT)
    done = _run("""
        import llama_cpp, pickle
        llm = neuralink.Llama(MODEL, vocab_only=True, verbose=False)
        stock = llama_cpp.Llama(MODEL, vocab_only=True, verbose=False)
        text = b"the quick brown fox"
        assert llm.tokenize(text) == stock.tokenize(text) and llm.detokenize(llm.tokenize(text)) == text
        again = pickle.loads(pickle.dumps(llm))
        assert again.tokenize(text) == stock.tokenize(text)
        try:
            llm("the quick brown fox", max_tokens=4)
        except RuntimeError as e:
            print("refused:", e)
        llm.close()
    """, model)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "refused: this Llama was loaded with vocab_only=True: the tokenizer only" in done.stdout


def test_embeddings_under_a_budget_take_their_whole_text(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    # under a budget n_batch defaults to 64 to leave room for the cache, but an embedding's whole input must fit
    # one batch: llama-cpp-python would cut it to 64 tokens without a word
    llm = neuralink.Llama(str(model), n_ctx=256, verbose=False, embedding=True, memory_budget="2GB")
    try:
        text = "the quick brown fox jumps over the lazy dog . " * 10
        n_tokens = len(llm.tokenize(text.encode()))
        assert n_tokens > 64
        assert llm.n_batch == 256  # llama-cpp-python's 512, bounded by n_ctx
        assert len(llm.embed(text)) == n_tokens
    finally:
        llm.close()


def test_a_whole_number_float_budget_is_read_as_bytes() -> None:
    assert memory_budget_bytes(180e6) == 180_000_000
    with pytest.raises(MemoryBudgetError, match="cannot read memory size"):
        memory_budget_bytes(1.5)


def test_a_refused_budget_says_what_the_process_already_held(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    # e.g. `llm = neuralink.Llama(...)` again in a notebook: the first model is still alive while the second loads
    done = _run("""
        from neuralink.errors import MemoryBudgetError
        first = neuralink.Llama(MODEL, n_ctx=128, verbose=False)
        held = bytearray(160 << 20)  # and whatever else the process holds
        try:
            neuralink.Llama(MODEL, n_ctx=128, verbose=False, memory_budget="150MB")
        except MemoryBudgetError as e:
            print(e)
    """, model)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"this process held [0-9.]+ MiB before the model, and all of it counts: another model it "
                     r"still holds \(close\(\) it", done.stdout), done.stdout[-2000:]


def test_a_long_lived_model_keeps_its_counters_bounded_and_its_summaries_whole(converted_model, monkeypatch) -> None:
    # a server's model lives through many completions: every layer evaluation's counters had been kept (~2.9 KB a
    # token on Qwen2.5-Coder-1.5B), past any memory budget; the summaries now add up running totals
    from neuralink.runtime import ffn_report

    model, _ = converted_model("llama", "q8_0")
    counts = re.compile(r"neuralink FFN: (\d+) tokens, (\d+) neurons active/layer/token \(predicted (\d+)\)")
    summaries = {}
    for kept in (None, 3):
        llm = neuralink.Llama(str(model), n_ctx=256, verbose=False, ffn="engine")
        if kept:
            monkeypatch.setattr(ffn_report, "FFN_STATS_KEPT_ROWS", kept * llm.engine.n_layer)
        llm("the quick brown fox", max_tokens=24, temperature=0.0)
        first = counts.match(llm.ffn_summary())
        llm("over the lazy dog and", max_tokens=12, temperature=0.0)
        second = counts.match(llm.ffn_summary())
        assert first and second
        summaries[kept] = (first.groups(), second.groups())
        rows = llm.ffn_stats()
        if kept:  # the most recent rows: the last decoded tokens' layers
            assert len(rows) == kept * llm.engine.n_layer
            assert (rows["n_tokens"][-kept * llm.engine.n_layer:] == 1).all()
        llm.close()
    assert summaries[3] == summaries[None]
    assert int(summaries[None][0][0]) > 24 and 12 < int(summaries[None][1][0]) < 24  # each covers its completion


def test_the_engine_keeps_a_bounded_number_of_untaken_counters(converted_model) -> None:
    # llama-cpp-python's embed() decodes without neuralink.Llama's eval, which takes the engine's counters: a
    # process serving embeddings had kept every layer evaluation's in the engine
    from neuralink import _engine

    model, sidecar = converted_model("llama", "q8_0")
    engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="none")
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    for _ in range(_engine.STATS_KEPT + 10):
        engine.forward(0, x, "silu")
    stats = engine.take_stats()
    assert _engine.STATS_KEPT // 2 <= len(stats) <= _engine.STATS_KEPT
    assert len(engine.take_stats()) == 0
