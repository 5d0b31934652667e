"""Inputs of `neuralink bench io`: the held-out activation trace and the placement, profiled and placed
when not given as files."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neuralink.errors import BenchIoError
from neuralink.formats.bundle_layout import BundleParts, bundle_has_gate, bundle_layouts
from neuralink.formats.coactivation import CoactivationStats
from neuralink.formats.ffn_tensors import DownEncoding, inspect_ffn_model
from neuralink.formats.files import file_sha256
from neuralink.formats.placement import Placement
from neuralink.place.orders import build_placement, check_model_matches, place_layers
from neuralink.profile.activity import DEFAULT_CRITERION, DEFAULT_WINDOW, profile_model

DEFAULT_MAX_TOKENS = 256
DEFAULT_CALIBRATION_TOKENS = 4096
PLACEMENT_METHODS = ("neuralink", "hotcold")
# called with (stage, done, total) for "profile calibration", "profile text", "place", "write", "replay"
StageProgress = Callable[[str, int, int], None]


@dataclass
class BenchInputs:
    """The held-out trace and the placement to replay, and the files made on the way."""

    trace: CoactivationStats
    placement: Placement
    saved: list[Path] = field(default_factory=list)


def need_file(path: Path | None, what: str) -> None:
    if path is not None and not path.is_file():
        raise BenchIoError(f"{path}: no such {what}")


def prepare_inputs(
    model: Path,
    *,
    calibration: Sequence[Path] | None = None,
    calibration_stats: Path | None = None,
    text: Sequence[Path] | None = None,
    trace: Path | None = None,
    placement: Path | None = None,
    placement_method: str = "neuralink",
    density: float | None = None,
    criterion: str | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    bundle_parts: BundleParts = "auto",
    bundle_down_type: DownEncoding = "auto",
    window: int | None = None,
    threads: int | None = None,
    workers: int = 2,
    save_dir: Path | None = None,
    progress: StageProgress | None = None,
) -> BenchInputs:
    """Profile and place whatever was not given as a file: the calibration stats (for thresholds and the
    placement), the placement, and the held-out trace. With `save_dir`, what was made is kept there."""
    report = progress or (lambda stage, done, total: None)
    for path in calibration or ():
        need_file(path, "calibration text")
    for path in text or ():
        need_file(path, "text")
    need_file(calibration_stats, "calibration stats file")
    need_file(trace, "trace (held-out stats) file")
    need_file(placement, "placement file")
    if (text is None) == (trace is None):
        raise BenchIoError("give the held-out text (--text) or its profile (--trace), not both")
    has_calibration = calibration is not None or calibration_stats is not None
    if placement is None and not has_calibration:
        raise BenchIoError("the placement comes from calibration: give --calibration, --calibration-stats or --placement")
    if text is not None and not has_calibration:
        raise BenchIoError("profiling --text needs the calibration's thresholds: give --calibration or "
                           "--calibration-stats (or profile the text yourself and pass --trace)")
    if placement_method not in PLACEMENT_METHODS:
        raise BenchIoError(f"placement method must be one of {PLACEMENT_METHODS}, not {placement_method!r}")

    ffn = inspect_ffn_model(model)  # ModelFileError / UnsupportedModelError naming the model
    sha256 = file_sha256(model)
    saved: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="neuralink-bench-io-stats-") as scratch:
        work = save_dir or Path(scratch)
        cal_path = calibration_stats
        cal_stats: CoactivationStats | None = None
        if cal_path is None and calibration is not None and (placement is None or text is not None):
            cal_stats = profile_model(model, calibration, density=density,
                                      criterion=criterion or DEFAULT_CRITERION, max_tokens=calibration_tokens,
                                      min_tokens=min(256, calibration_tokens), window=window or DEFAULT_WINDOW,
                                      threads=threads,
                                      progress=lambda d, t: report("profile calibration", d, t))
            cal_path = cal_stats.save(work / "calibration.npz")
            if save_dir is not None:
                saved.append(cal_path)
        if cal_path is not None and cal_stats is None:
            cal_stats = CoactivationStats.load(cal_path, with_masks=False)
            check_model_matches(cal_stats, model, str(cal_path))

        if placement is not None:
            placed = Placement.load(placement)
            if placed.model_sha256 != sha256:
                raise BenchIoError(f"{placement}: placement made for another model than {model}")
        else:
            assert cal_stats is not None and cal_path is not None
            gate = bundle_has_gate(ffn, bundle_parts, cal_stats.criterion)
            sizes = [lay.record_bytes for lay in bundle_layouts(ffn, bundle_down_type, gate)]
            results = place_layers(cal_path, [placement_method], bundle_bytes=sizes, workers=workers,  # type: ignore[list-item]
                                   progress=lambda d, t: report("place", d, t))
            placed = build_placement(cal_stats, results, placement_method)  # type: ignore[arg-type]
            if save_dir is not None:
                saved.append(placed.save(save_dir / "placement.npz"))

        if trace is not None:
            held = CoactivationStats.load(trace)
            check_model_matches(held, model, str(trace))
            where = str(trace)
        else:
            assert text is not None
            held = profile_model(model, text, thresholds_from=cal_path, max_tokens=max_tokens,
                                 min_tokens=min(16, max_tokens), window=window or DEFAULT_WINDOW, threads=threads,
                                 progress=lambda d, t: report("profile text", d, t))
            where = ", ".join(map(str, text))
            if save_dir is not None:
                saved.append(held.save(save_dir / "trace.npz"))
    if held.n_layer != ffn.n_layer or held.n_ff != ffn.n_ff:
        raise BenchIoError(f"{where}: {held.n_layer} layers x {held.n_ff} neurons, the model has "
                           f"{ffn.n_layer} x {ffn.n_ff}")
    if not np.array_equal(np.asarray(held.thresholds, np.float32), np.asarray(placed.thresholds, np.float32)):
        raise BenchIoError(f"{where}: not profiled with the thresholds of the placement's calibration; profile it "
                           "with `neuralink profile ... --thresholds-from CALIBRATION_STATS`")
    return BenchInputs(held, placed, saved)


__all__ = ["DEFAULT_CALIBRATION_TOKENS", "DEFAULT_MAX_TOKENS", "PLACEMENT_METHODS", "BenchInputs", "BenchIoError",
           "StageProgress", "need_file", "prepare_inputs"]
