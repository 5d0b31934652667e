"""Exceptions neuralink raises; the C++ engine's errors arrive as these too."""


class NeuralinkError(Exception):
    """Base class of neuralink's errors."""


class ModelFileError(NeuralinkError, ValueError):
    """A model or sidecar file is missing, malformed, truncated or mismatched."""


class UnsupportedModelError(NeuralinkError, ValueError):
    """A well-formed model whose architecture or FFN form neuralink does not support."""


class HookUnavailableError(NeuralinkError, RuntimeError):
    """The installed llama-cpp-python lacks the FFN hook added by patches/."""


class EngineIOError(NeuralinkError, OSError):
    """A read of FFN weights failed or came back short."""
