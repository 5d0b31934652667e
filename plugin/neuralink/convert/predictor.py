"""Fit and evaluate the low-rank activity predictor: which neurons a token will activate, without their weights.

Per layer, the pre-activation the activity criterion looks at (the gate of
a gated FFN, the up projection otherwise) is W x with W of n_ff x n_embd. A
rank-r approximation P = B A costs r (n_embd + n_ff) per token instead of
n_ff n_embd, and is fitted activation-aware: it minimises the error on the
layer's real inputs, || (W - B A) X ||, by a truncated SVD of W C^(1/2) with
C = X^T X / T the inputs' second moment (then A = V_r^T C^(-1/2), B = U_r S_r).
A neuron is predicted active when its predicted score passes a per-layer
threshold, chosen on the calibration tokens so that a fraction `recall` of
the truly active (token, neuron) pairs is predicted.

The engine evaluates the predictor, reads the predicted neurons' full
bundles, computes them exactly and applies the real criterion, so a false
positive costs a read but never changes the output; a false negative is a
neuron left out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from neuralink.errors import OptionError
from neuralink.profile.text import read_documents, split_windows
from neuralink.profile.thresholds import recall_threshold

log = logging.getLogger(__name__)

# criteria a predictor of one pre-activation can decide (see docs/engine.md)
PredictableCriterion = Literal["gate_magnitude", "relu"]


def activation_values(activation: str, v: np.ndarray) -> np.ndarray:
    """act(v) as the FFN applies it (GELU in its tanh form)."""
    if activation == "silu":
        return v / (1.0 + np.exp(-v))
    if activation == "gelu":
        return 0.5 * v * (1.0 + np.tanh(0.7978845608028654 * v * (1.0 + 0.044715 * v * v)))
    if activation == "relu":
        return np.maximum(v, 0.0)
    if activation == "relu_sqr":
        return np.square(np.maximum(v, 0.0))
    raise ValueError(f"unknown activation {activation!r}")


def activity_score(activation: str, criterion: str, v: np.ndarray) -> np.ndarray:
    """The number the criterion compares with its threshold: |act(v)|, or act(v) for native zeros."""
    a = activation_values(activation, v)
    if criterion == "relu":
        # ReLU-family activations are >= 0; "active" is act > 0, so the score is act itself
        return a
    if criterion == "gate_magnitude":
        return np.abs(a)
    raise ValueError(f"a low-rank predictor needs a criterion on one pre-activation (relu or gate_magnitude), "
                     f"not {criterion!r}")


@dataclass
class LayerFit:
    a: np.ndarray          # float32 (rank, n_embd)
    b: np.ndarray          # float32 (n_ff, rank), original neuron order
    threshold: float       # predicted score above which a neuron is predicted active
    recall: float          # on the calibration tokens
    precision: float
    predicted_density: float
    true_density: float


@dataclass
class LowRankPredictor:
    """A fitted predictor for every layer, in the original neuron order."""

    rank: int
    activation: str
    criterion: str
    recall_target: float
    layers: list[LayerFit]

    def placed(self, orders: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each layer's B with rows in placed order (row k predicts the neuron stored at position k)."""
        return [np.ascontiguousarray(fit.b[np.asarray(order)]) for fit, order in zip(self.layers, orders)]

    @property
    def thresholds(self) -> np.ndarray:
        return np.array([fit.threshold for fit in self.layers], dtype=np.float32)


