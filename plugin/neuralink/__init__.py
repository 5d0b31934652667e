"""neuralink: run llama.cpp models whose FFN weights stay on flash storage.

``neuralink.Llama`` is a drop-in ``llama_cpp.Llama`` whose FFN layers are
computed by neuralink's C++ engine through an FFN hook in a patched
llama.cpp (installed by ``scripts/setup.sh``).
"""

from neuralink.errors import (
    EngineIOError,
    HookUnavailableError,
    ModelFileError,
    NeuralinkError,
    UnsupportedModelError,
)
from neuralink.llama import Llama
from neuralink.models import default_model_path

__version__ = "0.1.0"

__all__ = [
    "EngineIOError",
    "HookUnavailableError",
    "Llama",
    "ModelFileError",
    "NeuralinkError",
    "UnsupportedModelError",
    "default_model_path",
]
