"""neuralink.Llama against llama.cpp's own FFN path, in the same process.

The engine must do llama.cpp's arithmetic (ggml's vec_dot on activations
converted to the weight type's vec_dot type, ggml's activation kernels): logits
within 1e-3 relative max-abs, identical greedy text.

Two batch paths of llama.cpp sum in another float order than vec_dot, and
activation quantization amplifies an ulp into ~1e-3 of the logits:
- K-quants: batches of 8 or more rows go through ggml's tiled GEMM. Those
  checks run in a subprocess with it off (GGML_CPU_TILED_MM=0, read once per
  process), where llama.cpp's arithmetic is vec_dot again and we are exact.
- BF16: batches go through llamafile's tinyBLAS (measured 1.3e-3, no switch).
For both, decoding and greedy text are checked in-process with stock settings.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

import neuralink
from neuralink import _engine
from neuralink.runtime.hook import FFN_HOOK_COMPUTE, FFN_HOOK_TAKE, FfnHook, ffn_hook_api

from conftest import ModelFactory

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters."
)
N_PROMPT, N_DECODE, N_GREEDY = 64, 32, 32
TOLERANCE = 1e-3

# every architecture in at least three weight types, plus bf16; K-quants below
CASES = [(arch, wt) for arch in ("llama", "qwen2", "gemma3", "arcee") for wt in ("f32", "f16", "q8_0", "q4_1")]
CASES += [("llama", "q5_0"), ("arcee", "q5_1"), ("qwen2", "q4_0")]
K_QUANT_CASES = [("llama", "q4_K"), ("qwen2", "q6_K"), ("arcee", "q5_K"), ("gemma3", "q3_K"), ("llama", "q2_K")]
OTHER_BATCH_GEMM_CASES = K_QUANT_CASES + [("llama", "bf16"), ("gemma3", "bf16")]
# decoding after a prefix shorter than the tiled GEMM's 8 rows keeps every matmul on vec_dot
DECODE_PREFIX = 4


def tokens_of(llm: llama_cpp.Llama, n: int) -> list[int]:
    tokens = llm.tokenize(TEXT.encode())
    while len(tokens) < n:
        tokens += tokens
    return tokens[:n]


def batch_logits(llm: llama_cpp.Llama, tokens: list[int]) -> np.ndarray:
    """Logits of every position of one batch (needs logits_all=True)."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


def decode_logits(llm: llama_cpp.Llama, prefix: list[int], tokens: list[int]) -> np.ndarray:
    """Logits after each of `tokens`, decoded one at a time after `prefix`."""
    llm.reset()
    llm.eval(prefix)
    steps = []
    for token in tokens:
        llm.eval([token])
        steps.append(np.array(llm.scores[llm.n_tokens - 1]))
    return np.array(steps)


def greedy(llm: llama_cpp.Llama, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, reset=True):
        out.append(token)
        if len(out) == n:
            break
    return out


def run_all(llm: llama_cpp.Llama) -> tuple[np.ndarray, np.ndarray, list[int]]:
    prompt = tokens_of(llm, N_PROMPT)
    return (
        batch_logits(llm, prompt),
        decode_logits(llm, prompt[:DECODE_PREFIX], prompt[DECODE_PREFIX : DECODE_PREFIX + N_DECODE]),
        greedy(llm, prompt[:16], N_GREEDY),
    )


def rel_max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def assert_engine_matches_stock(path: Path | str) -> None:
    llm = neuralink.Llama(str(path), n_ctx=256, logits_all=True, verbose=False)
    try:
        status = llm.engine.layer_status()
        assert all(s.taken for s in status), status
        before = llm.engine.tokens_computed
        hooked = run_all(llm)
        # the engine really ran: every layer saw every token of the batch and each decode step
        assert llm.engine.tokens_computed - before >= len(status) * (N_PROMPT + N_DECODE)
        with llm.stock_ffn():
            computed = llm.engine.tokens_computed
            stock = run_all(llm)
            assert llm.engine.tokens_computed == computed
    finally:
        llm.close()
    assert rel_max_abs(hooked[0], stock[0]) <= TOLERANCE, "64-token batch"
    assert rel_max_abs(hooked[1], stock[1]) <= TOLERANCE, "one-at-a-time decoding"
    assert hooked[2] == stock[2], "greedy generation"


@pytest.mark.parametrize(("arch", "weight_type"), CASES)
def test_engine_matches_llama_cpp_on_synthetic_models(synthetic_model: ModelFactory, arch: str, weight_type: str) -> None:
    assert_engine_matches_stock(synthetic_model(arch, weight_type))


def test_engine_matches_llama_cpp_on_smollm2(smollm2_path: Path) -> None:
    assert_engine_matches_stock(smollm2_path)


