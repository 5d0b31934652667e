"""Place each FFN layer's neurons so that those that fire together are stored together.

Reads a co-activation stats file (`neuralink profile`) and orders every layer's
neurons by one of:

  identity     the model's own order
  frequency    by decreasing activation frequency (the paper's Neuralink-S)
  neuralink    the paper's greedy shortest Hamiltonian path under 1 - P(ij)
               (pairs by decreasing co-activation, union-find, degree <= 2);
               chains concatenated by decreasing total activation count
  hotcold      ours: the greedy path cut at its weakest links and the pieces
               ordered hot to cold, the fraction of links cut chosen per layer
               to minimise the cost model's I/O time on the calibration masks
               (0 = the neuralink path, 1 = the frequency order)

Writes the placement (.npz) that `neuralink convert` applies. With --evaluate
HELDOUT_STATS, prints a quality table on text the placement was not built from:
runs per token, mean run length, and reads, bytes and time per token under a
flash cost model with access collapse. --timing-layer N instead times the
methods on a synthetic layer of N neurons (wall time and peak memory).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from neuralink.child import map_in_children
from neuralink.errors import ModelFileError, OptionError, PlacementError
from neuralink.formats.bundle_layout import bundle_has_gate, bundle_layouts
from neuralink.formats.coactivation import CoactivationStats, coactivation_counts, load_layer_masks, unpack_masks
from neuralink.formats.ffn_tensors import inspect_ffn_model
from neuralink.formats.files import file_sha256
from neuralink.formats.placement import Placement
from neuralink.place import linking
from neuralink.place.read_cost import ReadCounts, count_reads
from neuralink.runtime.device_profile import DEFAULT_COST_MODEL, DeviceCostModel

log = logging.getLogger(__name__)

Method = Literal["identity", "frequency", "neuralink", "hotcold"]
METHODS: tuple[Method, ...] = get_args(Method)
DEFAULT_METHOD: Method = "neuralink"
# fractions of the greedy path's links that "hotcold" tries cutting
HOTCOLD_CUT_FRACTIONS = (0.0, 0.125, 0.25, 0.5, 1.0)


def order_layer(
    method: Method, counts: np.ndarray, packed_masks: np.ndarray, *, bundle_bytes: int | None = None,
    cost: DeviceCostModel = DEFAULT_COST_MODEL,
) -> np.ndarray:
    """Neuron order of one layer (order[k] = original index at position k).

    `counts` is the layer's (n_ff, n_ff) co-activation count matrix (diagonal:
    activation counts) over the calibration tokens whose bit-packed masks are
    `packed_masks`; "hotcold" scores its candidates on those masks under
    `cost` with bundles of `bundle_bytes`.
    """
    activation_counts = np.diag(counts).astype(np.float64)
    n_ff = len(activation_counts)
    if method == "identity":
        return np.arange(n_ff, dtype=np.int64)
    if method == "frequency":
        return np.argsort(-activation_counts, kind="stable").astype(np.int64)
    if method not in METHODS:
        raise OptionError(f"unknown placement method {method!r}; expected one of {METHODS}")
    path = linking.concatenate_by_frequency(linking.greedy_chains(counts), activation_counts)
    if method == "neuralink":
        return path
    if bundle_bytes is None:
        raise OptionError("the hotcold placement needs the layer's bundle size for its cost model")
    active = unpack_masks(packed_masks, n_ff)
    candidates = [linking.cut_and_sort(counts, path, fraction) for fraction in HOTCOLD_CUT_FRACTIONS]
    seconds = [count_reads(active, order, bundle_bytes, cost).seconds for order in candidates]
    # the first minimum: on a tie, the fewest cuts
    return candidates[int(np.argmin(seconds))]


@dataclass(frozen=True)
class _LayerTask:
    calibration: str
    heldout: str | None
    layer: int
    n_ff: int
    methods: tuple[Method, ...]
    bundle_bytes: int
    cost: DeviceCostModel


@dataclass
class LayerResult:
    """One layer's orders (and, with held-out masks, their read counts) under each method."""

    layer: int
    orders: dict[Method, np.ndarray]
    chain_starts: dict[Method, np.ndarray]
    seconds: dict[Method, float]
    quality: dict[Method, ReadCounts] = field(default_factory=dict)


def _place_layer(task: _LayerTask) -> LayerResult:
    # one process per layer at a time: the n_ff x n_ff counts are built once and shared by all methods
    packed = load_layer_masks(task.calibration, task.layer)
    counts = coactivation_counts(packed, task.n_ff)
    result = LayerResult(task.layer, {}, {}, {})
    for method in task.methods:
        start = time.perf_counter()
        order = order_layer(method, counts, packed, bundle_bytes=task.bundle_bytes, cost=task.cost)
        result.seconds[method] = time.perf_counter() - start
        result.orders[method] = order
        result.chain_starts[method] = linking.chain_starts_of(counts, order)
    del counts
    if task.heldout is not None:
        active = unpack_masks(load_layer_masks(task.heldout, task.layer), task.n_ff)
        for method in task.methods:
            result.quality[method] = count_reads(active, result.orders[method], task.bundle_bytes, task.cost)
    return result


