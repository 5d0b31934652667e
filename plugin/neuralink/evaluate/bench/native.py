"""`bench e2e`'s native runner variants: neuralink-run (no Python) under the same caps as the other variants.

Each prompt is one run of the runner binary (``scripts/build_aarch64.sh native`` builds it for this machine),
started inside the cell's memory cgroup with ``--memory-budget`` as neuralink.Llama gets it; the figures come from
the report it prints to stderr. ``runner`` runs its defaults (prompt lookup drafts where they pay),
``runner-nodraft`` passes ``--prompt-lookup 0``, and ``runner-stock`` is stock llama.cpp in the same binary
(``--stock-ffn`` on the stock model: the FFNs from llama.cpp's mapped weights, no engine, no budget), the native
baseline the runner variants are compared with: the same process around llama.cpp, no interpreter in either.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuralink.evaluate.bench.e2e import E2eSettings

RUNNER_VARIANTS = ("runner", "runner-nodraft", "runner-engine", "runner-stock", "runner-noscreen")

_PHASE = re.compile(r"^(prompt|generation) +(\d+) tokens +([0-9.]+) s +([0-9.]+) tok/s")
_COUNTERS = re.compile(r"^ +reads/token ([0-9.]+) +bytes/token ([0-9.]+) KiB .*cache hits ([0-9.]+)%")
_STALL = re.compile(r"^ +I/O [0-9.]+ ms/token +I/O stall ([0-9.]+) ms/token")
_DRAFTS = re.compile(r"^drafts .*: (\d+) verifications, (\d+) of (\d+) proposed tokens confirmed")
_LOADED = re.compile(r"model loaded in ([0-9.]+) s")


def parse_report(stderr: str) -> dict[str, Any]:
    """The figures of one neuralink-run report: per phase its tokens and seconds, the generation's per-token
    counters, the drafts' counts and the load time. ValueError if the report has no generation line."""
    out: dict[str, Any] = {}
    phase = None
    for line in stderr.splitlines():
        if m := _PHASE.match(line):
            phase = m.group(1)
            tokens, seconds, rate = int(m.group(2)), float(m.group(3)), float(m.group(4))
            # the seconds are printed to the millisecond, the rate from the exact time: a tiny model's few tokens
            # take less than a printed millisecond
            out[f"{phase}_tokens"], out[f"{phase}_s"] = tokens, tokens / rate if rate > 0 else seconds
        elif phase == "generation" and (m := _COUNTERS.match(line)):
            out["reads_per_token"] = float(m.group(1))
            out["bytes_per_token"] = float(m.group(2)) * 1024
            out["cache_hit_rate"] = float(m.group(3)) / 100
        elif phase == "generation" and (m := _STALL.match(line)):
            out["stall_s_per_token"] = float(m.group(1)) * 1e-3
        elif m := _DRAFTS.match(line):
            out["verifications"], out["confirmed"], out["proposed"] = map(int, m.groups())
        elif m := _LOADED.search(line):
            out["load_s"] = float(m.group(1))
    if "generation_tokens" not in out:
        raise ValueError("no 'generation' line in neuralink-run's report")
    return out


def _last_message(stderr: str) -> str:
    """The runner's last message: it ends with its error (a budget's plan follows on indented lines)."""
    messages = [line for line in stderr.splitlines() if line.startswith("neuralink-run: ")]
    return messages[-1].removeprefix("neuralink-run: ")[:300] if messages else stderr[-300:]


def runner_command(variant: str, settings: E2eSettings, prompt: str, budget: int | None) -> list[str]:
    """neuralink-run's command line for one prompt of `variant`: `settings.tokens` decoded after the first token."""
    if settings.runner is None:
        raise ValueError(f"variant {variant} needs --runner (scripts/build_aarch64.sh native builds it)")
    common = ["-p", prompt, "-n", str(settings.tokens + 1), "-t", str(settings.threads), "-c", str(settings.n_ctx),
              "-b", str(settings.n_batch), "--ignore-eos"]
    if variant == "runner-stock":
        return [str(settings.runner), "-m", str(settings.stock_model), *common, "--stock-ffn"]
    command = [str(settings.runner), "-m", str(settings.model), "--sidecar", str(settings.sidecar), *common,
               "--cache-policy", settings.cache_policy]
    if budget is not None:
        command += ["--memory-budget", str(budget)]
    if settings.predictor:
        command += ["--predictor", settings.predictor]
    if variant in ("runner-nodraft", "runner-engine", "runner-noscreen"):
        command += ["--prompt-lookup", "0"]
    if variant == "runner-noscreen":
        command += ["--output-screen", "off"]
    if variant == "runner-engine":
        command += ["--ffn", "engine"]
    return command


