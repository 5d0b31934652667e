"""neuralink device-profile: the measured grid, its JSON and cache, the cost model and collapse rule, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from neuralink import _engine, cli
from neuralink.command import size_argument
from neuralink.errors import DeviceProfileError, EngineIOError
from neuralink.runtime import device_probe as device
from neuralink.runtime.device_probe import DeviceIdentity, DeviceProfile, ProbePoint
from neuralink.runtime.device_profile import BANDWIDTH_SATURATION

TINY = {"sizes": [4096, 8192], "depths": [1, 2], "seconds_per_point": 0.005, "probe_bytes": 1 << 20, "trials": 2}
TINY_FLAGS = ["--sizes", "4K", "8K", "--depths", "1", "2", "--seconds-per-point", "0.005", "--probe-bytes", "1M"]


def probe_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".neuralink-device-probe*"))


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[DeviceProfile, Path]:
    directory = tmp_path_factory.mktemp("probe")
    return device.measure_device(directory, **TINY), directory


def synthetic_profile(latency_s: float, bandwidth: float, depths: tuple[int, ...] = (1, 4)) -> DeviceProfile:
    """A device whose read of n bytes takes latency_s + n / bandwidth at every depth."""
    sizes = [4096 << i for i in range(11)]
    points = []
    for d in depths:
        for s in sizes:
            iops = 1.0 / (latency_s + s / bandwidth)
            points.append(ProbePoint(read_bytes=s, queue_depth=d, reads=100, seconds=100 / iops, iops=iops,
                                     iops_min=iops, iops_max=iops))
    return DeviceProfile(device=DeviceIdentity(st_dev="8:0", block_device="sda"), path="/x", sizes=sizes,
                         depths=list(depths), points=points, direct=True, measured_at="2025-01-01T00:00:00+00:00",
                         probe_file_bytes=1 << 28, probe_file_temporary=True, seconds_per_point=1.0, trials=3,
                         load_before=[0.0, 0.0, 0.0], load_after=[0.0, 0.0, 0.0])


def test_measured_grid_and_probe_file_removed(measured: tuple[DeviceProfile, Path]) -> None:
    profile, directory = measured
    assert [(p.read_bytes, p.queue_depth) for p in profile.points] == [(4096, 1), (4096, 2), (8192, 1), (8192, 2)]
    for p in profile.points:
        assert p.reads >= 8 * p.queue_depth * TINY["trials"] and p.seconds > 0
        assert p.iops_min <= p.iops <= p.iops_max
    assert profile.probe_file_temporary and profile.probe_file_bytes == 1 << 20
    assert profile.device.st_dev == "{}:{}".format(*(f(os.stat(directory).st_dev) for f in (os.major, os.minor)))
    assert any("caches below the filesystem" in note for note in profile.notes)
    assert probe_files(directory) == []


def test_json_has_documented_fields_and_round_trips(measured: tuple[DeviceProfile, Path], tmp_path: Path) -> None:
    profile, _ = measured
    path = profile.save(tmp_path / "profile.json")
    data = json.loads(path.read_text())
    assert data["format"] == "neuralink.device-profile" and data["format_version"] == 1
    assert {"st_dev", "block_device", "model", "rotational", "scheduler", "nr_requests", "filesystem"} <= set(
        data["device"])
    assert {"path", "sizes", "depths", "points", "direct", "measured_at", "probe_file_bytes", "probe_file_temporary",
            "seconds_per_point", "trials", "load_before", "load_after", "notes", "derived"} <= set(data)
    assert set(data["points"][0]) == {"read_bytes", "queue_depth", "reads", "seconds", "iops", "bandwidth_bytes_s",
                                      "iops_min", "iops_max"}
    assert [row["queue_depth"] for row in data["derived"]] == [1, 2]
    loaded = DeviceProfile.load(path)
    assert loaded == profile and loaded.loaded_from == path
    assert loaded.collapse_gap_bytes(2) == profile.collapse_gap_bytes(2)
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temporary left behind


def test_malformed_profiles_are_refused(measured: tuple[DeviceProfile, Path], tmp_path: Path) -> None:
    data = measured[0].to_json()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeviceProfileError, match="cannot read"):
        DeviceProfile.load(bad)
    bad.write_text(json.dumps(dict(data, points=data["points"][:-1])))
    with pytest.raises(DeviceProfileError, match="do not cover"):
        DeviceProfile.load(bad)
    bad.write_text(json.dumps(dict(data, format_version=99)))
    with pytest.raises(DeviceProfileError, match="format version 99"):
        DeviceProfile.load(bad)


def test_cache_is_reused_unless_remeasured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = device.measure_device

    def counting(path: Path, **options: object) -> DeviceProfile:
        calls.append(Path(path))
        return real(path, **options)

    monkeypatch.setattr(device, "measure_device", counting)
    cache = tmp_path / "cache"
    options = dict(TINY)
    first = device.load_or_measure(tmp_path, cache_dir=cache, **options)
    assert len(calls) == 1 and first.loaded_from is None
    assert [p.name for p in cache.iterdir()] == [f"{first.device.key}.json"]
    second = device.load_or_measure(tmp_path, cache_dir=cache, **options)
    assert len(calls) == 1 and second == first and second.loaded_from is not None
    device.load_or_measure(tmp_path, cache_dir=cache, **dict(options, sizes=[4096]))  # a sub-grid is covered
    assert len(calls) == 1
    device.load_or_measure(tmp_path, cache_dir=cache, **dict(options, depths=[1, 2, 4]))  # a wider one is not
    assert len(calls) == 2
    device.load_or_measure(tmp_path, cache_dir=cache, remeasure=True, **options)
    assert len(calls) == 3


def test_cli_writes_outputs_and_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[Path] = []
    real = device.measure_device
    monkeypatch.setattr(device, "measure_device", lambda path, **o: calls.append(path) or real(path, **o))
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    argv = ["device-profile", str(tmp_path), *TINY_FLAGS, "--cache-dir", str(tmp_path / "cache")]
    assert cli.main([*argv, "--json", str(out_json), "--png", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "| read size | QD1 IOPS | QD1 MB/s | QD2 IOPS | QD2 MB/s |" in printed and "collapse gap" in printed
    assert DeviceProfile.load(out_json).sizes == [4096, 8192]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(argv) == 0 and len(calls) == 1
    assert "cached:" in capsys.readouterr().out
    assert cli.main([*argv, "--remeasure"]) == 0 and len(calls) == 2
    assert probe_files(tmp_path) == []


def test_a_large_file_is_read_in_place(tmp_path: Path) -> None:
    data = tmp_path / "sidecar.bin"
    data.write_bytes(os.urandom(1 << 20))
    profile = device.measure_device(data, **TINY)
    assert not profile.probe_file_temporary and profile.probe_file_bytes == 1 << 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sidecar.bin"]


def test_iops_bound_device_merges_gaps_worth_less_than_a_read() -> None:
    latency, bandwidth = 60e-6, 1.4e9
    profile = synthetic_profile(latency, bandwidth)
    seconds_per_read, peak = profile.read_cost(4)
    # the peak is what 2 MiB reads achieve (median of 1, 2, 4 MiB), a little under the device's asymptote
    assert peak == profile.point(2 << 20, 4).bandwidth_bytes_s == pytest.approx(bandwidth, rel=0.05)
    assert seconds_per_read == pytest.approx(latency, rel=0.05)
    # the model reproduces the measured time of the smallest read exactly
    assert seconds_per_read + 4096 / peak == pytest.approx(1 / profile.point(4096, 4).iops)
    assert not profile.is_bandwidth_bound(4)
    gap = profile.collapse_gap_bytes(4)
    # merge when gap < seconds_per_read x bandwidth; the engine merges gaps of at most `gap` bytes
    assert gap < seconds_per_read * peak <= gap + 1
    assert gap == pytest.approx(latency * bandwidth, rel=0.05)
    assert profile.engine_options(4) == {"queue_depth": 4, "collapse_gap_bytes": gap,
                                         "read_latency_s": seconds_per_read, "bandwidth_bytes_s": peak}
    model = profile.cost_model(4)
    assert (model.read_latency_s, model.bandwidth_bytes_per_s) == (seconds_per_read, peak)


def test_bandwidth_bound_device_never_merges() -> None:
    # 4 KiB reads already reach the saturation fraction of the peak: a read costs almost only its bytes
    profile = synthetic_profile(0.5e-6, 1.4e9)
    assert profile.point(4096, 1).bandwidth_bytes_s >= BANDWIDTH_SATURATION * profile.peak_bandwidth(1)
    assert profile.read_cost(1)[0] > 0
    assert profile.is_bandwidth_bound(1) and profile.collapse_gap_bytes(1) == 0
    # the same device is IOPS-bound for callers whose typical read is smaller than saturation
    slow = synthetic_profile(20e-6, 1.4e9)
    assert slow.saturation_bytes(1) > 4096 and slow.collapse_gap_bytes(1) > 0
    assert slow.is_bandwidth_bound(1, read_bytes=slow.saturation_bytes(1))
    assert slow.collapse_gap_bytes(1, read_bytes=slow.saturation_bytes(1)) == 0


def test_one_lucky_point_does_not_set_the_peak() -> None:
    profile = synthetic_profile(60e-6, 1.4e9)
    before = profile.read_cost(4)
    lucky = profile.point(4 << 20, 4)
    profile.points[profile.points.index(lucky)] = ProbePoint(lucky.read_bytes, 4, lucky.reads, lucky.seconds / 2,
                                                             lucky.iops * 2, lucky.iops_min, lucky.iops * 2)
    assert profile.read_cost(4) == before


def test_depths_between_measured_ones_use_the_one_below() -> None:
    profile = synthetic_profile(60e-6, 1.4e9, depths=(1, 4))
    assert [profile.nearest_depth(q) for q in (1, 2, 3, 4, 8, 64)] == [1, 1, 1, 4, 4, 4]


def test_missing_path_fails_clearly_without_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DeviceProfileError, match="nope"):
        device.measure_device(missing, **TINY)
    out = tmp_path / "out.json"
    assert cli.main(["device-profile", str(missing), *TINY_FLAGS, "--cache-dir", str(tmp_path / "c"),
                     "--json", str(out)]) == 1
    assert "No such file" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "c").exists()


def test_unwritable_directory_and_special_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(DeviceProfileError, match="cannot write a 1 MiB probe file"):
        device.measure_device("/proc", **TINY)  # not writable, even by root
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DeviceProfileError, match="not a regular file or a directory"):
        device.measure_device(fifo, **TINY)
    with pytest.raises(DeviceProfileError, match="multiples of 4096"):
        device.measure_device(tmp_path, **dict(TINY, sizes=[5000]))


@pytest.mark.parametrize("error", [EngineIOError("short read at offset 4096"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_read_removes_the_probe_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             error: BaseException) -> None:
    def failing(*args: object, **kwargs: object) -> dict:
        raise error

    monkeypatch.setattr(_engine, "probe_reads", failing)
    expected = DeviceProfileError if isinstance(error, Exception) else KeyboardInterrupt
    with pytest.raises(expected, match="short read" if expected is DeviceProfileError else None):
        device.measure_device(tmp_path, **TINY)
    assert probe_files(tmp_path) == []


def test_parse_size() -> None:
    assert [size_argument(t) for t in ("4096", "4K", "4KiB", "64k", "1M", "1MiB")] == [
        4096, 4096, 4096, 65536, 1 << 20, 1 << 20]
    for bad in ("0", "x", "4T", "-4K"):
        with pytest.raises(Exception, match="not a positive size"):
            size_argument(bad)


def test_a_probe_file_a_killed_run_left_is_removed_by_the_next(tmp_path: Path) -> None:
    # a process that no longer exists (pid_max is at most 2**22) left its 256 MiB probe file behind
    left = tmp_path / ".neuralink-device-probe.4194999.0a1b2c3d.tmp"
    left.write_bytes(b"x" * 4096)
    running = tmp_path / f".neuralink-device-probe.{os.getppid()}.0a1b2c3d.tmp"  # a live process's: kept
    running.write_bytes(b"x")
    device.measure_device(tmp_path, **TINY)
    assert probe_files(tmp_path) == [running]
