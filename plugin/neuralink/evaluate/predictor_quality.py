"""Recall and precision of a sidecar's low-rank activity predictor on held-out text (``neuralink predictor``).

The converted model runs densely to give every layer's real FFN inputs; the
predictor's active sets are compared with the criterion's true ones. A false
positive costs a read, a false negative leaves a neuron out (see
neuralink.convert.predictor, which fits the predictor).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuralink.convert.contribution_predictor import measure_recall, placed_layers
from neuralink.convert.predictor import activity_score, capture_ffn_inputs
from neuralink.errors import OptionError
from neuralink.formats.ffn_tensors import FfnModel, decode_matrix, inspect_ffn_model
from neuralink.formats.sidecar import Sidecar


@dataclass
class LayerReport:
    il: int
    recall: float
    precision: float
    predicted_density: float
    true_density: float


def evaluate_predictor(
    model_path: str | os.PathLike[str],
    sidecar_path: str | os.PathLike[str],
    texts: Sequence[str | os.PathLike[str]],
    *,
    max_tokens: int = 2048,
    threads: int | None = None,
) -> list[LayerReport]:
    """Recall and precision of a sidecar's low-rank predictor on (held-out) texts, per layer.

    Runs the converted model densely to get every layer's real inputs, and
    compares the predicted active sets with the criterion's true ones.
    """

    model = inspect_ffn_model(model_path)
    reports = []
    with Sidecar.open(sidecar_path, model_path) as sidecar:
        header = sidecar.header
        if not header.predictor_rank:  # before the model runs on the texts
            raise OptionError(f"{sidecar_path}: has no low-rank predictor (convert with --lowrank-rank)")
        inputs = capture_ffn_inputs(model_path, texts, max_tokens=max_tokens, threads=threads)
        data = np.memmap(model.directory.path, dtype=np.uint8, mode="r")
        if header.criterion == "contribution":
            return _contribution_reports(model, data, sidecar, inputs)
        for il, x in enumerate(inputs):
            layer = model.layers[il]
            w = decode_matrix(data, layer.gate if layer.gate is not None else layer.up)
            x64 = x.astype(np.float64)
            truly = activity_score(header.activation, header.criterion, x64 @ w.T.astype(np.float64)) \
                > header.thresholds[il]
            a, b = sidecar.predictor(il)
            predicted = activity_score(header.activation, header.criterion, (x64 @ a.T) @ b.T) \
                > header.predictor_thresholds[il]
            hits = np.count_nonzero(predicted & truly)
            reports.append(LayerReport(il, hits / max(np.count_nonzero(truly), 1),
                                       hits / max(np.count_nonzero(predicted), 1),
                                       float(predicted.mean()), float(truly.mean())))
    return reports


def _contribution_reports(model: FfnModel, data: np.ndarray, sidecar: Sidecar,
                          inputs: Sequence[np.ndarray]) -> list[LayerReport]:
    """Under the contribution criterion "truly active" is what the sidecar's runtime setting keeps (the exact
    candidate and final tests), as the conversion measured it (neuralink.convert.contribution_predictor)."""
    header = sidecar.header
    got = measure_recall(inputs, placed_layers(model, data, sidecar), header.activation, header.runtime_thresholds,
                         header.predictor_thresholds)
    return [LayerReport(il, r.recall, r.recall * r.validated_density / max(r.predicted_density, 1e-30),
                        r.predicted_density, r.validated_density) for il, r in enumerate(got)]
