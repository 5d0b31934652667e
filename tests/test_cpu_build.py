"""The ggml the project builds runs on every x86-64 CPU it may land on: no AMX path, nothing the CPU lacks.

ggml's AMX kernels crash on some AMX machines (docs/cpu-build.md), so setup.sh
names the instruction sets explicitly and never AMX. These tests read what the
installed library says it was compiled with and which buffer types it offers.
On a CPU without AMX the crash cannot happen here; the checks still run and a
warning says what they could and could not show.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import subprocess
import warnings
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from neuralink.models.synthetic import write_synthetic_model
from neuralink.runtime.memory_budget import capture_llama_log

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction sets")

# llama_print_system_info's names -> /proc/cpuinfo flags the CPU needs for them
SYSTEM_INFO_FLAGS = {
    "SSE3": ["pni"], "SSSE3": ["ssse3"], "AVX": ["avx"], "AVX2": ["avx2"], "F16C": ["f16c"], "FMA": ["fma"],
    "BMI2": ["bmi2"], "AVX_VNNI": ["avx_vnni"],
    "AVX512": ["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"], "AVX512_VBMI": ["avx512vbmi"],
    "AVX512_VNNI": ["avx512_vnni"], "AVX512_BF16": ["avx512_bf16"], "AMX_INT8": ["amx_int8"],
}
SAPPHIRE_RAPIDS_FLAGS = (
    "fpu sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 avx512f avx512dq avx512cd avx512bw avx512vl "
    "avx512ifma avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg avx512_vpopcntdq avx512_bf16 avx512_fp16 "
    "avx_vnni amx_bf16 amx_tile amx_int8"
)


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def build_flags() -> set[str]:
    """The flags ggml was built for: the CPU's, or those NEURALINK_CPU_FLAGS named (a build for another CPU)."""
    named = os.environ.get("NEURALINK_CPU_FLAGS", "").split()
    return set(named) if named else cpu_flags()


def system_info() -> dict[str, bool]:
    text = llama_cpp.llama_print_system_info().decode()
    entries = [part.strip() for part in text.split("|")]
    info = {}
    for entry in entries:
        name, _, value = entry.rpartition("=")
        name = name.split(":")[-1].strip()
        if name and value.strip() in ("0", "1"):
            info[name] = value.strip() == "1"
    return info


def ggml_library(name: str) -> ctypes.CDLL:
    lib_dir = Path(next(iter(importlib.util.find_spec("llama_cpp").submodule_search_locations))) / "lib"
    return ctypes.CDLL(os.fspath(lib_dir / f"lib{name}.so"))


