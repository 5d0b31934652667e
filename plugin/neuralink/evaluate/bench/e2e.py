"""End to end: decode speed and memory of stock llama.cpp and neuralink under memory caps.

Each (cap, variant, run) is a fresh process inside its own cgroup v1 memory
group limited to the cap, with the model files evicted from the page cache
first: stock `llama_cpp.Llama` (mmap, as users run it) against
`neuralink.Llama` on the converted model and its sidecar with
memory_budget = the cap. Same prompts (from a text, default emma.txt), greedy
decoding. Prints a table (median over runs) and writes JSON and a PNG curve.
Without the right to create cgroups it says so and runs uncapped.

The table's "read GB/s" is what decoding read per second (bytes read a token
times tok/s), beside the disk's sequential rate and their ratio: the highest
of the rates measured before every round of runs and after each cap's last
(long direct reads of the sidecar), so that a probe that fell in a slow
moment of a shared disk does not flatter the ratio.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuralink import _engine
from neuralink.child import report_child_death
from neuralink.errors import CgroupUnavailable, NeuralinkError
from neuralink.evaluate.bench.native import RUNNER_VARIANTS, run_native
from neuralink.evaluate.cgroup import MemoryCgroup
from neuralink.formats.files import atomic_output
from neuralink.formats.sizes import parse_size

DEFAULT_CAPS = ("none", "300MB", "200MB", "150MB", "120MB", "100MB", "90MB", "80MB", "70MB")
# the project's shared corpora sit beside the repository; commands run from its root
SHARED_TEXT = Path("..") / "shared" / "data" / "emma.txt"
FALLBACK_PROMPTS = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "The three most useful things to know about flash storage are",
    "Once upon a time, in a small village by the sea, there lived",
)
# the disk's sequential rate, measured beside every round of runs: long direct reads of the sidecar in order from
# its start, many in flight (128 reads of 4 MiB at depth 16: ~0.2 s at 2.5 GB/s), as a reference for the rate
# decoding reads at (its stream reads each region in order too)
PEAK_READ_BYTES = 4 << 20
PEAK_QUEUE_DEPTH = 16
PEAK_READS = 128


@dataclass(frozen=True)
class E2eSettings:
    """What every run of `neuralink bench e2e` shares: the models, the prompts, the decode and the engine."""

    model: Path  # the converted GGUF neuralink runs
    sidecar: Path
    stock_model: Path  # the GGUF stock llama.cpp runs
    caps: tuple[str, ...] = DEFAULT_CAPS  # memory caps ("120MB"), "none" for uncapped
    variants: tuple[str, ...] = ("stock", "neuralink")
    prompts_from: Path | None = SHARED_TEXT
    prompts: int = 3
    prompt_texts: tuple[str, ...] = ()  # these prompts instead of ones taken from `prompts_from`
    tokens: int = 32
    runs: int = 3
    threads: int = 2
    n_ctx: int = 512
    n_batch: int = 64
    predictor: str | None = None
    cache_policy: str = "auto"
    budget_fraction: float = 0.95  # neuralink's memory_budget as a fraction of the cap (see budget_for_cap)
    timeout: float = 900.0
    thresholds_file: Path | None = None  # thresholds= and predictor_thresholds= for neuralink.Llama (JSON)
    ttft_tokens: int = 0  # after decoding, time a prompt of this many tokens to its first token (0: skip)
    draft_tokens: int = 4  # neuralink-draft: prompt lookup's proposals per verification
    runner: Path | None = None  # neuralink-run, for the runner variants


@dataclass
class RunResult:
    cap: str
    variant: str
    runs: list[dict] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    disk_rates: list[float] = field(default_factory=list)  # the disk's bytes/s: before each round, after the last
    note: str = ""
    crashed: bool = False

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if key in r]
        return statistics.median(values) if values else None

    def read_rate(self) -> float | None:
        """Bytes read per second of decoding (bytes read a token times tok/s), the median over runs."""
        values = [r["bytes_per_token"] * r["tok_s"] for r in self.runs if r.get("bytes_per_token")]
        return statistics.median(values) if values else None


def disk_read_rate(path: Path) -> float | None:
    """The sequential rate of the disk holding `path`, bytes/s: long direct reads of it in order, many in flight
    (of the whole file, again and again, where it is shorter than one read). None where it cannot say: direct I/O not available (the
    reads would come from the page cache), or the file too small or unreadable, which the runs will report."""
    try:
        read_bytes = min(PEAK_READ_BYTES, path.stat().st_size // _engine.DIRECT_ALIGN * _engine.DIRECT_ALIGN)
        if read_bytes == 0:
            return None
        result = _engine.probe_reads(str(path), read_bytes, PEAK_QUEUE_DEPTH, PEAK_READS, in_order=True)
    except (NeuralinkError, OSError):
        return None
    return result["bytes"] / result["seconds"] if result["direct"] and result["seconds"] > 0 else None


def disk_peak(results: list[RunResult]) -> float | None:
    """The disk's sequential rate for the whole bench: the highest of its probes (a shared disk's speed moves
    within seconds, and a probe in a slow moment would make decoding look closer to the disk's peak than it is)."""
    return max((rate for r in results for rate in r.disk_rates), default=None)


