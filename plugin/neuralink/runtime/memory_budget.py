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
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
from llama_cpp import _logger

from neuralink import _engine
from neuralink.errors import MemoryBudgetError, SizeError
from neuralink.formats.sizes import parse_size

log = logging.getLogger(__name__)

# where a budget goes, every field in bytes, with .minimum, .cache and .describe()
MemoryPlan = _engine.MemoryPlan


# what a cgroup charges beyond the process's RSS at the least (page cache the kernel keeps active: the engine's
# kCgroupHeadroom, memory_plan.h): a budget under a cgroup limit stays this far below it
CGROUP_HEADROOM = _engine.CGROUP_HEADROOM


# what neuralink-run holds before the model (its plan's process line on x86-64: 7.0 MiB) against the interpreter's
# ~46 MiB with numpy and llama-cpp-python: where only that differs, a refused budget names the runner
RUNNER_PROCESS = 8 << 20
# twice what the interpreter holds with numpy and llama-cpp-python: beyond it a refused budget says what else counts
PROCESS_HINT = 96 << 20


def budget_near_cgroup_limit(budget: int) -> int | None:
    """This process's cgroup memory limit when `budget` leaves less than CGROUP_HEADROOM below it, else None."""
    limit = _cgroup_limit()
    return limit if limit is not None and budget > limit - CGROUP_HEADROOM else None


def warn_if_near_cgroup_limit(model_path: str | os.PathLike[str], budget: int) -> None:
    """A warning naming the model where `budget` leaves less than CGROUP_HEADROOM below this process's cgroup limit."""
    limit = budget_near_cgroup_limit(budget)
    if limit is not None:
        log.warning("%s: memory_budget %.1f MiB leaves less than %d MiB below this process's cgroup limit of %.1f MiB: "
                    "the cgroup also charges the page cache the kernel keeps beside the process, and may kill it; give "
                    "a budget at least that much below the limit", model_path, budget / 2**20, CGROUP_HEADROOM >> 20,
                    limit / 2**20)


def _cgroup_limit(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup (v1 memory.limit_in_bytes or v2 memory.max), None if none."""
    return _engine.cgroup_memory_limit(os.fspath(proc), os.fspath(root))


def automatic_budget() -> tuple[int, str, bool] | None:
    """What this process may hold when no budget is given: the tighter of its cgroup's memory limit less
    CGROUP_HEADROOM (and 5 %) and its RSS plus the system's available memory less a margin (10 %, at least
    256 MiB); where that came from; and whether the cgroup's limit was the tighter. None where neither can be
    read. (The engine's, which neuralink-run uses too.)"""
    return _engine.automatic_budget(resident_bytes())


def tight_cgroup_limit(engine: _engine.Engine, automatic: tuple[int, str, bool] | None, llama_kwargs: dict,
                       process_before: int) -> bool:
    """Whether an automatic budget is a cgroup's limit too tight to run unbounded with the whole store cached, by
    a plan made before llama.cpp loads for the context and micro-batches llama_cpp.Llama's keyword arguments
    `llama_kwargs` ask for (n_ctx 0: the model's training context): the process then runs as under an explicit
    budget of that size (micro-batches of 64, the weights unrepacked and those read every token locked). The
    engine's rule (unbounded_need), which neuralink-run uses too. `process_before`: what the process held before
    the engine was opened (the plan counts the engine's resident rows on a line of their own)."""
    if automatic is None:
        return False
    asked, _, threads, n_ubatch = _context_asked(engine, llama_kwargs)
    return _engine.tight_cgroup_limit(engine, *automatic, process_before, threads, n_ubatch, asked)


def llama_fits_whole(model_path: str | os.PathLike[str], llama_kwargs: dict, process_before: int) -> tuple[bool, str]:
    """Whether stock llama.cpp, running the model whole (its FFN weights mapped and read every token), fits what
    this process may use without a budget (automatic_budget), by the engine's llama_whole_need for the context
    llama_cpp.Llama's keyword arguments `llama_kwargs` ask for; and the two figures in words. False where what
    the process may use cannot be read."""
    automatic = automatic_budget()
    if automatic is None:
        return False, "what this process may use is unknown"
    type_k, type_v = _kv_types(llama_kwargs)
    need = _engine.llama_whole_need(os.fspath(model_path), process_before, int(llama_kwargs.get("n_ctx", 512)),
                                    type_k, type_v, all_logits=bool(llama_kwargs.get("logits_all")))
    return need <= automatic[0], f"{need / 2**20:.0f} MiB of {automatic[0] / 2**20:.0f} MiB ({automatic[1]})"


def _context_asked(engine: _engine.Engine, llama_kwargs: dict) -> tuple[int, int, int, int]:
    """(n_ctx asked for, the context it gives, compute threads at the least, micro-batch) of llama_cpp.Llama's
    keyword arguments, as llama-cpp-python derives them (its defaults: n_ctx, n_batch and n_ubatch 512)."""
    asked = int(llama_kwargs.get("n_ctx", 512))
    tokens = _engine.resolved_context(engine, asked)
    n_ubatch = max(1, min(tokens or 1, int(llama_kwargs.get("n_batch", 512)), int(llama_kwargs.get("n_ubatch", 512))))
    threads = max(1, int(llama_kwargs["n_threads"]), int(llama_kwargs.get("n_threads_batch") or 0))
    return asked, tokens, threads, n_ubatch


def _kv_types(llama_kwargs: dict) -> tuple[int, int]:
    """The ggml types of the KV cache's K and V that llama_cpp.Llama's keyword arguments ask for (f16 unless
    type_k or type_v says)."""
    type_k, type_v = (int(llama_kwargs[k]) if llama_kwargs.get(k) is not None else _engine.KV_TYPE_F16
                      for k in ("type_k", "type_v"))
    return type_k, type_v


def memory_budget_bytes(value: str | int | float) -> int:
    """Bytes of a memory budget ("160MB", "1.5GiB", an int, or a float that is a whole number, such as 180e6);
    MemoryBudgetError when it cannot be read."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
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
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere), so that memory a
    closed model freed leaves the process's RSS: without it ~90 MB of a closed SmolLM2 stayed resident."""
    _engine.release_free_heap()


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
                n_ubatch: int, n_ctx: int, load_anon_growth: int, weights_in_heap: bool = False) -> MemoryPlan:
    """The engine's plan for a sparse `engine` on a context of n_ctx tokens, n_threads threads and micro-batches
    of n_ubatch;
    `load_anon_growth`: the anonymous memory opening the engine and loading the model added (what exceeds the
    KV cache and the engine's resident rows is heap nobody reports: vocabulary and tokenizer tables);
    `weights_in_heap`: llama.cpp read the weights it uses into its heap (use_mmap=False), which that growth
    counts, so no mapped pages are planned for them."""
    return _engine.plan_memory(engine, budget, process_before, llama_log, n_threads, n_ubatch, n_ctx,
                               load_anon_growth, weights_in_heap)


