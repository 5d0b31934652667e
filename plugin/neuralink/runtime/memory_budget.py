"""Memory budgets of neuralink.Llama: the budget read, llama.cpp's log captured, the engine's plan checked.

The plan itself is the engine's (neuralink/memory_plan.h, shared with
neuralink-run): everything a process holds for a sparse model is counted --
the process before the model (interpreter, libraries), the non-FFN weights
(mapped, read every token), what the engine keeps of the FFN (gate rows,
biases), llama.cpp's KV cache, output and compute buffers (as llama.cpp
itself reports them in its log), and the engine's I/O and compute scratch.
The bundle cache gets the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import llama_cpp
from llama_cpp import _logger

from neuralink import _engine
from neuralink.errors import MemoryBudgetError, SizeError
from neuralink.formats.sizes import parse_size

# where a budget goes, every field in bytes, with .minimum, .cache and .describe()
MemoryPlan = _engine.MemoryPlan


def memory_budget_bytes(value: str | int) -> int:
    """Bytes of a memory budget ("160MB", "1.5GiB" or an int); MemoryBudgetError when it cannot be read."""
    try:
        return parse_size(value, "memory size")
    except SizeError as e:
        raise MemoryBudgetError(str(e)) from None


def resident_bytes() -> int:
    """This process's resident set size (VmRSS)."""
    return _engine.resident_bytes()


def anonymous_resident_bytes() -> int:
    """Its anonymous part (RssAnon: heap and private mappings, no file pages)."""
    return _engine.anonymous_resident_bytes()


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim), so that memory a closed model
    freed leaves the process's RSS: without it ~90 MB of a closed SmolLM2 stayed resident."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (musl, bionic): nothing to do
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


@contextlib.contextmanager
def capture_llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines within the block (they are not printed meanwhile)."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def plan_memory(engine: _engine.Engine, budget: int, process_before: int, llama_log: list[str], n_threads: int,
                n_ubatch: int, load_anon_growth: int) -> MemoryPlan:
    """The engine's plan for a sparse `engine` on a context of n_threads threads and micro-batches of n_ubatch;
    `load_anon_growth`: the anonymous memory opening the engine and loading the model added (what exceeds the
    KV cache and the engine's resident rows is heap nobody reports: vocabulary and tokenizer tables)."""
    return _engine.plan_memory(engine, budget, process_before, llama_log, n_threads, n_ubatch, load_anon_growth)


def check_memory_plan(plan: MemoryPlan, model: str) -> None:
    """MemoryBudgetError naming the minimum when the budget cannot hold the model."""
    if plan.budget < plan.minimum:
        raise MemoryBudgetError(
            f"{model}: memory_budget {plan.budget / 2**20:.1f} MiB is below the minimum "
            f"{plan.minimum / 2**20:.1f} MiB this model and context need "
            f"(raise the budget, or lower n_ctx / n_batch):\n{plan.describe().rstrip()}"
        )
