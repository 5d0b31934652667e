"""Synthetic GGUF models: each architecture and weight type loads and runs in stock llama.cpp."""

from __future__ import annotations

from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from neuralink import _engine
from neuralink.formats.ggml_types import ggml_type_name, resolve_weight_type
from neuralink.models.synthetic import (
    ARCH_SPECS,
    ARCHITECTURES,
    Arch,
    build_vocabulary,
    write_synthetic_model,
)

from conftest import ModelFactory

N_EMBD, N_FF, N_LAYER = 256, 512, 2
CORE_TYPES = ("f32", "f16", "q8_0", "q4_1", "q4_k")
EXTRA_TYPES = ("bf16", "q4_0", "q5_0", "q5_1", "q5_k", "q6_k")
RUN_CASES = [(arch, wt) for arch in ARCHITECTURES for wt in CORE_TYPES] + [("llama", wt) for wt in EXTRA_TYPES]
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it writes tokens to flash memory in 2024."

def load(path: Path, **kwargs: object) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), n_ctx=128, verbose=False, **kwargs)


def tensor_bytes(tensor: gguf.ReaderTensor) -> np.ndarray:
    rows = int(tensor.shape[1])
    return np.ascontiguousarray(tensor.data).view(np.uint8).reshape(rows, -1)


def read_matrix(tensor: gguf.ReaderTensor) -> np.ndarray:
    type_name = ggml_type_name(gguf.GGMLQuantizationType(tensor.tensor_type))
    return _engine.dequantize(type_name, tensor_bytes(tensor), int(tensor.shape[0]))


