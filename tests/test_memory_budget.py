"""A memory budget holds: the whole process's peak RSS (VmHWM) stays within it, whatever the settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_convert import random_placement

import neuralink
from neuralink.runtime.llama import BUDGET_N_BATCH
from neuralink.convert.writer import convert_model
from neuralink.errors import MemoryBudgetError
from neuralink.formats.gguf_directory import read_gguf_directory
from neuralink.formats.sizes import parse_size
from neuralink.runtime.memory_budget import CGROUP_HEADROOM, _cgroup_limit, automatic_budget

# a fresh process per run: VmHWM is the peak of everything it did, from import to the last token
RUN = r"""
import json, sys
import neuralink
model, budget, n_batch, policy = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}  # more of neuralink.Llama's arguments
llm = neuralink.Llama(model, memory_budget=budget, n_batch=n_batch, cache_policy=policy, verbose=False, **extra)
prompt = " ".join(["The history of the city begins in the early medieval period, when a small settlement grew "
                   "around the river crossing and the market that served the farms of the valley."] * 6)
llm(prompt, max_tokens=40, temperature=0.0)
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
locked = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmLck"))
print(json.dumps({"peak": hwm, "locked": locked, **llm.memory_plan.to_dict()}))
"""


@pytest.fixture(scope="module")
def converted_smollm2(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("budget") / "smollm2.neuralink.gguf"
    convert_model(smollm2_path, random_placement(smollm2_path), output)
    return output


@pytest.mark.parametrize(("budget", "n_batch", "policy"), [
    ("160MB", 8, "linking"), ("160MB", 16, "linking"), ("200MB", 8, "s3fifo"), ("200MB", 128, "lru"),
    ("220MB", 32, "none"), ("200MB", 16, "stream"),
])
def test_peak_rss_stays_within_the_budget(converted_smollm2: Path, budget: str, n_batch: int, policy: str) -> None:
    result = subprocess.run([sys.executable, "-c", RUN, str(converted_smollm2), budget, str(n_batch), policy],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert run["minimum"] <= parse_size(budget)
    assert run["peak"] <= parse_size(budget), (
        f"peak RSS {run['peak'] / 2**20:.1f} MiB over the {budget} budget (cache {run['cache'] / 2**20:.1f} MiB)")


def test_the_cgroup_limit_is_read_from_v1_and_v2(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    v1 = tmp_path / "memory" / "bench" / "run"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("838860800\n")
    proc.write_text("12:cpu,cpuacct:/\n7:memory:/bench/run\n0::/\n")
    assert _cgroup_limit(proc, tmp_path) == 838860800
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert _cgroup_limit(proc, tmp_path) is None
    v2 = tmp_path / "user.slice"
    v2.mkdir()
    proc.write_text("0::/user.slice\n")
    (v2 / "memory.max").write_text("max\n")
    assert _cgroup_limit(proc, tmp_path) is None
    (v2 / "memory.max").write_text("536870912\n")
    assert _cgroup_limit(proc, tmp_path) == 536870912


def test_a_budget_only_the_interpreter_breaks_names_the_native_runner(converted_smollm2: Path) -> None:
    # where the model and context fit beside the runner's ~8 MiB of process but not beside this interpreter, the
    # refusal says so; far below, it does not. The budget lies mid-way in that window: the next load's process
    # differs from this one's by what closing this model and earlier tests leave or give back
    llm = neuralink.Llama(str(converted_smollm2), memory_budget="2GiB", verbose=False)
    plan = llm.memory_plan
    llm.close()
    assert plan is not None and plan.process > 40 * 2**20  # pytest's interpreter, numpy, llama-cpp-python
    for budget, named in [(plan.minimum - plan.process // 2, True), (2**20, False)]:
        with pytest.raises(MemoryBudgetError) as refused:
            neuralink.Llama(str(converted_smollm2), memory_budget=budget, verbose=False)
        assert ("neuralink-run" in str(refused.value)) == named, str(refused.value)
        assert "is below the minimum" in str(refused.value)


def test_a_budget_too_close_to_the_cgroup_limit_is_warned_about(
    converted_smollm2: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # the cgroup charges page cache beside the process: a budget at its limit gets the process killed
    from neuralink.runtime import memory_budget

    budget = parse_size("2GiB")  # within what this test process holds, whatever ran in it before
    for limit, warned in [(budget + 8 * 2**20, True), (budget + memory_budget.CGROUP_HEADROOM, False)]:
        monkeypatch.setattr(memory_budget, "_cgroup_limit", lambda limit=limit: limit)
        caplog.clear()
        neuralink.Llama(str(converted_smollm2), memory_budget=budget, verbose=False).close()
        assert ("below this process's cgroup limit" in caplog.text) == warned, caplog.text


def test_bench_gives_neuralink_a_budget_below_the_cap_with_the_cgroup_headroom() -> None:
    from neuralink.evaluate.bench.e2e import budget_for_cap

    assert budget_for_cap(parse_size("800MB"), 0.95) == int(parse_size("800MB") * 0.95)  # 5 % is more
    assert budget_for_cap(parse_size("220MB"), 0.95) == parse_size("220MB") - CGROUP_HEADROOM


def test_without_a_budget_the_cache_uses_the_memory_there_is(converted_smollm2: Path) -> None:
    budget, source, _ = automatic_budget()
    assert budget > 0 and "MiB" in source
    # (the engine asked for: SmolLM2 fits in memory, where ffn='auto' would have llama.cpp compute its FFNs)
    llm = neuralink.Llama(str(converted_smollm2), n_batch=64, verbose=False, ffn="engine")
    plan = llm.memory_plan
    assert plan is not None and plan.budget == pytest.approx(budget, rel=0.05)
    if plan.budget < plan.minimum + plan.whole_store_cache:
        pytest.skip(f"this machine has too little free memory to cache the whole store ({source})")
    assert plan.cache == plan.whole_store_cache >= plan.store_bytes
    prompt = "The history of the city begins in the early medieval period"
    first = llm(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm.ffn_stats(reset=True)
    llm.reset()
    again = llm(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    stats = llm.ffn_stats()
    llm.close()
    assert again == first
    assert int(stats["bytes_read"].sum()) == 0, "everything the first run read came from the cache the second time"
    # an explicit cache size or policy still wins
    none = neuralink.Llama(str(converted_smollm2), n_batch=64, cache_policy="none", verbose=False)
    assert none.memory_plan is None
    none.close()


def test_the_budget_counts_the_embedding_rows_a_micro_batch_maps_or_a_tied_embedding_and_not_the_header(
    converted_model, converted_smollm2: Path
) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    # rows of several pages, so that one micro-batch's rows are less than the table
    untied, _ = converted_model("llama", "f32", n_embd=2048, n_head=16, n_head_kv=4, n_ff=256, n_layer=1)
    for model in (untied, converted_smollm2):
        directory = read_gguf_directory(model)
        embedding = directory.tensors["token_embd.weight"]
        tied = "output.weight" not in directory.tensors
        llm = neuralink.Llama(str(model), memory_budget="2GiB", n_ctx=256, n_batch=8, verbose=False)
        row = embedding.nbytes // embedding.shape[1]
        # each row's pages, one more where it straddles, and a 64 KiB fault-around window on either side
        mapped_per_row = -(-row // page) * page + page + 2 * 65536
        plan = llm.memory_plan
        llm("The capital of France is", max_tokens=2)
        # the header (metadata, the vocabulary's arrays) is not counted: llama.cpp reads it into its heap and
        # unmaps the pages before the first tensor after the load; at most the page the first tensor starts in
        header = mapped_bytes_of_file_range(model, 0, directory.data_offset)
        llm.close()
        assert header <= page, (model, header, directory.data_offset)
        assert plan is not None
        if tied:  # the output matrix: every token reads all of it
            assert plan.token_embedding == embedding.nbytes
        else:  # looked up row by row in the mapped file, released every micro-batch
            assert plan.token_embedding == 8 * mapped_per_row < embedding.nbytes
        ffn = (".ffn_gate.weight", ".ffn_up.weight", ".ffn_down.weight")
        others = [t.nbytes for t in directory.tensors.values() if t.name != embedding.name and not t.name.endswith(ffn)]
        assert plan.non_ffn_weights == sum(others)


def mapped_bytes_of_file_range(path: Path, start: int, end: int) -> int:
    """Bytes of the pages of file bytes [start, end) that this process's mappings of `path` have present
    (/proc/self/pagemap's bit 63, page by page)."""
    page, real, total = os.sysconf("SC_PAGE_SIZE"), os.path.realpath(path), 0
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or fields[5] != real:
                continue
            low, high = (int(v, 16) for v in fields[0].split("-"))
            offset = int(fields[2], 16)
            first, last = max(start, offset), min(end, offset + high - low)
            for address in range((low + first - offset) // page * page, low + last - offset, page):
                pagemap.seek(address // page * 8)
                if int.from_bytes(pagemap.read(8), "little") >> 63:
                    total += page
    return total


def test_a_long_prompt_keeps_one_micro_batch_of_embedding_rows_mapped(converted_model) -> None:
    # llama.cpp looks each token's row up in its mapping of the file; the kernel maps far more than the row
    # around each lookup (read-ahead, large folios), and a long context would map the whole table: under a
    # budget the pages are released every micro-batch, so what stays mapped is within the plan's count
    model, _ = converted_model("llama", "f32", n_embd=2048, n_head=16, n_head_kv=4, n_ff=256, n_layer=1)
    embedding = read_gguf_directory(model).tensors["token_embd.weight"]
    start = embedding.offset  # absolute in the file
    llm = neuralink.Llama(str(model), memory_budget="2GiB", n_ctx=512, n_batch=8, verbose=False)
    try:
        vocab = llm.n_vocab()
        tokens = list(range(vocab - 400, vocab))  # 400 distinct rows of 8 KiB
        assert 400 * (embedding.nbytes // vocab) > llm.memory_plan.token_embedding
        llm.eval(tokens)
        mapped = mapped_bytes_of_file_range(model, start, start + embedding.nbytes)
        print("MAPPED", mapped, start, embedding.nbytes, llm.memory_plan.token_embedding)
        assert mapped <= llm.memory_plan.token_embedding, (mapped, llm.memory_plan.token_embedding)
    finally:
        llm.close()


def test_under_a_budget_llama_cpp_keeps_weights_unrepacked(converted_model, capfd: pytest.CaptureFixture[str]) -> None:
    # repacking copies Q4_0/Q4_K weights into anonymous memory beside the mapped file: not where memory is short
    model, sidecar = converted_model("llama", "q4_0")
    logs = {}
    for name, options in [("budget", dict(memory_budget="2GiB")), ("free", dict(cache_policy="none")),
                          ("budget, asked", dict(memory_budget="2GiB", repack_weights=True))]:
        llm = neuralink.Llama(str(model), sidecar=str(sidecar), n_ctx=256, verbose=True, **options)
        llm.close()
        logs[name] = capfd.readouterr().err
    assert "CPU_REPACK" in logs["free"], "this build repacks Q4_0 weights: the test must see it do so"
    assert "CPU_REPACK" not in logs["budget"]
    assert "CPU_REPACK" in logs["budget, asked"]


def locked_bytes() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmLck"))


def every_token_weight_bytes(model: Path) -> tuple[int, int]:
    """The bytes of the weights llama.cpp reads every token, and the slack of locking them in whole pages."""
    tensors = read_gguf_directory(model).tensors
    tied = "output.weight" not in tensors
    every_token = [t.nbytes for name, t in tensors.items()
                   if ".ffn_" not in name and (tied or name != "token_embd.weight")]
    # whole pages around each tensor: at least its bytes, at most a page more on each side
    return sum(every_token), 2 * 4096 * len(every_token)


def test_weights_read_every_token_are_locked_under_a_budget(converted_model) -> None:
    model, sidecar = converted_model("llama", "q8_0")
    every_token, slack = every_token_weight_bytes(model)
    before = locked_bytes()
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), memory_budget="2GiB", n_ctx=128, verbose=False)
    assert every_token <= locked_bytes() - before <= every_token + slack
    llm.close()
    assert locked_bytes() == before  # unmapped with the model
    unlocked = neuralink.Llama(str(model), sidecar=str(sidecar), memory_budget="2GiB", lock_weights=False,
                               n_ctx=128, verbose=False)
    assert locked_bytes() == before
    unlocked.close()


def test_use_mlock_locks_what_llama_cpp_reads_not_the_ffn_weights(converted_model) -> None:
    # llama-cpp-python's use_mlock (its server's default) would have llama.cpp lock its whole mapping, the FFN
    # tensors the engine reads itself included: on Qwen2.5-Coder-1.5B 1 GB, which a server under 800MB died of
    model, sidecar = converted_model("llama", "q8_0")
    every_token, slack = every_token_weight_bytes(model)
    before = locked_bytes()
    llm = neuralink.Llama(str(model), sidecar=str(sidecar), use_mlock=True, repack_weights=False, n_ctx=128,
                          verbose=False, ffn="engine")
    assert every_token <= locked_bytes() - before <= every_token + slack
    assert llm("the model", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    llm.close()
    assert locked_bytes() == before


def run_in_cgroup(limit: int, command: list[str]) -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
    """Run `command` in a fresh v1 memory cgroup limited to `limit` bytes (skips the test where none can be made):
    its result, and the group's limit as the kernel keeps it (whole pages) and whether the OOM killer struck."""
    from neuralink.errors import CgroupUnavailable
    from neuralink.evaluate.cgroup import MemoryCgroup

    try:
        group = MemoryCgroup.create(limit, prefix="neuralink-test")
    except CgroupUnavailable as e:
        pytest.skip(str(e))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=group.join)
        return done, {"limit": int((group.path / "memory.limit_in_bytes").read_text()), "oom": group.oom_killed()}
    finally:
        group.remove()


# what neuralink.Llama does without a budget: the plan, the micro-batch, the lock and a completion, or its refusal
WITHOUT_A_BUDGET = r"""
import json, sys
import neuralink
from neuralink.errors import MemoryBudgetError
try:
    llm = neuralink.Llama(sys.argv[1], verbose=False)
except MemoryBudgetError as e:
    print(json.dumps({"refused": str(e)}))
    sys.exit()
text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
locked = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmLck"))
print(json.dumps({"budget": llm.memory_plan.budget, "cache": llm.memory_plan.cache, "n_batch": llm.n_batch,
                  "locked": locked, "text": text}))
"""


def test_a_tight_cgroup_limit_runs_as_a_budget(converted_smollm2: Path) -> None:
    # a container's limit, no memory_budget: the process runs as under a budget of the limit less the page cache
    # the cgroup charges (it had kept a 256 MiB margin, so a 800MB limit ran Qwen2.5-Coder-1.5B with no cache,
    # no stream and llama-cpp-python's 512-token micro-batches: 2.4 against 5.2 tok/s with --memory-budget)
    limit = parse_size("200MB")
    done, group = run_in_cgroup(limit, [sys.executable, "-c", WITHOUT_A_BUDGET, str(converted_smollm2)])
    assert done.returncode == 0 and not group["oom"], done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert limit - 4096 < group["limit"] <= limit
    assert run["budget"] == min(int(group["limit"] * 0.95), group["limit"] - CGROUP_HEADROOM)
    assert 0 < run["cache"] and run["n_batch"] == BUDGET_N_BATCH and run["locked"] > 0
    assert run["text"].strip()


def test_the_runner_runs_a_tight_cgroup_limit_as_a_budget(runner: Path, converted_smollm2: Path) -> None:
    # neuralink-run shares the rule (tight_cgroup_limit): micro-batches of 64, the weights read every token locked
    done, group = run_in_cgroup(parse_size("150MB"), [
        str(runner), "-m", str(converted_smollm2), "-p", "The capital of France is", "-n", "8", "-c", "512", "-t", "2",
        "--verbose"])
    assert done.returncode == 0 and not group["oom"], done.stderr[-3000:]
    budget = min(int(group["limit"] * 0.95), group["limit"] - CGROUP_HEADROOM)
    assert f"cannot hold the whole store: run as under a memory budget of {budget / 2**20:.1f} MiB" in done.stderr
    assert re.search(r"n_batch\s+=\s+64\b", done.stderr), done.stderr[-3000:]
    assert "may be evicted" not in done.stderr  # every weight read every token locked


def test_a_cgroup_limit_below_the_minimum_is_refused_not_oom_killed(runner: Path, converted_smollm2: Path) -> None:
    # without memory_budget the cache is sized from what there is, never refused; but a cgroup's limit is one the
    # kernel enforces by killing: Qwen2.5-Coder-1.5B served at n_ctx 2048 in a 530MB cgroup was OOM-killed at load
    limit = parse_size("90MB")
    done, group = run_in_cgroup(limit, [sys.executable, "-c", WITHOUT_A_BUDGET, str(converted_smollm2)])
    assert done.returncode == 0 and not group["oom"], done.stderr[-3000:]
    refused = json.loads(done.stdout.strip().splitlines()[-1])["refused"]
    assert re.search(r": the cgroup memory limit \d+ MiB leaves a budget of [0-9.]+ MiB \(5 % and at least 24 MiB "
                     r"below it\), which is below the minimum [0-9.]+ MiB .*raise the limit", refused), refused
    native, group = run_in_cgroup(limit, [str(runner), "-m", str(converted_smollm2), "-p", "The capital of France is",
                                          "-n", "8", "-t", "2"])
    assert native.returncode != 0 and not group["oom"], native.stderr[-3000:]
    assert "the cgroup memory limit" in native.stderr and "raise the limit" in native.stderr, native.stderr[-3000:]


def test_use_mmap_false_is_planned_from_its_heap_copy_and_holds(converted_smollm2: Path) -> None:
    # use_mmap=False reads the weights llama.cpp uses into its heap: the plan had counted them twice (in the load
    # heap and as the mapped pages it plans for them) and refused this budget (minimum 191 MiB on SmolLM2), and
    # locking had faulted in copies of them in the mapping nobody reads (268 MiB on Qwen2.5-Coder-1.5B)
    done = subprocess.run([sys.executable, "-c", RUN, str(converted_smollm2), "180MB", "64", "auto",
                           json.dumps({"use_mmap": False})], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["non_ffn_weights"] == run["token_embedding"] == 0 and run["locked"] == 0
    assert run["minimum"] <= parse_size("180MB") and run["peak"] <= parse_size("180MB"), run


# neuralink.Llama in a fresh process (what this one holds counts in a budget): its refusal, and how much its RSS
# grew meanwhile, or that it loaded
LOAD_OR_REFUSE = r"""
import json, sys
import neuralink
from neuralink import _engine
from neuralink.errors import MemoryBudgetError
before = _engine.resident_bytes()
try:
    neuralink.Llama(sys.argv[1], verbose=False, **json.loads(sys.argv[2])).close()
except MemoryBudgetError as e:
    _engine.release_free_heap()
    print(json.dumps({"refused": str(e), "growth": _engine.resident_bytes() - before}))
    sys.exit()
print(json.dumps({"refused": None}))
"""


def load_or_refuse(model: Path, **options: object) -> dict:
    """neuralink.Llama(model, **options) in a fresh process: {"refused": its message or None, "growth": bytes}."""
    done = subprocess.run([sys.executable, "-c", LOAD_OR_REFUSE, str(model), json.dumps(options)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_refusal_under_use_mmap_false_names_its_heap_copy(converted_smollm2: Path) -> None:
    # the refusal had named only n_ctx and n_batch (Qwen2.5-Coder-1.5B: 432.7 MiB of load heap, its whole token
    # embedding in it where mapped one micro-batch's lookups are resident)
    refused = load_or_refuse(converted_smollm2, memory_budget="110MB", use_mmap=False)["refused"]  # minimum ~131
    assert re.search(r"use_mmap=False read the weights llama.cpp uses into the heap \([0-9.]+ MiB of load heap\).*"
                     r"leave use_mmap on", refused or ""), refused
