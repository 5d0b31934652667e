"""neuralink: run llama.cpp models whose FFN weights stay on flash storage.

``neuralink.Llama`` is a drop-in ``llama_cpp.Llama`` whose FFN layers are
computed by neuralink's C++ engine through an FFN hook in a patched
llama.cpp (installed by ``scripts/setup.sh``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from neuralink.errors import (
    EngineIOError,
    EngineNumericError,
    HookUnavailableError,
    ModelFileError,
    NeuralinkError,
    UnsupportedModelError,
)
from neuralink.runtime.default_model import default_model_path

if TYPE_CHECKING:
    from neuralink.runtime.llama import Llama

__version__ = "0.1.0"

__all__ = [
    "EngineIOError",
    "EngineNumericError",
    "HookUnavailableError",
    "Llama",
    "ModelFileError",
    "NeuralinkError",
    "UnsupportedModelError",
    "default_model_path",
]


def __getattr__(name: str) -> Any:
    # Llama pulls in llama.cpp and numpy; importing neuralink alone stays light (CLI start-up,
    # benchmark workers that join a memory cgroup before loading anything large)
    if name == "Llama":
        from neuralink.runtime.llama import Llama

        return Llama
    raise AttributeError(f"module 'neuralink' has no attribute {name!r}")
