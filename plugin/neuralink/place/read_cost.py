"""What a neuron order costs in flash reads: runs, collapsed reads, bytes and time per token.

A token's active neurons, laid out in a layer's stored order, form maximal
contiguous runs. Reading each run costs one read: ``read_latency_s`` plus its
bytes over ``bandwidth_bytes_per_s`` (the device model of DESIGN.md: ~60 us
per read at queue depth 1, ~1.4 GB/s). Access collapse merges two runs when
reading the gap between them costs less than another read; since each gap's
decision changes the cost by (gap bytes / bandwidth - latency) independently
of the others, merging every gap of at most ``collapse_gap`` neurons is the
best a planner can do. Reads are direct I/O: each covers whole
``alignment``-byte blocks of a bundle store laid out at a stride of
``bundle_bytes`` per neuron from an aligned start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from neuralink.runtime.device_profile import DeviceCostModel

_TOKEN_CHUNK = 1024


@dataclass
class ReadCounts:
    """Totals over the tokens of one or more layers under one order; add them with ``+``."""

    n_tokens: int = 0
    active: int = 0  # active neurons
    runs: int = 0  # maximal contiguous active segments, before collapse
    reads: int = 0  # reads after collapse
    read_bytes: int = 0  # bytes those reads move, alignment included
    active_bytes: int = 0  # bytes of the active neurons' bundles
    seconds: float = field(default=0.0)  # cost-model time of those reads

    def __add__(self, other: ReadCounts) -> ReadCounts:
        """Totals of two layers over the same tokens."""
        return ReadCounts(
            n_tokens=max(self.n_tokens, other.n_tokens), active=self.active + other.active,
            runs=self.runs + other.runs, reads=self.reads + other.reads,
            read_bytes=self.read_bytes + other.read_bytes, active_bytes=self.active_bytes + other.active_bytes,
            seconds=self.seconds + other.seconds,
        )

    @property
    def mean_run_length(self) -> float:
        """Active neurons per run (per maximal contiguous segment)."""
        return self.active / self.runs if self.runs else 0.0

    def per_token(self, value: float) -> float:
        return value / self.n_tokens if self.n_tokens else 0.0

    @property
    def effective_bandwidth(self) -> float:
        """Bytes of activated neurons per second of I/O (the paper's effective bandwidth)."""
        return self.active_bytes / self.seconds if self.seconds else 0.0


def count_reads(
    active: np.ndarray, order: np.ndarray, bundle_bytes: int, cost: DeviceCostModel, *,
    collapse_gap: int | None = None,
) -> ReadCounts:
    """Runs, collapsed reads, bytes and time of boolean masks (n_tokens, n_ff) stored in `order`.

    order[k] is the original index of the neuron at position k. `collapse_gap`
    defaults to the cost model's best gap for `bundle_bytes`.
    """
    gap_limit = cost.collapse_gap(bundle_bytes) if collapse_gap is None else collapse_gap
    totals = np.zeros(4, dtype=np.int64)
    for start in range(0, active.shape[0], _TOKEN_CHUNK):
        totals += _count_chunk(active[start : start + _TOKEN_CHUNK][:, order], bundle_bytes, cost, gap_limit)
    n_active, runs, reads, read_bytes = map(int, totals)
    return ReadCounts(
        n_tokens=active.shape[0], active=n_active, runs=runs, reads=reads, read_bytes=read_bytes,
        active_bytes=n_active * bundle_bytes, seconds=cost.seconds(reads, read_bytes),
    )


def _count_chunk(placed: np.ndarray, bundle_bytes: int, cost: DeviceCostModel, gap_limit: int) -> np.ndarray:
    n_tokens, n_ff = placed.shape
    padded = np.zeros((n_tokens, n_ff + 2), dtype=np.int8)
    padded[:, 1:-1] = placed
    edges = np.diff(padded, axis=1)
    # row-major nonzero: runs come token by token, left to right; ends are exclusive positions
    run_token, run_start = np.nonzero(edges == 1)
    run_end = np.nonzero(edges == -1)[1]
    gaps = run_start[1:] - run_end[:-1]
    same_token = run_token[1:] == run_token[:-1]
    # a read ends after run k unless the next run is in the same token within the gap limit
    merged = same_token & (gaps <= gap_limit)
    read_first = np.concatenate(([True], ~merged))
    read_last = np.concatenate((~merged, [True]))
    read_start = run_start[read_first].astype(np.int64) * bundle_bytes
    read_end = run_end[read_last].astype(np.int64) * bundle_bytes
    a = cost.alignment
    read_bytes = int((-(-read_end // a) * a - (read_start // a) * a).sum())
    return np.array([placed.sum(), len(run_start), read_first.sum(), read_bytes], dtype=np.int64)


def dense_reads(n_ff: int, bundle_bytes: Sequence[int], n_tokens: int, cost: DeviceCostModel) -> ReadCounts:
    """Reading every layer whole, once per token: the reference a placement has to beat."""
    a = cost.alignment
    layer_bytes = sum(-(-n_ff * b // a) * a for b in bundle_bytes)
    reads = len(bundle_bytes) * n_tokens
    return ReadCounts(n_tokens=n_tokens, reads=reads, read_bytes=layer_bytes * n_tokens,
                      seconds=cost.seconds(reads, layer_bytes * n_tokens))


def quality_table(totals: dict[str, ReadCounts], baseline: str | None = "neuralink") -> str:
    """A plain-text table of per-token read statistics, one row per method."""
    header = (f"{'method':<12} {'runs/tok':>9} {'run len':>8} {'reads/tok':>10} {'KiB/tok':>9} "
              f"{'I/O ms/tok':>11} {'eff GB/s':>9} {'time vs ' + (baseline or '-'):>16}")
    lines = [header, "-" * len(header)]
    reference = totals.get(baseline) if baseline else None
    for name, c in totals.items():
        ratio = f"{c.seconds / reference.seconds:.3f}x" if reference and reference.seconds else "-"
        runs = f"{c.per_token(c.runs):9.1f}" if c.runs else f"{'-':>9}"
        run_length = f"{c.mean_run_length:8.3f}" if c.runs else f"{'-':>8}"
        bandwidth = f"{c.effective_bandwidth / 1e9:9.3f}" if c.active else f"{'-':>9}"
        lines.append(
            f"{name:<12} {runs} {run_length} {c.per_token(c.reads):10.1f} {c.per_token(c.read_bytes) / 1024:9.1f} "
            f"{c.per_token(c.seconds) * 1e3:11.3f} {bandwidth} {ratio:>16}"
        )
    return "\n".join(lines)
