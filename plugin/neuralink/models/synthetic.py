"""Tiny random-weight GGUF models that stock llama.cpp loads and runs.

Tests use them to check the FFN hook across architectures and weight types
without a download, and to plant co-activation structure (``ffn_weights``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, TokenType
from gguf import GGMLQuantizationType as QType

from neuralink import _engine
from neuralink.formats.files import atomic_gguf
from neuralink.formats.ggml_types import ggml_type_name, resolve_weight_type

log = logging.getLogger(__name__)

Arch = Literal["llama", "qwen2", "gemma3", "arcee", "phi3"]
FfnPart = Literal["gate", "up", "down"]

ARCHITECTURES: tuple[Arch, ...] = get_args(Arch)


_RMS_EPS = 1e-6
# output rows of std 2/sqrt(n_embd) give logits of std ~2: peaked, not one-hot
_OUTPUT_SCALE = 2.0
_GEMMA_SLIDING_WINDOW = 64
# pattern 2: even layers use the sliding window, odd layers global attention, so 2 layers exercise both
_GEMMA_SWA_PATTERN = 2


@dataclass(frozen=True)
class ArchSpec:
    """What one llama.cpp builder (src/models/<arch>.cpp) needs beyond the llama layout."""

    model_arch: MODEL_ARCH
    gated: bool  # gate and up (SwiGLU/GeGLU) or up only (arcee's ReLU^2)
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # gemma3: RMS norm of Q and K per head
    post_norms: bool = False  # gemma3: post-attention and post-FFW norms
    sliding_window: bool = False  # gemma3: interleaved local/global attention
    scaled_embeddings: bool = False  # gemma3: input embeddings multiplied by sqrt(n_embd)
    fused_gate_up: bool = False  # phi3: gate and up stacked in one ffn_up of 2*n_ff rows (LLM_FFN_SWIGLU)


ARCH_SPECS: dict[Arch, ArchSpec] = {
    "llama": ArchSpec(MODEL_ARCH.LLAMA, gated=True),
    "qwen2": ArchSpec(MODEL_ARCH.QWEN2, gated=True, qkv_bias=True),
    "gemma3": ArchSpec(
        MODEL_ARCH.GEMMA3, gated=True, qk_norm=True, post_norms=True, sliding_window=True,
        scaled_embeddings=True,
    ),
    "arcee": ArchSpec(MODEL_ARCH.ARCEE, gated=False),
    "phi3": ArchSpec(MODEL_ARCH.PHI3, gated=True, fused_gate_up=True),
}


@dataclass(frozen=True)
class Vocabulary:
    """A SentencePiece-style ("llama") vocabulary with byte fallback."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    token_types: tuple[TokenType, ...]
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2


_SPACE = "\u2581"  # SentencePiece's word-boundary marker
_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "it", "for", "was", "on", "are", "with", "as",
    "be", "this", "by", "at", "from", "or", "have", "an", "not", "but", "which", "they", "one",
    "you", "all", "were", "we", "can", "there", "their", "has", "more", "will", "would", "about",
    "if", "what", "so", "when", "out", "up", "time", "people", "new", "first", "after", "some",
    "model", "token", "layer", "neuron", "memory", "flash", "quick", "brown", "fox", "jumps",
    "over", "lazy", "dog", "The", "A", "In", "It", "This", "We",
)
_SUFFIXES = ("ing", "ed", "er", "es", "ly", "tion", "ment", "ness", "est", "al", "ion", "ers")


def build_vocabulary() -> Vocabulary:
    """The synthetic models' vocabulary: specials, 256 byte tokens, "▁", ASCII characters, word pieces.

    Every multi-character piece comes with all its prefixes, so SentencePiece's
    bigram merging can reach it; anything else falls back to bytes.
    """
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    pieces: dict[str, None] = {_SPACE: None}  # insertion-ordered set, most frequent first
    pieces.update((chr(c), None) for c in range(33, 127))
    for word in [_SPACE + w for w in _WORDS] + list(_SUFFIXES):
        pieces.update((word[:i], None) for i in range(2, len(word) + 1))
    n_fixed = len(tokens)
    tokens += list(pieces)
    types += [TokenType.NORMAL] * len(pieces)
    # SentencePiece scores are log-probabilities: earlier pieces are more frequent
    scores = [0.0] * n_fixed + [-float(i) for i in range(len(pieces))]
    return Vocabulary(tuple(tokens), tuple(scores), tuple(types))


def _encode(matrix: np.ndarray, qtype: QType) -> np.ndarray:
    if qtype == QType.F32:
        return np.ascontiguousarray(matrix, dtype=np.float32)
    return _engine.quantize(ggml_type_name(qtype), np.ascontiguousarray(matrix, dtype=np.float32))


