"""Scoring a text with a loaded model: the windows that score each token once, their log-likelihoods, and how
far a model's next-token predictions moved from a reference's.

Shared by `neuralink perplexity` and by the conversion's quality search,
which scores one loaded model under several threshold settings.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from neuralink import _engine
from neuralink.errors import OptionError

if TYPE_CHECKING:
    import llama_cpp


REFERENCE_TOP = 256  # next tokens kept per scored position for comparing other models with this one
REST_FLOOR = 1e-6  # probability masses below this are float32 rounding where they come from 1 - a sum


@dataclass(frozen=True)
class TopTokens:
    """A model's most likely next tokens at each scored position, most likely first, with their log-probabilities."""

    tokens: np.ndarray = field(repr=False)  # int64 (scored tokens, k)
    logprobs: np.ndarray = field(repr=False)  # float64 (scored tokens, k)


@dataclass(frozen=True)
class Divergence:
    """How another model's next-token predictions differ from the reference's, per scored token."""

    kld: np.ndarray = field(repr=False)  # float64 KL(reference || model), nats
    same_top: np.ndarray = field(repr=False)  # bool: both rank the same token first

    @property
    def mean_kld(self) -> float:
        return float(self.kld.mean())

    @property
    def kld_standard_error(self) -> float:
        return float(self.kld.std(ddof=1) / math.sqrt(self.kld.size)) if self.kld.size > 1 else math.nan

    @property
    def top_agreement(self) -> float:
        return float(self.same_top.mean())


@dataclass(frozen=True)
class ScoringWindow:
    """Evaluate tokens [begin, end) and score the targets [first_scored, end)."""

    begin: int
    end: int
    first_scored: int


def scoring_windows(n_tokens: int, n_ctx: int, stride: int) -> list[ScoringWindow]:
    """The windows scoring each token of a text at most once (see the module doc).

    With stride < n_ctx every token but the first is scored; with stride ==
    n_ctx the first token of each window is not (it has no context).
    """
    if n_ctx < 2:
        raise OptionError(f"n_ctx must be at least 2, got {n_ctx}")
    if not 1 <= stride <= n_ctx:
        raise OptionError(f"stride must be in 1..n_ctx ({n_ctx}), got {stride}")
    windows: list[ScoringWindow] = []
    scored_until = 1  # token 0 has no context
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + n_ctx, n_tokens)
        first_scored = max(scored_until, begin + 1)
        if first_scored < end:
            windows.append(ScoringWindow(begin, end, first_scored))
        scored_until = end
        begin += stride
    return windows


def window_nll(logits: np.ndarray, targets: np.ndarray, threads: int | None = None) -> np.ndarray:
    """float64 NLL of each row's target: logsumexp(row) - row[target], summed in double (in C++: in numpy, the
    temporaries over a window's 512 x 151936 logits cost about half of llama.cpp's forward pass of it)."""
    rows = np.ascontiguousarray(logits, dtype=np.float32)
    return _engine.token_nll(rows, np.asarray(targets, dtype=np.int64), threads or os.cpu_count() or 1)


def row_log_total(logits: np.ndarray, targets: np.ndarray, nll: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) of each row, float64, from the rows' target NLLs (no second pass over the logits)."""
    return nll + logits[np.arange(len(targets)), targets].astype(np.float64)


def top_tokens(logits: np.ndarray, log_total: np.ndarray, k: int) -> TopTokens:
    """Each row's k most likely tokens, most likely first, with their log-probabilities."""
    k = min(k, logits.shape[1])
    index = np.argpartition(logits, logits.shape[1] - k, axis=1)[:, -k:]
    chosen = np.take_along_axis(logits, index, axis=1)
    order = np.argsort(-chosen, axis=1, kind="stable")
    index = np.take_along_axis(index, order, axis=1)
    logprobs = np.take_along_axis(chosen, order, axis=1).astype(np.float64) - log_total[:, None]
    return TopTokens(index.astype(np.int64), logprobs)


