"""I/O replay: the flash reads of llama.cpp, LLM in a Flash, Neuralink-S, Neuralink and dense loading.

Records which FFN neurons every token of a held-out text activates (llama.cpp
evaluates the text; the thresholds come from the calibration profile), then
replays, token by token and layer by layer, the reads each variant issues for
them, with direct I/O (O_DIRECT) from replay files on one storage, the same
DRAM budget for every variant's cache, and the engine's own reader, planner
and cache (docs/bench-io.md):

  llamacpp     per-neuron rows of separate gate, up and down tensors, original
               order; a run of adjacent rows is one read; LRU cache
  llmflash     row-column bundles in original order; a sliding-window cache of
               the neurons active in the last 5 tokens (LLM in a Flash)
  neuralink-s  bundles in frequency order, access collapse; S3-FIFO cache
  neuralink    bundles in the placement's order, access collapse, linking cache
  neuralink-adaptive  the same, with the collapse gap fitted to the reads' own timing while replaying
  dense        every layer read whole, sequentially

Prints a markdown table: reads/token, IOPS, mean read length (bundles),
KiB/token, effective bandwidth (bytes of active neurons read / I/O time) and
I/O latency per token (per layer, first read issued -> last completed, summed).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from neuralink import _engine
from neuralink.errors import BenchIoError
from neuralink.evaluate.bench.io_files import (
    ReplayLayout,
    bundle_store_layout,
    frequency_orders,
    placement_with_order,
    tensor_file_layout,
    write_bundle_store,
    write_tensor_file,
)
from neuralink.evaluate.bench.io_inputs import BenchInputs, StageProgress, prepare_inputs
from neuralink.evaluate.bench.io_variants import (
    CACHE_RULES,
    DEFAULT_SPECS,
    VARIANTS,
    ReplaySettings,
    Trace,
    Variant,
    VariantResult,
    build_trace,
    markdown_table,
    ratio_lines,
    replay_variants,
)
from neuralink.formats.bundle_layout import BundleParts, bundle_has_gate
from neuralink.formats.coactivation import CoactivationStats
from neuralink.formats.ffn_tensors import DownEncoding, inspect_ffn_model
from neuralink.formats.placement import Placement
from neuralink.runtime.device_probe import cached_profile, device_identity
from neuralink.runtime.device_profile import DEFAULT_COST_MODEL

log = logging.getLogger(__name__)

DEFAULT_CACHE_FRACTION = 0.05


@dataclass
class BenchIoResult:
    """Everything the report needs: per-variant results and the shared settings."""

    results: dict[Variant, VariantResult]
    settings: ReplaySettings
    store_bytes: int
    record_bytes: tuple[int, ...]
    bundle_parts: tuple[str, ...]
    collapse_note: str
    replay_dir: Path
    device: str
    n_tokens: int
    reused: list[Path] = field(default_factory=list)


def _collapse_gap(replay_dir: Path, queue_depth: int, override: int | None) -> tuple[int, float, str]:
    """(gap bytes, bandwidth bytes/s, where they came from): the fixed gap, and the adaptive plan's prior."""
    profile = cached_profile(replay_dir)
    bandwidth = profile.read_cost(queue_depth)[1] if profile is not None else DEFAULT_COST_MODEL.bandwidth_bytes_per_s
    if override is not None:
        return override, bandwidth, f"collapse gap {override} B (--collapse-gap)"
    if profile is not None:
        gap = profile.collapse_gap_bytes(queue_depth)
        return gap, bandwidth, (f"collapse gap {gap} B from the device profile at queue depth "
                                f"{profile.nearest_depth(queue_depth)} (measured {profile.measured_at})")
    cost = DEFAULT_COST_MODEL
    gap = max(int(cost.read_latency_s * cost.bandwidth_bytes_per_s) - 1, 0)
    return gap, bandwidth, (f"collapse gap {gap} B from the default cost model ({cost.read_latency_s * 1e6:g} us/read, "
                            f"{cost.bandwidth_bytes_per_s / 1e9:g} GB/s): no device profile is cached for this "
                            f"storage; run `neuralink device-profile {replay_dir.parent}`")


