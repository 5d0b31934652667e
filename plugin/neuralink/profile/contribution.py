"""The contribution criterion: which neurons of a gated FFN matter for a token, decided in two steps.

A neuron's contribution to the FFN output is h_i * d_i (h = act(gate) * up,
d_i its down column), of size |h_i| * |d_i|. Thresholding that (the final
score) keeps far more quality at equal density than thresholding |act(gate)|
alone (measured: docs/benchmarks.md), but needs the up value, which lives in
the neuron's bundle. So the engine reads the up row only for candidates,
|act(gate_i)| * E|up_i| * |d_i| > t_candidate (known from the resident gate),
and the down column only where the final score passes. This module computes
the per-neuron constants and the calibration score distributions.
"""

from __future__ import annotations

import math
import os

import numpy as np

from neuralink.formats.coactivation import QUANTILE_POINTS, SelectionStats
from neuralink.profile.thresholds import MAX_THRESHOLD_SAMPLES, check_finite, density_thresholds

# up rows are read for this much more of the neurons than the final density keeps (candidates =
# final + margin): measured on Qwen2.5-Coder-1.5B and SmolLM2 (docs/benchmarks.md), where a smaller
# margin loses the neurons whose large up value the gate alone does not show
CANDIDATE_MARGIN = 0.35


def candidate_density(final_density: float) -> float:
    """The fraction of neurons whose up rows are read for a final density (one rule, used everywhere)."""
    return min(1.0, final_density + CANDIDATE_MARGIN)


def down_column_norms(model_path: str | os.PathLike[str]) -> list[np.ndarray]:
    """|d_i| of every neuron of every layer (original order), from the model's ffn_down."""
    from neuralink.formats.ffn_tensors import decode_matrix, inspect_ffn_model

    model = inspect_ffn_model(model_path)
    data = np.memmap(model.directory.path, dtype=np.uint8, mode="r")
    try:
        # ffn_down is (n_embd rows of n_ff): a neuron is a column
        return [np.linalg.norm(decode_matrix(data, layer.down), axis=0).astype(np.float32) for layer in model.layers]
    finally:
        del data


def quantile_table(scores: np.ndarray) -> np.ndarray:
    """float32 [QUANTILE_POINTS]: the score a fraction d of `scores` exceeds, for d evenly from 0 to 1."""
    return density_thresholds(scores, np.linspace(0.0, 1.0, QUANTILE_POINTS)).astype(np.float32)


class PilotScores:
    """Accumulates, over pilot tokens, E|up| per neuron and samples of |act(gate)| and the final score."""

    def __init__(self, n_layer: int, n_ff: int, down_norms: list[np.ndarray], pilot_tokens: int, seed: int = 0) -> None:
        self.n_ff, self.down_norms = n_ff, down_norms
        self.rng = np.random.default_rng(seed)
        self.quota = max(1, math.ceil(MAX_THRESHOLD_SAMPLES / max(pilot_tokens, 1)))
        self.up_sum = np.zeros((n_layer, n_ff), dtype=np.float64)
        self.tokens = np.zeros(n_layer, dtype=np.int64)
        self.gate_samples: list[list[np.ndarray]] = [[] for _ in range(n_layer)]
        self.index_samples: list[list[np.ndarray]] = [[] for _ in range(n_layer)]
        self.final_samples: list[list[np.ndarray]] = [[] for _ in range(n_layer)]

    def add(self, layer: int, act_gate: np.ndarray, up: np.ndarray) -> None:
        """Rows of act(gate) and up of one window, (tokens, n_ff) each."""
        self.up_sum[layer] += np.abs(up).sum(axis=0)
        self.tokens[layer] += len(up)
        picks = self.rng.integers(0, act_gate.size, self.quota * len(up))
        neurons = picks % self.n_ff
        a, u = act_gate.ravel()[picks], up.ravel()[picks]
        self.gate_samples[layer].append(np.abs(a).astype(np.float32))
        self.index_samples[layer].append(neurons.astype(np.int32))
        self.final_samples[layer].append((np.abs(a * u) * self.down_norms[layer][neurons]).astype(np.float32))

    def selection(self, final_density: float) -> tuple[SelectionStats, np.ndarray]:
        """The selection tables, and the final thresholds at `final_density` (candidates at its candidate density)."""
        n_layer = len(self.tokens)
        up_mean = (self.up_sum / np.maximum(self.tokens, 1)[:, None]).astype(np.float32)
        quantiles = np.zeros((n_layer, 2, QUANTILE_POINTS), dtype=np.float32)
        for il in range(n_layer):
            scale = up_mean[il] * self.down_norms[il]
            candidate = np.concatenate(self.gate_samples[il]) * scale[np.concatenate(self.index_samples[il])]
            quantiles[il, 0] = quantile_table(check_finite(np.concatenate(self.final_samples[il]), il))
            quantiles[il, 1] = quantile_table(check_finite(candidate, il))
        stats = SelectionStats(score_quantiles=quantiles, up_mean_abs=up_mean,
                               candidate_counts=np.zeros((n_layer, self.n_ff), dtype=np.int64),
                               candidate_thresholds=np.zeros(n_layer, dtype=np.float32))
        stats.candidate_thresholds[:] = [stats.threshold(il, candidate_density(final_density), candidate=True)
                                         for il in range(n_layer)]
        finals = np.array([stats.threshold(il, final_density) for il in range(n_layer)], dtype=np.float32)
        return stats, finals


def candidate_scale(selection: SelectionStats, down_norms: list[np.ndarray], layer: int) -> np.ndarray:
    """E|up_i| * |d_i| of layer `layer` (original order): what scales |act(gate)| into a candidate score."""
    return (selection.up_mean_abs[layer] * down_norms[layer]).astype(np.float32)
