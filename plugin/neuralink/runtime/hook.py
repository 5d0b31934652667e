"""Access to the FFN-hook C API that patches/ adds to llama.cpp's libllama.

llama-cpp-python loads libllama with ctypes; the patched build exports
``llama_set_ffn_hook``. A stock build does not, and we say so plainly.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp
from llama_cpp import llama_cpp as bindings

from neuralink.errors import HookUnavailableError

SETUP_COMMAND = "bash scripts/setup.sh"


class FfnHookLayer(ctypes.Structure):
    """``struct llama_ffn_hook_layer``: what the graph builder tells the hook about one FFN."""

    _fields_ = [
        ("il", ctypes.c_int32),
        ("act", ctypes.c_int32),
        ("gated", ctypes.c_bool),
        ("n_embd", ctypes.c_int64),
        ("n_ff", ctypes.c_int64),
        ("n_out", ctypes.c_int64),
        ("n_tokens", ctypes.c_int64),
        ("up", ctypes.c_char_p),
        ("gate", ctypes.c_char_p),
        ("down", ctypes.c_char_p),
        ("up_bias", ctypes.c_char_p),
        ("gate_bias", ctypes.c_char_p),
        ("down_bias", ctypes.c_char_p),
        ("kind", ctypes.c_int32),  # enum llama_ffn_hook_kind: 0 a layer's FFN, 1 the output matrix's product
    ]


FFN_HOOK_TAKE = ctypes.CFUNCTYPE(
    ctypes.c_int32, ctypes.c_void_p, ctypes.POINTER(FfnHookLayer), ctypes.POINTER(ctypes.c_int32)
)
FFN_HOOK_COMPUTE = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
)


class FfnHook(ctypes.Structure):
    """``struct llama_ffn_hook``; a Python hook keeps its callbacks alive as long as it is set."""

    _fields_ = [("take", FFN_HOOK_TAKE), ("compute", FFN_HOOK_COMPUTE), ("user_data", ctypes.c_void_p)]


class FfnHookApi:
    """The patched libllama's hook entry points."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._set = lib.llama_set_ffn_hook
        self._set.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._set.restype = None
        version = lib.llama_ffn_hook_api_version
        version.argtypes = []
        version.restype = ctypes.c_int32
        self.version = int(version())

    def attach(self, ctx: ctypes.c_void_p, hook_address: int) -> None:
        """Set the hook at `hook_address` (a ``struct llama_ffn_hook *``) on a context."""
        self._set(ctx, ctypes.c_void_p(hook_address))

    def detach(self, ctx: ctypes.c_void_p) -> None:
        """Clear the context's hook; no graph refers to it once this returns."""
        self._set(ctx, None)


def detach_before_free(api: FfnHookApi, context: Any) -> None:
    """A Llama's first step when it closes: clear the hook of `context` (llama-cpp-python's LlamaContext) while the
    context still exists. A callback that holds no Llama: a bound method on the Llama's own exit stack would make a
    reference cycle, which only the garbage collector frees, finalizing the context and the Llama in any order (a
    detach after the context had been freed ended the process)."""
    if context.ctx is not None:
        api.detach(context.ctx)


def ffn_hook_api(expected_version: int) -> FfnHookApi:
    """The hook API of the loaded libllama, or HookUnavailableError naming the fix."""
    lib = bindings._lib
    where = getattr(lib, "_name", "libllama")
    if not hasattr(lib, "llama_set_ffn_hook"):
        raise HookUnavailableError(
            f"the installed llama-cpp-python {llama_cpp.__version__} ({where}) has no FFN hook: "
            f"it is not neuralink's patched build. Run `{SETUP_COMMAND}` to build and install it."
        )
    api = FfnHookApi(lib)
    if api.version != expected_version:
        raise HookUnavailableError(
            f"{where} implements FFN hook API version {api.version}, but this neuralink needs "
            f"version {expected_version}. Run `{SETUP_COMMAND}` to rebuild the patched llama-cpp-python."
        )
    return api
