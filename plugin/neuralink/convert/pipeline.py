"""The profile -> place -> convert pipeline from calibration text, and the predictor fitted on the way."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from neuralink.convert.predictor import LowRankPredictor, capture_ffn_inputs, fit_lowrank
from neuralink.errors import OptionError
from neuralink.formats.bundle_layout import (
    bundle_has_gate,
    bundle_layouts,
)
from neuralink.formats.ffn_tensors import (
    decode_matrix,
    inspect_ffn_model,
)
from neuralink.formats.placement import Placement
from neuralink.place.orders import DEFAULT_METHOD, METHODS, build_placement, place_layers
from neuralink.profile.activity import DEFAULT_CRITERION, DEFAULT_DENSITY, profile_model

StageProgress = Callable[[str, int, int], None]  # (stage, done, total) of profiling and placement


def placement_from_text(
    model_path: str | os.PathLike[str],
    texts: Sequence[str | os.PathLike[str]],
    *,
    method: str | None = None,
    density: float | None = None,
    criterion: str | None = None,
    max_tokens: int | None = 4096,
    bundle_bytes: Sequence[int] | None = None,
    workers: int = 2,
    threads: int | None = None,
    progress: StageProgress | None = None,
) -> Placement:
    """Profile `model_path` on the calibration `texts` and place its neurons (`neuralink profile` + `place`).

    `method`, `density` and `criterion` default to those of ``neuralink place``
    and ``neuralink profile``; `bundle_bytes` (per layer, for the placement's
    read-cost model) to the sidecar's records with the default encoding and
    parts. The co-activation masks live in a temporary file only while placing.
    """

    chosen = next((m for m in METHODS if m == (method or DEFAULT_METHOD)), None)
    if chosen is None:
        raise OptionError(f"unknown placement method {method!r}; expected one of {METHODS}")
    report = progress or (lambda stage, done, total: None)
    stats = profile_model(model_path, texts, density=density if density is not None else DEFAULT_DENSITY,
                          criterion=criterion or DEFAULT_CRITERION, max_tokens=max_tokens, threads=threads,
                          progress=lambda done, total: report("profile", done, total))
    with tempfile.TemporaryDirectory(prefix="neuralink-convert-") as tmp:
        stats_path = stats.save(Path(tmp) / "calibration.npz")
        if bundle_bytes is None:
            model = inspect_ffn_model(model_path)
            layouts = bundle_layouts(model, gate=bundle_has_gate(model, "auto", stats.criterion))
            bundle_bytes = [lay.record_bytes for lay in layouts]
        results = place_layers(stats_path, [chosen], bundle_bytes=bundle_bytes, workers=workers,
                               progress=lambda done, total: report("place", done, total))
    return build_placement(stats, results, chosen)


def fit_model_predictor(
    model_path: str | os.PathLike[str],
    texts: Sequence[str | os.PathLike[str]],
    placement: Placement,
    *,
    rank: int = 64,
    recall: float = 0.99,
    max_tokens: int = 4096,
    threads: int | None = None,
) -> LowRankPredictor:
    """Fit the low-rank predictor of `model_path` on calibration texts, for the placement's criterion and thresholds."""
    model = inspect_ffn_model(model_path)
    inputs = capture_ffn_inputs(model_path, texts, max_tokens=max_tokens, threads=threads)
    data = np.memmap(model.directory.path, dtype=np.uint8, mode="r")

    def weights(il: int) -> np.ndarray:
        layer = model.layers[il]
        return decode_matrix(data, layer.gate if layer.gate is not None else layer.up)

    return fit_lowrank(inputs, weights, activation=model.activation, criterion=placement.criterion,
                       activity_thresholds=placement.thresholds, rank=rank, recall=recall)