@contextmanager
def _replay_directory(replay_dir: Path | None, model: Path) -> Iterator[Path]:
    if replay_dir is None:
        # on the model's storage when possible: that is the flash the engine would read
        beside = model.resolve().parent
        with tempfile.TemporaryDirectory(prefix=".neuralink-bench-io-",
                                         dir=beside if os.access(beside, os.W_OK) else None) as tmp:
            yield Path(tmp)
    else:
        yield _made_dir(replay_dir)


def bench_io(
    model: Path,
    trace: CoactivationStats,
    placement: Placement,
    *,
    variants: Sequence[Variant] = VARIANTS,
    cache_rules: dict[Variant, str] | None = None,
    replay_dir: Path | None = None,
    cache_fraction: float = DEFAULT_CACHE_FRACTION,
    cache_bytes: int | None = None,
    queue_depth: int = _engine.DEFAULT_QUEUE_DEPTH,
    collapse_gap_bytes: int | None = None,
    max_read_bytes: int = _engine.DEFAULT_MAX_READ_BYTES,
    io_backend: str = "auto",
    bundle_parts: BundleParts = "auto",
    bundle_down_type: DownEncoding = "auto",
    max_tokens: int | None = None,
    chunk_tokens: int = 16,
    progress: StageProgress | None = None,
) -> BenchIoResult:
    """Write the replay files (or reuse those in `replay_dir`), then replay `trace` for every variant."""
    report = progress or (lambda stage, done, total: None)
    if not variants:
        raise BenchIoError("no variants to replay")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise BenchIoError(f"unknown variants {unknown}; expected some of {VARIANTS}")
    specs = [DEFAULT_SPECS[v] for v in dict.fromkeys(variants)]
    for name, rule in (cache_rules or {}).items():
        if name not in VARIANTS or rule not in CACHE_RULES:
            raise BenchIoError(f"cache rule {name}={rule}: expected VARIANT=RULE with RULE one of {CACHE_RULES}")
        specs = [replace(s, cache=rule) if s.name == name else s for s in specs]  # type: ignore[arg-type]
    if not 0 <= cache_fraction < 1 or queue_depth < 1 or chunk_tokens < 1 or max_read_bytes < 4096:
        raise BenchIoError("need 0 <= cache fraction < 1, queue depth >= 1, chunk >= 1, max read >= 4096 B")

    ffn = inspect_ffn_model(model)
    n_layer = ffn.n_layer
    if (trace.n_layer, trace.n_ff) != (n_layer, ffn.n_ff) or {len(o) for o in placement.orders} != {ffn.n_ff} \
            or placement.n_layer != n_layer:
        raise BenchIoError(f"{model}: {n_layer} layers x {ffn.n_ff} neurons, but the trace has {trace.n_layer} x "
                           f"{trace.n_ff} and the placement {placement.n_layer} layers: made for another model")
    sources = {s.source for s in specs} | {"identity"}  # the identity store sizes the budget and feeds the tensors
    orders: dict[str, list[np.ndarray] | None] = {
        "identity": [np.arange(ffn.n_ff)] * n_layer, "frequency": frequency_orders(placement),
        "placement": [np.asarray(o) for o in placement.orders], "tensors": None,
    }
    reused: list[Path] = []
    with _replay_directory(replay_dir, model) as directory:
        layouts_by_source: dict[str, ReplayLayout] = {}
        to_write = [s for s in ("identity", "frequency", "placement") if s in sources]
        total = n_layer * (len(to_write) + ("tensors" in sources))
        written = 0

        def advance(n: int) -> None:
            nonlocal written
            written += n
            report("write", written, total)

        for source in to_write:
            method = placement.method if source == "placement" else source
            order = orders[source]
            assert order is not None
            placed = placement if source == "placement" else placement_with_order(placement, method, order)
            path, was_reused = write_bundle_store(model, placed, directory / f"{source}-{method}.sidecar",
                                                  bundle_parts=bundle_parts, bundle_down_type=bundle_down_type,
                                                  progress=advance)
            if was_reused:
                reused.append(path)
                advance(n_layer)
            layouts_by_source[source] = bundle_store_layout(path)
        identity = layouts_by_source["identity"]
        if "tensors" in sources:
            path, was_reused = write_tensor_file(identity.path, directory / "tensors-identity.gguf", advance)
            if was_reused:
                reused.append(path)
                advance(n_layer)
            layouts_by_source["tensors"] = tensor_file_layout(path, identity.bundle_bytes)

        for layout in layouts_by_source.values():
            _engine.evict_from_page_cache(str(layout.path))  # cold also for a buffered fallback
        budget = cache_bytes if cache_bytes is not None else int(round(cache_fraction * identity.store_bytes))
        gap, bandwidth, collapse_note = _collapse_gap(directory, queue_depth, collapse_gap_bytes)
        settings = ReplaySettings(cache_bytes=budget, queue_depth=queue_depth, collapse_gap_bytes=gap,
                                  bandwidth_bytes_s=bandwidth, max_read_bytes=max_read_bytes, io_backend=io_backend,
                                  chunk_tokens=chunk_tokens)
        traces_by_source: dict[str, Trace] = {}
        for source in sources:
            key = "identity" if source == "tensors" else source
            if key not in traces_by_source:
                traces_by_source[key] = build_trace(trace, orders[key], max_tokens)
        n_tokens = traces_by_source["identity"].n_tokens
        with_pins = {s.name: _pin_frequencies(placement, orders[s.source], layouts_by_source[s.source])
                     for s in specs if s.cache == "pinned"}
        results = replay_variants(
            specs, {s.name: layouts_by_source[s.source] for s in specs},
            {s.name: traces_by_source["identity" if s.source == "tensors" else s.source] for s in specs},
            settings, pin_frequencies=with_pins,
            progress=_counter(lambda done: report("replay", done, n_tokens * len(specs))),
        )
        device = device_identity(directory).describe()
    with_gate = bundle_has_gate(ffn, bundle_parts, placement.criterion)
    return BenchIoResult(
        results=results, settings=settings, store_bytes=identity.store_bytes, record_bytes=identity.bundle_bytes,
        bundle_parts=("gate", "up", "down") if with_gate else ("up", "down"), collapse_note=collapse_note,
        replay_dir=directory, device=device, n_tokens=n_tokens, reused=reused,
    )


