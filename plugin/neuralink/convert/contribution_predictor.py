"""The low-rank predictor under the contribution criterion: a compact stand-in for the resident gate rows.

The gate predictor decides whether a (token, neuron) pair is a candidate
from the exact gate, so every gate row stays in DRAM or is read every
token. This predictor keeps only rank-r factors of the gate rows (A, B:
r (n_embd + n_ff) floats a layer, fitted as for any low-rank predictor),
scores each pair as the candidate test does but with the estimated gate,
|act(B A x)| * E|up| * |d|, and predicts the pairs above a per-layer
threshold. The engine reads their records, which then hold the exact gate
row, and keeps a pair only where the exact candidate test and the final
test both hold: it computes the validated thresholded model less the
validated pairs the predictor missed, never a pair outside it.

The thresholds depend on the runtime thresholds the quality search chooses
after the sidecar is written, so they are fitted then, on the calibration
tokens, to find a fraction `recall` of the validated pairs; the recall on
held-out tokens is measured the same way and recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from neuralink.convert.predictor import activation_values
from neuralink.formats.ffn_tensors import FfnModel, TensorEntry, decode_matrix
from neuralink.formats.sidecar import Sidecar
from neuralink.profile.thresholds import recall_threshold

log = logging.getLogger(__name__)

# a threshold above every score: a layer with no validated pair predicts none
_NONE_PREDICTED = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class PlacedLayer:
    """What scoring one layer's pairs needs, every per-neuron array in placed order."""

    gate: np.ndarray                 # float32 (n_ff, n_embd)
    up: np.ndarray                   # float32 (n_ff, n_embd)
    gate_bias: np.ndarray | None     # float32 (n_ff,)
    up_bias: np.ndarray | None
    a: np.ndarray                    # float32 (rank, n_embd)
    b: np.ndarray                    # float32 (n_ff, rank)
    candidate_scale: np.ndarray      # E|up| * |d|, float32 (n_ff,)
    down_norm: np.ndarray            # |d|, float32 (n_ff,)


def placed_layers(converted: FfnModel, data: np.ndarray, sidecar: Sidecar) -> Callable[[int], PlacedLayer]:
    """Each layer's PlacedLayer from a converted GGUF (`data` its bytes: gate and up rows already in placed
    order, byte for byte the source's) and its open sidecar (the factors, E|up| * |d| and |d|)."""

    def bias(entry: TensorEntry | None) -> np.ndarray | None:
        return None if entry is None else decode_matrix(data, entry).reshape(-1)

    def layer(il: int) -> PlacedLayer:
        tensors = converted.layers[il]
        assert tensors.gate is not None
        a, b = sidecar.predictor(il)
        return PlacedLayer(gate=decode_matrix(data, tensors.gate), up=decode_matrix(data, tensors.up),
                           gate_bias=bias(tensors.gate_bias), up_bias=bias(tensors.up_bias), a=np.array(a),
                           b=np.array(b), candidate_scale=np.array(sidecar.candidate_scale(il)),
                           down_norm=np.array(sidecar.down_norms(il)))

    return layer


@dataclass(frozen=True)
class LayerRecall:
    recall: float                # validated pairs predicted / validated pairs
    predicted_density: float     # pairs predicted / all pairs: the records read for them
    validated_density: float     # pairs the gate predictor's thresholded model keeps / all pairs


def score_pairs(x: np.ndarray, layer: PlacedLayer, activation: str, threshold: float,
                candidate_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For inputs x (T, n_embd): the predictor's score of every (token, neuron) pair, float32 (T, n_ff), and
    whether the pair is validated (a candidate by the exact gate and final by its h), as the engine decides."""
    x = np.asarray(x, dtype=np.float32)
    g = x @ layer.gate.T
    if layer.gate_bias is not None:
        g += layer.gate_bias
    u = x @ layer.up.T
    if layer.up_bias is not None:
        u += layer.up_bias
    act = activation_values(activation, g)
    validated = (np.abs(act) * layer.candidate_scale > candidate_threshold) & \
                (np.abs(act * u) * layer.down_norm > threshold)
    estimate = activation_values(activation, (x @ layer.a.T) @ layer.b.T)
    scores = (np.abs(estimate) * layer.candidate_scale).astype(np.float32)
    return scores, validated


def fit_thresholds(inputs: Sequence[np.ndarray], layer: Callable[[int], PlacedLayer], activation: str,
                   runtime: Sequence[tuple[float, float]], recall: float,
                   progress: Callable[[int, int], None] | None = None) -> tuple[list[float], list[LayerRecall]]:
    """Each layer's predictor threshold finding a fraction `recall` of the validated pairs of `inputs[l]`
    under the runtime thresholds (activity, candidate), and what it gets on those tokens."""
    thresholds, got = [], []
    for il, x in enumerate(inputs):
        scores, validated = score_pairs(x, layer(il), activation, *runtime[il])
        if validated.any():
            threshold, _ = recall_threshold(scores, validated, recall)  # float32, as the engine compares
        else:
            threshold = _NONE_PREDICTED
        thresholds.append(max(float(threshold), 0.0))
        got.append(_recall(scores, validated, thresholds[-1]))
        log.info("layer %d: predictor threshold %.4g, recall %.4f, predicted %.3f, validated %.3f", il,
                 thresholds[-1], got[-1].recall, got[-1].predicted_density, got[-1].validated_density)
        if progress:
            progress(il + 1, len(inputs))
    return thresholds, got


def measure_recall(inputs: Sequence[np.ndarray], layer: Callable[[int], PlacedLayer], activation: str,
                   runtime: Sequence[tuple[float, float]], thresholds: Sequence[float]) -> list[LayerRecall]:
    """What the predictor at `thresholds` finds of the validated pairs of `inputs[l]` (held-out tokens)."""
    out = []
    for il, x in enumerate(inputs):
        scores, validated = score_pairs(x, layer(il), activation, *runtime[il])
        out.append(_recall(scores, validated, thresholds[il]))
    return out


def _recall(scores: np.ndarray, validated: np.ndarray, threshold: float) -> LayerRecall:
    predicted = scores > np.float32(threshold)
    n_validated = int(np.count_nonzero(validated))
    found = int(np.count_nonzero(predicted & validated))
    return LayerRecall(recall=found / n_validated if n_validated else 1.0,
                       predicted_density=float(predicted.mean()), validated_density=float(validated.mean()))


def summary(layers: Sequence[LayerRecall]) -> dict[str, float]:
    """The quality record's view of per-layer recalls: pooled over layers (each has as many pairs) and the
    worst layer."""
    validated = np.array([r.validated_density for r in layers])
    recall = np.array([r.recall for r in layers])
    return {
        "recall": float((recall * validated).sum() / max(validated.sum(), 1e-30)),
        "min_layer_recall": float(recall.min()),
        "predicted_density": float(np.mean([r.predicted_density for r in layers])),
        "validated_density": float(validated.mean()),
    }
