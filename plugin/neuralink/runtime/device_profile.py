"""A device's read cost: the cost model of one read, and the profile measured for it.

A device profile holds direct-I/O IOPS and bandwidth over read sizes x queue depths, and the cost model it gives.

Written by ``neuralink device-profile`` (neuralink.runtime.device_probe), one JSON file per
device. The engine takes from it, for its queue depth, the cost of one more
read, the bandwidth of long reads and the access-collapse threshold: merge
two runs when reading the gap costs less than one more read, and never when
the device is bandwidth-bound (the reads we issue already saturate it).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neuralink import _engine
from neuralink.errors import DeviceProfileError, OptionError
from neuralink.formats.files import atomic_output
from neuralink.formats.sizes import KiB

# the phone-flash model used without a measured profile: the engine's defaults (neuralink/defaults.h)
DEFAULT_READ_LATENCY_S: float = _engine.DEFAULT_READ_LATENCY_S
DEFAULT_BANDWIDTH_BYTES_PER_S: float = _engine.DEFAULT_BANDWIDTH_BYTES_S
DEFAULT_ALIGNMENT: int = _engine.DIRECT_ALIGN


@dataclass(frozen=True)
class DeviceCostModel:
    """Time of one read: latency + bytes / bandwidth; reads cover whole alignment blocks."""

    read_latency_s: float = DEFAULT_READ_LATENCY_S
    bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH_BYTES_PER_S
    alignment: int = DEFAULT_ALIGNMENT

    def __post_init__(self) -> None:
        if self.read_latency_s < 0 or self.bandwidth_bytes_per_s <= 0 or self.alignment < 1:
            raise OptionError(f"cost model needs latency >= 0, bandwidth > 0 and alignment >= 1: {self}")

    def collapse_gap(self, bundle_bytes: int) -> int:
        """Largest gap, in neurons, that costs less to read through than one more read."""
        return max(math.ceil(self.read_latency_s * self.bandwidth_bytes_per_s / bundle_bytes) - 1, 0)

    def seconds(self, reads: float, n_bytes: float) -> float:
        """Time of `reads` reads moving `n_bytes` bytes in all, one after the other."""
        return reads * self.read_latency_s + n_bytes / self.bandwidth_bytes_per_s


DEFAULT_COST_MODEL = DeviceCostModel()


DEVICE_PROFILE_FORMAT = "neuralink.device-profile"
DEVICE_PROFILE_FORMAT_VERSION = 1
DEFAULT_SIZES: tuple[int, ...] = tuple(4 * KiB << i for i in range(11))  # 4 KiB ... 4 MiB
DEFAULT_DEPTHS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
READ_ALIGN: int = _engine.DIRECT_ALIGN  # the engine's direct-I/O block (kDirectAlign)
# a read size saturates the device at a depth when it reaches this fraction of the best bandwidth there
BANDWIDTH_SATURATION = 0.8
PEAK_SIZES = 3  # the largest read sizes whose median bandwidth is the device's peak at a depth


@dataclass(frozen=True)
class DeviceIdentity:
    """Which storage a path lives on: st_dev and what /sys/dev/block tells about it (None where it does not)."""

    st_dev: str  # "major:minor"
    block_device: str | None = None  # whole-disk name, e.g. "nvme0n1", "vda"
    model: str | None = None
    vendor: str | None = None
    rotational: bool | None = None
    scheduler: str | None = None
    nr_requests: int | None = None
    max_sectors_kb: int | None = None
    logical_block_size: int | None = None
    physical_block_size: int | None = None
    filesystem: str | None = None
    mount_point: str | None = None

    @property
    def key(self) -> str:
        """Cache key: st_dev, plus the disk name so a renumbered device is not mistaken for another."""
        key = self.st_dev.replace(":", "-")
        return f"{key}-{self.block_device}" if self.block_device else key

    def describe(self) -> str:
        """One line for people: disk, st_dev, model, queue settings, filesystem."""
        what = [self.block_device or "no block device", f"st_dev {self.st_dev}"]
        what += [f"model {self.model}"] if self.model else ([f"vendor {self.vendor}"] if self.vendor else [])
        if self.rotational is not None:
            what.append("rotational" if self.rotational else "non-rotational")
        if self.scheduler:
            what.append(f"scheduler {self.scheduler}")
        if self.filesystem:
            what.append(f"{self.filesystem} on {self.mount_point}")
        return ", ".join(what)


@dataclass(frozen=True)
class ProbePoint:
    """One grid point: `trials` timed runs of random reads; rates are the median run's."""

    read_bytes: int
    queue_depth: int
    reads: int  # over all runs
    seconds: float  # over all runs
    iops: float
    iops_min: float
    iops_max: float

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.iops * self.read_bytes