def _counter(call: Callable[[int], None]) -> Callable[[int], None]:
    done = 0

    def add(n: int) -> None:
        nonlocal done
        done += n
        call(done)

    return add


def _pin_frequencies(placement: Placement, order: list[np.ndarray] | None, layout: ReplayLayout) -> list[np.ndarray]:
    # per region, in stored order; the tensor file's regions are a layer's parts in original order
    per_layer = [np.asarray(f) if order is None else np.asarray(f)[np.asarray(order[il])]
                 for il, f in enumerate(placement.frequencies)]
    return [per_layer[il] for il, step in enumerate(layout.steps) for _ in step]


def checksum_throughput(n_bytes: int = 1 << 20, calls: int = 32, repeats: int = 3) -> float:
    """Bytes per second at which this CPU computes the sidecar's checksum (checksum64 over 4 KiB blocks, the
    same multiply-rotate loop that verifies each record as it arrives): the best of `repeats` passes of `calls`
    hashes of an n_bytes buffer (small enough to stay in cache, as a record just read does)."""
    data = np.random.default_rng(0).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            _engine.block_checksum64(data)
        best = min(best, time.perf_counter() - start)
    return n_bytes * calls / best


def checksum_line(result: BenchIoResult, throughput: float) -> str:
    """What verifying every record read costs the neuralink variant per token, at `throughput` bytes/s."""
    nl = next((r for r in result.results.values() if r.name == "neuralink"), None)
    line = f"record checksums: {throughput / 1e9:.1f} GB/s on this CPU (checksum64, measured here)"
    if nl is None:
        return line
    per_token = nl.metrics()["bytes_per_token"]
    io_ms = nl.metrics()["io_ms_per_token"]
    verify_ms = per_token / throughput * 1e3
    return (f"{line}: verifying neuralink's {per_token / 2**20:.2f} MiB per token costs {verify_ms:.2f} ms of CPU "
            f"({100 * verify_ms / io_ms:.1f} % of its {io_ms:.2f} ms of I/O; not in the replayed times above)")


