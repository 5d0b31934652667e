"""Speculative decoding (llama-cpp-python's ``draft_model=``) with the logits rows it samples, no more.

llama-cpp-python verifies a draft's tokens in one batch. To sample each of them it asks llama.cpp for the logits
of every position of every batch (it turns ``logits_all`` on) and copies them into an n_ctx x n_vocab array: 311 MB
at n_ctx 512 on Qwen2.5-Coder's 152k vocabulary, and an output buffer of n_batch rows. ``neuralink.Llama`` asks for
the rows a verification samples instead, the last 1 + draft positions of a batch, held in llama.cpp's output buffer
(``n_outputs_max``) and never copied; the draft is cut to what those rows verify.

Under a memory cap this is where drafting pays most: the engine reads a layer's records once per batch, so a
verification of several tokens costs the bytes of one (docs/engine.md, "Drafts").
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt
from llama_cpp.llama_speculative import LlamaDraftModel

from neuralink import _engine
from neuralink.errors import OptionError

# its messages are neuralink.Llama's
logger = logging.getLogger("neuralink.runtime.llama")

# tokens a draft model proposes when it does not say (llama-cpp-python's LlamaPromptLookupDecoding default)
DEFAULT_DRAFT_TOKENS = 10
# prompt lookup's proposals where neuralink.Llama drafts by itself (prompt_lookup=None under cache policy stream),
# and the share of a decoded token's time spent waiting for reads from which it tries them (then they are made
# while they give tokens faster than single decodes: _engine.DraftGate): the engine's values, which neuralink-run
# uses too (cpp/include/neuralink/prompt_lookup.h)
AUTO_PROPOSALS: int = _engine.AUTO_PROPOSALS
DRAFT_TRIAL_SHARE: float = _engine.DRAFT_TRIAL_SHARE


class RecentPromptLookup(LlamaDraftModel):
    """Prompt lookup: up to `num_pred_tokens` tokens that followed the most recent earlier occurrence of the last
    `max_ngram` tokens of the text, else of fewer (down to the last token); none if none occurs earlier.

    llama-cpp-python's LlamaPromptLookupDecoding continues the first occurrence instead. On Python source the most
    recent one confirms more of its proposals (measured in docs/benchmarks.md, seventeenth pass), and it is what
    neuralink-run proposes: both call the engine's (cpp/src/prompt_lookup.cpp)."""

    def __init__(self, num_pred_tokens: int, max_ngram: int = 2) -> None:
        self.num_pred_tokens = num_pred_tokens
        self.max_ngram = max_ngram

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        return _engine.prompt_lookup(input_ids, self.num_pred_tokens, self.max_ngram).astype(np.intc)


class BoundedDraft(LlamaDraftModel):
    """A draft model's proposals cut to `max_tokens`: the logits rows the context holds verify no more."""

    def __init__(self, draft: LlamaDraftModel, max_tokens: int) -> None:
        self.draft = draft
        self.max_tokens = max_tokens

    @property
    def num_pred_tokens(self) -> int:  # as prompt lookup names it: a Llama rebuilt from its state asks the same rows
        return self.max_tokens

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        return np.asarray(self.draft(input_ids, **kwargs), dtype=np.intc)[: self.max_tokens]


class GatedDraft(BoundedDraft):
    """A BoundedDraft whose proposals are verified only where `gate` (an ``_engine.DraftGate``, neuralink-run's
    rule) says they pay: tried once waiting for reads takes DRAFT_TRIAL_SHARE of a single decoded token, then made
    while a verification's seconds per token produced stay below a single decode's. The Llama reports its single
    decodes to the gate and every eval of several tokens to ``evaluated``; the tokens a verification produced (the
    proposals confirmed and the token after them) are known at the next call, from where generation stands."""

    def __init__(self, draft: LlamaDraftModel, max_tokens: int, gate: _engine.DraftGate) -> None:
        super().__init__(draft, max_tokens)
        self.gate = gate
        self._expected: tuple[int, int] | None = None  # (position, tokens) of the eval that verifies the proposals
        self._verified: tuple[int, int, float] | None = None  # that eval: (position, tokens, seconds)

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        position = len(input_ids) - 1  # the sampled token's: the next eval starts there
        self._settle(position)
        proposals = super().__call__(input_ids, **kwargs)
        if proposals.size == 0 or not self.gate.draft():
            return np.zeros(0, dtype=np.intc)
        self._expected = (position, 1 + proposals.size)
        return proposals

    def evaluated(self, position: int, n_tokens: int, seconds: float) -> None:
        """The Llama evaluated n_tokens from `position` in `seconds`: the verification of the last proposals when
        it is the eval they expected (llama-cpp-python may cut a draft to the context's room: then not timed)."""
        if self._expected == (position, n_tokens):
            self._verified = (position, n_tokens, seconds)
        self._expected = None

    def _settle(self, position: int) -> None:
        if self._verified is not None:
            start, fed, seconds = self._verified
            self._verified = None
            if 1 <= position - start <= fed:  # else generation started over elsewhere: not this pass's doing
                self.gate.observe_verification(seconds, position - start)


