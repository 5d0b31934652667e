"""The variants `neuralink bench io` compares, their replay on the engine's reader, and their metrics.

| variant | file | order | reads | cache |
| --- | --- | --- | --- | --- |
| llamacpp | gate/up/down tensors | original | one per run of adjacent rows, per tensor | LRU |
| llmflash | bundle store | original | one per run of adjacent bundles | sliding window, last 5 tokens |
| neuralink-s | bundle store | frequency | access collapse | S3-FIFO |
| neuralink | bundle store | placement | access collapse | linking (S3-FIFO + run-aware admission) |
| neuralink-adaptive | bundle store | placement | access collapse, gap fitted to the reads' timing | linking |
| dense | bundle store | original | the whole layer, sequentially | none |

Every replay runs in C++ (`_engine.Replayer`): the engine's planner
(`plan_reads`), its I/O paths (io_uring ring or pread pool, O_DIRECT) and its
bundle cache, one layer at a time like one compute thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np

from neuralink import _engine
from neuralink.evaluate.bench.io_files import ReplayLayout
from neuralink.formats.coactivation import CoactivationStats, unpack_masks

Variant = Literal["llamacpp", "llmflash", "neuralink-s", "neuralink", "neuralink-adaptive", "dense"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
# what a variant reads from: the tensor file, or the bundle store of an order
Source = Literal["tensors", "identity", "frequency", "placement"]
# a cache policy of the engine, or LLM in a Flash's sliding window
CacheRule = Literal["none", "lru", "s3fifo", "linking", "pinned", "window"]
CACHE_RULES: tuple[CacheRule, ...] = get_args(CacheRule)
LLMFLASH_WINDOW_TOKENS = 5


@dataclass(frozen=True)
class VariantSpec:
    """How one variant reads: from which file, how reads are planned, which cache."""

    name: Variant
    source: Source
    plan: Literal["runs", "collapse", "adaptive", "whole"]
    cache: CacheRule


DEFAULT_SPECS: dict[Variant, VariantSpec] = {
    "llamacpp": VariantSpec("llamacpp", "tensors", "runs", "lru"),
    "llmflash": VariantSpec("llmflash", "identity", "runs", "window"),
    "neuralink-s": VariantSpec("neuralink-s", "frequency", "collapse", "s3fifo"),
    "neuralink": VariantSpec("neuralink", "placement", "collapse", "linking"),
    "neuralink-adaptive": VariantSpec("neuralink-adaptive", "placement", "adaptive", "linking"),
    "dense": VariantSpec("dense", "identity", "whole", "none"),
}


@dataclass(frozen=True)
class ReplaySettings:
    """What every variant shares: the DRAM budget, the device, the collapse rule."""

    cache_bytes: int
    queue_depth: int = _engine.DEFAULT_QUEUE_DEPTH
    collapse_gap_bytes: int = 0
    bandwidth_bytes_s: float = _engine.DEFAULT_BANDWIDTH_BYTES_S  # the adaptive plan's prior, with the gap
    max_read_bytes: int = _engine.DEFAULT_MAX_READ_BYTES
    io_backend: str = "auto"
    window_tokens: int = LLMFLASH_WINDOW_TOKENS
    chunk_tokens: int = 16


@dataclass(frozen=True)
class Trace:
    """Needed positions per token and layer in CSR form: token t, layer l at offsets[t * n_layer + l]."""

    positions: np.ndarray  # uint32
    offsets: np.ndarray  # uint64, n_tokens * n_layer + 1
    n_tokens: int
    n_layer: int


def build_trace(stats: CoactivationStats, orders: Sequence[np.ndarray] | None = None,
                max_tokens: int | None = None) -> Trace:
    """The active neurons of every token and layer of `stats`, as positions in the stored `orders`
    (order[k] = original index at position k; None: original order), sorted within each (token, layer)."""
    n_tokens = stats.n_tokens if max_tokens is None else min(stats.n_tokens, max_tokens)
    n_layer = stats.n_layer
    counts = np.zeros((n_tokens, n_layer), dtype=np.int64)
    per_layer: list[tuple[np.ndarray, np.ndarray]] = []
    for il in range(n_layer):
        active = unpack_masks(stats.packed_masks(il)[:n_tokens], stats.n_ff)
        if orders is not None:
            active = active[:, np.asarray(orders[il])]
        token, position = np.nonzero(active)  # row-major: positions ascend within a token
        counts[:, il] = np.bincount(token, minlength=n_tokens)
        per_layer.append((token, position))
    offsets = np.zeros(n_tokens * n_layer + 1, dtype=np.uint64)
    np.cumsum(counts.ravel(), out=offsets[1:])
    positions = np.empty(int(offsets[-1]), dtype=np.uint32)
    for il, (token, position) in enumerate(per_layer):
        first_of_token = np.cumsum(counts[:, il]) - counts[:, il]
        rank = np.arange(len(token)) - first_of_token[token]
        positions[offsets[token * n_layer + il].astype(np.int64) + rank] = position
    return Trace(positions, offsets, n_tokens, n_layer)


@dataclass
class VariantResult:
    """Per-token replay counters of one variant (a structured array) and what it ran with."""

    name: str
    spec: VariantSpec
    tokens: np.ndarray
    bundle_bytes: float  # mean bytes of one neuron's whole bundle
    direct: bool
    io_backend: str
    notes: tuple[str, ...] = ()

    def total(self, field: str) -> int:
        return int(self.tokens[field].sum(dtype=np.uint64))

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def io_seconds(self) -> float:
        return self.total("io_ns") / 1e9

    def metrics(self) -> dict[str, float]:
        """The table's numbers: per token, per read, per second of I/O."""
        n, reads, seconds = max(self.n_tokens, 1), self.total("reads"), self.io_seconds
        per_read = 1 / reads if reads else math.nan
        return {
            "reads_per_token": reads / n,
            "iops": reads / seconds if seconds else math.nan,
            "read_length_bundles": self.total("spanned_bytes") * per_read / self.bundle_bytes,
            "active_bundles_per_read": self.total("needed_bytes") * per_read / self.bundle_bytes,
            "bytes_per_token": self.total("bytes_read") / n,
            "effective_bandwidth": self.total("needed_bytes") / seconds if seconds else math.nan,
            "io_ms_per_token": seconds * 1e3 / n,
            "io_ms_per_token_median": float(np.median(self.tokens["io_ns"])) / 1e6 if self.n_tokens else math.nan,
            "cache_hit_rate": self.total("hits") / max(self.total("needed"), 1),
            "active_bytes_per_token": self.total("needed_bytes") / n,
        }

    def to_json(self) -> dict[str, object]:
        return {"variant": self.name, **asdict(self.spec), "direct": self.direct, "io_backend": self.io_backend,
                "tokens": self.n_tokens, "notes": list(self.notes), **self.metrics()}


