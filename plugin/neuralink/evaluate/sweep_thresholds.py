"""Per-layer thresholds of a converted model at other densities, placed on calibration text (the sweep's first step).

The sidecar fixes one per-layer activity threshold t_l, set at one density
when the model was converted. To run at another density without converting
again, `density_thresholds` places new thresholds on calibration text (the
conversion's own, never the scored text): per layer, the value that a
fraction `density` of the criterion's calibration scores exceeds (the
quantile rule of `neuralink profile`). Density 1.0 is threshold 0: every
neuron whose activation is not exactly zero. A ReLU model cannot be made
denser than its native zeros: asking for more gives threshold 0, and the
measured active fraction says so.

- **contribution** sidecars: one stock llama.cpp pass over the calibration
  text shows every layer's ffn_gate and h (the input of ffn_down, in the
  converted model's placed order); the candidate score |act(gate)| * scale and
  the final score |h| * |d| of a sample of (token, neuron) pairs give both
  thresholds of each density. These are the values the sweep's scorer then
  thresholds, from the same kernels.
- **gate_magnitude and relu**: the dense engine captures every layer's FFN
  inputs x, and the scores come from the converted model's own weights
  (|act(gate)|, or act(up or gate) for relu). The low-rank predictor's
  threshold is re-tuned for each density on the same tokens, for the recall
  the sidecar's was tuned for (0.99 by default): with the sidecar's A and B,
  the largest threshold that still predicts that fraction of the truly
  active pairs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuralink.convert.predictor import activation_values, activity_score, capture_ffn_inputs
from neuralink.errors import SweepError
from neuralink.formats.ffn_tensors import decode_matrix, inspect_ffn_model, permute_vector
from neuralink.formats.sidecar import Sidecar
from neuralink.profile.contribution import candidate_density
from neuralink.profile.thresholds import MAX_THRESHOLD_SAMPLES, density_threshold, recall_threshold

log = logging.getLogger(__name__)

DEFAULT_DENSITIES = (1.0, 0.5, 0.3, 0.2, 0.1)
DEFAULT_CALIBRATION_TOKENS = 2048
# calibration windows of the contribution pass (the profile's window)
CALIBRATION_WINDOW = 512


@dataclass(frozen=True)
class DensityThresholds:
    """Per-layer thresholds that put the activity criterion at one target density on calibration text."""

    density: float                    # the target
    thresholds: np.ndarray            # float32 (n_layer,): activity thresholds
    calibration_density: np.ndarray   # float64 (n_layer,): fraction of calibration pairs active under them
    predictor_thresholds: np.ndarray | None = None  # float32 (n_layer,): re-tuned low-rank thresholds
    predictor_recall: np.ndarray | None = None      # float64 (n_layer,): their recall on the calibration pairs
    candidate_thresholds: np.ndarray | None = None  # float32 (n_layer,): contribution criterion's candidate step


def threshold_for_density(scores: np.ndarray, density: float, rng: np.random.Generator) -> float:
    """The per-layer threshold that a fraction `density` of `scores` exceeds (the density rule of
    neuralink.profile.thresholds, on at most MAX_THRESHOLD_SAMPLES sampled scores).

    Density 1.0 gives 0: every non-zero activation.
    """
    if density >= 1.0:
        return 0.0
    values = scores.ravel()
    if values.size > MAX_THRESHOLD_SAMPLES:
        values = values[rng.integers(0, values.size, MAX_THRESHOLD_SAMPLES)]
    return density_threshold(values, density)


def density_thresholds(
    model_path: str | os.PathLike[str],
    sidecar_path: str | os.PathLike[str],
    texts: Sequence[str | os.PathLike[str]],
    densities: Sequence[float] = DEFAULT_DENSITIES,
    *,
    max_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    recall: float | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> list[DensityThresholds]:
    """Activity thresholds (and re-tuned low-rank thresholds) of a converted model for each target density.

    Calibrates on the first `max_tokens` tokens of `texts` (use the
    conversion's calibration text, not the text to be scored). `recall`
    defaults to the one the sidecar's predictor was tuned for. Raises
    SweepError for densities outside (0, 1] and for sidecars whose criterion
    has no single pre-activation (`magnitude`).
    """
    check_densities(densities)
    with Sidecar.open(sidecar_path, model_path) as sidecar:
        header = sidecar.header
        if header.criterion not in ("gate_magnitude", "relu", "contribution"):
            raise SweepError(
                f"{sidecar_path}: criterion '{header.criterion}' thresholds |act(gate)*up| with no candidate step, "
                "which no predictor decides before reading the bundle; convert with --criterion contribution or "
                "gate_magnitude to vary the density"
            )
        if header.criterion == "contribution":
            tables = [(sidecar.candidate_scale(il).astype(np.float32), sidecar.down_norms(il).astype(np.float32))
                      for il in range(header.n_layer)]
            return contribution_thresholds(model_path, texts, densities, tables, header.activation,
                                           max_tokens=max_tokens, threads=threads, seed=seed)
        predictors = [sidecar.predictor(il) for il in range(header.n_layer)] if header.predictor_rank else None
        recall = recall if recall is not None else (header.predictor_recall or 0.99)
        model = inspect_ffn_model(model_path)
        inputs = capture_ffn_inputs(model_path, texts, max_tokens=max_tokens, threads=threads)
        if min(len(x) for x in inputs) == 0:
            raise SweepError(f"{', '.join(map(str, texts))}: no calibration tokens")
        data = np.memmap(model.directory.path, dtype=np.uint8, mode="r")
        rng = np.random.default_rng(seed)
        n_layer, n_density = header.n_layer, len(densities)
        thresholds = np.zeros((n_density, n_layer), dtype=np.float32)
        calibration = np.zeros((n_density, n_layer))
        predictor_thresholds = np.zeros((n_density, n_layer), dtype=np.float32)
        predictor_recall = np.zeros((n_density, n_layer))
        for il, x in enumerate(inputs):
            layer = model.layers[il]
            # the converted GGUF holds rows in placed order, as the engine and the sidecar's B do
            tensor, bias = (layer.gate, layer.gate_bias) if layer.gate is not None else (layer.up, layer.up_bias)
            x64 = x.astype(np.float64)
            v = x64 @ decode_matrix(data, tensor).T.astype(np.float64)
            if bias is not None:
                v += permute_vector(data, bias, np.arange(model.n_ff)).astype(np.float64)
            scores = activity_score(header.activation, header.criterion, v)
            predicted = None
            if predictors is not None:
                a, b = predictors[il]
                predicted = activity_score(header.activation, header.criterion,
                                             (x64 @ a.T.astype(np.float64)) @ b.T.astype(np.float64))
            for j, density in enumerate(densities):
                t = threshold_for_density(scores, density, rng)
                truly = scores > t
                thresholds[j, il] = t
                calibration[j, il] = truly.mean()
                if predicted is not None:
                    predictor_thresholds[j, il], predictor_recall[j, il] = recall_threshold(predicted, truly, recall)
    _log_calibration(densities, calibration)
    return [DensityThresholds(float(density), thresholds[j], calibration[j],
                              predictor_thresholds[j] if predictors is not None else None,
                              predictor_recall[j] if predictors is not None else None)
            for j, density in enumerate(densities)]


def _log_calibration(densities: Sequence[float], calibration: np.ndarray) -> None:
    for j, density in enumerate(densities):
        log.info("density %.2f: calibration active fraction %.4f (layers %.4f..%.4f)", density,
                 calibration[j].mean(), calibration[j].min(), calibration[j].max())


def contribution_thresholds(
    model_path: str | os.PathLike[str],
    texts: Sequence[str | os.PathLike[str]],
    densities: Sequence[float],
    tables: Sequence[tuple[np.ndarray, np.ndarray]],
    activation: str,
    *,
    max_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    threads: int | None = None,
    seed: int = 0,
) -> list[DensityThresholds]:
    """Both thresholds of the contribution criterion at each density, from one stock llama.cpp pass (module doc).

    `tables` holds each layer's (candidate scale, down-column norms) in placed order, as the sidecar does."""
    # deferred: llama_cpp loads libllama, only for commands that run a model
    from neuralink.profile.activations import ActivationReader
    from neuralink.profile.activity import GATE_TENSOR, probe_ffn_activation
    from neuralink.profile.text import read_documents, split_windows

    rng = np.random.default_rng(seed)
    n_layer = len(tables)
    samples: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_layer)]
    reader = ActivationReader(model_path, window=CALIBRATION_WINDOW, threads=threads)
    try:
        documents = [reader.tokenize(doc) for doc in read_documents(texts)]
        windows = split_windows(documents, reader.text_tokens_per_window, max_tokens)
        n_tokens = sum(map(len, windows))
        if n_tokens == 0:
            raise SweepError(f"{', '.join(map(str, texts))}: no calibration tokens")
        form, n_ff = probe_ffn_activation(reader, windows[0], "magnitude")  # form.tensor: what ffn_down consumes
        # each pair is kept with this probability: about MAX_THRESHOLD_SAMPLES pairs per layer in all
        keep = min(1.0, MAX_THRESHOLD_SAMPLES / (n_tokens * n_ff))
        gates: dict[int, np.ndarray] = {}

        def consume(name: str, layer: int, rows: np.ndarray) -> None:
            if name == GATE_TENSOR:
                gates[layer] = np.array(rows)  # a copy: llama.cpp may reuse the buffer once h is computed
                return
            picked = np.flatnonzero(rng.random(rows.size) < keep)
            neuron = picked % rows.shape[1]
            scale, down_norm = tables[layer]
            a = activation_values(activation, gates.pop(layer).ravel()[picked])
            samples[layer].append((np.abs(a) * scale[neuron], np.abs(rows.ravel()[picked]) * down_norm[neuron]))

        for tokens in windows:
            reader.evaluate(tokens, {GATE_TENSOR, form.tensor}.__contains__, consume)
    finally:
        reader.close()
    n_density = len(densities)
    thresholds = np.zeros((n_density, n_layer), dtype=np.float32)
    candidate_thresholds = np.zeros((n_density, n_layer), dtype=np.float32)
    calibration = np.zeros((n_density, n_layer))
    for il, layer_samples in enumerate(samples):
        candidate_scores = np.concatenate([c for c, _ in layer_samples])
        final_scores = np.concatenate([f for _, f in layer_samples])
        for j, density in enumerate(densities):
            t = threshold_for_density(final_scores, density, rng)
            c = threshold_for_density(candidate_scores, candidate_density(density), rng)
            thresholds[j, il], candidate_thresholds[j, il] = t, c
            calibration[j, il] = ((candidate_scores > c) & (final_scores > t)).mean()
    log.info("contribution thresholds from %d calibration tokens, %d sampled pairs per layer", n_tokens,
             len(final_scores))
    _log_calibration(densities, calibration)
    return [DensityThresholds(float(d), thresholds[j], calibration[j], candidate_thresholds=candidate_thresholds[j])
            for j, d in enumerate(densities)]


def check_densities(densities: Sequence[float]) -> None:
    if not densities:
        raise SweepError("no densities to sweep")
    bad = [d for d in densities if not (0.0 < d <= 1.0)]
    if bad:
        raise SweepError(f"densities must lie in (0, 1], got {bad}")
    if len(set(densities)) != len(densities):
        raise SweepError(f"densities repeat: {list(densities)}")