def gate_layers_to_stream(plan: MemoryPlan, engine: _engine.Engine, room_for_region_stream: bool = False) -> int:
    """The fewest layers whose gate rows, read each time the layer runs instead of kept resident, bring the
    plan's minimum within its budget: 0 when it fits as it is, -1 when streaming them all would not do. With
    room_for_region_stream (cache policy auto or stream), as many more as leave room for the region stream's
    two buffers, where reading every region whole pays."""
    return _engine.gate_layers_to_stream(plan, engine, room_for_region_stream)


def lock_every_token_weights(engine: _engine.Engine) -> tuple[int, str]:
    """Lock the pages of the weights llama.cpp reads every token in its mapping of the model: (bytes locked,
    why not all of them or '')."""
    return _engine.lock_every_token_weights(engine)


def refuse_before_load(engine: _engine.Engine, budget: int, process_before: int, model: str,
                       llama_kwargs: dict, limit: str | None) -> None:
    """MemoryBudgetError before llama.cpp loads, where `budget` is below the minimum of plan_before_load for the
    context llama_cpp.Llama's keyword arguments `llama_kwargs` ask for (n_ctx 0: the model's training context):
    a KV cache that cannot fit is refused here, where under a cgroup's limit the kernel would kill the load.
    `process_before`: what the process held before the engine was opened; `limit`: as check_memory_plan's."""
    asked, tokens, threads, n_ubatch = _context_asked(engine, llama_kwargs)
    type_k, type_v = _kv_types(llama_kwargs)
    unmapped = not llama_kwargs.get("use_mmap", True) or bool(llama_kwargs.get("lora_path"))
    # llama-cpp-python's copy of every position's logits, which the loaded plan counts in the process too
    all_logits = tokens * _engine.vocab_size(engine) * 4 if llama_kwargs.get("logits_all") else 0
    plan = _engine.plan_before_load(engine, budget, process_before + all_logits, threads, n_ubatch, asked, type_k,
                                    type_v, weights_in_heap=unmapped)
    check_memory_plan(plan, model, engine, all_logits=all_logits, limit=limit, unmapped=unmapped,
                      context=(asked, tokens))


def bound_lookup_pages(engine: _engine.Engine) -> tuple[int, str]:
    """Keep at most one micro-batch's lookups of an untied token embedding mapped (the plan counts that much):
    (bytes of the table bounded, why not or '')."""
    return _engine.bound_lookup_pages(engine)


def resolved_cache_policy(policy: str, engine: _engine.Engine, cache_bytes: int) -> str:
    """The cache policy `auto` stands for at this size (the engine's rule, Engine.auto_cache_policy): the whole
    store when it fits (the store arena), else every region read whole ahead of its layer when collapsed reads
    would cover the layers anyway ("stream"), else the hottest records pinned."""
    return policy if policy != "auto" else engine.auto_cache_policy(cache_bytes)


