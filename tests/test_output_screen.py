"""The output screen (output_screen.h): under a budget a coarse copy of an untied output matrix ranks the
vocabulary, and the rows within a margin of its maximum are multiplied exactly, as llama.cpp multiplies them."""

from __future__ import annotations

import numpy as np
import pytest

import neuralink
from neuralink import _engine
from neuralink.errors import OptionError, UnsupportedModelError
from neuralink.evaluate.bench.dense import last_logits
from neuralink.runtime import output_screen as screen_module

PROMPT = "the quick brown fox jumps over the lazy dog and the model reads the flash memory of one layer at a time"


@pytest.fixture(scope="module")
def q6k_output(converted_model):
    """A converted qwen2 model whose untied output matrix is q6_K, as Q4_K_M models store theirs."""
    return converted_model("qwen2", "q4_K", output_type="q6_K")


def decoded_logits(model, **options) -> tuple[np.ndarray, dict | None]:
    """The logits of each PROMPT token decoded one at a time through the engine (one row of logits a graph, as
    in generation), and the screen's figures."""
    llm = neuralink.Llama(str(model), ffn="engine", n_ctx=128, verbose=False, **options)
    try:
        rows = []
        for token in llm.tokenize(PROMPT.encode()):
            llm.eval([token])
            rows.append(np.array(last_logits(llm)))
        return np.array(rows), llm.engine.output_screen
    finally:
        llm.close()


def batch_logits(model, **options) -> np.ndarray:
    """Every position's logits of PROMPT evaluated as one batch (logits_all, as perplexity does)."""
    llm = neuralink.Llama(str(model), ffn="engine", n_ctx=128, logits_all=True, verbose=False, **options)
    try:
        tokens = llm.tokenize(PROMPT.encode())
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)])
    finally:
        llm.close()


def test_the_likely_rows_are_llama_cpp_s_and_the_rest_the_copy_s(q6k_output, monkeypatch):
    # a margin that leaves most of the synthetic vocabulary (logits of sd ~2) to the coarse copy
    monkeypatch.setattr(screen_module, "OUTPUT_SCREEN_MARGIN", 2.0)
    model, _ = q6k_output
    plain, none = decoded_logits(model, output_screen=False)
    screened, figures = decoded_logits(model, output_screen=True)
    assert none is None and figures is not None
    n_tokens, n_vocab = plain.shape
    assert figures["tokens"] == n_tokens and figures["coarse_type"] == "q3_K"
    # the screen screens: most rows stay coarse; the likely ones repeat, and the row cache keeps some of them
    assert figures["exact_rows"] < 0.25 * n_tokens * n_vocab
    assert 0 < figures["rows_read"] < figures["exact_rows"]
    exact = screened == plain
    for t in range(n_tokens):
        top = int(np.argmax(plain[t]))
        assert int(np.argmax(screened[t])) == top, f"position {t}: greedy decoding took another token"
        # the likely rows bit for bit what llama.cpp computes (the same ggml kernel on the same bytes)
        likely = plain[t] >= plain[t, top] - 1.0
        assert exact[t, likely].all(), f"position {t}: a row within 1 nat of the top is not exact"
    # the rest are the q3_K copy's: near, not equal (its error ~15 % of the logits' spread on these random rows;
    # another row's logit would be as far off as the spread itself)
    assert not exact.all()
    coarse = (screened - plain)[~exact]
    assert np.sqrt(np.mean(coarse**2)) < 0.25 * plain.std()
    # a batch's rows: llama.cpp multiplies several rows of logits with another kernel, which rounds differently
    plain, screened = batch_logits(model, output_screen=False), batch_logits(model, output_screen=True)
    assert (np.argmax(plain, axis=1) == np.argmax(screened, axis=1)).all()
    likely = plain >= plain.max(axis=1, keepdims=True) - 1.0
    assert np.abs(screened - plain)[likely].max() < 1e-4


def test_a_budget_counts_the_copy_in_place_of_the_matrix(q6k_output):
    model, _ = q6k_output
    plans, locked, figures = {}, {}, None
    for screen in (False, True):
        llm = neuralink.Llama(str(model), memory_budget="1GiB", output_screen=screen, n_ctx=128, verbose=False)
        try:
            plans[screen] = llm.memory_plan.to_dict()
            locked[screen], why = _engine.lock_every_token_weights(llm.engine)
            assert why == ""
            if screen:
                figures = llm.engine.output_screen
                assert llm.engine.output_taken
                assert llm(PROMPT, max_tokens=4, temperature=0.0)["choices"][0]["text"]
        finally:
            llm.close()
    assert figures is not None and figures["resident_bytes"] < figures["matrix_bytes"]
    # the matrix leaves the weights llama.cpp reads every token (and is not locked); its copy is the engine's
    assert plans[False]["non_ffn_weights"] - plans[True]["non_ffn_weights"] == figures["matrix_bytes"]
    assert plans[True]["engine_resident"] - plans[False]["engine_resident"] == figures["resident_bytes"]
    assert locked[False] - locked[True] >= figures["matrix_bytes"] - 8192


def test_auto_screens_under_a_budget_only(q6k_output):
    model, _ = q6k_output
    budgeted = neuralink.Llama(str(model), memory_budget="1GiB", n_ctx=128, verbose=False)
    free = neuralink.Llama(str(model), ffn="engine", n_ctx=128, verbose=False)
    try:
        assert budgeted.engine.output_screen is not None and budgeted.engine.output_taken
        assert free.engine.output_screen is None
        # the same greedy text either way on this model (the top rows are exact)
        text = [llm(PROMPT, max_tokens=12, temperature=0.0)["choices"][0]["text"] for llm in (budgeted, free)]
        assert text[0] == text[1]
    finally:
        budgeted.close()
        free.close()


def test_a_matrix_the_copy_cannot_stand_in_for_is_left_to_llama_cpp(converted_model):
    model, _ = converted_model("qwen2", "q4_K")  # an f16 output matrix: its activations are not q8_K's
    with pytest.raises(UnsupportedModelError, match="output_screen=True.*f16"):
        neuralink.Llama(str(model), output_screen=True, n_ctx=128, verbose=False)
    llm = neuralink.Llama(str(model), memory_budget="1GiB", n_ctx=128, verbose=False)
    try:
        assert llm.engine.output_screen is None
        assert llm(PROMPT, max_tokens=4, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def test_a_bad_choice_is_named(q6k_output):
    model, _ = q6k_output
    with pytest.raises(OptionError, match="output_screen='yes'"):
        neuralink.Llama(str(model), output_screen="yes", memory_budget="1GiB", n_ctx=128, verbose=False)
