"""Memory budgets: what a model needs resident, and how much is left for the bundle cache.

Everything a process holds for a sparse model is counted: the process before
the model (interpreter, libraries), the non-FFN weights (mapped, read every
token), what the engine keeps of the FFN (gate rows, biases), llama.cpp's
KV cache, output and compute buffers (as llama.cpp itself reports them), and
the engine's I/O and compute scratch. The bundle cache gets the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields

from neuralink.errors import MemoryBudgetError

_UNITS = {
    "": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Bytes in "120MB", "1.5 GiB", "512M" (binary for K/M/G, decimal for kB/MB/GB) or an int."""
    if isinstance(value, int):
        if value <= 0:
            raise MemoryBudgetError(f"memory budget must be positive, got {value}")
        return value
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise MemoryBudgetError(f"cannot read memory size {value!r}: expected e.g. 120MB, 1.5GiB or 512M")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise MemoryBudgetError(f"memory budget must be positive, got {value!r}")
    return size


def resident_bytes() -> int:
    """This process's resident set size (VmRSS)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class LlamaBuffers:
    """llama.cpp's own allocations, from its log: KV cache, output buffer, compute buffers."""

    kv_cache: int = 0
    output: int = 0
    compute: int = 0


_BUFFER_LINE = re.compile(r"(KV|output|compute) buffer size = +([0-9.]+) MiB")


def parse_buffer_sizes(log: list[str]) -> LlamaBuffers:
    """Sizes from llama.cpp's log lines; a compute buffer re-reserved later replaces the earlier one."""
    buffers = LlamaBuffers()
    compute: dict[str, int] = {}
    for line in log:
        for match in _BUFFER_LINE.finditer(line):
            kind, size = match.group(1), int(float(match.group(2)) * 1024**2)
            if kind == "KV":
                buffers.kv_cache += size
            elif kind == "output":
                buffers.output += size
            else:
                backend = line.split("compute buffer size")[0].split(":")[-1].strip()
                compute[backend] = size
    buffers.compute = sum(compute.values())
    return buffers


@contextlib.contextmanager
def capture_llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines within the block (they are not printed meanwhile)."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


@dataclass
class MemoryPlan:
    """Where a memory budget goes; every field in bytes."""

    budget: int
    process: int          # resident before the model was loaded: interpreter, libraries
    non_ffn_weights: int  # attention, norms, embeddings: read every token
    engine_resident: int  # FFN data the engine keeps in RAM (gate rows, biases)
    kv_cache: int
    llama_buffers: int    # llama.cpp's output and compute buffers
    engine_scratch: int   # I/O buffers and compute scratch of the engine, worst case
    store_bytes: int      # all bundles: more cache than this is useless

    @property
    def minimum(self) -> int:
        """The smallest budget that holds everything but the cache."""
        return (self.process + self.non_ffn_weights + self.engine_resident + self.kv_cache + self.llama_buffers
                + self.engine_scratch)

    @property
    def cache(self) -> int:
        return max(0, min(self.budget - self.minimum, self.store_bytes))

    def describe(self) -> str:
        rows = [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self)]
        rows += [("minimum", self.minimum), ("bundle cache", self.cache)]
        return "\n".join(f"  {name:<16} {value / 2**20:9.1f} MiB" for name, value in rows)

    def check(self, model: str) -> None:
        """MemoryBudgetError naming the minimum when the budget cannot hold the model."""
        if self.budget < self.minimum:
            raise MemoryBudgetError(
                f"{model}: memory_budget {self.budget / 2**20:.1f} MiB is below the minimum "
                f"{self.minimum / 2**20:.1f} MiB this model and context need "
                f"(raise the budget, or lower n_ctx / n_batch):\n{self.describe()}"
            )
