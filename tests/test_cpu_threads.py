"""Decoding's default thread count: one per physical core the process may use, not llama-cpp-python's half of the
CPUs, which on a machine without SMT leaves half the cores idle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import neuralink
from neuralink.runtime.cpu_threads import default_thread_count
from neuralink.runtime.server import NeuralinkOptions, _ServerLlamaNames


def fake_topology(root: Path, cores_of_cpus: list[tuple[int, int]]) -> Path:
    """A sysfs cpu directory whose cpu N has (package, core) = cores_of_cpus[N]."""
    for cpu, (package, core) in enumerate(cores_of_cpus):
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
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


def test_a_machine_without_smt_gets_a_thread_per_cpu(tmp_path: Path, four_cpus: None) -> None:
    sys_cpu = fake_topology(tmp_path / "cpu", [(0, 0), (0, 1), (0, 2), (0, 3)])
    assert default_thread_count(sys_cpu, tmp_path / "none", tmp_path / "none") == 4


def test_hyperthreads_of_one_core_count_once(tmp_path: Path, four_cpus: None) -> None:
    sys_cpu = fake_topology(tmp_path / "cpu", [(0, 0), (0, 1), (0, 0), (0, 1)])
    assert default_thread_count(sys_cpu, tmp_path / "none", tmp_path / "none") == 2
    # the same core id on two packages is two cores
    sys_cpu = fake_topology(tmp_path / "two", [(0, 0), (1, 0), (0, 0), (1, 0)])
    assert default_thread_count(sys_cpu, tmp_path / "none", tmp_path / "none") == 2


def test_only_the_cpus_the_process_may_run_on_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys_cpu = fake_topology(tmp_path / "cpu", [(0, 0), (0, 1), (0, 2), (0, 3)])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 3})  # taskset -c 1,3
    assert default_thread_count(sys_cpu, tmp_path / "none", tmp_path / "none") == 2


def test_an_unreadable_topology_falls_back_to_half_the_cpus(tmp_path: Path, four_cpus: None) -> None:
    assert default_thread_count(tmp_path / "no-sysfs", tmp_path / "none", tmp_path / "none") == 2


@pytest.mark.parametrize("quota, expected", [("150000 100000", 2), ("50000 100000", 1), ("max 100000", 4)])
def test_a_cgroup_v2_cpu_quota_caps_the_threads(tmp_path: Path, four_cpus: None, quota: str, expected: int) -> None:
    sys_cpu = fake_topology(tmp_path / "cpu", [(0, 0), (0, 1), (0, 2), (0, 3)])
    cgroup, proc = fake_cgroup(tmp_path, {"": "/app.slice/server"}, {"app.slice/server/cpu.max": quota})
    assert default_thread_count(sys_cpu, cgroup, proc) == expected


def test_a_cgroup_v1_cpu_quota_caps_the_threads(tmp_path: Path, four_cpus: None) -> None:
    sys_cpu = fake_topology(tmp_path / "cpu", [(0, 0), (0, 1), (0, 2), (0, 3)])
    # the process's own group (a quota of 1 CPU), below a root with none
    cgroup, proc = fake_cgroup(tmp_path, {"cpu,cpuacct": "/bench", "memory": "/bench"}, {
        "cpu/bench/cpu.cfs_quota_us": "100000\n", "cpu/bench/cpu.cfs_period_us": "100000\n",
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
    })
    assert default_thread_count(sys_cpu, cgroup, proc) == 1
    # in a container's own namespace its group is the mount's root
    cgroup, proc = fake_cgroup(tmp_path / "ns", {"cpu,cpuacct": "/"}, {
        "cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert default_thread_count(sys_cpu, cgroup, proc) == 2


def test_neuralink_llama_decodes_on_every_physical_core_unless_told(converted_model) -> None:
    model, _ = converted_model("llama", "q8_0")
    llm = neuralink.Llama(str(model), n_ctx=128, verbose=False)
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
