"""The dense FFN tensors of a GGUF model: finding them, and permuting their neurons.

A neuron i of layer l is row i of ``ffn_gate``/``ffn_up`` (and element i of
their biases) and column i of ``ffn_down``. Rows are independent in every ggml
type, so permuting them moves bytes and is exact. Columns of a quantized
``ffn_down`` share blocks with their neighbours: permuting them means
dequantizing, permuting and re-encoding, in a type chosen by
:func:`choose_down_type` (see docs/convert.md for the measurements behind the
defaults).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cache
from typing import Literal, get_args

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

from neuralink import _engine
from neuralink.errors import ModelFileError, UnsupportedModelError
from neuralink.formats.constants import (
    FFN_DOWN,
    FFN_GATE,
    FFN_GATE_BIAS,
    FFN_UP,
    FFN_UP_BIAS,
    KEY_MODEL_ID,
    ffn_tensor_name,
)
from neuralink.formats.ggml_types import ggml_type_name
from neuralink.formats.gguf_directory import GgufDirectory, TensorEntry, read_gguf_directory

log = logging.getLogger(__name__)

Activation = Literal["silu", "gelu", "relu", "relu_sqr"]
ACTIVATIONS: tuple[Activation, ...] = get_args(Activation)

# How the converted GGUF's ffn_down and the sidecar's down columns are encoded:
# "auto" (the measured default per type), "same" (the source ffn_down type), or a fixed type.
DownEncoding = Literal["auto", "same", "q8_0", "q6_K", "q5_K", "q4_K", "f16", "f32"]
DOWN_ENCODINGS: tuple[DownEncoding, ...] = get_args(DownEncoding)

FLOAT_TYPES = frozenset({QType.F32, QType.F16, QType.BF16})
# "auto" keeps these types when re-encoding; every other quantized type goes to q8_0. Measured on
# SmolLM2-135M, emma.txt (docs/convert.md): Q4_1 ffn_down re-encoded in Q4_1 after a permutation costs
# +5.3 % perplexity (a second 8 % quantization error on top of the first), in q8_0 +0.007 %; a q8_0 model
# re-encoded in q8_0 -0.009 %.
AUTO_KEEPS_TYPES = FLOAT_TYPES | {QType.Q8_0}
AUTO_FINER_TYPE = QType.Q8_0
# Under "auto", K-quant sources of at most 6 bits go to q5_K where the values fit its 256-value blocks: the
# sidecar's down columns (n_embd % 256 == 0) and the converted GGUF's ffn_down rows (n_ff % 256 == 0).
# The columns, measured on Qwen2.5-Coder-1.5B Q4_K_M (docs/convert.md):
# relative RMS error q8_0 0.57 %, q6_K 1.85 %, q5_K 3.7 %, q4_K 7.3 %; the engine reading every neuron,
# against stock, on held-out code +0.12 % (q8_0), +0.06 % (q6_K), +1.12 % (q4_K) perplexity, and q6_K
# -0.04 % / q5_K -0.16 % on 2048 code tokens, -0.17 % / +0.49 % on 2048 tokens of English; at the validated
# sparsity q5_K +0.85 % / +3.16 % against q6_K's +0.92 % / +3.57 %, greedy agreement 0.470 against 0.453.
# q5_K columns are 16 % smaller than q6_K's (1056 against 1260 bytes at n_embd 1536): under 800MB and 530MB
# caps, where every byte not held is read per token, decoding ran 15-18 % faster. Every K-quant type has a
# fused loop (column_axpy). The GGUF's rows (2026-12-06): stock llama.cpp on the converted file, against the
# source, +0.14 % on 2048 held-out code tokens and -0.07 % on English (q8_0 rows -0.21 % / +0.10 %, both within
# the standard error), 196 MB smaller (1064 against 1260 MiB) and decoding at 0.95-1.0x the source's speed
# (q8_0 rows 0.85-0.9x); the engine times them against its columns where it holds the store (try_down_rows).
AUTO_BUNDLE_K_SOURCES = frozenset({QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K})
AUTO_BUNDLE_K_TYPE = QType.Q5_K

# The activation of the dense FFN of llama.cpp's builders (src/models/<arch>.cpp, their build_ffn call).
ARCH_ACTIVATIONS: dict[str, Activation] = {
    **dict.fromkeys(
        ("llama", "mistral3", "qwen", "qwen2", "qwen3", "granite", "internlm2", "baichuan", "olmo", "olmo2",
         "exaone", "exaone4", "orion", "minicpm3", "deci", "command-r", "cohere2", "stablelm", "smollm3",
         "ernie4_5", "seed_oss"),
        "silu",
    ),
    **dict.fromkeys(
        ("gemma", "gemma2", "gemma3", "phi2", "gpt2", "bloom", "falcon", "gptneox", "starcoder", "starcoder2",
         "codeshell"),
        "gelu",
    ),
    **dict.fromkeys(("arcee", "nemotron", "plm", "jais2"), "relu_sqr"),
}

# per-layer FFN tensors that do not depend on the order of the neurons (they live in n_embd space)
_ORDER_FREE_FFN_TENSORS = frozenset({"ffn_norm.weight", "ffn_norm.bias", "ffn_down.bias", "post_ffw_norm.weight",
                                     "ffn_post_norm.weight"})
# the ones conversion permutes, without the "blk.{bid}." prefix
_PERMUTED_FFN_TENSORS = frozenset(t.split(".", 2)[2] for t in (FFN_UP, FFN_DOWN, FFN_GATE, FFN_UP_BIAS, FFN_GATE_BIAS))


@dataclass(frozen=True)
class FfnLayerTensors:
    """The tensors holding one layer's neurons."""

    il: int
    up: TensorEntry
    down: TensorEntry
    gate: TensorEntry | None
    up_bias: TensorEntry | None
    gate_bias: TensorEntry | None

    @property
    def permuted(self) -> tuple[TensorEntry, ...]:
        """Every tensor whose neuron axis a permutation reorders."""
        return tuple(t for t in (self.gate, self.up, self.down, self.gate_bias, self.up_bias) if t is not None)


