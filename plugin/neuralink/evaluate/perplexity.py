"""Perplexity of models on a text: compare an original, a converted and a sparse model side by side.

Method: the text is tokenized once (with the model's own BOS convention) and
cut to --max-tokens. Windows of n_ctx tokens start every `stride` tokens; each
window is evaluated from an empty cache with logits at every position, and
scores only the tokens no earlier window scored: the first window all but its
first token, every later one its last `stride` tokens, so each of those has
at least n_ctx - stride tokens of context (stride = n_ctx: non-overlapping
windows, the first token of each unscored). The result is the mean negative
log-likelihood per scored token (nats) and its exponential, the perplexity.

Models after the first are also compared with it token by token on what they
predict: the KL divergence from the first model's next-token distribution
(its 256 most likely tokens exactly, the rest of the vocabulary as one
outcome: never more than the full divergence, and equal to it where 256
tokens hold all but a negligible mass) and how often both rank the same
token first. Both see changes that perplexity averages away: on
Qwen2.5-Coder-1.5B a re-encoding that moved perplexity by 0.2 %, within its
noise, moved the divergence by 40 %, well outside its own (perplexity.md).

With --sweep, one converted model is scored by stock llama.cpp, by the
engine reading every neuron, and by each predictor at densities 1.0, 0.5,
0.3, 0.2, 0.1 (thresholds placed on --calibration text), and the sparsest
density within --budget (default +5 %) of stock is reported per predictor
(neuralink.evaluate.density_sweep, docs/perplexity.md).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from neuralink.errors import OptionError
from neuralink.profile.activations import check_gguf_file
from neuralink.runtime.scoring import Divergence, PredictionRecorder, TopTokens, scoring_windows, window_nll

log = logging.getLogger(__name__)

LlamaFactory = Callable[..., llama_cpp.Llama]


@dataclass(frozen=True)
class PerplexityResult:
    """Token-level likelihood of a text under one model."""

    model: str
    n_ctx: int
    stride: int
    n_windows: int
    token_nll: np.ndarray = field(repr=False)  # float64, one per scored token, in text order
    seconds: float
    tokens: np.ndarray | None = field(default=None, repr=False)  # int64, the text's tokens as scored
    top: TopTokens | None = field(default=None, repr=False)  # kept when asked (the reference of a comparison)
    divergence: Divergence | None = None  # from the reference, when one was given on the same tokens

    @property
    def n_scored(self) -> int:
        return int(self.token_nll.size)

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token, in nats."""
        return float(self.token_nll.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def nll_standard_error(self) -> float:
        """Standard error of the mean NLL, treating tokens as independent (an underestimate)."""
        return float(self.token_nll.std(ddof=1) / math.sqrt(self.n_scored)) if self.n_scored > 1 else math.nan


def perplexity(
    model_path: str | os.PathLike[str],
    text: str,
    *,
    n_ctx: int = 512,
    stride: int | None = None,
    max_tokens: int | None = 4096,
    llama_factory: LlamaFactory = llama_cpp.Llama,
    n_threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    inspect: Callable[[Any], None] | None = None,
    keep_top: int = 0,
    reference: PerplexityResult | None = None,
    **llama_kwargs: Any,
) -> PerplexityResult:
    """Perplexity of `text` under the model at `model_path` (method in the module doc).

    `llama_factory` builds the model: ``llama_cpp.Llama`` (default),
    ``neuralink.Llama`` or any class taking the same arguments; extra keyword
    arguments go to it. `stride` defaults to n_ctx // 2; `max_tokens` caps the
    tokens of the text used (None: all). `progress(windows done, windows)` is
    called after each window; `inspect(model)` once all are scored, before the
    model is closed (e.g. to read ``neuralink.Llama.ffn_stats()``).
    `keep_top` keeps that many most likely next tokens per scored position
    (the result's `top`, for comparing other models with this one); with a
    `reference` that kept them and scored the same tokens, the result's
    `divergence` compares this model's predictions with the reference's. Raises
    ModelFileError for a missing model and ValueError when the text has fewer
    than 2 tokens.
    """
    model_path = check_gguf_file(model_path)  # a directory, a missing file or another format named as such
    stride = stride if stride is not None else max(1, n_ctx // 2)
    llm = llama_factory(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                        n_threads=n_threads, verbose=False, **llama_kwargs)
    try:
        tokens = np.asarray(llm.tokenize(text.encode("utf-8"), add_bos=True), dtype=np.int64)
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        if tokens.size < 2:
            raise OptionError(f"the text has {tokens.size} tokens; perplexity needs at least 2")
        windows = scoring_windows(int(tokens.size), n_ctx, stride)
        if reference is not None and not _same_tokens(reference, tokens, n_ctx, stride):
            log.info("%s: scored other tokens than %s; no divergence", model_path, reference.model)
            reference = None
        start = time.perf_counter()
        nlls: list[np.ndarray] = []
        recorder = PredictionRecorder(keep_top, reference.top if reference is not None else None)
        comparing = 0.0  # seconds spent on top tokens and divergence, not scoring
        for window in windows:
            llm.reset()
            llm.eval(tokens[window.begin:window.end].tolist())
            # row r of the window's logits predicts token begin + r + 1
            rows = slice(window.first_scored - 1 - window.begin, window.end - 1 - window.begin)
            logits = np.asarray(llm.scores[rows], dtype=np.float32)
            targets = tokens[window.first_scored:window.end]
            nlls.append(window_nll(logits, targets))
            compare_start = time.perf_counter()
            recorder.add(logits, targets, nlls[-1])
            comparing += time.perf_counter() - compare_start
            if progress is not None:
                progress(len(nlls), len(windows))
        seconds = time.perf_counter() - start - comparing
        if inspect is not None:
            inspect(llm)
    finally:
        llm.close()
    result = PerplexityResult(
        str(model_path), n_ctx, stride, len(windows), np.concatenate(nlls), seconds, tokens=tokens,
        top=recorder.top, divergence=recorder.divergence,
    )
    log.info("%s: perplexity %.4f over %d tokens (%d windows, %.1f s)", model_path, result.perplexity,
             result.n_scored, result.n_windows, seconds)
    return result


def _same_tokens(reference: PerplexityResult, tokens: np.ndarray, n_ctx: int, stride: int) -> bool:
    return (reference.tokens is not None and reference.n_ctx == n_ctx and reference.stride == stride
            and np.array_equal(reference.tokens, tokens))


def paired_nll_difference(result: PerplexityResult, reference: PerplexityResult) -> tuple[float, float]:
    """Mean per-token NLL difference to `reference` on the same tokens, and its standard error.

    Pairing token by token removes the text's own variance, which dominates
    the unpaired standard errors: a +0.5 % perplexity change is +0.005 nats.
    """
    if result.token_nll.shape != reference.token_nll.shape:
        raise ValueError("paired comparison needs the same scored tokens (same tokenizer, text and windows)")
    diff = result.token_nll - reference.token_nll
    error = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else math.nan
    return float(diff.mean()), error