def place_layers(
    calibration: str | os.PathLike[str],
    methods: Sequence[Method],
    *,
    bundle_bytes: Sequence[int],
    heldout: str | os.PathLike[str] | None = None,
    cost: DeviceCostModel = DEFAULT_COST_MODEL,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> list[LayerResult]:
    """Every layer's order under each of `methods`, layers in parallel over `workers` processes.

    `bundle_bytes` gives each layer's bytes per neuron for the cost model.
    With `heldout` (a stats file profiled with the calibration thresholds), also
    each order's runs, reads and bytes on the held-out masks. `progress` is
    called with (layers done, layers) as layers finish.
    """
    stats = CoactivationStats.load(calibration, with_masks=False)
    if heldout is not None:
        _check_heldout(stats, CoactivationStats.load(heldout, with_masks=False), str(calibration), str(heldout))
    sizes = list(bundle_bytes)
    if len(sizes) != stats.n_layer:
        raise PlacementError(f"{len(sizes)} bundle sizes for {stats.n_layer} layers")
    tasks = [
        _LayerTask(os.fspath(calibration), None if heldout is None else os.fspath(heldout), il, stats.n_ff,
                   tuple(methods), int(sizes[il]), cost)
        for il in range(stats.n_layer)
    ]
    results: list[LayerResult] = []

    def finished(result: LayerResult) -> None:
        results.append(result)
        if progress is not None:
            progress(len(results), len(tasks))

    if workers <= 1:
        for task in tasks:
            finished(_place_layer(task))
    else:
        # one child per layer (spawned: the parent may hold llama.cpp threads); a dying one is named
        for result in map_in_children("placing a layer", _place_layer, tasks, workers):
            finished(result)
    return sorted(results, key=lambda r: r.layer)


def _check_heldout(calibration: CoactivationStats, heldout: CoactivationStats, cal_path: str, eval_path: str) -> None:
    if heldout.model_sha256 != calibration.model_sha256:
        raise PlacementError(f"{eval_path} was profiled on another model than {cal_path}")
    if (heldout.n_layer, heldout.n_ff, heldout.criterion, heldout.activation) != (
        calibration.n_layer, calibration.n_ff, calibration.criterion, calibration.activation
    ):
        raise PlacementError(f"{eval_path} and {cal_path} differ in layers, neurons or criterion")
    if not np.array_equal(heldout.thresholds, calibration.thresholds):
        raise PlacementError(
            f"{eval_path} was not profiled with the thresholds of {cal_path}: "
            f"run `neuralink profile ... --thresholds-from {cal_path}`"
        )


def build_placement(stats: CoactivationStats, results: Sequence[LayerResult], method: Method) -> Placement:
    """The Placement of `method` from per-layer results, with the profile it came from."""
    ordered = sorted(results, key=lambda r: r.layer)
    if [r.layer for r in ordered] != list(range(stats.n_layer)):
        raise PlacementError(f"results cover layers {[r.layer for r in ordered]}, not all {stats.n_layer}")
    return Placement(
        method=method,
        orders=[r.orders[method].astype(np.int32) for r in ordered],
        chain_starts=[r.chain_starts[method].astype(np.int32) for r in ordered],
        frequencies=[stats.frequencies(r.layer).astype(np.float32) for r in ordered],
        thresholds=np.asarray(stats.thresholds, dtype=np.float32),
        criterion=stats.criterion,
        n_tokens=stats.n_tokens,
        model_sha256=stats.model_sha256,
        selection=stats.selection,
    )


def place(
    calibration: str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    method: Method = DEFAULT_METHOD,
    cost: DeviceCostModel = DEFAULT_COST_MODEL,
    bundle_bytes: Sequence[int] | None = None,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> Placement:
    """The `method` placement of every layer of `model` from its calibration stats file.

    Refuses (ModelFileError) a model other than the one profiled. Bundle sizes
    (for "hotcold") default to those of the bundle store `neuralink convert` writes.
    """
    stats = CoactivationStats.load(calibration, with_masks=False)
    check_model_matches(stats, model, str(calibration))
    sizes = bundle_bytes if bundle_bytes is not None else sidecar_bundle_bytes(model, stats.criterion)
    results = place_layers(calibration, [method], bundle_bytes=sizes, cost=cost, workers=workers, progress=progress)
    return build_placement(stats, results, method)


def sidecar_bundle_bytes(model: str | os.PathLike[str], criterion: str) -> list[int]:
    """Bytes per neuron of each layer's bundle as `neuralink convert` stores it by default for `criterion`.

    Gate-only criteria leave gate rows out of the records: the gate predictor keeps them resident.
    """
    ffn = inspect_ffn_model(model)
    return [layout.record_bytes for layout in bundle_layouts(ffn, gate=bundle_has_gate(ffn, "auto", criterion))]


def check_model_matches(stats: CoactivationStats, model: str | os.PathLike[str], where: str) -> None:
    """ModelFileError unless `model` is the file the stats were profiled on."""
    if not Path(model).is_file():
        raise ModelFileError(f"{model}: no such model file")
    if file_sha256(model) != stats.model_sha256:
        raise ModelFileError(f"{model}: not the model {where} was profiled on ({stats.model_name})")