def tensors_by_name(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize(("arch", "weight_type"), RUN_CASES)
def test_model_loads_evaluates_and_completes(synthetic_model: ModelFactory, arch: Arch, weight_type: str) -> None:
    llm = load(synthetic_model(arch, weight_type), logits_all=True)
    tokens = llm.tokenize(SENTENCE.encode())[:16]
    assert len(tokens) == 16

    llm.eval(tokens)
    logits = np.asarray(llm.scores[: llm.n_tokens])
    assert logits.shape == (16, llm.n_vocab())
    assert np.isfinite(logits).all()
    # each position's distribution is spread out, and positions differ from one another
    assert (logits.std(axis=1) > 0.5).all()
    assert (logits.std(axis=0) > 0).any()

    completion = llm.create_completion(SENTENCE, max_tokens=8, temperature=0)
    assert completion["usage"]["completion_tokens"] >= 1
    assert isinstance(completion["choices"][0]["text"], str)


def prompt_logits(path: Path) -> np.ndarray:
    llm = load(path, logits_all=True)
    llm.eval(llm.tokenize(SENTENCE.encode())[:16])
    return np.asarray(llm.scores[: llm.n_tokens])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ffn_output_moves_the_logits(synthetic_model: ModelFactory, tmp_path: Path, arch: Arch) -> None:
    # FFN-hook tests compare logits, so the FFN layers must matter to them
    silent = {il: {"down": np.zeros((N_EMBD, N_FF), dtype=np.float32)} for il in range(N_LAYER)}
    baseline = prompt_logits(synthetic_model(arch))
    without_ffn = prompt_logits(write_synthetic_model(tmp_path / "m.gguf", arch, ffn_weights=silent))
    assert np.abs(baseline - without_ffn).mean() > 0.25 * baseline.std()


@pytest.mark.parametrize(("arch", "weight_type"), RUN_CASES)
def test_tensor_types_and_shapes(synthetic_model: ModelFactory, arch: Arch, weight_type: str) -> None:
    tensors = tensors_by_name(synthetic_model(arch, weight_type))
    qtype = resolve_weight_type(weight_type)

    gated = arch != "arcee"
    fused = arch == "phi3"
    assert ARCH_SPECS[arch].gated == gated and ARCH_SPECS[arch].fused_gate_up == fused
    for il in range(N_LAYER):
        n_up = 2 * N_FF if fused else N_FF
        expected = {"ffn_up": [N_EMBD, n_up], "ffn_down": [N_FF, N_EMBD], "attn_q": [N_EMBD, N_EMBD]}
        if gated and not fused:
            expected["ffn_gate"] = [N_EMBD, N_FF]
        else:
            assert f"blk.{il}.ffn_gate.weight" not in tensors
        for part, shape in expected.items():
            tensor = tensors[f"blk.{il}.{part}.weight"]
            assert tensor.tensor_type == qtype
            assert [int(n) for n in tensor.shape] == shape
        assert tensors[f"blk.{il}.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    # every tensor is one gguf lists for the architecture (blk.N.name.weight -> blk.{bid}.name)
    model_arch = ARCH_SPECS[arch].model_arch
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[model_arch]}
    for name in tensors:
        stem = name.rsplit(".", 1)[0]
        parts = stem.split(".")
        if parts[0] == "blk":
            stem = ".".join(["blk", "{bid}", *parts[2:]])
        assert stem in allowed, name


def test_architecture_specific_tensors_and_metadata(synthetic_model: ModelFactory) -> None:
    qwen2 = tensors_by_name(synthetic_model("qwen2"))
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= qwen2.keys()

    path = synthetic_model("gemma3")
    gemma3 = tensors_by_name(path)
    for part in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"):
        assert f"blk.1.{part}.weight" in gemma3
    reader = gguf.GGUFReader(path)
    window = reader.get_field(gguf.Keys.Attention.SLIDING_WINDOW.format(arch="gemma3"))
    assert window is not None and window.contents() > 0


@pytest.mark.parametrize("weight_type", ["f32", "q8_0", "q4_k"])
def test_ffn_overrides_land_in_file(tmp_path: Path, weight_type: str) -> None:
    rng = np.random.default_rng(7)
    planted = {
        "gate": rng.standard_normal((N_FF, N_EMBD)).astype(np.float32) * 0.1,
        "up": rng.standard_normal((N_FF, N_EMBD)).astype(np.float32) * 0.1,
        "down": rng.standard_normal((N_EMBD, N_FF)).astype(np.float32) * 0.05,
    }
    planted["up"][:8] = 3.0  # a recognisable block of neurons
    plain = tensors_by_name(write_synthetic_model(tmp_path / "plain.gguf", "llama", weight_type=weight_type))
    path = write_synthetic_model(tmp_path / "planted.gguf", "llama", weight_type=weight_type, ffn_weights={1: planted})
    tensors = tensors_by_name(path)
    type_name = ggml_type_name(resolve_weight_type(weight_type))

    for part, weights in planted.items():
        stored = read_matrix(tensors[f"blk.1.ffn_{part}.weight"])
        assert stored.shape == weights.shape
        if weight_type == "f32":
            np.testing.assert_array_equal(stored, weights)
        else:
            # exactly ggml's own encoding of the planted values, and close to them
            np.testing.assert_array_equal(
                stored, _engine.dequantize(type_name, _engine.quantize(type_name, weights), weights.shape[1])
            )
            rel_error = np.linalg.norm(stored - weights) / np.linalg.norm(weights)
            assert rel_error < (0.01 if weight_type == "q8_0" else 0.1)
        assert not np.array_equal(stored, read_matrix(plain[f"blk.1.ffn_{part}.weight"]))

    # layers without overrides keep the weights the same seed gives without any
    for name in ("blk.0.ffn_up.weight", "blk.0.attn_q.weight", "blk.1.attn_v.weight"):
        np.testing.assert_array_equal(tensor_bytes(tensors[name]), tensor_bytes(plain[name]))


def test_overrides_are_validated(tmp_path: Path) -> None:
    up = np.zeros((N_FF, N_EMBD), dtype=np.float32)
    with pytest.raises(ValueError, match="gate"):
        write_synthetic_model(tmp_path / "m.gguf", "arcee", ffn_weights={0: {"gate": up}})
    with pytest.raises(ValueError, match="shape"):
        write_synthetic_model(tmp_path / "m.gguf", "llama", ffn_weights={0: {"down": up}})
    with pytest.raises(ValueError, match="layer 5"):
        write_synthetic_model(tmp_path / "m.gguf", "llama", ffn_weights={5: {"up": up}})
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_round_trip(synthetic_model: ModelFactory) -> None:
    llm = load(synthetic_model("llama"), vocab_only=True)
    vocab = build_vocabulary()
    assert llm.n_vocab() == len(vocab.tokens)
    assert (llm.token_bos(), llm.token_eos()) == (vocab.bos_id, vocab.eos_id)

    tokens = llm.tokenize(SENTENCE.encode())
    assert tokens[0] == vocab.bos_id
    assert llm.detokenize(tokens) == SENTENCE.encode()
    # word pieces merge: far fewer tokens than characters, and no byte fallback for ASCII
    assert len(tokens) < len(SENTENCE) / 2
    assert all(vocab.token_types[t] != gguf.TokenType.BYTE for t in tokens)

    text = "naïve café: 東京 ☕"
    assert llm.detokenize(llm.tokenize(text.encode())) == text.encode()


@pytest.mark.parametrize(
    ("weight_type", "dims"),
    [("q4_k", {"n_embd": 128, "n_head": 2, "n_head_kv": 1}), ("q8_0", {"n_ff": 500}), ("q5_k", {"n_ff": 384})],
)
def test_block_size_mismatch_leaves_no_file(tmp_path: Path, weight_type: str, dims: dict[str, int]) -> None:
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"previous contents")
    with pytest.raises(ValueError, match="block size"):
        write_synthetic_model(tmp_path / "new.gguf", "llama", weight_type=weight_type, **dims)
    with pytest.raises(ValueError, match="block size"):
        write_synthetic_model(existing, "llama", weight_type=weight_type, **dims)
    assert [p.name for p in tmp_path.iterdir()] == ["existing.gguf"]
    assert existing.read_bytes() == b"previous contents"


def test_failure_while_encoding_leaves_no_file(tmp_path: Path) -> None:
    # ggml cannot quantize iq2_xxs without an importance matrix: the error comes mid-write
    with pytest.raises(ValueError):
        write_synthetic_model(tmp_path / "m.gguf", "llama", weight_type="iq2_xxs")
    assert list(tmp_path.iterdir()) == []


def test_unknown_weight_type_and_architecture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown weight type"):
        write_synthetic_model(tmp_path / "m.gguf", "llama", weight_type="q3_x")
    with pytest.raises(ValueError, match="not a weight type"):
        write_synthetic_model(tmp_path / "m.gguf", "llama", weight_type="i32")
    with pytest.raises(ValueError, match="unknown architecture"):
        write_synthetic_model(tmp_path / "m.gguf", "gpt2")  # type: ignore[arg-type]