def test_engine_matches_llama_cpp_vec_dot_path_on_k_quants(synthetic_model: ModelFactory) -> None:
    paths = [str(synthetic_model(arch, wt)) for arch, wt in K_QUANT_CASES]
    code = "import sys, test_llama_hook as t\nfor p in sys.argv[1:]: t.assert_engine_matches_stock(p)"
    env = {**os.environ, "GGML_CPU_TILED_MM": "0"}
    run = subprocess.run([sys.executable, "-c", code, *paths], cwd=Path(__file__).parent, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize(("arch", "weight_type"), OTHER_BATCH_GEMM_CASES)
def test_decoding_and_greedy_text_match_where_llama_cpp_batches_with_another_gemm(
    synthetic_model: ModelFactory, arch: str, weight_type: str
) -> None:
    llm = neuralink.Llama(str(synthetic_model(arch, weight_type)), n_ctx=256, logits_all=True, verbose=False)
    try:
        _, decoded, text = run_all(llm)
        with llm.stock_ffn():
            _, stock_decoded, stock_text = run_all(llm)
    finally:
        llm.close()
    assert rel_max_abs(decoded, stock_decoded) <= TOLERANCE
    assert text == stock_text


def test_lazily_mapped_model_without_hook_equals_plain_llama_cpp(smollm2_path: Path) -> None:
    plain = llama_cpp.Llama(str(smollm2_path), n_ctx=256, logits_all=True, verbose=False)
    tokens = tokens_of(plain, N_PROMPT)
    want = batch_logits(plain, tokens)
    plain.close()
    llm = neuralink.Llama(str(smollm2_path), n_ctx=256, logits_all=True, verbose=False)
    with llm.stock_ffn():
        got = batch_logits(llm, tokens)
    llm.close()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_hook_declining_every_layer_is_bit_identical_to_no_hook(
    synthetic_model: ModelFactory, smollm2_path: Path, model: str
) -> None:
    path = smollm2_path if model == "smollm2" else synthetic_model("gemma3", "q8_0")
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False)
    n_layer = int(llm.metadata[f"{llm.metadata['general.architecture']}.block_count"])
    tokens = tokens_of(llm, N_PROMPT)
    without = batch_logits(llm, tokens), decode_logits(llm, tokens[:8], tokens[8:24])

    asked: list[tuple[int, int]] = []

    def take(user_data: int, layer: object, n_phases: object) -> int:
        asked.append((layer.contents.kind, layer.contents.il))  # type: ignore[attr-defined]
        return -1

    def compute(*args: object) -> None:
        raise AssertionError("compute called for a declined layer")

    hook = FfnHook(FFN_HOOK_TAKE(take), FFN_HOOK_COMPUTE(compute), None)
    api = ffn_hook_api(_engine.FFN_HOOK_API_VERSION)
    api.attach(llm._ctx.ctx, ctypes.addressof(hook))
    try:
        declined = batch_logits(llm, tokens), decode_logits(llm, tokens[:8], tokens[8:24])
    finally:
        api.detach(llm._ctx.ctx)
        llm.close()
    assert {il for kind, il in asked if kind == 0} == set(range(n_layer)), "the hook was asked about every layer"
    # and about the output product where the output matrix is its own (gemma3's synthetic one; SmolLM2's is tied)
    assert {il for kind, il in asked if kind == 1} == ({-1} if model == "gemma3" else set())
    assert np.array_equal(declined[0], without[0])
    assert np.array_equal(declined[1], without[1])


def test_one_and_two_threads_give_the_same_greedy_text(smollm2_path: Path) -> None:
    outputs = []
    for n_threads in (1, 2):
        llm = neuralink.Llama(
            str(smollm2_path), n_ctx=256, n_threads=n_threads, n_threads_batch=n_threads, logits_all=True, verbose=False
        )
        prompt = tokens_of(llm, 24)
        outputs.append((greedy(llm, prompt, N_GREEDY), batch_logits(llm, prompt)))
        llm.close()
    assert outputs[0][0] == outputs[1][0]
    # the engine splits work across threads without changing any sum
    assert np.array_equal(outputs[0][1], outputs[1][1])


def test_completion_chat_streaming_and_call_work_unchanged(smollm2_path: Path) -> None:
    llm = neuralink.Llama(str(smollm2_path), n_ctx=512, verbose=False)
    try:
        completion = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
        assert completion["choices"][0]["text"].strip()
        called = llm("The capital of France is", max_tokens=8, temperature=0.0)
        assert called["choices"][0]["text"] == completion["choices"][0]["text"]
        streamed = "".join(
            chunk["choices"][0]["text"]
            for chunk in llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0, stream=True)
        )
        assert streamed == completion["choices"][0]["text"]
        chat = llm.create_chat_completion(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0.0)
        assert chat["choices"][0]["message"]["content"].strip()
        with llm.stock_ffn():
            stock = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
        assert stock["choices"][0]["text"] == completion["choices"][0]["text"]
    finally:
        llm.close()