def make_replayer(spec: VariantSpec, layout: ReplayLayout, settings: ReplaySettings) -> _engine.Replayer:
    """The engine-side replayer of one variant."""
    window = spec.cache == "window"
    policy = "none" if window else spec.cache
    return _engine.Replayer(
        str(layout.path), list(layout.regions), [list(s) for s in layout.steps], plan=spec.plan,
        collapse_gap_bytes=settings.collapse_gap_bytes if spec.plan in ("collapse", "adaptive") else 0,
        bandwidth_bytes_s=settings.bandwidth_bytes_s,
        max_read_bytes=settings.max_read_bytes, queue_depth=settings.queue_depth, io_backend=settings.io_backend,
        cache_policy=policy, cache_bytes=0 if spec.cache == "none" else settings.cache_bytes,
        window_tokens=settings.window_tokens if window else 0,
    )


def replay_variants(
    specs: Sequence[VariantSpec],
    layouts: dict[Variant, ReplayLayout],
    traces: dict[Variant, Trace],
    settings: ReplaySettings,
    *,
    pin_frequencies: dict[Variant, list[np.ndarray]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[Variant, VariantResult]:
    """Replay every variant's trace, in turns of `settings.chunk_tokens` tokens (the order rotating
    each turn) so that a burst of other load on the machine hits all variants alike.
    `progress` is called with the tokens each turn replayed."""
    replayers = {s.name: make_replayer(s, layouts[s.name], settings) for s in specs}
    for s in specs:
        if s.cache == "pinned":
            replayers[s.name].pin([np.asarray(f, dtype=np.float32) for f in (pin_frequencies or {})[s.name]])
    n_tokens = min(t.n_tokens for t in traces.values())
    parts: dict[Variant, list[np.ndarray]] = {s.name: [] for s in specs}
    names = [s.name for s in specs]
    for turn, start in enumerate(range(0, n_tokens, settings.chunk_tokens)):
        stop = min(start + settings.chunk_tokens, n_tokens)
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            trace = traces[name]
            parts[name].append(replayers[name].replay(trace.positions, trace.offsets, start, stop))
            if progress is not None:
                progress(stop - start)
    results: dict[Variant, VariantResult] = {}
    for s in specs:
        r = replayers[s.name]
        fitted = f"collapse gap fitted to {r.collapse_gap_bytes:,} B at the end" if s.plan == "adaptive" else ""
        notes = tuple(n for n in (r.io_note, r.io_backend_note, fitted) if n)
        layout = layouts[s.name]
        results[s.name] = VariantResult(s.name, s, np.concatenate(parts[s.name]),
                                        float(np.mean(layout.bundle_bytes)), r.direct, r.io_backend, notes)
    return results


COLUMNS = (
    ("variant", None), ("reads/tok", "reads_per_token"), ("IOPS", "iops"),
    ("read len (bundles)", "read_length_bundles"), ("active/read", "active_bundles_per_read"),
    ("KiB/tok", "bytes_per_token"), ("eff. MB/s", "effective_bandwidth"), ("I/O ms/tok", "io_ms_per_token"),
    ("cache hits", "cache_hit_rate"),
)


def _cell(key: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    if key == "bytes_per_token":
        return f"{value / 1024:,.1f}"
    if key == "effective_bandwidth":
        return f"{value / 1e6:,.1f}"
    if key == "cache_hit_rate":
        return f"{100 * value:.1f} %"
    if key in ("iops",):
        return f"{value:,.0f}"
    if key in ("io_ms_per_token",):
        return f"{value:.3f}"
    return f"{value:,.2f}"


def markdown_table(results: dict[Variant, VariantResult]) -> str:
    """The results as a markdown table, one row per variant."""
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for name, result in results.items():
        m = result.metrics()
        cells = [name] + [_cell(key, m[key]) for _, key in COLUMNS[1:] if key is not None]
        if result.spec.cache == "none" or result.spec.plan == "whole":
            cells[-1] = "-"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_lines(results: dict[Variant, VariantResult]) -> list[str]:
    """The paper's comparisons: neuralink against each baseline present."""
    if "neuralink" not in results:
        return []
    ours = results["neuralink"].metrics()
    lines = []
    for base in ("llamacpp", "llmflash", "neuralink-s", "neuralink-adaptive", "dense"):
        if base not in results:
            continue
        other = results[base].metrics()
        reads = other["reads_per_token"] / ours["reads_per_token"] if ours["reads_per_token"] else math.inf
        bandwidth = ours["effective_bandwidth"] / other["effective_bandwidth"]
        latency = other["io_ms_per_token"] / ours["io_ms_per_token"] if ours["io_ms_per_token"] else math.inf
        lines.append(f"neuralink vs {base}: reads / {reads:.2f}, effective bandwidth x {bandwidth:.2f}, "
                     f"I/O latency per token / {latency:.2f}")
    return lines


def plot_results(results: dict[Variant, VariantResult], output: str, title: str) -> None:
    """A bar chart per metric, one bar per variant (PNG)."""
    import matplotlib  # deferred: matplotlib loads only when a picture is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reads / token", "reads_per_token", 1), ("IOPS", "iops", 1),
              ("mean read length (bundles)", "read_length_bundles", 1), ("KiB / token", "bytes_per_token", 1 / 1024),
              ("effective bandwidth (MB/s)", "effective_bandwidth", 1e-6), ("I/O ms / token", "io_ms_per_token", 1)]
    names = list(results)
    metrics = {n: results[n].metrics() for n in names}
    colors = [f"C{VARIANTS.index(n)}" for n in names]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (label, key, scale) in zip(axes.ravel(), panels):
        values = [metrics[n][key] * scale for n in names]
        ax.bar(names, values, color=colors)
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=30)
        for i, v in enumerate(values):
            if not math.isnan(v):
                ax.annotate(f"{v:,.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=110, format="png")
    plt.close(fig)


__all__ = [
    "CACHE_RULES", "DEFAULT_SPECS", "VARIANTS", "ReplaySettings", "Trace", "VariantResult", "VariantSpec",
    "build_trace", "make_replayer", "markdown_table", "plot_results", "ratio_lines", "replay_variants",
]