def verification_rows(draft: LlamaDraftModel, n_batch: int) -> int:
    """Logits rows one verification needs: the sampled token and the draft's proposals (its ``num_pred_tokens``,
    as llama-cpp-python's prompt lookup names it, else DEFAULT_DRAFT_TOKENS), at most one micro-batch."""
    proposed = getattr(draft, "num_pred_tokens", DEFAULT_DRAFT_TOKENS)
    return _rows(proposed if _is_token_count(proposed) else DEFAULT_DRAFT_TOKENS, n_batch)


def prompt_lookup_rows(prompt_lookup: int | None, n_batch: int) -> int:
    """Logits rows for neuralink.Llama's prompt_lookup= (None: AUTO_PROPOSALS), at most one micro-batch."""
    if prompt_lookup is not None and not _is_token_count(prompt_lookup):
        raise OptionError(f"prompt_lookup={prompt_lookup!r}: expected a number of tokens, 0 or more, or None")
    return _rows(AUTO_PROPOSALS if prompt_lookup is None else prompt_lookup, n_batch)


def _is_token_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rows(proposals: int, n_batch: int) -> int:
    """The sampled token and `proposals`, at most one micro-batch (and at least the sampled token)."""
    return max(1, min(1 + proposals, n_batch))


def eval_with_sampled_rows(llm: Any, tokens: list[int] | Any, rows: int) -> None:
    """``llama_cpp.Llama.eval`` asking llama.cpp for the logits of the last `rows` positions only (sampling reads
    them from the context) and copying none of them into ``llm.scores``."""
    llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
    for start in range(0, len(tokens), llm.n_batch):
        batch = tokens[start:start + llm.n_batch]
        n_past, n_tokens = llm.n_tokens, len(batch)
        llm._batch.set_batch(batch=batch, n_past=n_past, logits_all=False)  # the last position's logits
        if start + n_tokens == len(tokens):
            for i in range(max(0, n_tokens - rows), n_tokens):
                llm._batch.batch.logits[i] = True
        llm._ctx.decode(llm._batch)
        llm.input_ids[n_past:n_past + n_tokens] = batch
        llm.n_tokens += n_tokens
        llm._requires_eval = False


class PromptLookupDrafts:
    """neuralink.Llama's own prompt lookup drafts (its prompt_lookup argument; a mixin before llama_cpp.Llama: it
    needs the Llama's ``engine``, ``model_path``, ``draft_model``, ``_draft_gate`` and ``_verification_rows``)."""

    def _use_prompt_lookup(self, proposals: int, automatic: bool) -> None:
        """Decode with prompt lookup drafts of `proposals` tokens: asked for, or (automatic) where every token
        reads the layers' records whole ("stream") and while they give tokens faster than single (GatedDraft)."""
        if automatic and not self.engine.streams_regions:
            self._verification_rows = 0  # the records are cached or read sparsely: drafts would cost compute
            return
        lookup = RecentPromptLookup(num_pred_tokens=proposals)
        if automatic:
            self.draft_model = GatedDraft(lookup, proposals, self._draft_gate)
        else:
            self.draft_model = BoundedDraft(lookup, proposals)
        self.draft_model.from_prompt_lookup = True  # made again from prompt_lookup= when unpickled
        logger.info("%s: prompt lookup drafts of up to %d tokens, each verified in one batch that reads the records "
                    "once%s (prompt_lookup=0 turns them off)", self.model_path, proposals,
                    f", tried where reads take {DRAFT_TRIAL_SHARE:.0%} of a token or more and made while they give "
                    "tokens faster than single decodes" if automatic else "")
