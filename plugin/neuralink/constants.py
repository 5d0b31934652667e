"""Names shared across neuralink: metadata keys, tensor names, format constants."""

from __future__ import annotations

from gguf.constants import MODEL_TENSOR, TENSOR_NAMES

# kv override understood by the patched loader (LLAMA_FFN_HOOK_LAZY_WEIGHTS_KEY in llama-ffn-hook.h)
LAZY_FFN_WEIGHTS_KEY = "ffn_hook.lazy_weights"

# per-layer FFN tensor names, from gguf's own table ("blk.{bid}.ffn_up" ...)
FFN_GATE = TENSOR_NAMES[MODEL_TENSOR.FFN_GATE] + ".weight"
FFN_UP = TENSOR_NAMES[MODEL_TENSOR.FFN_UP] + ".weight"
FFN_DOWN = TENSOR_NAMES[MODEL_TENSOR.FFN_DOWN] + ".weight"


def ffn_tensor_name(template: str, layer: int) -> str:
    """The name of an FFN tensor of `layer`, e.g. ``ffn_tensor_name(FFN_UP, 3)``."""
    return template.format(bid=layer)
