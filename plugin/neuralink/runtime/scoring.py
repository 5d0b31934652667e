"""Scoring a text with a loaded model: the windows that score each token once, and their log-likelihoods.

Shared by `neuralink perplexity` and by the conversion's quality search,
which scores one loaded model under several threshold settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from neuralink import _engine
from neuralink.errors import OptionError

if TYPE_CHECKING:
    import llama_cpp


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
