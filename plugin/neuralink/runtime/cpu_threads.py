"""How many compute threads decoding gets when the caller does not say: one per physical core this process may use.

llama-cpp-python's default is half of ``os.cpu_count()``, which assumes two
hardware threads per core: on a machine without SMT (most cloud VMs of a few
vCPUs, every phone) that leaves half the cores idle, and decoding on two such
cores ran 1.8x faster with both (docs/benchmarks.md). llama.cpp's own tools
count physical cores; this does the same, within the CPUs the process is
allowed to run on (its affinity) and the CPU time its cgroup's quota allows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_SYS_CPU = Path("/sys/devices/system/cpu")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _physical_cores(cpus: set[int], sys_cpu: Path) -> int | None:
    """Distinct (package, core) pairs among `cpus`, or None where sysfs does not say."""
    cores = set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return None
    return len(cores) or None


def _own_cgroup_dirs(root: Path, controller: str, proc_cgroup: Path) -> list[Path]:
    """The directories that may hold this process's cgroup files for a v1 `controller`, or v2's ("")."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    dirs = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controller == "" and controllers == "":
            dirs.append(root / path.lstrip("/"))
        elif controller and controller in controllers.split(","):
            # mounted as "cpu,cpuacct" or as "cpu" (often both, one a link to the other)
            dirs += [root / controllers / path.lstrip("/"), root / controller / path.lstrip("/")]
    # in a container with its own cgroup namespace its cgroup is the mount's root; without one, the path
    # above is the host's and only the root is there to read
    dirs.append(root / controller if controller else root)
    return dirs


def _cgroup_cpu_quota(root: Path, proc_cgroup: Path) -> float | None:
    """The CPUs' worth of time this process's cgroup may use (v2 cpu.max, v1 cfs quota), None if unlimited."""
    for directory in _own_cgroup_dirs(root, "", proc_cgroup):
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError, ZeroDivisionError):
            continue
    for directory in _own_cgroup_dirs(root, "cpu", proc_cgroup):
        try:
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def default_thread_count(sys_cpu: Path = _SYS_CPU, cgroup_root: Path = _CGROUP_ROOT,
                         proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """One thread per physical core among the CPUs this process may run on, no more than its CPU quota allows."""
    cpus = _allowed_cpus()
    cores = _physical_cores(cpus, sys_cpu)
    if cores is None:
        cores = max(len(cpus) // 2, 1)  # llama-cpp-python's guess, where the topology is not readable
    quota = _cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cores = min(cores, max(math.ceil(quota), 1))
    return max(cores, 1)


__all__ = ["default_thread_count"]
