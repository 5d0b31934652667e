"""Measure the storage behind a file or directory: direct-I/O IOPS and bandwidth against read size and queue depth.

Random 4 KiB-aligned reads of each size (4 KiB ... 4 MiB) with each number of
reads in flight (1 ... 32), through the engine's own pread pool with O_DIRECT.
A directory or a file under --probe-bytes gets a temporary probe file of
random bytes beside it. The profile is cached per device (st_dev) and gives
the engine its read cost model and access-collapse threshold: merge two runs
when reading the gap costs less than one more read, never when the device is
bandwidth-bound. Prints the grid and the cost model; writes JSON and a PNG
like the paper's Figure 4.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import stat
import statistics
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuralink import _engine
from neuralink.errors import DeviceProfileError
from neuralink.formats.files import remove_stale_temporaries, temporary_path
from neuralink.formats.sizes import MiB, format_size
from neuralink.paths import cache_dir
from neuralink.runtime.device_profile import (
    BANDWIDTH_SATURATION,
    DEFAULT_DEPTHS,
    DEFAULT_SIZES,
    READ_ALIGN,
    DeviceIdentity,
    DeviceProfile,
    ProbePoint,
    write_atomically,
)

logger = logging.getLogger(__name__)

DEFAULT_SECONDS_PER_POINT = 1.0
DEFAULT_PROBE_BYTES = 256 * MiB
DEFAULT_TRIALS = 3
# below this many reads per reader thread, filling and draining the queue skews the rate
_MIN_READS_PER_DEPTH = 8
_MAX_READS = 10_000_000

ProgressFn = Callable[[int, int], None]


def _read_sys(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def device_identity(path: str | os.PathLike[str]) -> DeviceIdentity:
    """The storage `path` lives on; DeviceProfileError if it does not exist."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DeviceProfileError(f"{path}: {e.strerror}") from e
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    filesystem = mount_point = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            parts = left.split()
            if len(parts) >= 5 and parts[2] == f"{major}:{minor}":
                filesystem, mount_point = right.split()[0], parts[4]  # the last mount of it wins (the visible one)
    fields: dict[str, Any] = {"st_dev": f"{major}:{minor}", "filesystem": filesystem, "mount_point": mount_point}
    sys_dir = Path(f"/sys/dev/block/{major}:{minor}")
    if sys_dir.exists():  # absent for overlay, tmpfs, btrfs subvolumes, network filesystems
        disk = sys_dir.resolve()
        if (disk / "partition").exists():
            disk = disk.parent  # queue settings and the model belong to the whole disk
        queue = disk / "queue"
        rotational = _read_sys(queue / "rotational")
        scheduler = _read_sys(queue / "scheduler")
        if scheduler and "[" in scheduler:
            scheduler = scheduler.split("[", 1)[1].split("]", 1)[0]  # the active one
        fields.update(
            block_device=disk.name, model=_read_sys(disk / "device" / "model"),
            vendor=_read_sys(disk / "device" / "vendor"),
            rotational=None if rotational is None else rotational == "1", scheduler=scheduler,
            nr_requests=_int_or_none(_read_sys(queue / "nr_requests")),
            max_sectors_kb=_int_or_none(_read_sys(queue / "max_sectors_kb")),
            logical_block_size=_int_or_none(_read_sys(queue / "logical_block_size")),
            physical_block_size=_int_or_none(_read_sys(queue / "physical_block_size")))
    return DeviceIdentity(**fields)


PROBE_NAME = "neuralink-device-probe"


@contextlib.contextmanager
def _probe_target(path: Path, probe_bytes: int) -> Iterator[tuple[Path, bool]]:
    """The file to read: `path` itself if it is a file of at least probe_bytes, else a temporary one beside it."""
    st = path.stat()
    if stat.S_ISREG(st.st_mode) and st.st_size >= probe_bytes:
        yield path, False
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise DeviceProfileError(f"{path}: not a regular file or a directory")
    directory = path if stat.S_ISDIR(st.st_mode) else path.parent
    # a temporary's name (``.neuralink-device-probe.<pid>.<random>.tmp``): one a killed probe left is removed here
    for stale in remove_stale_temporaries(directory / PROBE_NAME):
        logger.info("removed %s, a probe file a killed run left", stale)
    probe = temporary_path(directory / PROBE_NAME)
    try:
        logger.info("writing a %g MiB probe file %s", probe_bytes / MiB, probe)
        try:
            # random bytes: zeros could be deduplicated, compressed or left as holes below the filesystem
            rng = np.random.default_rng()
            with open(probe, "xb") as f:
                for start in range(0, probe_bytes, 4 * MiB):
                    f.write(rng.bytes(min(4 * MiB, probe_bytes - start)))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise DeviceProfileError(f"{directory}: cannot write a {probe_bytes / MiB:g} MiB probe file there "
                                     f"({e.strerror}); give a writable directory on the same device") from e
        _engine.evict_from_page_cache(str(probe))
        yield probe, True
    finally:
        probe.unlink(missing_ok=True)


