"""A small ReLU^2 decoder in llama.cpp's `arcee` layout: PyTorch model, GGUF export and import.

llama.cpp's arcee builder (src/models/arcee.cpp) computes, per layer,
  h = x + wo . attn(rope(wq . rms(x)), rope(wk . rms(x)), wv . rms(x))
  y = h + ffn_down . relu(ffn_up . rms(h))^2
with RMS norms scaled by a weight, "normal" RoPE (rotating consecutive pairs of
head values, theta_i = base^(-2i/head_dim)), grouped-query attention (query head
h reads kv head h // (n_head / n_head_kv)), scale 1/sqrt(head_dim), and the
output reusing the token embeddings when the file has no `output.weight`.
``ReluDecoder`` computes exactly that with weights in GGUF's row layout
(an nn.Linear weight of shape (out, in) is the numpy array GGUF stores), so
export is a copy and PyTorch and llama.cpp agree up to float rounding.
Training lives in ``neuralink.models.relu_training``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGUFValueType
from gguf import GGMLQuantizationType as QType

from neuralink.formats.files import atomic_gguf

log = logging.getLogger(__name__)

ARCHITECTURE = MODEL_ARCH_NAMES[MODEL_ARCH.ARCEE]
WeightType = Literal["f32", "f16", "q8_0"]
WEIGHT_TYPES: tuple[WeightType, ...] = get_args(WeightType)
_QTYPES: dict[WeightType, QType] = {"f32": QType.F32, "f16": QType.F16, "q8_0": QType.Q8_0}

# tokenizer keys copied verbatim from the tokenizer's GGUF; its chat template is left out, as this
# model never saw a chat
TOKENIZER_KEY_PREFIX = "tokenizer.ggml."
# prefix of the keys recording how the model was made (llama.cpp ignores unknown keys)
TRAINING_KEY_PREFIX = "neuralink.training."

# called with (layer, relu(up . x)^2 of shape (..., n_ff)) during a forward pass
ActivationConsumer = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class DecoderShape:
    """The hyperparameters llama.cpp reads from an arcee GGUF."""

    n_vocab: int
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    context_length: int
    rope_freq_base: float = 10_000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_head_kv={self.n_head_kv}")
        if self.head_dim % 2:
            raise ValueError(f"head size {self.head_dim} must be even for RoPE")


def rope_tables(head_dim: int, n_pos: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (n_pos, head_dim/2): pair i at position p turns by p * base^(-2i/head_dim)."""
    # ggml computes theta = p * theta_scale^i in float32 from theta_scale = base^(-2/head_dim)
    theta_scale = np.float32(base) ** np.float32(-2.0 / head_dim)
    powers = np.cumprod(np.concatenate([[np.float32(1.0)], np.full(head_dim // 2 - 1, theta_scale)]),
                        dtype=np.float32)
    angles = np.arange(n_pos, dtype=np.float32)[:, None] * powers[None, :]
    return torch.from_numpy(np.cos(angles)), torch.from_numpy(np.sin(angles))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the last axis (llama.cpp's LLAMA_ROPE_TYPE_NORM)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class DecoderLayer(torch.nn.Module):
    def __init__(self, shape: DecoderShape, dropout: float) -> None:
        super().__init__()
        hd = shape.head_dim
        self.shape = shape
        self.dropout = dropout
        self.attn_norm = torch.nn.Parameter(torch.ones(shape.n_embd))
        self.attn_q = torch.nn.Linear(shape.n_embd, shape.n_head * hd, bias=False)
        self.attn_k = torch.nn.Linear(shape.n_embd, shape.n_head_kv * hd, bias=False)
        self.attn_v = torch.nn.Linear(shape.n_embd, shape.n_head_kv * hd, bias=False)
        self.attn_output = torch.nn.Linear(shape.n_head * hd, shape.n_embd, bias=False)
        self.ffn_norm = torch.nn.Parameter(torch.ones(shape.n_embd))
        self.ffn_up = torch.nn.Linear(shape.n_embd, shape.n_ff, bias=False)
        self.ffn_down = torch.nn.Linear(shape.n_ff, shape.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                consumer: ActivationConsumer | None) -> torch.Tensor:
        s = self.shape
        batch, n_tok, _ = x.shape
        h = F.rms_norm(x, (s.n_embd,), self.attn_norm, s.rms_eps)
        q = self.attn_q(h).view(batch, n_tok, s.n_head, s.head_dim).transpose(1, 2)
        k = self.attn_k(h).view(batch, n_tok, s.n_head_kv, s.head_dim).transpose(1, 2)
        v = self.attn_v(h).view(batch, n_tok, s.n_head_kv, s.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=s.n_head != s.n_head_kv)
        attn = self.attn_output(attn.transpose(1, 2).reshape(batch, n_tok, s.n_head * s.head_dim))
        x = x + F.dropout(attn, self.dropout, self.training)
        act = F.relu(self.ffn_up(F.rms_norm(x, (s.n_embd,), self.ffn_norm, s.rms_eps))).square()
        if consumer is not None:
            consumer(layer, act.detach())
        return x + F.dropout(self.ffn_down(act), self.dropout, self.training)


class ReluDecoder(torch.nn.Module):
    """The arcee forward pass (module doc), with tied input/output embeddings.

    `dropout` (training only, on each residual branch's output) is not part of llama.cpp's graph:
    it is the identity in eval mode, which is what gets exported.
    """

    def __init__(self, shape: DecoderShape, dropout: float = 0.0) -> None:
        super().__init__()
        shape.validate()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.shape = shape
        self.token_embd = torch.nn.Embedding(shape.n_vocab, shape.n_embd)
        self.layers = torch.nn.ModuleList(DecoderLayer(shape, dropout) for _ in range(shape.n_layer))
        self.output_norm = torch.nn.Parameter(torch.ones(shape.n_embd))
        cos, sin = rope_tables(shape.head_dim, shape.context_length, shape.rope_freq_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2 style: N(0, 0.02), residual projections shrunk by 1/sqrt(2 n_layer); norms at one."""
        residual_std = 0.02 / math.sqrt(2 * self.shape.n_layer)
        for name, param in self.named_parameters():
            if param.ndim == 1:
                torch.nn.init.ones_(param)
            else:
                std = residual_std if name.endswith(("attn_output.weight", "ffn_down.weight")) else 0.02
                torch.nn.init.normal_(param, 0.0, std, generator=generator)

    def forward(self, tokens: torch.Tensor, consumer: ActivationConsumer | None = None) -> torch.Tensor:
        """Logits of shape (batch, n_tokens, n_vocab) for tokens of shape (batch, n_tokens)."""
        n_tok = tokens.shape[1]
        if n_tok > self.shape.context_length:
            raise ValueError(f"{n_tok} tokens exceed the context length {self.shape.context_length}")
        cos, sin = self.rope_cos[:n_tok], self.rope_sin[:n_tok]
        x = self.token_embd(tokens)
        for layer, block in enumerate(self.layers):
            x = block(x, cos, sin, layer, consumer)
        x = F.rms_norm(x, (self.shape.n_embd,), self.output_norm, self.shape.rms_eps)
        return x @ self.token_embd.weight.T


def _tensor_name(tensor: MODEL_TENSOR, layer: int | None = None) -> str:
    base = TENSOR_NAMES[tensor]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


def _layer_tensors(layer: DecoderLayer) -> dict[MODEL_TENSOR, torch.Tensor]:
    return {
        MODEL_TENSOR.ATTN_NORM: layer.attn_norm, MODEL_TENSOR.ATTN_Q: layer.attn_q.weight,
        MODEL_TENSOR.ATTN_K: layer.attn_k.weight, MODEL_TENSOR.ATTN_V: layer.attn_v.weight,
        MODEL_TENSOR.ATTN_OUT: layer.attn_output.weight, MODEL_TENSOR.FFN_NORM: layer.ffn_norm,
        MODEL_TENSOR.FFN_UP: layer.ffn_up.weight, MODEL_TENSOR.FFN_DOWN: layer.ffn_down.weight,
    }


def gguf_tensors(model: ReluDecoder) -> dict[str, torch.Tensor]:
    """Every tensor of the exported file by GGUF name (no output.weight: llama.cpp reuses token_embd)."""
    tensors = {_tensor_name(MODEL_TENSOR.TOKEN_EMBD): model.token_embd.weight,
               _tensor_name(MODEL_TENSOR.OUTPUT_NORM): model.output_norm}
    for il, layer in enumerate(model.layers):
        tensors.update({_tensor_name(t, il): w for t, w in _layer_tensors(layer).items()})
    return tensors


MetadataEntry = tuple[str, object, GGUFValueType, GGUFValueType | None]  # key, value, type, array element type


def read_tokenizer_metadata(path: str | os.PathLike[str]) -> list[MetadataEntry]:
    """The tokenizer.ggml.* keys of a GGUF file as (key, value, type, array element type)."""
    reader = gguf.GGUFReader(path)
    keys = []
    for field in reader.fields.values():
        if field.name.startswith(TOKENIZER_KEY_PREFIX):
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            keys.append((field.name, field.contents(), vtype, sub_type))
    if not any(name == gguf.Keys.Tokenizer.LIST for name, *_ in keys):
        raise ValueError(f"{path}: has no {gguf.Keys.Tokenizer.LIST}, so it cannot lend its tokenizer")
    return keys


def _encode(tensor: torch.Tensor, qtype: QType) -> np.ndarray:
    array = tensor.detach().cpu().float().numpy()
    if array.ndim == 1 or qtype == QType.F32:  # norms stay f32, as in llama.cpp's own conversions
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == QType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def export_gguf(
    model: ReluDecoder,
    path: str | os.PathLike[str],
    tokenizer_gguf: str | os.PathLike[str],
    *,
    weight_type: WeightType = "f32",
    name: str = "neuralink relu model",
    training_metadata: dict[str, object] | None = None,
) -> Path:
    """Write `model` as an arcee GGUF at `path` (temp file + rename: complete or untouched).

    Matrices are stored in `weight_type`, norms in F32; the tokenizer keys
    come from `tokenizer_gguf`; `training_metadata` values (str or int) go
    in as neuralink.training.* keys.
    """
    if weight_type not in _QTYPES:
        raise ValueError(f"weight type {weight_type!r} is not one of {WEIGHT_TYPES}")
    qtype = _QTYPES[weight_type]
    s = model.shape
    tokenizer_keys = read_tokenizer_metadata(tokenizer_gguf)
    n_tokens = len(next(value for key, value, *_ in tokenizer_keys if key == gguf.Keys.Tokenizer.LIST))
    if n_tokens != s.n_vocab:
        raise ValueError(f"{tokenizer_gguf}: {n_tokens} tokens, but the model has n_vocab {s.n_vocab}")
    path = Path(path)
    with atomic_gguf(path, ARCHITECTURE) as writer:
        writer.add_name(name)
        writer.add_file_type({QType.F32: gguf.LlamaFileType.ALL_F32, QType.F16: gguf.LlamaFileType.MOSTLY_F16,
                              QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
        if qtype == QType.Q8_0:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(s.n_vocab)
        writer.add_context_length(s.context_length)
        writer.add_embedding_length(s.n_embd)
        writer.add_block_count(s.n_layer)
        writer.add_feed_forward_length(s.n_ff)
        writer.add_head_count(s.n_head)
        writer.add_head_count_kv(s.n_head_kv)
        writer.add_rope_dimension_count(s.head_dim)  # arcee asserts n_rot == head size
        writer.add_rope_freq_base(s.rope_freq_base)
        writer.add_layer_norm_rms_eps(s.rms_eps)
        for key, value, vtype, sub_type in tokenizer_keys:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        for key, value in (training_metadata or {}).items():
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise TypeError(f"training metadata {key!r} must be str or int, got {type(value).__name__}")
            if isinstance(value, str):
                writer.add_string(TRAINING_KEY_PREFIX + key, value)
            else:
                writer.add_uint64(TRAINING_KEY_PREFIX + key, value)
        for tensor_name, tensor in gguf_tensors(model).items():
            data = _encode(tensor, qtype)
            raw = qtype if data.dtype == np.uint8 else None
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    log.info("wrote %s (%s, %d layers, n_embd %d, n_ff %d) to %s", ARCHITECTURE, weight_type, s.n_layer,
             s.n_embd, s.n_ff, path)
    return path


def load_gguf(path: str | os.PathLike[str]) -> ReluDecoder:
    """A ReluDecoder holding the (dequantized) weights of an arcee GGUF written by `export_gguf`."""
    reader = gguf.GGUFReader(path)

    def key(template: str) -> object:
        field = reader.get_field(template.format(arch=ARCHITECTURE))
        if field is None:
            raise ValueError(f"{path}: no {template.format(arch=ARCHITECTURE)} in the metadata")
        return field.contents()

    arch = key(gguf.Keys.General.ARCHITECTURE)
    if arch != ARCHITECTURE:
        raise ValueError(f"{path}: architecture {arch!r}, expected {ARCHITECTURE!r}")
    tensors = {t.name: t for t in reader.tensors}
    n_vocab = int(tensors[_tensor_name(MODEL_TENSOR.TOKEN_EMBD)].shape[1])
    shape = DecoderShape(
        n_vocab=n_vocab, n_layer=int(key(gguf.Keys.LLM.BLOCK_COUNT)), n_embd=int(key(gguf.Keys.LLM.EMBEDDING_LENGTH)),
        n_ff=int(key(gguf.Keys.LLM.FEED_FORWARD_LENGTH)), n_head=int(key(gguf.Keys.Attention.HEAD_COUNT)),
        n_head_kv=int(key(gguf.Keys.Attention.HEAD_COUNT_KV)), context_length=int(key(gguf.Keys.LLM.CONTEXT_LENGTH)),
        rope_freq_base=float(key(gguf.Keys.Rope.FREQ_BASE)), rms_eps=float(key(gguf.Keys.Attention.LAYERNORM_RMS_EPS)),
    )
    model = ReluDecoder(shape)
    with torch.no_grad():
        for name, param in gguf_tensors(model).items():
            if name not in tensors:
                raise ValueError(f"{path}: tensor {name} is missing")
            t = tensors[name]
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(param.shape))
            param.copy_(torch.from_numpy(np.array(values, dtype=np.float32)))
    return model


__all__ = [
    "ARCHITECTURE", "WEIGHT_TYPES", "ActivationConsumer", "DecoderShape", "ReluDecoder", "WeightType",
    "apply_rope", "export_gguf", "gguf_tensors", "load_gguf", "read_tokenizer_metadata", "rope_tables",
]
