"""The threshold rules every stage shares: "active" at a target density, and a predictor at a target recall.

The density rule places a layer's activity threshold so that a fraction
`density` of the calibration's (token, neuron) scores exceeds it (`neuralink
profile`, and the density sweep of `neuralink perplexity --sweep`). The
recall rule places a predictor's threshold so that it still predicts a
fraction `recall` of the truly active pairs (the low-rank predictor's fit,
and the sweep's re-tuning at each density).
"""

from __future__ import annotations

import math

import numpy as np

from neuralink.errors import ProfileError

# scores kept per layer to place a density threshold (the rest are sampled): the density it gives is within ~0.001
MAX_THRESHOLD_SAMPLES = 1 << 21


def _density_rank(n: int, density: float) -> int:
    # the ceil((1 - density) n)-th smallest of n values, as a 0-based rank
    return min(max(math.ceil((1.0 - density) * n) - 1, 0), n - 1)


def check_finite(values: np.ndarray, layer: int) -> np.ndarray:
    """`values` (a layer's sampled activity scores) when all are finite; ProfileError otherwise: llama.cpp computed
    NaN or Inf in that layer's FFN, so the model's weights are damaged (and any threshold would be meaningless)."""
    if not np.isfinite(values).all():
        raise ProfileError(f"layer {layer}: the FFN's activations on the calibration text hold NaN or Inf "
                           f"({np.count_nonzero(~np.isfinite(values))} of {values.size} sampled values): the model's "
                           "weights give non-finite values there")
    return values


def density_threshold(values: np.ndarray, density: float) -> float:
    """The value that a fraction `density` of `values` exceeds: the ceil((1 - density) n)-th smallest."""
    values = values.ravel()
    k = _density_rank(values.size, density)
    return float(np.partition(values, k)[k])


def density_thresholds(values: np.ndarray, densities: np.ndarray) -> np.ndarray:
    """`density_threshold` at each of `densities`, from one sort (float64 array)."""
    ordered = np.sort(values.ravel())
    return np.array([ordered[_density_rank(ordered.size, float(d))] for d in densities], dtype=np.float64)


def recall_threshold(predicted_scores: np.ndarray, truly_active: np.ndarray, recall: float, *,
                     precision: type[np.floating] = np.float32) -> tuple[float, float]:
    """The largest predictor threshold keeping a fraction `recall` of the truly active pairs, and the recall it gets.

    The k-th smallest predicted score of the truly active pairs, nudged down
    one step in `precision` because a neuron is predicted when score >
    threshold: float32 as the engine compares (the density sweep), float64
    where the scores themselves are float64 (the predictor's fit, whose
    thresholds the sidecar then stores in float32). inf (recall 1) when no
    pair is active.
    """
    active_scores = np.sort(predicted_scores[truly_active])
    if not active_scores.size:
        return float("inf"), 1.0
    k = int(np.floor((1.0 - recall) * active_scores.size))
    threshold = float(np.nextafter(precision(active_scores[k]), precision(-np.inf)))
    return threshold, float(np.count_nonzero(active_scores > threshold) / active_scores.size)
