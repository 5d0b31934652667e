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


class ChildProcessDied(NeuralinkError, RuntimeError):
    """A child process (conversion, a placement worker, a benchmark run) died without a result."""

    def __init__(self, step: str, how: str, log_path: object) -> None:
        super().__init__(f"{step}: the child process {how}; its log: {log_path}")
        self.step, self.how, self.log_path = step, how, log_path

    def __reduce__(self):  # picklable, so a child's own child can report through it
        return (type(self), (self.step, self.how, self.log_path))


class ProfileError(NeuralinkError, ValueError):
    """Profiling cannot proceed: missing or malformed text, too little of it, or mismatched thresholds."""