def report_text(result: BenchIoResult, inputs: BenchInputs) -> str:
    """The printed report: what was replayed, on what, the table and the paper's ratios."""
    held, placement = inputs.trace, inputs.placement
    first = next(iter(result.results.values()))
    s = result.settings
    direct = all(r.direct for r in result.results.values())
    lines = [
        f"trace: {result.n_tokens} tokens of {', '.join(held.sources)}; {held.criterion} on {held.activation}, "
        f"active fraction {held.densities().mean():.3f}",
        f"placement: {placement.method} from {placement.n_tokens} calibration tokens",
        f"bundles: {'+'.join(result.bundle_parts)}, {sorted(set(result.record_bytes))} B per neuron; "
        f"FFN store {result.store_bytes / 2**20:.1f} MiB; cache budget {s.cache_bytes / 2**20:.2f} MiB "
        f"({100 * s.cache_bytes / max(result.store_bytes, 1):.1f} %) for every variant",
        f"reads: {first.io_backend}, queue depth {s.queue_depth}, "
        f"{'direct I/O (O_DIRECT)' if direct else 'BUFFERED reads: O_DIRECT was refused, page cache dropped per token'}"
        f", at most {s.max_read_bytes // 1024} KiB per read; {result.collapse_note}",
        f"replay files: {result.replay_dir} ({result.device})"
        + (f"; reused {', '.join(p.name for p in result.reused)}" if result.reused else ""),
    ]
    notes = sorted({n for r in result.results.values() for n in r.notes})
    lines += [f"note: {n}" for n in notes]
    lines += ["", markdown_table(result.results), ""]
    lines += ratio_lines(result.results)
    lines += ["", checksum_line(result, checksum_throughput())]
    return "\n".join(lines)


def result_json(result: BenchIoResult, inputs: BenchInputs) -> dict[str, object]:
    s = result.settings
    return {
        "benchmark": "neuralink bench io", "tokens": result.n_tokens, "sources": list(inputs.trace.sources),
        "placement_method": inputs.placement.method, "criterion": inputs.trace.criterion,
        "bundle_parts": list(result.bundle_parts), "record_bytes": sorted(set(result.record_bytes)),
        "store_bytes": result.store_bytes, "cache_bytes": s.cache_bytes, "queue_depth": s.queue_depth,
        "collapse_gap_bytes": s.collapse_gap_bytes, "collapse": result.collapse_note,
        "max_read_bytes": s.max_read_bytes, "device": result.device, "load_average": list(os.getloadavg()),
        "variants": [r.to_json() for r in result.results.values()],
    }


def _made_dir(directory: Path) -> Path:
    if directory.exists() and not directory.is_dir():
        raise BenchIoError(f"{directory}: exists and is not a directory")
    if not directory.parent.is_dir():
        raise BenchIoError(f"{directory}: directory {directory.parent} does not exist")
    directory.mkdir(exist_ok=True)
    return directory


__all__ = ["BenchInputs", "BenchIoError", "BenchIoResult", "bench_io", "prepare_inputs", "report_text", "result_json"]
