"""Decoding's default thread count: one per physical core the process may use, not llama-cpp-python's half of the
CPUs, which on a machine without SMT leaves half the cores idle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import neuralink
from neuralink import _engine
from neuralink.runtime.server import NeuralinkOptions, _ServerLlamaNames


def default_thread_count(sys_cpu: Path | None = None, cgroup_root: Path | None = None,
                         proc_cgroup: Path | None = None) -> int:
    """The engine's rule (neuralink.Llama's and neuralink-run's), on the given sysfs and cgroup trees."""
    paths = {name: os.fspath(path) for name, path in
             (("sys_cpu", sys_cpu), ("cgroup_root", cgroup_root), ("proc_cgroup", proc_cgroup)) if path is not None}
    return _engine.default_thread_count(**paths)


def allowed_cpus_in_child(cpus: set[int], sys_cpu: Path, none: Path) -> int:
    """default_thread_count in a process whose affinity is `cpus` (as `taskset` would set it)."""
    code = ("import os, sys; from neuralink import _engine; os.sched_setaffinity(0, {cpus}); "
            f"print(_engine.default_thread_count(sys.argv[1], sys.argv[2], sys.argv[2]))").replace("{cpus}", repr(cpus))
    done = subprocess.run([sys.executable, "-c", code, os.fspath(sys_cpu), os.fspath(none)], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


def fake_topology(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    """A sysfs cpu directory whose cpu N has (package, core) = cores[N]."""
    for cpu, (package, core) in cores.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


def fake_cgroup(root: Path, proc: dict[str, str], files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup mount at root/cgroup holding `files`, and a /proc/self/cgroup naming `proc` (controllers: path)."""
    for name, text in files.items():
        path = root / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "proc").write_text("".join(f"{n}:{c}:{p}\n" for n, (c, p) in enumerate(proc.items())))
    return root / "cgroup", root / "proc"


@pytest.fixture
def cpus() -> list[int]:
    """The CPUs this process may run on; the fake topologies below describe them."""
    return sorted(os.sched_getaffinity(0))


def test_a_machine_without_smt_gets_a_thread_per_cpu(tmp_path: Path, cpus: list[int]) -> None:
    sys_cpu = fake_topology(tmp_path / "cpu", {cpu: (0, k) for k, cpu in enumerate(cpus)})
    assert default_thread_count(sys_cpu, tmp_path / "none", tmp_path / "none") == len(cpus)


def test_hyperthreads_of_one_core_count_once(tmp_path: Path, cpus: list[int]) -> None:
    # llama-cpp-python's half of the CPUs is right here, and so is this
    sys_cpu = fake_topology(tmp_path / "cpu", {cpu: (0, k // 2) for k, cpu in enumerate(cpus)})
    assert default_thread_count(sys_cpu, tmp_path / "none", tmp_path / "none") == (len(cpus) + 1) // 2
    # the same core id on two packages is two cores
    sys_cpu = fake_topology(tmp_path / "two", {cpu: (k % 2, 0) for k, cpu in enumerate(cpus)})
    assert default_thread_count(sys_cpu, tmp_path / "none", tmp_path / "none") == min(len(cpus), 2)


def test_only_the_cpus_the_process_may_run_on_count(tmp_path: Path, cpus: list[int]) -> None:
    sys_cpu = fake_topology(tmp_path / "cpu", {cpu: (0, k) for k, cpu in enumerate(cpus)})
    assert allowed_cpus_in_child({cpus[-1]}, sys_cpu, tmp_path / "none") == 1  # taskset -c N


def test_an_unreadable_topology_falls_back_to_half_the_cpus(tmp_path: Path, cpus: list[int]) -> None:
    assert default_thread_count(tmp_path / "no-sysfs", tmp_path / "none", tmp_path / "none") == max(len(cpus) // 2, 1)


@pytest.fixture
def two_or_more(cpus: list[int]) -> list[int]:
    if len(cpus) < 2:
        pytest.skip("a hybrid CPU needs two CPUs this process may run on")
    return cpus


def test_a_big_little_phone_decodes_on_its_big_cores(tmp_path: Path, two_or_more: list[int]) -> None:
    cpus = two_or_more
    sys_cpu = fake_topology(tmp_path / "cpu", {cpu: (0, k) for k, cpu in enumerate(cpus)})
    # the first CPU a little core (a quarter of the fastest one's capacity), the others big or middle ones
    capacities = [256] + [1024 if k % 2 else 700 for k in range(1, len(cpus))]
    for cpu, capacity in zip(cpus, capacities):
        (sys_cpu / f"cpu{cpu}" / "cpu_capacity").write_text(f"{capacity}\n")
    assert default_thread_count(sys_cpu, tmp_path / "none", tmp_path / "none") == len(cpus) - 1
    # equal capacities (a desktop, this machine): every core
    for cpu in cpus:
        (sys_cpu / f"cpu{cpu}" / "cpu_capacity").write_text("1024\n")
    assert default_thread_count(sys_cpu, tmp_path / "none", tmp_path / "none") == len(cpus)
    # a process kept to the little core by its affinity still gets a thread there
    (sys_cpu / f"cpu{cpus[0]}" / "cpu_capacity").write_text("256\n")
    assert allowed_cpus_in_child({cpus[0]}, sys_cpu, tmp_path / "none") == 1


def test_an_intel_hybrid_decodes_on_its_p_cores(tmp_path: Path, two_or_more: list[int]) -> None:
    cpus = two_or_more
    devices = tmp_path / "devices"
    sys_cpu = fake_topology(devices / "system" / "cpu", {cpu: (0, k) for k, cpu in enumerate(cpus)})
    (devices / "cpu_core").mkdir()
    # the P-cores as sysfs lists them: every CPU but the last
    p_cores = ",".join(f"{cpu}-{cpu}" if k % 2 else str(cpu) for k, cpu in enumerate(cpus[:-1]))
    (devices / "cpu_core" / "cpus").write_text(p_cores + "\n")
    # the kernel may rate an E-core above half a P-core's capacity: the list decides
    for cpu in cpus:
        (sys_cpu / f"cpu{cpu}" / "cpu_capacity").write_text("600\n" if cpu == cpus[-1] else "1024\n")
    assert default_thread_count(sys_cpu, tmp_path / "none", tmp_path / "none") == len(cpus) - 1
    # a malformed list says nothing: every core
    (devices / "cpu_core" / "cpus").write_text("0-\n")
    assert default_thread_count(sys_cpu, tmp_path / "none", tmp_path / "none") == len(cpus)


@pytest.mark.parametrize("quota, cpus_allowed", [("150000 100000", 2), ("50000 100000", 1), ("max 100000", None)])
def test_a_cgroup_v2_cpu_quota_caps_the_threads(tmp_path: Path, cpus: list[int], quota: str,
                                                cpus_allowed: int | None) -> None:
    sys_cpu = fake_topology(tmp_path / "cpu", {cpu: (0, k) for k, cpu in enumerate(cpus)})
    cgroup, proc = fake_cgroup(tmp_path, {"": "/app.slice/server"}, {"app.slice/server/cpu.max": quota})
    assert default_thread_count(sys_cpu, cgroup, proc) == min(len(cpus), cpus_allowed or len(cpus))


def test_a_cgroup_v1_cpu_quota_caps_the_threads(tmp_path: Path, cpus: list[int]) -> None:
    sys_cpu = fake_topology(tmp_path / "cpu", {cpu: (0, k) for k, cpu in enumerate(cpus)})
    # the process's own group (a quota of 1 CPU), below a root with none
    cgroup, proc = fake_cgroup(tmp_path, {"cpu,cpuacct": "/bench", "memory": "/bench"}, {
        "cpu/bench/cpu.cfs_quota_us": "100000\n", "cpu/bench/cpu.cfs_period_us": "100000\n",
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
    })
    assert default_thread_count(sys_cpu, cgroup, proc) == 1
    # in a container's own cgroup namespace its group is the mount's root
    cgroup, proc = fake_cgroup(tmp_path / "ns", {"cpu,cpuacct": "/"}, {
        "cpu,cpuacct/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert default_thread_count(sys_cpu, cgroup, proc) == 1
    # malformed files are no quota
    cgroup, proc = fake_cgroup(tmp_path / "bad", {"cpu": "/x"}, {
        "cpu/x/cpu.cfs_quota_us": "lots\n", "cpu/x/cpu.cfs_period_us": "100000\n",
    })
    assert default_thread_count(sys_cpu, cgroup, proc) == len(cpus)


def test_neuralink_llama_decodes_on_every_physical_core_unless_told(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    for unsaid in ({}, {"n_threads": None}, {"n_threads": 0}):  # llama-cpp-python reads 0 as "not said" too
        llm = neuralink.Llama(str(model), n_ctx=128, verbose=False, **unsaid)
        assert llm.n_threads == llm.context_params.n_threads == default_thread_count()
        llm.close()
    llm = neuralink.Llama(str(model), n_ctx=128, n_threads=1, verbose=False)
    assert llm.n_threads == llm.context_params.n_threads == 1
    llm.close()


@pytest.mark.parametrize("default", [True, False])
def test_the_server_passes_its_thread_count_only_when_given(converted_model, default: bool) -> None:
    # llama-cpp-python's server settings always carry n_threads (half of the CPUs); `neuralink serve` without
    # --n_threads drops it so neuralink.Llama's default applies
    model, _ = converted_model("llama", "q8_0")
    names = _ServerLlamaNames({str(model): NeuralinkOptions(default_n_threads=default)})
    llm = names.Llama(model_path=str(model), n_threads=1, n_ctx=128, verbose=False)
    assert llm.n_threads == (default_thread_count() if default else 1)
    llm.close()