def _tensor_name(tensor: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    base = TENSOR_NAMES[tensor]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


def _check_dimensions(
    qtype: QType, *, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, context_length: int
) -> None:
    sizes = {"n_layer": n_layer, "n_embd": n_embd, "n_ff": n_ff, "n_head": n_head, "n_head_kv": n_head_kv,
             "context_length": context_length}
    for what, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{what} must be positive, got {value}")
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
    if n_head % n_head_kv:
        raise ValueError(f"n_head={n_head} is not a multiple of n_head_kv={n_head_kv}")
    if (n_embd // n_head) % 2:
        raise ValueError(f"head size n_embd/n_head={n_embd // n_head} must be even for RoPE")
    block = GGML_QUANT_SIZES[qtype][0]
    # rows of q/k/v/o/gate/up hold n_embd values, rows of down n_ff; ggml blocks never straddle rows
    for what, value in (("n_embd", n_embd), ("n_ff", n_ff)):
        if value % block:
            raise ValueError(
                f"{what}={value} does not fit weight type {qtype.name.lower()}: "
                f"rows must be a multiple of its block size {block}"
            )


def _check_ffn_overrides(
    ffn_weights: Mapping[int, Mapping[str, np.ndarray]], arch: Arch, n_layer: int, n_embd: int, n_ff: int
) -> dict[int, dict[str, np.ndarray]]:
    shapes = {"gate": (n_ff, n_embd), "up": (n_ff, n_embd), "down": (n_embd, n_ff)}
    if not ARCH_SPECS[arch].gated:
        del shapes["gate"]
    checked: dict[int, dict[str, np.ndarray]] = {}
    for layer, parts in ffn_weights.items():
        if not 0 <= layer < n_layer:
            raise ValueError(f"ffn_weights: layer {layer} is outside 0..{n_layer - 1}")
        checked[layer] = {}
        for part, weights in parts.items():
            if part not in shapes:
                raise ValueError(f"ffn_weights: {arch} FFN layers have parts {sorted(shapes)}, not {part!r}")
            array = np.asarray(weights, dtype=np.float32)
            if array.shape != shapes[part]:
                raise ValueError(
                    f"ffn_weights[{layer}][{part!r}] has shape {array.shape}, expected {shapes[part]} "
                    "(gate/up: one row per neuron, down: one column per neuron)"
                )
            if not np.isfinite(array).all():
                raise ValueError(f"ffn_weights[{layer}][{part!r}] holds non-finite values")
            checked[layer][part] = array
    return checked


def _add_metadata(
    writer: gguf.GGUFWriter,
    arch: Arch,
    vocab: Vocabulary,
    *,
    n_layer: int,
    n_embd: int,
    n_ff: int,
    n_head: int,
    n_head_kv: int,
    context_length: int,
    quantized: bool,
) -> None:
    # no architecture in the name: llama.cpp keys tokenizer quirks on names containing e.g. "phi3"
    writer.add_name("neuralink synthetic model")
    if quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    # llama and arcee assert n_rot == head size
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(_RMS_EPS)
    if ARCH_SPECS[arch].sliding_window:
        writer.add_rope_freq_base(1_000_000.0)  # gemma3: global layers use a long base, local ones 10k
        writer.add_rope_freq_base_swa(10_000.0)
        writer.add_sliding_window(min(_GEMMA_SLIDING_WINDOW, context_length))
        writer.add_sliding_window_pattern(_GEMMA_SWA_PATTERN)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_scores(list(vocab.scores))
    writer.add_token_types([int(t) for t in vocab.token_types])
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _add_tensors(
    writer: gguf.GGUFWriter,
    arch: Arch,
    qtype: QType,
    n_vocab: int,
    overrides: dict[int, dict[str, np.ndarray]],
    *,
    n_layer: int,
    n_embd: int,
    n_ff: int,
    n_head: int,
    n_head_kv: int,
    seed: int,
    output_qtype: QType | None = None,
) -> None:
    spec = ARCH_SPECS[arch]
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    ones = np.ones(n_embd, dtype=np.float32)

    def random_matrix(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        # std scale/sqrt(fan_in) keeps a normalised input's projection at O(1)
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(scale / np.sqrt(cols))

    def add_matrix(name: str, matrix: np.ndarray) -> None:
        data = _encode(matrix, qtype)
        writer.add_tensor(name, data, raw_dtype=None if qtype == QType.F32 else qtype)

    # embeddings enter the residual stream at RMS ~1 (gemma scales them by sqrt(n_embd) first);
    # an untied output keeps the logits from just echoing the input token, as tied random ones would
    embd_scale = 1.0 if spec.scaled_embeddings else float(np.sqrt(n_embd))
    outer_dtype = np.float32 if qtype == QType.F32 else np.float16
    embd = random_matrix(n_vocab, n_embd, embd_scale)
    writer.add_tensor(_tensor_name(MODEL_TENSOR.TOKEN_EMBD), embd.astype(outer_dtype))
    writer.add_tensor(_tensor_name(MODEL_TENSOR.OUTPUT_NORM), ones)
    output = random_matrix(n_vocab, n_embd, _OUTPUT_SCALE)
    if output_qtype is None:
        writer.add_tensor(_tensor_name(MODEL_TENSOR.OUTPUT), output.astype(outer_dtype))
    else:
        writer.add_tensor(_tensor_name(MODEL_TENSOR.OUTPUT), _encode(output, output_qtype), raw_dtype=output_qtype)

    for il in range(n_layer):
        # llama.cpp multiplies by the stored norm weight (gemma's converter already folded in the +1)
        writer.add_tensor(_tensor_name(MODEL_TENSOR.ATTN_NORM, il), ones)
        heads = {MODEL_TENSOR.ATTN_Q: n_head, MODEL_TENSOR.ATTN_K: n_head_kv, MODEL_TENSOR.ATTN_V: n_head_kv}
        for tensor, rows in heads.items():
            add_matrix(_tensor_name(tensor, il), random_matrix(rows * head_dim, n_embd))
            if spec.qkv_bias:
                bias = 0.1 * rng.standard_normal(rows * head_dim, dtype=np.float32)
                writer.add_tensor(_tensor_name(tensor, il, "bias"), bias)
        add_matrix(_tensor_name(MODEL_TENSOR.ATTN_OUT, il), random_matrix(n_embd, n_head * head_dim))
        if spec.qk_norm:
            writer.add_tensor(_tensor_name(MODEL_TENSOR.ATTN_Q_NORM, il), np.ones(head_dim, dtype=np.float32))
            writer.add_tensor(_tensor_name(MODEL_TENSOR.ATTN_K_NORM, il), np.ones(head_dim, dtype=np.float32))
        if spec.post_norms:
            writer.add_tensor(_tensor_name(MODEL_TENSOR.ATTN_POST_NORM, il), ones)

        writer.add_tensor(_tensor_name(MODEL_TENSOR.FFN_NORM, il), ones)
        # draw every part even when overridden, so an override leaves the other weights unchanged
        ffn = {"up": random_matrix(n_ff, n_embd), "down": random_matrix(n_embd, n_ff)}
        if spec.gated:
            ffn["gate"] = random_matrix(n_ff, n_embd)
        ffn.update(overrides.get(il, {}))
        if spec.fused_gate_up:
            add_matrix(_tensor_name(MODEL_TENSOR.FFN_UP, il), np.concatenate([ffn["gate"], ffn["up"]]))
        else:
            if spec.gated:
                add_matrix(_tensor_name(MODEL_TENSOR.FFN_GATE, il), ffn["gate"])
            add_matrix(_tensor_name(MODEL_TENSOR.FFN_UP, il), ffn["up"])
        add_matrix(_tensor_name(MODEL_TENSOR.FFN_DOWN, il), ffn["down"])
        if spec.post_norms:
            writer.add_tensor(_tensor_name(MODEL_TENSOR.FFN_POST_NORM, il), ones)


def write_synthetic_model(
    path: str | os.PathLike[str],
    arch: Arch,
    *,
    weight_type: str = "f32",
    n_layer: int = 2,
    n_embd: int = 256,
    n_ff: int = 512,
    n_head: int = 4,
    n_head_kv: int = 2,
    context_length: int = 512,
    seed: int = 0,
    ffn_weights: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    output_type: str | None = None,
) -> Path:
    """Write a tiny random-weight `arch` model that llama.cpp loads, and return its path.

    All attention and FFN matrices are stored in `weight_type` (a ggml type name);
    token embeddings and the output matrix in F32 for f32 models, F16 otherwise; norms are F32 ones.
    `ffn_weights[layer]` may replace "gate"/"up" (shape (n_ff, n_embd), one row
    per neuron) and "down" (shape (n_embd, n_ff)) of a layer. `output_type` stores the output matrix in
    that ggml type instead (as Q4_K_M models store theirs in q6_K). The file is written
    to a temporary name and renamed, so `path` is either complete or untouched.
    """
    if arch not in ARCH_SPECS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {list(ARCH_SPECS)}")
    qtype = resolve_weight_type(weight_type)
    output_qtype = resolve_weight_type(output_type) if output_type is not None else None
    dims = dict(n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv)
    _check_dimensions(qtype, context_length=context_length, **dims)
    overrides = _check_ffn_overrides(ffn_weights or {}, arch, n_layer, n_embd, n_ff)
    vocab = build_vocabulary()

    path = Path(path)
    with atomic_gguf(path, MODEL_ARCH_NAMES[ARCH_SPECS[arch].model_arch]) as writer:
        quantized = qtype not in (QType.F32, QType.F16, QType.BF16)
        _add_metadata(writer, arch, vocab, context_length=context_length, quantized=quantized, **dims)
        _add_tensors(writer, arch, qtype, len(vocab.tokens), overrides, seed=seed, output_qtype=output_qtype, **dims)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    log.info(
        "wrote synthetic %s model (%s, %d layers, n_embd %d, n_ff %d) to %s",
        arch, qtype.name.lower(), n_layer, n_embd, n_ff, path,
    )
    return path