def prompts_from(text_path: Path | None, n: int, words: int = 40) -> list[str]:
    """n prompts of `words` words taken at evenly spaced offsets of a text (built-in ones without a text)."""
    if text_path is None or not text_path.is_file():
        return list(FALLBACK_PROMPTS[:n])
    tokens = text_path.read_text(encoding="utf-8", errors="replace").split()
    step = max((len(tokens) - words) // (n + 1), 1)
    return [" ".join(tokens[(i + 1) * step : (i + 1) * step + words]) for i in range(n)]


def budget_for_cap(limit: int, fraction: float) -> int:
    """neuralink's memory_budget under a cgroup cap of `limit` bytes: `fraction` of it, and at least
    CGROUP_HEADROOM below it (the engine's rule for a cgroup's limit without a budget, at its 0.95)."""
    return _engine.budget_under_cgroup_limit(limit, fraction)


def run_worker(variant: str, cap: str, settings: E2eSettings, prompts_file: Path,
               use_cgroups: bool) -> tuple[dict, int | None]:
    """One run of `variant` under `cap` in a fresh worker process (and cgroup): its JSON result, peak bytes."""
    limit = None if cap == "none" else parse_size(cap)
    group = MemoryCgroup.create(limit) if use_cgroups else None
    budget = None if limit is None else budget_for_cap(limit, settings.budget_fraction)
    if variant in RUNNER_VARIANTS:
        result = _runner_result(variant, cap, budget, settings, prompts_file, group)
    else:
        result = _worker_result(variant, cap, budget, settings, prompts_file, group)
    peak = group.peak_bytes() if group is not None else None
    if group is not None:
        group.remove()
    return result, peak


def _failure(variant: str, cap: str, returncode: int, stderr: str, reported: str,
             group: MemoryCgroup | None) -> dict:
    """A run that ended without a result: killed by the OOM killer, by another signal (its stderr kept in a log),
    or refused (`reported`: what the process said)."""
    if group is not None and group.oom_killed():
        return {"error": "killed by the OOM killer"}
    if returncode < 0:  # e.g. a segfault: say which signal, and keep the process's stderr in a log
        died = report_child_death(f"bench e2e {variant} at cap {cap}", returncode, stderr,
                                  log_name=f"bench-e2e-{variant}-{cap}")
        return {"error": str(died), "crashed": True}
    return {"error": reported}


def _worker_result(variant: str, cap: str, budget: int | None, settings: E2eSettings, prompts_file: Path,
                   group: MemoryCgroup | None) -> dict:
    """stock or a neuralink.Llama variant: the worker's JSON line."""
    command = [sys.executable, "-m", "neuralink.evaluate.bench.worker", "--variant", variant,
               "--model", str(settings.stock_model if variant == "stock" else settings.model),
               "--prompts", str(prompts_file), "--tokens", str(settings.tokens), "--threads", str(settings.threads),
               "--n-ctx", str(settings.n_ctx), "--n-batch", str(settings.n_batch),
               "--draft-tokens", str(settings.draft_tokens)]
    if settings.ttft_tokens:
        command += ["--ttft-prompt", str(prompts_file.parent / "ttft.txt"), "--ttft-tokens", str(settings.ttft_tokens)]
    if group is not None:
        command += ["--cgroup", str(group.path)]
    if variant != "stock":
        command += ["--sidecar", str(settings.sidecar), "--cache-policy", settings.cache_policy]
        if budget is not None:
            command += ["--budget", str(budget)]
        if settings.predictor:
            command += ["--predictor", settings.predictor]
        if settings.thresholds_file is not None:
            command += ["--thresholds", str(settings.thresholds_file)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=settings.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {settings.timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        # a refusal (e.g. a budget below the minimum) or another error the worker reported
        return _failure(variant, cap, done.returncode, done.stderr, f"exit {done.returncode}: {done.stderr[-300:]}",
                        group)
    return json.loads(lines[-1])


def _runner_result(variant: str, cap: str, budget: int | None, settings: E2eSettings, prompts_file: Path,
                   group: MemoryCgroup | None) -> dict:
    """A neuralink-run variant: the prompts one process each, in `group`, from cold storage."""
    from neuralink import _engine

    for path in (settings.stock_model,) if variant == "runner-stock" else (settings.model, settings.sidecar):
        _engine.evict_from_page_cache(str(path))
    result = run_native(variant, settings, json.loads(prompts_file.read_text()), budget,
                        group.path if group is not None else None)
    if "returncode" in result:
        return _failure(variant, cap, result["returncode"], result["stderr"], result["error"], group)
    return result


def run_e2e(settings: E2eSettings, progress: Callable[[str], None] = print) -> list[RunResult]:
    """Every (cap, variant), `settings.runs` times; `progress` gets one line per cell."""
    try:
        MemoryCgroup.create(None).remove()
        use_cgroups = True
    except CgroupUnavailable as e:
        use_cgroups = False
        progress(f"no memory caps: {e}; every variant runs uncapped")
    prompts = list(settings.prompt_texts) or prompts_from(settings.prompts_from, settings.prompts)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        if settings.ttft_tokens:
            # words enough for the tokens (code and English run 1-2 tokens a word); the worker cuts to the count
            long_prompt = prompts_from(settings.prompts_from, 1, words=settings.ttft_tokens)[0]
            (Path(tmp) / "ttft.txt").write_text(long_prompt if len(long_prompt.split()) >= settings.ttft_tokens
                                                else " ".join(prompts * settings.ttft_tokens))
        for cap in settings.caps:
            rows = {variant: RunResult(cap, variant) for variant in settings.variants}
            # the variants take turns, run by run: a shared machine's slow minutes fall on both alike
            for round_ in range(settings.runs + 1):
                rate = disk_read_rate(settings.sidecar)
                for variant, row in rows.items():
                    if rate is not None:
                        row.disk_rates.append(rate)
                    # a failed variant's later runs would fail too; the last round is the probe after the runs
                    if row.note or round_ == settings.runs:
                        continue
                    result, peak = run_worker(variant, cap, settings, prompts_file, use_cgroups)
                    if "error" in result:
                        row.crashed = bool(result.get("crashed"))
                        # a crash keeps its whole line: it names the log
                        row.note = result["error"].splitlines()[0][: None if row.crashed else 120]
                        continue
                    row.runs.append(result)
                    if peak is not None:
                        row.peaks.append(peak)
            for variant, row in rows.items():
                progress(f"cap {cap:>6} {variant:>9}: "
                         + (f"{row.median('tok_s'):.2f} tok/s" if row.runs else row.note))
                results.append(row)
    return results


def format_table(results: list[RunResult]) -> str:
    by_cap: dict[str, dict[str, RunResult]] = {}
    for r in results:
        by_cap.setdefault(r.cap, {})[r.variant] = r
    lines = ["| cap | stock tok/s | neuralink tok/s | neuralink / stock | stock peak MiB | neuralink peak MiB "
             "| reads/token | MiB read/token | read GB/s (disk's) | I/O stall ms/token | cache hits | TTFT s (stock, neuralink) "
             "| notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    disk = disk_peak(results)
    # one line per cap and neuralink variant, each against the same stock runs: the runner's against stock
    # llama.cpp in the same binary where that ran (runner-stock), the others against stock llama-cpp-python
    baselines = ("stock", "runner-stock")
    lines_of = [(cap, rows, name) for cap, rows in by_cap.items()
                for name in ([v for v in rows if v not in baselines] or ["neuralink"])]
    for cap, rows, name in lines_of:
        native = name in RUNNER_VARIANTS and "runner-stock" in rows
        stock, nl = rows.get("runner-stock" if native else "stock"), rows.get(name)
        if native:
            name = f"{name} against runner-stock"
        if name != "neuralink":
            cap = f"{cap} ({name})"
        s_tok = stock.median("tok_s") if stock else None
        n_tok = nl.median("tok_s") if nl else None
        ratio = n_tok / s_tok if s_tok and n_tok else None
        peak = lambda r: statistics.median(r.peaks) / 2**20 if r and r.peaks else None  # noqa: E731
        notes = "; ".join(f"{r.variant}: {r.note}" for r in (stock, nl) if r and r.note)
        trials = [r["down_trial"] for r in (nl.runs if nl else []) if r.get("down_trial", {}).get("settled")]
        if trials:
            kept = sum(bool(t["rows_kept"]) for t in trials)
            notes = "; ".join(filter(None, [notes, f"down rows kept in {kept} of {len(trials)} runs"]))
        by_llama = sum(r.get("cache_policy") == "llama.cpp" for r in (nl.runs if nl else []))
        if by_llama:
            notes = "; ".join(filter(None, [notes, f"FFN by llama.cpp (the model fits in memory) in {by_llama} of "
                                                   f"{len(nl.runs)} runs"]))
        screened = [r["exact_output_rows"] for r in (nl.runs if nl else []) if r.get("exact_output_rows") is not None]
        if screened:
            notes = "; ".join(filter(None, [notes, f"output screened, {statistics.median(screened):.0f} exact rows "
                                                   "a token"]))
        stall = nl.median("stall_s_per_token") if nl else None
        read_mib = nl.median("bytes_per_token") if nl else None
        rate = nl.read_rate() if nl else None
        rate_cell = "—" if rate is None else (f"{rate / 1e9:.2f}" if disk is None else
                                              f"{rate / 1e9:.2f} of {disk / 1e9:.2f} ({rate / disk:.2f})")
        lines.append(
            f"| {cap} | {fmt(s_tok, '.2f')} | {fmt(n_tok, '.2f')} | {fmt(ratio, '.2f')} | {fmt(peak(stock), '.0f')} "
            f"| {fmt(peak(nl), '.0f')} | {fmt(nl.median('reads_per_token') if nl else None, '.0f')} "
            f"| {fmt(read_mib / 2**20 if read_mib else None, '.2f')} | {rate_cell} "
            f"| {fmt(stall * 1e3 if stall else None, '.2f')} "
            f"| {fmt(nl.median('cache_hit_rate') if nl else None, '.2f')} "
            f"| {fmt(stock.median('ttft_s') if stock else None, '.2f')}, {fmt(nl.median('ttft_s') if nl else None, '.2f')} "
            f"| {notes} |"
        )
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib  # deferred: matplotlib loads only when a picture is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: Path) -> None:
    """Write `fig` to `path` atomically, and free it."""
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        _pyplot().close(fig)


def plot(results: list[RunResult], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, style in (("stock", "o-"), ("neuralink", "s-")):
        points = [(parse_size(r.cap) / 2**20, r.median("tok_s")) for r in results
                  if r.variant == variant and r.cap != "none" and r.runs]
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, style, label=f"{variant} llama.cpp" if variant == "stock" else "neuralink")
    ax.set_xlabel("memory cap of the whole process (MiB)")
    ax.set_ylabel("decode tokens / s")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_png(fig, path)




def plot_pair(results: list[RunResult], title: str, path: Path) -> None:
    """Two panels, stock and neuralink side by side: decode tok/s, and peak memory against the cap (the demo's
    picture)."""
    plt = _pyplot()
    runs = [r for r in results if r.runs]
    names = ["stock llama.cpp" if r.variant == "stock" else r.variant for r in runs]
    colors = ["tab:gray" if r.variant == "stock" else "tab:blue" for r in runs]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(8, 3.6))
    speeds = [r.median("tok_s") or 0.0 for r in runs]
    peaks = [(max(r.peaks) if r.peaks else r.median("peak_rss") or 0.0) / 2**20 for r in runs]
    for ax, values, label, fmt in ((speed, speeds, "decode tokens / s", "{:.1f}"),
                                   (memory, peaks, "peak memory (MiB)", "{:.0f}")):
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, [fmt.format(v) for v in values])
        ax.set_ylabel(label)
        ax.margins(y=0.15)
    caps = {r.cap for r in runs} - {"none"}
    if len(caps) == 1:
        cap = parse_size(caps.pop()) / 2**20
        memory.axhline(cap, color="tab:red", linestyle="--", label=f"cap {cap:.0f} MiB")
        memory.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    _save_png(fig, path)
