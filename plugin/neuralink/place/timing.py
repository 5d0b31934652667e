"""Wall time and peak memory of placement on a synthetic layer (``neuralink place --timing-layer``).

Each method runs in a fresh process, so that its peak resident set is its own:
the process builds the layer's bit-packed masks, then the co-activation
counts (masks^T masks), then the order.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuralink.child import run_in_child
from neuralink.formats.coactivation import coactivation_counts, pack_masks
from neuralink.place.orders import order_layer
from neuralink.runtime.device_profile import DEFAULT_COST_MODEL, DeviceCostModel

GROUP_SIZE = 16
# a 7B-class layer's bundle: gate, up and down of n_embd 4096 in Q4_0 (4.5 bits per weight)
DEFAULT_TIMING_BUNDLE_BYTES = 3 * 4096 * 18 // 32
_CHUNK_TOKENS = 1024


def synthetic_layer_masks(n_ff: int, n_tokens: int, *, seed: int = 0) -> np.ndarray:
    """Packed masks (n_tokens, ceil(n_ff / 8)) with planted groups of co-activated neurons.

    Neurons form groups of GROUP_SIZE (at shuffled indices); a group fires in a
    token with its own probability (skewed, mean ~0.1), and then each member
    with probability 0.8; 1 % of neurons fire at random besides.
    """
    rng = np.random.default_rng(seed)
    n_groups = -(-n_ff // GROUP_SIZE)
    group_of = rng.permutation(np.arange(n_ff) // GROUP_SIZE % n_groups)
    group_probability = np.clip(rng.beta(0.5, 4.5, n_groups), 0.001, 0.9)
    packed = np.empty((n_tokens, -(-n_ff // 8)), dtype=np.uint8)
    for start in range(0, n_tokens, _CHUNK_TOKENS):
        rows = min(_CHUNK_TOKENS, n_tokens - start)
        groups = rng.random((rows, n_groups)) < group_probability
        active = (groups[:, group_of] & (rng.random((rows, n_ff)) < 0.8)) | (rng.random((rows, n_ff)) < 0.01)
        packed[start : start + rows] = pack_masks(active)
    return packed


@dataclass(frozen=True)
class PlacementTiming:
    """Costs of placing one layer with one method."""

    method: str
    n_ff: int
    n_tokens: int
    counts_seconds: float  # masks^T masks
    order_seconds: float
    peak_rss_bytes: int  # of the whole process
    input_rss_bytes: int  # peak before placement began (interpreter, numpy, the masks)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _time_one(method: str, n_ff: int, n_tokens: int, seed: int, bundle_bytes: int,
              cost: DeviceCostModel) -> PlacementTiming:
    packed = synthetic_layer_masks(n_ff, n_tokens, seed=seed)
    input_rss = _peak_rss_bytes()
    start = time.perf_counter()
    counts = coactivation_counts(packed, n_ff)
    counted = time.perf_counter()
    order_layer(method, counts, packed, bundle_bytes=bundle_bytes, cost=cost)  # type: ignore[arg-type]
    ordered = time.perf_counter()
    return PlacementTiming(method, n_ff, n_tokens, counted - start, ordered - counted, _peak_rss_bytes(), input_rss)


def time_methods(
    n_ff: int, n_tokens: int, methods: Sequence[str], *, bundle_bytes: int = DEFAULT_TIMING_BUNDLE_BYTES,
    cost: DeviceCostModel = DEFAULT_COST_MODEL, seed: int = 0,
) -> list[PlacementTiming]:
    """Time each method on the same synthetic layer, each in a fresh process."""
    timings = []
    for method in methods:
        timings.append(run_in_child(f"timing placement {method}", _time_one, method, n_ff, n_tokens, seed,
                                    bundle_bytes, cost))
    return timings


def timing_table(timings: Sequence[PlacementTiming]) -> str:
    """A plain-text table of the timings."""
    header = (f"{'method':<12} {'n_ff':>6} {'tokens':>7} {'counts s':>9} {'order s':>8} "
              f"{'peak RSS MiB':>13} {'placement MiB':>14}")
    lines = [header, "-" * len(header)]
    for t in timings:
        lines.append(
            f"{t.method:<12} {t.n_ff:>6} {t.n_tokens:>7} {t.counts_seconds:9.1f} {t.order_seconds:8.1f} "
            f"{t.peak_rss_bytes / 2**20:13.0f} {(t.peak_rss_bytes - t.input_rss_bytes) / 2**20:14.0f}"
        )
    return "\n".join(lines)