def _probe(target: Path, read_bytes: int, depth: int, n_reads: int, seed: int, buffered: bool) -> dict[str, Any]:
    if buffered:
        _engine.evict_from_page_cache(str(target))  # buffered fallback: start each run from a cold page cache
    try:
        result = _engine.probe_reads(str(target), read_bytes, depth, n_reads, seed=seed, direct=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise DeviceProfileError(f"{target}: {n_reads} reads of {read_bytes} B at queue depth {depth} "
                                 f"failed: {e}") from e
    if result["seconds"] <= 0:
        raise DeviceProfileError(f"{target}: reads of {read_bytes} B at depth {depth} took no measurable time")
    return dict(result)


def measure_device(
    path: str | os.PathLike[str],
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    depths: Sequence[int] = DEFAULT_DEPTHS,
    seconds_per_point: float = DEFAULT_SECONDS_PER_POINT,
    probe_bytes: int = DEFAULT_PROBE_BYTES,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> DeviceProfile:
    """Measure direct-I/O IOPS and bandwidth of the storage holding `path` for every (size, depth).

    A file of at least `probe_bytes` is read in place; for a directory or a
    smaller file, a temporary file of `probe_bytes` random bytes is written
    beside it (fsynced, removed afterwards whatever happens). Each point gets
    about `seconds_per_point`: a short pilot sets the number of reads, then
    `trials` runs, spread over as many sweeps of the whole grid so that a burst
    of other work on the machine hits one run of many points rather than every
    run of one point; the median run counts. `progress(done, total)` is called
    after each run.
    """
    path = Path(path)
    sizes, depths = sorted(set(sizes)), sorted(set(depths))
    if not sizes or any(s <= 0 or s % READ_ALIGN for s in sizes):
        raise DeviceProfileError(f"read sizes must be positive multiples of {READ_ALIGN} B: {sizes}")
    if not depths or depths[0] < 1:
        raise DeviceProfileError(f"queue depths must be at least 1: {depths}")
    if not seconds_per_point > 0 or trials < 1:
        raise DeviceProfileError("seconds per point must be positive and trials at least 1")
    if probe_bytes < sizes[-1] or probe_bytes % READ_ALIGN:
        raise DeviceProfileError(f"the probe file ({probe_bytes} B) must be a multiple of {READ_ALIGN} B "
                                 f"holding at least one read of {sizes[-1]} B")
    identity = device_identity(path)
    load_before = list(os.getloadavg())
    grid = [(s, d) for s in sizes for d in depths]
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {p: [] for p in grid}
    n_reads: dict[tuple[int, int], int] = {}
    notes: list[str] = []
    direct = True
    with _probe_target(path, probe_bytes) as (target, temporary):
        target_bytes = target.stat().st_size
        for sweep in range(trials):
            for i, (size, depth) in enumerate(grid):
                if sweep == 0:
                    n_reads[size, depth] = _pilot(target, size, depth, seconds_per_point, trials, seed + i, not direct)
                result = _probe(target, size, depth, n_reads[size, depth], seed + (sweep + 1) * len(grid) + i,
                                not direct)
                runs[size, depth].append(result)
                if not result["direct"] and direct:
                    direct = False
                    logger.warning("%s: the filesystem refused O_DIRECT; reads go through the page cache", target)
                logger.info("%7d B depth %2d: %9.0f IOPS", size, depth, result["reads"] / result["seconds"])
                if progress is not None:
                    progress(sweep * len(grid) + i + 1, trials * len(grid))
    if not direct:
        notes.append("O_DIRECT was refused: buffered reads from an evicted page cache, not device numbers")
    if temporary or target_bytes < DEFAULT_PROBE_BYTES:
        notes.append(f"probed a {target_bytes / MiB:.0f} MiB file{' written just now' if temporary else ''}: caches "
                     "below the filesystem (the drive's DRAM, a hypervisor's page cache) may hold all of it, so "
                     "these numbers can be better than reads spread over a large cold model")
        logger.warning(notes[-1])
    points = []
    for size, depth in grid:
        rates = [r["reads"] / r["seconds"] for r in runs[size, depth]]
        points.append(ProbePoint(read_bytes=size, queue_depth=depth, reads=sum(r["reads"] for r in runs[size, depth]),
                                 seconds=sum(r["seconds"] for r in runs[size, depth]), iops=statistics.median(rates),
                                 iops_min=min(rates), iops_max=max(rates)))
    profile = DeviceProfile(
        device=identity, path=str(path.resolve()), sizes=sizes, depths=depths, points=points, direct=direct,
        measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        probe_file_bytes=target_bytes, probe_file_temporary=temporary, seconds_per_point=seconds_per_point,
        trials=trials, load_before=load_before, load_after=list(os.getloadavg()), notes=notes)
    profile.validate()
    return profile


def _pilot(target: Path, size: int, depth: int, seconds_per_point: float, trials: int, seed: int,
           buffered: bool) -> int:
    """Reads per run so that `trials` runs take about seconds_per_point, scaled from pilot runs not recorded."""
    least = _MIN_READS_PER_DEPTH * depth
    n = least
    while True:
        result = _probe(target, size, depth, n, seed, buffered)
        if result["seconds"] >= seconds_per_point / 10 or n >= _MAX_READS:
            break
        n *= 4
    rate = result["reads"] / result["seconds"]
    return int(min(max(round(rate * seconds_per_point / trials), least), _MAX_READS))


def default_cache_dir() -> Path:
    """~/.cache/neuralink/devices (neuralink.paths.cache_dir)."""
    return cache_dir("devices")


def cached_profile(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> DeviceProfile | None:
    """The cached profile of the device holding `path`, or None: never measures (for model loading)."""
    identity = device_identity(path)
    cache_file = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{identity.key}.json"
    if not cache_file.is_file():
        return None
    try:
        profile = DeviceProfile.load(cache_file)
    except DeviceProfileError as e:
        logger.warning("ignoring the cached profile: %s", e)
        return None
    return profile if profile.device.key == identity.key else None


def load_or_measure(
    path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    remeasure: bool = False,
    sizes: Sequence[int] = DEFAULT_SIZES,
    depths: Sequence[int] = DEFAULT_DEPTHS,
    **measure_options: Any,
) -> DeviceProfile:
    """The cached profile of the device holding `path` if it covers sizes x depths, else a new measurement.

    The cache holds one `<st_dev>-<disk>.json` per device in `cache_dir`
    (default: default_cache_dir()). `measure_options` go to measure_device.
    A cache that cannot be written is logged, not fatal.
    """
    identity = device_identity(path)
    cache_file = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{identity.key}.json"
    cached = None if remeasure else cached_profile(path, cache_dir)
    if cached is not None:
        if set(sizes) <= set(cached.sizes) and set(depths) <= set(cached.depths):
            logger.info("%s: cached profile of %s from %s", path, identity.describe(), cache_file)
            return cached
        logger.info("%s: the cached profile does not cover the requested grid; measuring", cache_file)
    profile = measure_device(path, sizes=sizes, depths=depths, **measure_options)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        profile.save(cache_file)
    except OSError as e:
        logger.warning("could not cache the device profile in %s: %s", cache_file, e)
    return profile


def grid_table(profile: DeviceProfile) -> str:
    """Markdown table: one row per read size, IOPS and MB/s (10^6 B/s) per queue depth."""
    header = "| read size | " + " | ".join(f"QD{d} IOPS | QD{d} MB/s" for d in profile.depths) + " |"
    lines = [header, "|" + "---:|" * (1 + 2 * len(profile.depths))]
    for s in profile.sizes:
        points = [profile.point(s, d) for d in profile.depths]
        cells = [f"{p.iops:,.0f} | {p.bandwidth_bytes_s / 1e6:,.0f}" for p in points]
        lines.append(f"| {format_size(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(profile: DeviceProfile) -> str:
    """Markdown table of the cost model and collapse threshold at every measured depth."""
    lines = [f"| QD | {format_size(profile.sizes[0])} IOPS | read cost (us) | peak MB/s | saturates at "
             f"({BANDWIDTH_SATURATION:.0%} of peak) | bandwidth-bound | collapse gap (B) |",
             "|---:|---:|---:|---:|---:|:---:|---:|"]
    for row in profile.derived():
        d = row["queue_depth"]
        lines.append(f"| {d} | {profile.point(profile.sizes[0], d).iops:,.0f} | {row['seconds_per_read'] * 1e6:.1f} | "
                     f"{row['bandwidth_bytes_s'] / 1e6:,.0f} | {format_size(row['saturation_bytes'])} | "
                     f"{'yes' if row['bandwidth_bound'] else 'no'} | {row['collapse_gap_bytes']:,} |")
    return "\n".join(lines)


def describe_measurement(profile: DeviceProfile) -> str:
    """Where, when and how the profile was measured, with the machine's load; one line each."""
    probe = (f"a {profile.probe_file_bytes / MiB:.0f} MiB probe file written for it" if profile.probe_file_temporary
             else f"the file itself ({profile.probe_file_bytes / MiB:.0f} MiB)")
    spread = sorted((p.iops_max - p.iops_min) / p.iops for p in profile.points)
    lines = [f"device: {profile.device.describe()}",
             f"measured {profile.measured_at} under {profile.path} through {probe}; "
             f"{'direct I/O' if profile.direct else 'BUFFERED I/O (O_DIRECT refused)'}; "
             f"~{profile.seconds_per_point:g} s per point in {profile.trials} runs (median)",
             f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in profile.load_before)}, after "
             f"{'/'.join(f'{x:.1f}' for x in profile.load_after)} on {os.cpu_count()} CPUs; run-to-run IOPS spread "
             f"median {statistics.median(spread):.0%}, worst {spread[-1]:.0%}"]
    if profile.loaded_from is not None:
        lines.append(f"cached: {profile.loaded_from} (--remeasure to measure again)")
    lines += [f"note: {note}" for note in profile.notes]
    return "\n".join(lines)


def _render_png(profile: DeviceProfile, output: Path) -> None:
    # deferred: matplotlib loads only when a picture is drawn; Agg, without touching pyplot's global backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.6), dpi=120)
    FigureCanvasAgg(figure)
    bandwidth_ax, iops_ax = figure.subplots(1, 2)
    for d in profile.depths:
        points = [profile.point(s, d) for s in profile.sizes]
        bandwidth_ax.plot(profile.sizes, [p.bandwidth_bytes_s / 1e6 for p in points], marker="o", ms=3,
                          label=f"QD {d}")
        iops_ax.plot(profile.sizes, [p.iops for p in points], marker="o", ms=3, label=f"QD {d}")
    for ax, label in ((bandwidth_ax, "bandwidth (MB/s)"), (iops_ax, "IOPS")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(profile.sizes, [format_size(s).replace(" ", "") for s in profile.sizes], rotation=45)
        ax.set_xlabel("read size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    iops_ax.set_yscale("log")
    bandwidth_ax.legend(fontsize="small")
    figure.suptitle(f"{profile.device.block_device or profile.device.st_dev}: random "
                    f"{'direct' if profile.direct else 'buffered'} reads, {profile.measured_at[:10]}, "
                    f"load {profile.load_before[0]:.1f}", fontsize="medium")
    figure.tight_layout()
    figure.savefig(output, format="png")


def plot_profile(profile: DeviceProfile, output: str | os.PathLike[str]) -> Path:
    """Write the paper's Figure 4 for this device to `output` (PNG): bandwidth and IOPS against read size."""
    output = Path(output)
    write_atomically(output, lambda tmp: _render_png(profile, tmp))
    return output


def write_outputs(profile: DeviceProfile, json_path: Path | None, png_path: Path | None) -> None:
    """Write the JSON and the PNG both or neither: render each to a temporary file, then rename them."""
    staged: list[tuple[Path, Path]] = []
    try:
        for final, render in ((png_path, lambda t: _render_png(profile, t)), (json_path, profile.save)):
            if final is not None:
                tmp = temporary_path(final)
                staged.append((tmp, final))
                render(tmp)
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise


__all__ = [
    "DeviceIdentity", "DeviceProfile", "DeviceProfileError", "ProbePoint", "cost_table", "default_cache_dir",
    "device_identity", "grid_table", "load_or_measure", "measure_device", "plot_profile", "write_outputs",
]


def read_cost_options(sidecar: str | os.PathLike[str], queue_depth: int) -> dict[str, Any]:
    """The engine's read-cost options from the device profile cached for `sidecar`'s storage (the collapse gap
    follows from it), or none: a model's load never measures the device."""
    profile = cached_profile(sidecar)
    if profile is None:
        logger.info("%s: no device profile cached; the engine uses a phone-flash cost model "
                    "(run `neuralink device-profile %s` to measure this storage)", sidecar, Path(sidecar).parent)
        return {}
    options = profile.engine_options(queue_depth)
    del options["queue_depth"]
    return options