@dataclass(frozen=True)
class FfnModel:
    """A GGUF model whose every layer has a dense FFN neuralink can reorder."""

    directory: GgufDirectory
    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    gated: bool
    activation: Activation
    layers: tuple[FfnLayerTensors, ...]

    @property
    def converted(self) -> bool:
        """Whether the file was written by ``neuralink convert`` (it names a model id); other neuralink.* keys,
        e.g. the training record of scripts/train_relu_model.py, do not make a model converted."""
        return self.directory.get(KEY_MODEL_ID) is not None


def _layer_tensor(directory: GgufDirectory, template: str, il: int) -> TensorEntry | None:
    return directory.tensors.get(ffn_tensor_name(template, il))


def _check_layer(path: os.PathLike[str], layer: FfnLayerTensors, n_embd: int, n_ff: int, declared_ff: object) -> None:
    up, down, gate = layer.up, layer.down, layer.gate
    if len(up.shape) != 2 or len(down.shape) != 2:
        raise UnsupportedModelError(f"{path}: layer {layer.il}: ffn_up/ffn_down are not matrices")
    if gate is None and isinstance(declared_ff, int) and up.shape[1] == 2 * declared_ff:
        raise UnsupportedModelError(
            f"{path}: layer {layer.il}: '{up.name}' stacks gate and up ({up.shape[1]} rows for n_ff "
            f"{declared_ff}); fused gate/up FFNs are not supported"
        )
    if up.shape != (n_embd, n_ff) or down.shape != (n_ff, n_embd):
        raise UnsupportedModelError(
            f"{path}: layer {layer.il}: FFN shapes up {list(up.shape)}, down {list(down.shape)} differ from "
            f"layer 0's [n_embd {n_embd}, n_ff {n_ff}]; layers of different widths are not supported"
        )
    if gate is not None and gate.shape != up.shape:
        raise UnsupportedModelError(f"{path}: '{gate.name}' shape {list(gate.shape)} differs from '{up.name}'")
    for bias in (layer.up_bias, layer.gate_bias):
        if bias is not None and (bias.shape != (n_ff,) or bias.type not in FLOAT_TYPES):
            raise UnsupportedModelError(f"{path}: '{bias.name}' is not a float vector of n_ff = {n_ff} values")


