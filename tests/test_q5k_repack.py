"""q5_K weights repacked on x86 (patches/0003-q5k-repack-x86.patch): a converted model's ffn_down is q5_K, and
llama.cpp multiplies it with its interleaved GEMV/GEMM kernels, as it does the source's q4_K, instead of vec_dot."""

from __future__ import annotations

import contextlib
import platform
import re
import shutil
import subprocess
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from neuralink.runtime.llama_params import without_weight_repacking
from neuralink.runtime.memory_budget import capture_llama_log

from conftest import ModelFactory
from test_llama_hook import rel_max_abs

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the x86 kernels")

TEXT = b"It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want"
N = 16
MiB = 1 << 20
# (arch, options): n_head 32 with one KV head gives K and V matrices of 8 rows, one group of eight, which the
# kernels take alone after the pairs of groups the others go through
MODELS = [("qwen2", {}), ("llama", {}), ("gemma3", {}), ("arcee", dict(n_head=32, n_head_kv=1))]


def test_kernels_match_ggml_portable_versions(tmp_path: Path) -> None:
    """The GEMV and GEMM against ggml's portable versions (which define the interleaved layout) on random blocks,
    two pairs of groups and one group alone; the GEMM against the GEMV on the same activations."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    lib = Path(llama_cpp.__file__).parent / "lib"
    exe = tmp_path / "q5k_kernels_check"
    source = Path(__file__).parent / "q5k_kernels_check.cpp"
    subprocess.run([compiler, "-O2", "-o", str(exe), str(source), f"-L{lib}", "-lggml-cpu", "-lggml-base",
                    f"-Wl,-rpath,{lib}"], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout.split()
    errors = dict(zip(out[::2], map(float, out[1::2])))
    # the portable versions add the float products of each 8-value chunk, then subtract the minimums: ~1e-5 here
    assert errors["gemm"] <= 1e-3 and errors["gemv"] <= 1e-3, errors
    assert errors["gemm-vs-gemv"] <= 1e-6, errors


def load(path: Path, repack: bool) -> tuple[llama_cpp.Llama, list[str]]:
    with capture_llama_log() as log, contextlib.nullcontext() if repack else without_weight_repacking():
        llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=True, n_threads=2)
    return llm, log


def one_at_a_time(llm: llama_cpp.Llama, tokens: list[int]) -> np.ndarray:
    llm.reset()
    rows = []
    for token in tokens:
        llm.eval([token])
        rows.append(np.array(llm.scores[llm.n_tokens - 1]))
    return np.array(rows)


@pytest.fixture(scope="module", params=MODELS, ids=[arch for arch, _ in MODELS])
def q5k_model(request, synthetic_model: ModelFactory) -> Path:
    arch, options = request.param
    return synthetic_model(arch, "q5_K", **options)


def test_q5k_matrices_are_repacked(q5k_model: Path) -> None:
    matrices = sum(int(t.n_bytes) for t in GGUFReader(q5k_model).tensors
                   if t.tensor_type == GGMLQuantizationType.Q5_K and len(t.shape) == 2)
    assert matrices > 0
    llm, log = load(q5k_model, repack=True)
    llm.close()
    sizes = [float(m.group(1)) for line in log if (m := re.search(r"CPU_REPACK model buffer size = +([0-9.]+) MiB", line))]
    assert sizes, "llama.cpp kept the q5_K matrices in their own layout"
    assert sizes[0] * MiB >= 0.99 * matrices, (sizes, matrices)


def test_prompt_batches_compute_what_decoding_does(q5k_model: Path) -> None:
    """A batch goes through the GEMM (four rows at a time), decoding through the GEMV: the same sums."""
    llm, _ = load(q5k_model, repack=True)
    try:
        tokens = (llm.tokenize(TEXT) * 4)[:N]
        llm.reset()
        llm.eval(tokens)
        batch = np.array(llm.scores[:N])
        decoded = one_at_a_time(llm, tokens)
    finally:
        llm.close()
    # 0 (bit for bit) with the AVX512-VNNI kernels; the AVX2 ones (an AVX2-only build, NEURALINK_CPU_FLAGS) gave
    # 1.1e-5 on the llama model, cause not traced: there too the GEMM and GEMV agree exactly on random blocks (the
    # test above allows 1e-6), and a q8_0 model's batch equals its decoding. Stock's own repacked q4_K differs by
    # ~1e-2 between a batch and decoding
    vnni = "AVX512_VNNI = 1" in llama_cpp.llama_print_system_info().decode()
    assert rel_max_abs(batch, decoded) <= (1e-5 if vnni else 1e-4)


def test_repacked_agrees_with_vec_dot(q5k_model: Path) -> None:
    """Against the weights in their own layout (vec_dot): the integer sums are the same, the float steps in another
    order. The first position is compared closely; later ones may round an activation's q8 value the other way,
    which the KV cache carries on (about 1e-2 measured), so those are held to 0.1, far below a wrong kernel's error."""
    results = []
    for repack in (True, False):
        llm, log = load(q5k_model, repack)
        try:
            results.append(one_at_a_time(llm, (llm.tokenize(TEXT) * 4)[:N]))
        finally:
            llm.close()
        assert any("CPU_REPACK" in line for line in log) == repack
    repacked, plain = results
    assert rel_max_abs(repacked[0], plain[0]) <= 1e-4
    assert rel_max_abs(repacked, plain) <= 0.1
    assert (repacked.argmax(axis=1) == plain.argmax(axis=1)).mean() >= 0.9