def fit_factors(x: np.ndarray, w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A (rank, n_embd) and B (n_ff, rank), float64, minimising || (W - B A) X || on the inputs x (T, n_embd)."""
    x64 = x.astype(np.float64)
    w64 = w.astype(np.float64)
    n_embd = x.shape[1]
    rank = min(rank, n_embd, w.shape[0])
    second_moment = x64.T @ x64 / len(x64)
    # a small ridge keeps C^(-1/2) bounded along directions the inputs never take
    eigval, eigvec = np.linalg.eigh(second_moment + 1e-6 * np.trace(second_moment) / n_embd * np.eye(n_embd))
    root = (eigvec * np.sqrt(eigval)) @ eigvec.T
    inv_root = (eigvec / np.sqrt(eigval)) @ eigvec.T
    # the top right singular vectors of M = W C^(1/2) from the eigenvectors of M^T M (n_embd square): B = M V_r is
    # U_r S_r without the SVD of the tall M (Qwen2.5-Coder-1.5B: ~15 s -> ~1 s a layer)
    m = w64 @ root
    gram_values, gram_vectors = np.linalg.eigh(m.T @ m)
    top = gram_vectors[:, np.argsort(gram_values)[::-1][:rank]]
    return top.T @ inv_root, m @ top


def fit_layer(x: np.ndarray, w: np.ndarray, rank: int, activation: str, criterion: str, activity_threshold: float,
              recall: float) -> LayerFit:
    """Fit one layer's predictor from its inputs x (T, n_embd) and pre-activation weights w (n_ff, n_embd)."""
    x64 = x.astype(np.float64)
    w64 = w.astype(np.float64)
    a, b = fit_factors(x, w, rank)
    truly = activity_score(activation, criterion, x64 @ w64.T) > activity_threshold
    predicted_score = activity_score(activation, criterion, (x64 @ a.T) @ b.T)
    threshold, _ = recall_threshold(predicted_score, truly, recall, precision=np.float64)
    predicted = predicted_score > threshold
    hits = np.count_nonzero(predicted & truly)
    return LayerFit(
        a=a.astype(np.float32), b=b.astype(np.float32), threshold=float(threshold),
        recall=hits / max(np.count_nonzero(truly), 1), precision=hits / max(np.count_nonzero(predicted), 1),
        predicted_density=float(predicted.mean()), true_density=float(truly.mean()),
    )


def fit_lowrank(
    inputs: Sequence[np.ndarray],
    weights: Callable[[int], np.ndarray],
    *,
    activation: str,
    criterion: str,
    activity_thresholds: Sequence[float],
    rank: int = 64,
    recall: float = 0.99,
    progress: Callable[[int, int], None] | None = None,
) -> LowRankPredictor:
    """Fit every layer: `inputs[l]` the FFN inputs of layer l (T, n_embd), `weights(l)` its pre-activation rows.

    Under the contribution criterion only the factors of the gate rows, with thresholds of 0 (every pair
    predicted) until the quality search has chosen the runtime thresholds they follow
    (neuralink.convert.contribution_predictor); `activity_thresholds` are not used then.
    """
    if not 0.0 < recall <= 1.0:
        raise OptionError(f"recall must lie in (0, 1], got {recall}")
    layers = []
    for il, x in enumerate(inputs):
        if len(x) < rank:
            raise OptionError(f"layer {il}: {len(x)} calibration tokens cannot fit a rank-{rank} predictor")
        if criterion == "contribution":
            a, b = fit_factors(x, weights(il), rank)
            layers.append(LayerFit(a=a.astype(np.float32), b=b.astype(np.float32), threshold=0.0, recall=1.0,
                                   precision=float("nan"), predicted_density=1.0, true_density=float("nan")))
            log.info("layer %d: rank-%d factors of the gate rows fitted", il, rank)
        else:
            layers.append(fit_layer(x, weights(il), rank, activation, criterion, float(activity_thresholds[il]),
                                    recall))
            log.info("layer %d: recall %.4f precision %.3f predicted density %.3f (true %.3f)", il,
                     layers[-1].recall, layers[-1].precision, layers[-1].predicted_density, layers[-1].true_density)
        if progress:
            progress(il + 1, len(inputs))
    return LowRankPredictor(rank, activation, criterion, recall, layers)


def capture_ffn_inputs(
    model_path: str | os.PathLike[str],
    texts: Sequence[str | os.PathLike[str]],
    *,
    max_tokens: int = 4096,
    window: int = 512,
    threads: int | None = None,
) -> list[np.ndarray]:
    """Every layer's FFN inputs over the texts, as the dense engine receives them from llama.cpp.

    Returns per layer an array (tokens, n_embd). Logits are requested at every
    position so that the last layer's FFN sees every token too.
    """
    from neuralink.runtime.llama import Llama  # deferred: llama_cpp loads libllama, only for commands that run a model

    llm = Llama(os.fspath(model_path), sidecar=False, n_ctx=window, n_batch=window, n_ubatch=window,
                logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        documents = [np.array(llm.tokenize(doc.encode("utf-8")), dtype=np.int32) for doc in read_documents(texts)]
        engine = llm.engine
        engine.capture_inputs(max_tokens)
        for tokens in split_windows(documents, window, max_tokens):
            llm.reset()
            llm.eval(tokens.tolist())
        inputs = [engine.captured_inputs(il) for il in range(engine.n_layer)]
        engine.capture_inputs(0)
    finally:
        llm.close()
    return inputs