def inspect_ffn_model(path: str | os.PathLike[str], activation: Activation | None = None) -> FfnModel:
    """Find every layer's FFN tensors and check that neuralink can reorder them.

    `activation` overrides the per-architecture table for architectures it
    does not list. Raises ModelFileError for unreadable files and
    UnsupportedModelError (naming the file and the reason) for
    mixture-of-experts, fused gate/up, layers without a dense FFN, FFN tensors
    whose meaning neuralink does not know, or layers of different widths.
    """
    directory = read_gguf_directory(path)
    arch = directory.architecture
    if (directory.get(f"{arch}.expert_count") or 0) > 0:
        raise UnsupportedModelError(
            f"{path}: architecture '{arch}' has mixture-of-experts FFNs, which neuralink does not support"
        )
    n_layer = directory.require(f"{arch}.block_count", int)
    if n_layer <= 0:
        raise ModelFileError(f"{path}: {arch}.block_count is {n_layer}")
    layers: list[FfnLayerTensors] = []
    for il in range(n_layer):
        up, down = _layer_tensor(directory, FFN_UP, il), _layer_tensor(directory, FFN_DOWN, il)
        if up is None or down is None:
            raise UnsupportedModelError(
                f"{path}: layer {il} has no dense FFN ({ffn_tensor_name(FFN_UP, il)} and "
                f"{ffn_tensor_name(FFN_DOWN, il)}); architecture '{arch}' is not supported"
            )
        prefix = f"blk.{il}."
        known = _ORDER_FREE_FFN_TENSORS | _PERMUTED_FFN_TENSORS
        unknown = [
            name for name in directory.tensors
            if name.startswith((prefix + "ffn_", prefix + "post_ffw")) and name[len(prefix):] not in known
        ]
        if unknown:
            raise UnsupportedModelError(
                f"{path}: layer {il} has FFN tensors neuralink cannot reorder consistently: {', '.join(unknown)}"
            )
        layers.append(FfnLayerTensors(
            il, up, down, _layer_tensor(directory, FFN_GATE, il),
            _layer_tensor(directory, FFN_UP_BIAS, il), _layer_tensor(directory, FFN_GATE_BIAS, il),
        ))

    if len(layers[0].up.shape) != 2:
        raise UnsupportedModelError(f"{path}: '{layers[0].up.name}' is not a matrix")
    n_embd, n_ff = layers[0].up.shape
    declared_ff = directory.get(f"{arch}.feed_forward_length")
    for layer in layers:
        _check_layer(path, layer, n_embd, n_ff, declared_ff)
    gated = layers[0].gate is not None
    if any((layer.gate is not None) != gated for layer in layers):
        raise UnsupportedModelError(f"{path}: some layers have ffn_gate and others do not")
    if activation is None:
        if arch not in ARCH_ACTIVATIONS:
            raise UnsupportedModelError(
                f"{path}: the FFN activation of architecture '{arch}' is not known to neuralink "
                f"(known: {', '.join(sorted(ARCH_ACTIVATIONS))}); pass it explicitly"
            )
        activation = ARCH_ACTIVATIONS[arch]
    elif activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return FfnModel(directory, arch, n_layer, n_embd, n_ff, gated, activation, tuple(layers))


@cache
def quantizable(qtype: QType) -> bool:
    """Whether ggml quantizes `qtype` without an importance matrix (a one-block trial)."""
    block = GGML_QUANT_SIZES[qtype][0]
    try:
        _engine.quantize(ggml_type_name(qtype), np.zeros((1, block), dtype=np.float32))
    except ValueError:
        return False
    return True


def choose_down_type(source: QType, row_length: int, policy: DownEncoding) -> QType:
    """The type to store re-encoded down values in, for rows of `row_length` values.

    "auto" stores a K-quant `ffn_down` of at most 6 bits in q5_K when the rows
    fit its blocks (AUTO_BUNDLE_K_SOURCES), keeps float and q8_0 types and
    re-encodes other quantized types in q8_0; "same" keeps the source type.
    When rows do not fit the chosen type's block size (K-quants need multiples
    of 256) or ggml cannot quantize it without an importance matrix, falls
    back to q8_0, then to f16.
    """
    if policy not in DOWN_ENCODINGS:
        raise ValueError(f"unknown down encoding {policy!r}; expected one of {DOWN_ENCODINGS}")
    if policy == "auto" and source in AUTO_BUNDLE_K_SOURCES and quantizable(AUTO_BUNDLE_K_TYPE) \
            and row_length % GGML_QUANT_SIZES[AUTO_BUNDLE_K_TYPE][0] == 0:
        return AUTO_BUNDLE_K_TYPE
    if policy == "auto":
        target = source if source in AUTO_KEEPS_TYPES else AUTO_FINER_TYPE
    elif policy == "same":
        target = source
    else:
        target = QType[policy.upper()]
    for candidate in (target, QType.Q8_0, QType.F16):
        if row_length % GGML_QUANT_SIZES[candidate][0] == 0 and quantizable(candidate):
            if candidate != target:
                log.info("rows of %d values do not fit %s: storing them as %s", row_length,
                         ggml_type_name(target), ggml_type_name(candidate))
            return candidate
    raise AssertionError("f16 fits every row length")


