"""An OpenAI-compatible server with neuralink.Llama behind it: llama-cpp-python's own server, reused.

llama-cpp-python's server (``llama_cpp.server``: its FastAPI app factory,
routes, settings, chat formats and errors) builds each model with
``llama_cpp.Llama(model_path=..., **settings)`` in ``llama_cpp/server/model.py``.
``create_neuralink_app`` points that one name at ``neuralink.Llama`` carrying
each model's neuralink options, then calls the unchanged ``create_app``, so
every endpoint behaves as in ``python -m llama_cpp.server`` and only the FFN
runs through neuralink's engine.
"""

from __future__ import annotations

import functools
import types
from dataclasses import asdict, dataclass
from typing import Any

import llama_cpp
from llama_cpp.server import model as server_model
from llama_cpp.server.app import create_app
from llama_cpp.server.settings import ModelSettings, ServerSettings

from neuralink.runtime.llama import Llama


@dataclass(frozen=True)
class NeuralinkOptions:
    """The neuralink.Llama arguments a served model takes beside llama-cpp-python's (see its docstring)."""

    sidecar: str | None = None
    predictor: str | None = None
    memory_budget: int | str | None = None
    cache_policy: str = "auto"
    queue_depth: int | None = None
    io_backend: str = "auto"
    direct_io: bool = True
    ffn: str = "auto"
    # the server's n_batch is its settings' default (512), not the user's: neuralink.Llama's under a budget (64)
    default_n_batch: bool = False
    # the server's n_threads is its settings' default (half of the CPUs), not the user's: neuralink.Llama's
    default_n_threads: bool = False

    def llama_kwargs(self) -> dict[str, Any]:
        kwargs = {k: v for k, v in asdict(self).items() if v is not None}
        del kwargs["default_n_batch"], kwargs["default_n_threads"]
        if self.sidecar is None:
            kwargs.pop("sidecar", None)  # the converted model's own sidecar, found beside it
        return kwargs


class _ServerLlamaNames(types.ModuleType):
    """``llama_cpp`` as llama_cpp/server/model.py sees it, but for ``Llama``: neuralink's, per model path."""

    def __init__(self, options: dict[str, NeuralinkOptions]) -> None:
        super().__init__("llama_cpp")
        self._options = options

    def __getattr__(self, name: str) -> Any:
        return getattr(llama_cpp, name)

    @property
    def Llama(self) -> Any:  # noqa: N802 - the name llama-cpp-python's server looks up
        def build(*, model_path: str, **kwargs: Any) -> Llama:
            options = self._options.get(model_path, NeuralinkOptions())
            if options.default_n_batch:
                kwargs.pop("n_batch", None)
            if options.default_n_threads:
                kwargs.pop("n_threads", None)
            return Llama(model_path, **kwargs, **options.llama_kwargs())

        return functools.update_wrapper(build, Llama)


def create_neuralink_app(server_settings: ServerSettings, models: list[tuple[ModelSettings, NeuralinkOptions]]):
    """llama-cpp-python's FastAPI app serving `models` through neuralink.Llama (the module doc)."""
    server_model.llama_cpp = _ServerLlamaNames({settings.model: options for settings, options in models})
    return create_app(server_settings=server_settings, model_settings=[settings for settings, _ in models])


__all__ = ["NeuralinkOptions", "create_neuralink_app"]
