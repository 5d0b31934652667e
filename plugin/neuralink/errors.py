"""Every exception neuralink raises; the C++ engine's errors arrive as these too.

All derive from NeuralinkError, and each also from the built-in error it
refines (ValueError, OSError, RuntimeError), so callers may catch either.
The ``neuralink`` command turns any of them into one line and exit status 1.
"""


class NeuralinkError(Exception):
    """Base class of neuralink's errors."""


# ---- files and models

class ModelFileError(NeuralinkError, ValueError):
    """A model or sidecar file is missing, malformed, truncated or mismatched."""


class UnsupportedModelError(NeuralinkError, ValueError):
    """A well-formed model whose architecture or FFN form neuralink does not support."""


class OutputPathError(NeuralinkError, OSError):
    """An output file cannot be created where it was asked for."""


# ---- options and inputs of the stages

class OptionError(NeuralinkError, ValueError):
    """An option neuralink cannot use: unknown, out of range, or not fitting the others (the engine's too)."""


class SizeError(NeuralinkError, ValueError):
    """A size such as "120MB" that cannot be read (neuralink.formats.sizes)."""


class ProfileError(NeuralinkError, ValueError):
    """Profiling cannot proceed: missing or malformed text, too little of it, or mismatched thresholds."""


class PlacementError(NeuralinkError, ValueError):
    """Placement cannot proceed: mismatched stats and model, or bad options."""


class PlotError(NeuralinkError, ValueError):
    """The plot cannot be drawn: bad layer or window, or a placement of another model."""


class SweepError(NeuralinkError, ValueError):
    """A sweep cannot run as asked: bad densities or budget, a sidecar it cannot vary, no calibration text."""


class BenchIoError(NeuralinkError, ValueError):
    """`bench io` cannot run: missing or mismatched inputs, or bad options."""


class FetchError(NeuralinkError, OSError):
    """A model cannot be fetched: unknown name, a failed download, chunks that do not give the pinned file."""


class TrainingError(NeuralinkError, ValueError):
    """Training cannot start: missing or unreadable text, too little of it, or bad settings."""


# ---- running

class HookUnavailableError(NeuralinkError, RuntimeError):
    """The installed llama-cpp-python lacks the FFN hook added by patches/."""


class MemoryBudgetError(NeuralinkError, ValueError):
    """A memory budget that cannot hold the model, or that cannot be read."""


class EngineIOError(NeuralinkError, OSError):
    """A read of FFN weights failed or came back short."""


class EngineNumericError(NeuralinkError, ArithmeticError):
    """An FFN output held NaN or infinity (weights corrupt beyond the checksums, or an overflow): refused, never
    passed on to the next layer."""


class DeviceProfileError(NeuralinkError, OSError):
    """The storage cannot be profiled: a missing path, no room for the probe file, a failed read."""


class CgroupUnavailable(NeuralinkError, RuntimeError):
    """No cgroup v1 memory controller we may write to: the reason, in plain words."""


class ChildProcessDied(NeuralinkError, RuntimeError):
    """A child process (conversion, a placement worker, a benchmark run) died without a result."""

    def __init__(self, step: str, how: str, log_path: object) -> None:
        super().__init__(f"{step}: the child process {how}; its log: {log_path}")
        self.step, self.how, self.log_path = step, how, log_path

    def __reduce__(self):  # picklable, so a child's own child can report through it
        return (type(self), (self.step, self.how, self.log_path))