def cpu_extra_buffer_types() -> list[str]:
    """Names of the extra buffer types ggml's CPU device offers (e.g. CPU_REPACK, AMX)."""
    base, ggml = ggml_library("ggml-base"), ggml_library("ggml")
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    device = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    assert device, "ggml has no CPU device"
    address = base.ggml_backend_reg_get_proc_address(base.ggml_backend_dev_backend_reg(device),
                                                     b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return []
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    bufts, names = get_extra(device), []
    i = 0
    while bufts[i]:
        names.append(base.ggml_backend_buft_name(bufts[i]).decode())
        i += 1
    return names


def note_if_no_amx(checked: str) -> None:
    if not {"amx_tile", "amx_int8"} & cpu_flags():
        warnings.warn(f"this CPU has no AMX, so ggml's AMX crash cannot occur here; checked: {checked}", stacklevel=2)


def test_library_is_compiled_without_amx():
    info = system_info()
    assert "AVX2" in info, f"unexpected llama_print_system_info: {llama_cpp.llama_print_system_info()!r}"
    assert not any(v for k, v in info.items() if k.startswith("AMX")), f"AMX compiled in: {info}"
    has_amx_int8 = ggml_library("ggml-cpu").ggml_cpu_has_amx_int8
    assert has_amx_int8() == 0, "libggml-cpu was compiled with __AMX_INT8__"
    assert "AMX" not in cpu_extra_buffer_types()
    note_if_no_amx("the library reports AMX_INT8 = 0 and offers no AMX buffer type")


def test_library_uses_only_instructions_this_cpu_has():
    """A wheel built for another CPU (a carried cache) would die with SIGILL: setup.sh keys it by CPU."""
    flags = cpu_flags()
    compiled = [name for name, on in system_info().items() if on and name in SYSTEM_INFO_FLAGS]
    missing = {name: [f for f in SYSTEM_INFO_FLAGS[name] if f not in flags] for name in compiled}
    assert not {k: v for k, v in missing.items() if v}, f"compiled for instructions this CPU lacks: {missing}"
    # and the fast kernels are still there where the CPU (or the CPU the build was asked for) has them
    target = build_flags() & flags
    if "avx512f" in target:
        assert "AVX512" in compiled
    if "avx2" in target:
        assert "AVX2" in compiled


def test_the_sparse_down_projection_runs_the_widest_loops_this_cpu_has():
    """Its loops are compiled per instruction set and picked at run time: a CPU with AVX-512 must get them
    (unless NEURALINK_KERNELS asks for narrower ones, as setup.sh's C++ checks do)."""
    from neuralink import _engine

    flags = cpu_flags()
    narrower = os.environ.get("NEURALINK_KERNELS", "")
    if narrower == "generic":
        assert _engine.column_axpy_isa() == "generic"
    elif not narrower and {"avx512f", "avx512bw", "avx512vl", "fma"} <= flags:
        assert _engine.column_axpy_isa() == "avx512"
    elif {"avx2", "fma"} <= flags:
        assert _engine.column_axpy_isa() == "avx2"
    else:
        assert _engine.column_axpy_isa() == "generic"


def test_setup_never_selects_amx_even_on_an_amx_cpu():
    """The CMake options setup.sh derives for a Sapphire Rapids CPU: AVX-512 and its extensions on, AMX off."""
    out = subprocess.run(
        ["bash", "-c", 'say() { :; }; die() { exit 1; }; source scripts/llama_source.sh; ggml_cpu_cmake_args "$1"',
         "_", SAPPHIRE_RAPIDS_FLAGS], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    options = dict(o.removeprefix("-D").split("=") for o in out)
    assert options["GGML_NATIVE"] == "OFF"
    assert all(options[k] == "OFF" for k in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"))
    assert all(options[k] == "ON" for k in ("GGML_AVX2", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"))
    # a CPU without AVX-512 gets AVX2 and no AVX-512 (it would die with SIGILL otherwise)
    out = subprocess.run(
        ["bash", "-c", 'say() { :; }; die() { exit 1; }; source scripts/llama_source.sh; ggml_cpu_cmake_args "$1"',
         "_", "sse4_2 avx avx2 fma f16c bmi2"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    options = dict(o.removeprefix("-D").split("=") for o in out)
    assert options["GGML_AVX2"] == "ON" and options["GGML_AVX512"] == "OFF"


def test_setup_builds_for_the_cpu_flags_it_is_given():
    """NEURALINK_CPU_FLAGS names the CPU to build for (an AVX2 fleet from an AVX-512 machine), not /proc/cpuinfo."""
    out = subprocess.run(
        ["bash", "-c", 'say() { :; }; die() { exit 1; }; source scripts/llama_source.sh; ggml_cpu_cmake_args'],
        cwd=ROOT, capture_output=True, text=True, check=True,
        env={**os.environ, "NEURALINK_CPU_FLAGS": "sse4_2 avx avx2 fma f16c"}).stdout.split()
    options = dict(o.removeprefix("-D").split("=") for o in out)
    assert options["GGML_AVX2"] == "ON" and options["GGML_F16C"] == "ON"
    assert options["GGML_AVX512"] == "OFF" and options["GGML_BMI2"] == "OFF"


@pytest.mark.parametrize("weight_type", ["q4_0", "q8_0"])
def test_stock_llama_decodes_without_an_amx_buffer(tmp_path, weight_type):
    """Q4_0/Q8_0 weights are what ggml would repack into an AMX buffer; stock llama.cpp must not."""
    path = write_synthetic_model(tmp_path / f"m-{weight_type}.gguf", "llama", weight_type=weight_type)
    with capture_llama_log() as log:
        # logits_all: llama-cpp-python fills `scores` only then (otherwise the rows are uninitialized memory)
        llm = llama_cpp.Llama(os.fspath(path), n_ctx=64, logits_all=True, verbose=True)
    try:
        buffers = [line for line in "".join(log).splitlines() if "model buffer size" in line]
        assert buffers, "llama.cpp logged no model buffers"
        assert not any("AMX" in line for line in buffers), buffers
        tokens = llm.tokenize(b"hello world")
        llm.eval(tokens)
        assert np.isfinite(llm.scores[len(tokens) - 1]).all()
    finally:
        llm.close()
    note_if_no_amx(f"{weight_type} weights loaded into {[b.split(':')[1].split()[0] for b in buffers]} and decoded")