def check_memory_plan(plan: MemoryPlan, model: str, engine: _engine.Engine | None = None,
                      all_logits: int = 0, limit: str | None = None, unmapped: bool = False,
                      context: tuple[int, int] | None = None) -> None:
    """MemoryBudgetError naming the minimum when the budget cannot hold the model: the lowest one, with every
    layer's gate rows streamed, when the engine could stream them. `all_logits`: the bytes of llama-cpp-python's
    copy of every position's logits (logits_all), which the process counts: named in the error when nonzero.
    `limit`: the cgroup limit the budget was taken from when none was given (automatic_budget's source).
    `unmapped`: the model was loaded with use_mmap=False, whose heap copy of the weights (the whole token
    embedding included, where mapped one micro-batch's lookups are resident) is named in the error.
    `context`: (the n_ctx asked for, the context it gives) of a plan made before llama.cpp loads
    (plan_before_load), refused only below the lowest minimum, with what its KV cache takes named."""
    if plan.budget >= plan.minimum:
        return
    lowest = _engine.minimum_with_gate_rows_streamed(plan, engine) if engine is not None else plan.minimum
    if context is not None and plan.budget >= lowest:
        return  # streaming gate rows may make it fit: the loaded plan decides
    streamed = (f" with every layer's gate rows read each token; {plan.minimum / 2**20:.1f} MiB with them "
                "resident, as below") if lowest < plan.minimum else ""
    fix = f"raise the {'limit' if limit else 'budget'}, or lower n_ctx / n_batch"
    if context is not None and plan.kv_cache * 4 >= lowest:
        asked, tokens = context
        training = " (n_ctx=0: the model's training context)" if asked == 0 else ""
        fix += f"; a context of {tokens} tokens{training} holds {plan.kv_cache / 2**20:.1f} MiB of KV cache"
    if all_logits:
        fix += (f"; the process counts {all_logits / 2**20:.1f} MiB of every position's logits (logits_all), which "
                "only logprobs need: without logits_all they are not kept")
    if unmapped:
        heap = plan.to_dict()["load_heap"]
        read = (f"read the weights llama.cpp uses into the heap ({heap / 2**20:.1f} MiB of load heap)"
                if context is None else
                "reads the weights llama.cpp uses into the heap (not counted above: the load has not run)")
        fix += (f"; use_mmap=False {read}, the whole token embedding with them, where mapped only one micro-batch's "
                "lookups of it are resident: leave use_mmap on")
    if plan.process > PROCESS_HINT:
        fix += (f"; this process held {plan.process / 2**20:.1f} MiB before the model, and all of it counts: another "
                "model it still holds (close() it, or drop its last reference, first) or other data")
    if lowest - plan.process + RUNNER_PROCESS <= plan.budget:
        fix += (f"; or run it with neuralink-run (`bash scripts/build_aarch64.sh native` builds it), which holds "
                f"~{RUNNER_PROCESS >> 20} MiB before the model where this Python process held "
                f"{plan.process / 2**20:.1f} MiB")
    budget = f"memory_budget {plan.budget / 2**20:.1f} MiB is"
    if limit:
        budget = (f"{limit} leaves a budget of {plan.budget / 2**20:.1f} MiB (5 % and at least "
                  f"{CGROUP_HEADROOM >> 20} MiB below it), which is")
    before = " (counted before loading, without llama.cpp's own buffers)" if context is not None else ""
    raise MemoryBudgetError(
        f"{model}: {budget} below the minimum "
        f"{lowest / 2**20:.1f} MiB{before} this model and context need{streamed} ({fix}):\n{plan.describe().rstrip()}"
    )


def hold_down_rows(engine: _engine.Engine, model: str, plan: MemoryPlan | None, cache_bytes: int,
                   trial: bool = False) -> list[int]:
    """Hand the engine, whose cache holds the whole store, the converted GGUF's down rows by the engine's rule
    (Engine.hold_down_rows, which neuralink-run shares), given the room the plan's budget leaves beside
    everything else or, without a plan, `cache_bytes`: in place of the columns where they pay by the cost
    model; with `trial`, on trial beside the columns when the room holds both (the first decoded tokens time
    them and the faster is kept: which one depends on the machine and the process, docs/engine.md). Returns
    the layers given rows."""
    room = max(0, plan.budget - plan.minimum) if plan is not None else cache_bytes
    layers, on_trial, row_bytes, column_bytes = engine.hold_down_rows(room, trial)
    if on_trial:
        log.info("%s: the down projection of %d layers timed on the first decoded tokens by the model's own rows "
                 "(%.0f MiB) and by the down columns; the faster is kept", model, len(layers), row_bytes / 2**20)
    elif layers:
        log.info("%s: the down projection of %d layers by the model's own rows (%.0f MiB, in place of %.0f MiB "
                 "of down columns)", model, len(layers), row_bytes / 2**20, column_bytes / 2**20)
    return layers