@dataclass
class DeviceProfile:
    """IOPS and bandwidth of one device over a grid of read sizes and queue depths, and the cost model from them.

    `points` holds one ProbePoint per (size, depth) of `sizes` x `depths`.
    `direct` is False when the filesystem refused O_DIRECT (page-cache numbers).
    """

    device: DeviceIdentity
    path: str  # what was asked for
    sizes: list[int]
    depths: list[int]
    points: list[ProbePoint]
    direct: bool
    measured_at: str  # ISO 8601, UTC
    probe_file_bytes: int
    probe_file_temporary: bool  # a probe file was written for the measurement
    seconds_per_point: float
    trials: int
    load_before: list[float]  # os.getloadavg(): other work on the machine skews the numbers
    load_after: list[float]
    notes: list[str] = field(default_factory=list)
    loaded_from: Path | None = field(default=None, compare=False)  # set by load(), not saved

    def validate(self, where: str = "device profile") -> None:
        """Raise DeviceProfileError unless the grid is complete, sorted and positive."""
        if not self.sizes or not self.depths:
            raise DeviceProfileError(f"{where}: empty grid")
        if self.sizes != sorted(set(self.sizes)) or any(s <= 0 or s % READ_ALIGN for s in self.sizes):
            raise DeviceProfileError(f"{where}: sizes must be increasing positive multiples of {READ_ALIGN}")
        if self.depths != sorted(set(self.depths)) or self.depths[0] < 1:
            raise DeviceProfileError(f"{where}: depths must be increasing and at least 1")
        want = {(s, d) for s in self.sizes for d in self.depths}
        if len(self.points) != len(want) or {(p.read_bytes, p.queue_depth) for p in self.points} != want:
            raise DeviceProfileError(f"{where}: {len(self.points)} points do not cover the "
                                     f"{len(self.sizes)} x {len(self.depths)} grid once each")
        if any(not (p.iops > 0 and math.isfinite(p.iops)) or p.reads <= 0 for p in self.points):
            raise DeviceProfileError(f"{where}: every point needs reads and a positive finite IOPS")

    def point(self, read_bytes: int, queue_depth: int) -> ProbePoint:
        """The measured point at exactly (read_bytes, queue_depth); KeyError if it was not measured."""
        for p in self.points:  # a scan, not an index: points may be edited, and the grid is small
            if p.read_bytes == read_bytes and p.queue_depth == queue_depth:
                return p
        raise KeyError((read_bytes, queue_depth))

    def nearest_depth(self, queue_depth: int) -> int:
        """The measured depth used for `queue_depth`: the largest not above it (the smallest if all are)."""
        below = [d for d in self.depths if d <= queue_depth]
        return below[-1] if below else self.depths[0]

    def peak_bandwidth(self, queue_depth: int) -> float:
        """Bandwidth of long reads at (the nearest measured) depth, bytes/s: the median over the largest sizes.

        The median of the PEAK_SIZES largest read sizes rather than the best
        point, so that one lucky run (a burst of idle time on a shared
        machine) does not set the model; the grid should reach past the knee.
        """
        d = self.nearest_depth(queue_depth)
        return statistics.median(self.point(s, d).bandwidth_bytes_s for s in self.sizes[-PEAK_SIZES:])

    def saturation_bytes(self, queue_depth: int) -> int:
        """Smallest read size whose bandwidth reaches BANDWIDTH_SATURATION of the peak at that depth."""
        d, peak = self.nearest_depth(queue_depth), self.peak_bandwidth(queue_depth)
        return next(s for s in self.sizes if self.point(s, d).bandwidth_bytes_s >= BANDWIDTH_SATURATION * peak)

    def is_bandwidth_bound(self, queue_depth: int, read_bytes: int | None = None) -> bool:
        """Whether reads of `read_bytes` (default: the smallest measured, one aligned block) already saturate."""
        return self.saturation_bytes(queue_depth) <= (read_bytes or self.sizes[0])

    def read_cost(self, queue_depth: int) -> tuple[float, float]:
        """(seconds_per_read, bytes_per_second) at a depth: one read of n bytes costs s + n / B of device time.

        B is the peak bandwidth at that depth and s the marginal cost of one
        more read: the time per smallest read (1 / IOPS) less its transfer
        time, so that the model reproduces both ends of the measured curve.
        """
        d, bandwidth = self.nearest_depth(queue_depth), self.peak_bandwidth(queue_depth)
        smallest = self.point(self.sizes[0], d)
        return max(1.0 / smallest.iops - smallest.read_bytes / bandwidth, 0.0), bandwidth

    def collapse_gap_bytes(self, queue_depth: int, read_bytes: int | None = None) -> int:
        """Largest gap worth reading through: gap < seconds_per_read x bandwidth; 0 when bandwidth-bound."""
        if self.is_bandwidth_bound(queue_depth, read_bytes):
            return 0  # longer reads gain no bandwidth there: merging only adds bytes
        seconds_per_read, bandwidth = self.read_cost(queue_depth)
        return max(math.ceil(seconds_per_read * bandwidth) - 1, 0)

    def cost_model(self, queue_depth: int) -> DeviceCostModel:
        """The read cost model at a depth, as iocost uses it (placement evaluation)."""
        seconds_per_read, bandwidth = self.read_cost(queue_depth)
        return DeviceCostModel(seconds_per_read, bandwidth, READ_ALIGN)

    def engine_options(self, queue_depth: int) -> dict[str, Any]:
        """Keyword arguments of `_engine.Engine` for reads at `queue_depth`."""
        seconds_per_read, bandwidth = self.read_cost(queue_depth)
        return {"queue_depth": queue_depth, "collapse_gap_bytes": self.collapse_gap_bytes(queue_depth),
                "read_latency_s": seconds_per_read, "bandwidth_bytes_s": bandwidth}

    def derived(self) -> list[dict[str, Any]]:
        """The cost model at every measured depth (written to the JSON for readers; recomputed on load)."""
        rows = []
        for d in self.depths:
            seconds_per_read, bandwidth = self.read_cost(d)
            rows.append({"queue_depth": d, "seconds_per_read": seconds_per_read, "bandwidth_bytes_s": bandwidth,
                         "saturation_bytes": self.saturation_bytes(d), "bandwidth_bound": self.is_bandwidth_bound(d),
                         "collapse_gap_bytes": self.collapse_gap_bytes(d)})
        return rows

    def to_json(self) -> dict[str, Any]:
        """The JSON document save() writes (see docs/device-profile.md for its fields)."""
        self.validate()
        out = {"format": DEVICE_PROFILE_FORMAT, "format_version": DEVICE_PROFILE_FORMAT_VERSION,
               "device": asdict(self.device)}
        out.update({k: v for k, v in asdict(self).items() if k not in ("device", "points", "loaded_from")})
        out["points"] = [dict(asdict(p), bandwidth_bytes_s=p.bandwidth_bytes_s) for p in self.points]
        out["derived"] = self.derived()
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "device profile") -> DeviceProfile:
        """Rebuild from `to_json()` output; DeviceProfileError naming what is wrong otherwise."""
        if not isinstance(data, dict) or data.get("format") != DEVICE_PROFILE_FORMAT:
            raise DeviceProfileError(f"{where}: not a {DEVICE_PROFILE_FORMAT} file")
        if data.get("format_version") != DEVICE_PROFILE_FORMAT_VERSION:
            raise DeviceProfileError(f"{where}: format version {data.get('format_version')}, "
                                     f"expected {DEVICE_PROFILE_FORMAT_VERSION}")
        try:
            fields = {k: data[k] for k in ("path", "sizes", "depths", "direct", "measured_at", "probe_file_bytes",
                                           "probe_file_temporary", "seconds_per_point", "trials", "load_before",
                                           "load_after", "notes")}
            points = [ProbePoint(**{k: v for k, v in p.items() if k != "bandwidth_bytes_s"}) for p in data["points"]]
            profile = cls(device=DeviceIdentity(**data["device"]), points=points, **fields)
        except (KeyError, TypeError, AttributeError) as e:
            raise DeviceProfileError(f"{where}: missing or malformed field ({e})") from e
        profile.validate(where)
        return profile

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON to `path` through a temporary file and a rename."""
        path = Path(path)
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceProfile:
        """Read a profile written by save(); DeviceProfileError if it is unreadable or malformed."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise DeviceProfileError(f"{path}: cannot read a device profile: {e}") from e
        profile = cls.from_json(data, str(path))
        profile.loaded_from = Path(path)
        return profile


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) on a temporary name beside `path`, then rename it over `path`; no partial file remains."""
    with atomic_output(path) as tmp:
        write(tmp)