def run_native(variant: str, settings: E2eSettings, prompts: list[str], budget: int | None,
               cgroup: Path | None) -> dict[str, Any]:
    """Every prompt through neuralink-run in `cgroup` (joined before exec): the worker's JSON fields, summed over
    the prompts; {"error": ...} for the first run that fails (with its "returncode" and "stderr" where it ended
    with one)."""
    def join() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text("0\n")

    reports, texts = [], []
    start = time.perf_counter()
    for prompt in prompts:
        command = runner_command(variant, settings, prompt, budget)
        remaining = settings.timeout - (time.perf_counter() - start)
        try:
            done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=max(remaining, 1),
                                  preexec_fn=join)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {settings.timeout} s"}
        if done.returncode != 0:
            status = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
            return {"error": f"neuralink-run {status}: {_last_message(done.stderr)}", "returncode": done.returncode,
                    "stderr": done.stderr}
        try:
            reports.append(parse_report(done.stderr))
        except ValueError as e:
            return {"error": f"{e}: {_last_message(done.stderr)}"}
        texts.append(done.stdout[len(prompt):].strip("\n"))
    decoded = sum(r["generation_tokens"] for r in reports)
    seconds = sum(r["generation_s"] for r in reports)

    def per_token(key: str) -> float:  # a mean over every decoded token of the runs
        return sum(r.get(key, 0.0) * r["generation_tokens"] for r in reports) / max(decoded, 1)

    result: dict[str, Any] = {
        "variant": variant,
        "load_s": sum(r.get("load_s", 0.0) for r in reports) / len(reports),
        "decode_tokens": decoded,
        "tok_s": decoded / seconds if seconds else 0.0,
        "prompt_tok_s": sum(r["prompt_tokens"] for r in reports) / max(sum(r["prompt_s"] for r in reports), 1e-9),
        "texts": texts,
        "reads_per_token": per_token("reads_per_token"),
        "bytes_per_token": per_token("bytes_per_token"),
        "stall_s_per_token": per_token("stall_s_per_token"),
        "cache_hit_rate": per_token("cache_hit_rate"),
    }
    if any("verifications" in r for r in reports):
        for key in ("verifications", "confirmed", "proposed"):
            result[key] = sum(r.get(key, 0) for r in reports)
    return result


_MINIMUM = re.compile(r"is below the minimum ([0-9.]+) MiB")


def runner_minimum(settings: E2eSettings) -> int:
    """The smallest memory budget (bytes) neuralink-run accepts for `settings`' model, context and batch: what it
    names when refusing a budget once the model is loaded. A budget below the plan made before the load is refused
    before it, naming that plan's minimum, a lower bound without llama.cpp's own buffers which varies by a few
    tenths of a MiB with what the process held at its start: asked again a MiB above it, the runner loads and
    names the floor, or runs, when that budget holds it (then the budget is returned). ValueError when it names
    none."""
    def run(budget: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(runner_command("runner", settings, "Hello", budget), capture_output=True, text=True,
                              errors="replace", timeout=settings.timeout)

    budget = 1 << 20
    for _ in range(4):
        done = run(budget)
        found = _MINIMUM.search(done.stderr)
        if done.returncode == 0 and budget > 1 << 20:
            return budget
        if done.returncode == 0 or found is None:
            break
        named = int(float(found.group(1)) * 2**20)
        if "counted before loading" not in done.stderr:
            return named
        budget = max(named, budget) + (1 << 20)
    raise ValueError(f"neuralink-run named no minimum budget for {settings.model}: {_last_message(done.stderr)}")