def divergence(logits: np.ndarray, log_total: np.ndarray, reference: TopTokens) -> Divergence:
    """KL(reference || model) per row, over the reference's top tokens and the rest of the vocabulary as one.

    Coarsening the vocabulary never raises a KL divergence, so this is at
    most the full one. The rest's masses come from one minus the top tokens'
    sum, exact only to float32 logits' rounding: below REST_FLOOR they are
    not told apart from it (the rest's term is then left out where the
    reference's is below it, and the model's counts as REST_FLOOR).
    """
    logq = np.take_along_axis(logits, reference.tokens, axis=1).astype(np.float64) - log_total[:, None]
    p = np.exp(reference.logprobs)
    kld = (p * (reference.logprobs - logq)).sum(axis=1)
    p_rest = 1.0 - p.sum(axis=1)
    q_rest = np.maximum(1.0 - np.exp(logq).sum(axis=1), REST_FLOOR)
    rest = p_rest > REST_FLOOR
    kld[rest] += p_rest[rest] * (np.log(p_rest[rest]) - np.log(q_rest[rest]))
    return Divergence(np.maximum(kld, 0.0), np.argmax(logits, axis=1) == reference.tokens[:, 0])


class PredictionRecorder:
    """A pass over a text's windows, window by window: its most likely next tokens (`keep_top` of them, to be a
    later pass's reference) and its divergence from a `reference` pass's (on the same scored tokens)."""

    def __init__(self, keep_top: int = 0, reference: TopTokens | None = None) -> None:
        self.keep_top, self.reference = keep_top, reference
        self._tops: list[TopTokens] = []
        self._moved: list[Divergence] = []
        self._scored = 0

    def add(self, logits: np.ndarray, targets: np.ndarray, nll: np.ndarray) -> None:
        """One window's scored rows: their logits, the tokens they predict and those tokens' NLLs."""
        if self.keep_top or self.reference is not None:
            log_total = row_log_total(logits, targets, nll)
            if self.keep_top:
                self._tops.append(top_tokens(logits, log_total, self.keep_top))
            if self.reference is not None:
                rows = slice(self._scored, self._scored + len(targets))
                self._moved.append(divergence(logits, log_total, TopTokens(self.reference.tokens[rows],
                                                                           self.reference.logprobs[rows])))
        self._scored += len(targets)

    @property
    def top(self) -> TopTokens | None:
        if not self._tops:
            return None
        return TopTokens(np.concatenate([t.tokens for t in self._tops]),
                         np.concatenate([t.logprobs for t in self._tops]))

    @property
    def divergence(self) -> Divergence | None:
        if not self._moved:
            return None
        return Divergence(np.concatenate([d.kld for d in self._moved]),
                          np.concatenate([d.same_top for d in self._moved]))


class TextScorer:
    """One loaded model (with logits_all) and one tokenized text: `score()` gives every scored token's NLL.

    Keeps the model loaded between calls, so that several threshold settings
    of one neuralink.Llama (``engine.set_thresholds``) are scored per load.
    """

    def __init__(self, llm: llama_cpp.Llama, tokens: np.ndarray, n_ctx: int, stride: int | None = None) -> None:
        self.llm, self.tokens = llm, np.asarray(tokens, dtype=np.int64)
        if self.tokens.size < 2:
            raise OptionError(f"the text has {self.tokens.size} tokens; scoring needs at least 2")
        self.windows = scoring_windows(int(self.tokens.size), n_ctx, stride if stride is not None else n_ctx)

    def score(self) -> np.ndarray:
        """float64 NLL of each scored token, in text order."""
        nlls: list[np.ndarray] = []
        for window in self.windows:
            self.llm.reset()
            self.llm.eval(self.tokens[window.begin:window.end].tolist())
            rows = slice(window.first_scored - 1 - window.begin, window.end - 1 - window.begin)
            logits = np.asarray(self.llm.scores[rows], dtype=np.float32)
            nlls.append(window_nll(logits, self.tokens[window.first_scored:window.end]))
        return np.concatenate(nlls)
