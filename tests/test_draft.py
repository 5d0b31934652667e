"""Speculative decoding through llama-cpp-python's draft_model= on neuralink.Llama (neuralink.runtime.draft)."""

from __future__ import annotations

import numpy as np
import pytest
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

import neuralink
from neuralink import _engine
from neuralink.errors import MemoryBudgetError, OptionError
from neuralink.runtime.draft import (
    DRAFT_TRIAL_SHARE,
    BoundedDraft,
    GatedDraft,
    RecentPromptLookup,
    verification_rows,
)

# repeats itself, so that prompt lookup finds drafts in it and in what the model writes after it
PROMPT = "the quick brown fox jumps over the lazy dog . " * 4
TOKENS = 24


def _completion(llm: neuralink.Llama) -> str:
    return llm(PROMPT, max_tokens=TOKENS, temperature=0.0)["choices"][0]["text"]


def test_drafts_are_verified_in_one_batch_with_the_rows_they_need_and_keep_the_greedy_text(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    plain = neuralink.Llama(str(model), n_ctx=256, verbose=False, ffn="engine")
    try:
        want = _completion(plain)
    finally:
        plain.close()
    # before neuralink.runtime.draft, the context held one logits row and llama.cpp aborted the process here
    llm = neuralink.Llama(str(model), n_ctx=256, verbose=False, ffn="engine",
                          draft_model=LlamaPromptLookupDecoding(num_pred_tokens=3))
    try:
        llm.ffn_stats(reset=True)
        assert _completion(llm) == want
        stats = llm.ffn_stats()
        batches = stats["n_tokens"][stats["n_tokens"] < 40]  # after the prompt's batch
        # drafts were found and verified several tokens at a time, never more than the sampled token and three
        assert batches.max() == 4 and (batches > 1).sum() > 0
        assert llm.scores.shape == (llm.n_batch, llm.n_vocab())  # not n_ctx rows of copied logits
        assert llm.draft_model.max_tokens == 3
    finally:
        llm.close()


def test_logits_all_with_a_draft_is_llama_cpp_python_s_own_path(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    llm = neuralink.Llama(str(model), n_ctx=256, verbose=False, logits_all=True, ffn="engine",
                          draft_model=LlamaPromptLookupDecoding(num_pred_tokens=3))
    try:
        out = llm(PROMPT, max_tokens=8, temperature=0.0, logprobs=2)
        assert len(out["choices"][0]["logprobs"]["tokens"]) == 8
        assert llm.scores.shape == (256, llm.n_vocab())
    finally:
        llm.close()


def test_logprobs_with_a_draft_and_no_logits_all_name_what_to_pass(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    llm = neuralink.Llama(str(model), n_ctx=256, verbose=False, ffn="engine",
                          draft_model=LlamaPromptLookupDecoding(num_pred_tokens=3))
    try:
        # stock turns logits_all on for a draft; neuralink keeps the sampled rows only, and says what to do
        with pytest.raises(ValueError, match=r"logprobs needs logits_all=True when completions verify drafts"):
            llm(PROMPT, max_tokens=4, temperature=0.0, logprobs=2)
        assert llm(PROMPT, max_tokens=4, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def test_a_draft_is_cut_to_the_rows_the_context_holds() -> None:
    class Long(LlamaPromptLookupDecoding):
        def __call__(self, input_ids, /, **kwargs):
            return np.arange(40, dtype=np.intc)

    assert verification_rows(Long(num_pred_tokens=10), n_batch=512) == 11
    assert verification_rows(Long(num_pred_tokens=10), n_batch=8) == 8
    assert verification_rows(object(), n_batch=512) == 11  # a draft model that does not say: 10 proposals
    assert list(BoundedDraft(Long(), 7)(np.zeros(3, dtype=np.intc))) == list(range(7))


def test_prompt_lookup_drafts_where_every_token_reads_the_records_whole(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    streamed = neuralink.Llama(str(model), n_ctx=256, verbose=False, cache_policy="stream")
    try:
        assert streamed.engine.streams_regions and isinstance(streamed.draft_model, GatedDraft)
        assert streamed.draft_model.max_tokens == 4
        assert streamed.stall_share is None  # nothing decoded yet: no share, and no proposals on a guess
        text = _completion(streamed)
        # this tiny model's reads (from the page cache) take little of a token: measured, and no proposals made
        assert 0.0 <= streamed.stall_share < DRAFT_TRIAL_SHARE
        assert streamed._draft_gate.drafted_seconds is None
        # as where the reads take the token's time: tried at once, then timed against single tokens
        streamed._draft_gate = streamed.draft_model.gate = _engine.DraftGate(trial_share=0.0)
        streamed.ffn_stats(reset=True)
        assert _completion(streamed) == text
        assert streamed.ffn_stats()["n_tokens"][2:].max() == 5  # the sampled token and four proposals
        # the verifications reached the gate (their seconds per token produced), timed by eval
        assert streamed._draft_gate.drafted_seconds is not None
    finally:
        streamed.close()
    for options in (dict(cache_policy="stream", prompt_lookup=0), {}):  # turned off; the whole store cached
        llm = neuralink.Llama(str(model), n_ctx=256, verbose=False, **options)
        try:
            assert llm.draft_model is None and _completion(llm) == text
        finally:
            llm.close()
    asked = neuralink.Llama(str(model), n_ctx=256, verbose=False, prompt_lookup=2)  # any cache policy
    try:
        assert asked.draft_model.max_tokens == 2 and _completion(asked) == text
    finally:
        asked.close()


def test_a_bad_prompt_lookup_is_refused(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    for bad in (-1, 2.5, True):
        with pytest.raises(OptionError, match="prompt_lookup="):
            neuralink.Llama(str(model), n_ctx=256, verbose=False, prompt_lookup=bad)


def test_a_budget_refused_with_logits_all_names_them(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    with pytest.raises(MemoryBudgetError, match=r"MiB of every position's logits \(logits_all\)"):
        neuralink.Llama(str(model), n_ctx=256, verbose=False, logits_all=True, memory_budget="20MB")


@pytest.mark.parametrize("text, proposals, want", [
    ([7, 8, 1, 2, 3, 7, 8, 5, 6, 4, 7, 8], 2, [5, 6]),  # the most recent earlier "7 8", not the first
    ([7, 8, 1, 2, 3, 7, 8, 5, 6, 4, 7, 8], 10, [5, 6, 4, 7, 8]),  # up to the end of the text, not past it
    ([3, 9, 4, 5, 1, 9], 3, [4, 5, 1]),  # "1 9" never occurred: the last token alone
    ([1, 2, 3, 4], 4, []),
    ([5, 5], 4, [5]),
    ([5], 4, []),
])
def test_prompt_lookup_continues_the_most_recent_earlier_occurrence(text: list[int], proposals: int,
                                                                    want: list[int]) -> None:
    # the same cases as neuralink-run's lookup (cpp/tests/test_prompt_lookup.cpp): both propose alike
    got = RecentPromptLookup(num_pred_tokens=proposals)(np.array(text, dtype=np.intc))
    assert got.dtype == np.intc and got.tolist() == want
