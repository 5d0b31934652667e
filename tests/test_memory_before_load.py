"""What is decided before llama.cpp loads: the KV cache a context will take, and a budget refused before it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from test_memory_budget import WITHOUT_A_BUDGET, converted_smollm2, load_or_refuse, run_in_cgroup  # noqa: F401

import neuralink
from neuralink import _engine
from neuralink.formats.sizes import parse_size
from neuralink.runtime import llama as llama_module
from neuralink.runtime.llama import BUDGET_N_BATCH
from neuralink.runtime.memory_budget import release_free_heap, resident_bytes

Q8_0 = 8  # ggml's GGML_TYPE_Q8_0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize(("n_ctx", "kv_type"), [(300, None), (0, None), (256, Q8_0)])
def test_the_kv_cache_planned_before_loading_is_at_most_what_llama_cpp_allocates(
        converted_model, arch: str, n_ctx: int, kv_type: int | None) -> None:
    # the plan before the load counts llama.cpp's KV cache from the model's metadata: exactly on full-attention
    # models (n_ctx rounded up to 256 cells; 0 is the training context), never more on a sliding-window one
    model, sidecar = converted_model(arch, "q8_0")
    types = {"type_k": kv_type, "type_v": kv_type, "flash_attn": True} if kv_type is not None else {}
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), n_ctx=n_ctx, memory_budget="4GiB", verbose=False, **types)
    planned = _engine.plan_before_load(llm.engine, 1 << 40, 0, 1, 1, n_ctx, kv_type or _engine.KV_TYPE_F16,
                                       kv_type or _engine.KV_TYPE_F16).kv_cache
    allocated = llm.memory_plan.kv_cache  # llama.cpp's own count, from its load log
    assert _engine.resolved_context(llm.engine, n_ctx) == (n_ctx or 512)  # the synthetic models' training context
    llm.close()
    if arch == "gemma3":
        assert 0 < planned <= allocated
    else:
        assert abs(planned - allocated) <= 0.01 * 2**20, (planned, allocated)  # the log rounds to 0.01 MiB


def test_a_context_that_cannot_fit_is_refused_before_llama_cpp_allocates_it(converted_smollm2: Path) -> None:
    # n_ctx=0 is the model's training context: 8192 tokens, 180 MiB of KV cache on SmolLM2 (896 MiB on
    # Qwen2.5-Coder-1.5B, which an 800MB cgroup killed at load): the budget is refused before llama.cpp clears it
    run = load_or_refuse(converted_smollm2, memory_budget="200MB", n_ctx=0)
    assert re.search(r"below the minimum [0-9.]+ MiB \(counted before loading, without llama.cpp's own buffers\)"
                     r".*a context of 8192 tokens \(n_ctx=0: the model's training context\) holds 180.0 MiB of KV "
                     r"cache", run["refused"] or ""), run["refused"]
    assert run["growth"] < 64 << 20  # no KV cache was allocated
    # the same budget runs the default context
    assert load_or_refuse(converted_smollm2, memory_budget="200MB")["refused"] is None


ZERO_CONTEXT = WITHOUT_A_BUDGET.replace("neuralink.Llama(sys.argv[1], verbose=False)",
                                        "neuralink.Llama(sys.argv[1], n_ctx=0, verbose=False)")


def test_a_cgroup_too_small_for_the_context_refuses_it_instead_of_being_killed(runner: Path,
                                                                               converted_smollm2: Path) -> None:
    # 200MB runs SmolLM2 at n_ctx 512 (test_a_tight_cgroup_limit_runs_as_a_budget); at its training context the
    # process was killed as llama.cpp cleared its KV cache
    assert "n_ctx=0" in ZERO_CONTEXT
    done, group = run_in_cgroup(parse_size("200MB"), [sys.executable, "-c", ZERO_CONTEXT, str(converted_smollm2)])
    assert done.returncode == 0 and not group["oom"], done.stderr[-3000:]
    refused = json.loads(done.stdout.strip().splitlines()[-1])["refused"]
    assert "the cgroup memory limit" in refused and "a context of 8192 tokens" in refused, refused
    native, group = run_in_cgroup(parse_size("200MB"), [
        str(runner), "-m", str(converted_smollm2), "-p", "The capital of France is", "-n", "8", "-c", "8192",
        "-t", "2"])
    assert native.returncode != 0 and not group["oom"], native.stderr[-3000:]
    assert "counted before loading" in native.stderr and "raise the limit" in native.stderr, native.stderr[-3000:]


@pytest.mark.parametrize(("margin", "tight"), [(6 << 20, False), (-(6 << 20), True)])
def test_a_cgroup_limit_runs_unbounded_only_where_the_whole_store_stays_cached(
        converted_model, monkeypatch: pytest.MonkeyPatch, margin: int, tight: bool) -> None:
    # the decision counts the engine's resident gate rows once (17 MiB here): they had been counted in the process
    # too (227 MiB on Qwen2.5-Coder-1.5B), which happened to stand in for what llama.cpp allocates unbounded
    # (repacked weights, 512-token buffers) and which the rule now counts itself. Above its threshold the process
    # runs unbounded and its cache still holds the whole store; below, it runs as under a budget
    model, sidecar = converted_model("llama", "q8_0", n_layer=4, n_embd=1024, n_ff=4096)
    release_free_heap()
    process = resident_bytes()
    engine = _engine.Engine(str(model), sidecar=str(sidecar), predictor="gate", cache_policy="pinned", cache_bytes=0)
    assert engine.resident_bytes > 16 << 20
    need = _engine.unbounded_need(engine, process, 2, 512, 512)
    del engine
    release_free_heap()
    budget = need + margin
    monkeypatch.setattr(llama_module, "automatic_budget",
                        lambda: (budget, f"the cgroup memory limit {budget >> 20} MiB", True))
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), predictor="gate", n_threads=2, verbose=False)
    assert (llm.n_batch == BUDGET_N_BATCH) == tight, (llm.n_batch, need / 2**20, budget / 2**20)
    assert llm.memory_plan.cache >= llm.memory_plan.whole_store_cache
    llm.close()
