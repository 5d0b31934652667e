"""``neuralink.Llama``: a drop-in ``llama_cpp.Llama`` whose FFNs run in neuralink's engine."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import llama_cpp

from neuralink import _engine
from neuralink.constants import LAZY_FFN_WEIGHTS_KEY
from neuralink.errors import ModelFileError, UnsupportedModelError
from neuralink.hook import FfnHookApi, ffn_hook_api

logger = logging.getLogger(__name__)

_NOT_OFFERED = (
    "llama.cpp did not offer its FFN to the hook (a form neuralink does not serve: "
    "fused gate/up, per-tensor scales, clamped SwiGLU, a LoRA adapter on the FFN, or no build_ffn call)"
)


class Llama(llama_cpp.Llama):
    """``llama_cpp.Llama`` with every layer's dense FFN computed by neuralink's C++ engine.

    Takes the same arguments as ``llama_cpp.Llama``, plus:

    direct_io:
        read the FFN weights with O_DIRECT so that they never enter the page
        cache (falls back to buffered reads where the filesystem refuses).

    The model is loaded with its FFN weights mapped lazily (never prefetched,
    repacked or read by llama.cpp), the engine is attached to the context for
    its whole life and detached on ``close()``.

    Raises HookUnavailableError when llama-cpp-python is not the patched
    build, ModelFileError for unreadable models and UnsupportedModelError for
    architectures or FFN forms the engine cannot serve.
    """

    def __init__(self, model_path: str, *args: Any, direct_io: bool = True, **kwargs: Any) -> None:
        self._hook_api: FfnHookApi | None = None
        self._engine: _engine.Engine | None = None
        # llama_cpp.Llama.__del__ closes this stack even when __init__ failed early
        self._stack = contextlib.ExitStack()
        api = ffn_hook_api(_engine.FFN_HOOK_API_VERSION)
        if not os.path.exists(model_path):
            raise ModelFileError(f"{model_path}: no such model file")
        # the engine reads the FFN weights itself before llama.cpp maps the rest
        engine = _engine.Engine(os.fspath(model_path), direct_io=direct_io)
        if not engine.direct_io and direct_io:
            logger.warning("%s: %s", model_path, engine.io_note)

        kv_overrides = dict(kwargs.pop("kv_overrides", None) or {})
        kv_overrides[LAZY_FFN_WEIGHTS_KEY] = True
        super().__init__(model_path, *args, kv_overrides=kv_overrides, **kwargs)

        api.attach(self._ctx.ctx, engine.hook_address)
        self._hook_api, self._engine = api, engine
        self._stack.callback(self._detach_engine)
        self._direct_io = direct_io

        refused = [s for s in engine.layer_status() if not s.taken]
        if refused:
            details = "; ".join(f"layer {s.il}: {s.reason or _NOT_OFFERED}" for s in refused[:3])
            more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
            self.close()
            raise UnsupportedModelError(
                f"{model_path}: architecture '{engine.architecture}': {len(refused)} of "
                f"{engine.n_layer} layers cannot be served by neuralink: {details}{more}"
            )

    @property
    def engine(self) -> _engine.Engine:
        """The engine serving this model's FFNs (layer status, weight bytes, counters)."""
        if self._engine is None:
            raise RuntimeError("this Llama is closed")
        return self._engine

    @contextlib.contextmanager
    def stock_ffn(self) -> Iterator[None]:
        """Within the block, llama.cpp computes the FFNs itself (from the mapped weights).

        For A/B checks: the rest of the model, the KV cache and the sampler are
        shared, so outputs differ only by the FFN computation.
        """
        assert self._hook_api is not None and self._engine is not None, "this Llama is closed"
        self._hook_api.detach(self._ctx.ctx)
        try:
            yield
        finally:
            self._hook_api.attach(self._ctx.ctx, self._engine.hook_address)

    def _detach_engine(self) -> None:
        # runs before the context is freed (the exit stack unwinds in reverse order)
        if self._hook_api is not None and self._engine is not None:
            self._hook_api.detach(self._ctx.ctx)
        self._engine = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["direct_io"] = self._direct_io
        return state