def choose_bundle_down_type(source: QType, column_length: int, policy: DownEncoding) -> QType:
    """The type of the sidecar's down columns of `column_length` (n_embd) values: choose_down_type's (q5_K
    columns of a K-quant `ffn_down`: 35 % fewer bytes than q8_0 at a measured +0-0.7 % perplexity)."""
    return choose_down_type(source, column_length, policy)


def tensor_rows(data: np.ndarray, tensor: TensorEntry) -> np.ndarray:
    """A tensor's bytes as (rows, row_bytes) uint8, a view of the mapped file `data`."""
    return data[tensor.offset:tensor.offset + tensor.nbytes].reshape(tensor.rows, tensor.row_bytes)


def _element_view(data: np.ndarray, tensor: TensorEntry) -> np.ndarray:
    # float elements as same-size unsigned ints: moving them never rounds or canonicalizes NaNs
    itemsize = GGML_QUANT_SIZES[tensor.type][1]
    return tensor_rows(data, tensor).view(f"<u{itemsize}")


def decode_matrix(data: np.ndarray, tensor: TensorEntry) -> np.ndarray:
    """A 2-D tensor's values as float32 (rows, row length)."""
    return _engine.dequantize(ggml_type_name(tensor.type), tensor_rows(data, tensor), tensor.shape[0])


def permute_rows(data: np.ndarray, tensor: TensorEntry, order: np.ndarray) -> np.ndarray:
    """Rows (neurons) of a gate/up matrix in placed order: row k = source row order[k]; bit-exact."""
    return tensor_rows(data, tensor)[order]


def permute_vector(data: np.ndarray, tensor: TensorEntry, order: np.ndarray) -> np.ndarray:
    """A float bias vector in placed order; bit-exact."""
    return _element_view(data, tensor)[0, order]


@dataclass(frozen=True)
class EncodedMatrix:
    """Re-arranged down weights and how far re-encoding moved them."""

    data: np.ndarray  # uint8 (rows, row_bytes) in `type`
    type: QType
    rel_rms_error: float  # ||decoded - source values|| / ||source values||; 0.0 when bit-exact


def _encode(values: np.ndarray, qtype: QType) -> EncodedMatrix:
    encoded = _engine.quantize(ggml_type_name(qtype), values)
    decoded = _engine.dequantize(ggml_type_name(qtype), encoded, values.shape[1])
    norm = float(np.linalg.norm(values))
    error = float(np.linalg.norm(decoded - values)) / norm if norm > 0 else 0.0
    return EncodedMatrix(encoded, qtype, error)


def permute_down(data: np.ndarray, down: TensorEntry, order: np.ndarray, target: QType) -> EncodedMatrix:
    """ffn_down with its columns in placed order (n_embd rows of n_ff), encoded in `target`.

    Exact when source and target are the same float type; otherwise the
    source is dequantized, permuted and quantized by ggml.
    """
    if target == down.type and target in FLOAT_TYPES:
        return EncodedMatrix(np.ascontiguousarray(_element_view(data, down)[:, order]).view(np.uint8), target, 0.0)
    return _encode(np.ascontiguousarray(decode_matrix(data, down)[:, order]), target)


def down_columns(data: np.ndarray, down: TensorEntry, order: np.ndarray, target: QType) -> EncodedMatrix:
    """ffn_down's columns transposed into rows, in placed order (n_ff rows of n_embd), encoded in `target`."""
    if target == down.type and target in FLOAT_TYPES:
        return EncodedMatrix(np.ascontiguousarray(_element_view(data, down).T[order]).view(np.uint8), target, 0.0)
    return _encode(np.ascontiguousarray(decode_matrix(data, down).T[order]), target)
