"""``neuralink place`` and ``neuralink plot``: the command line of the place stage."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from neuralink.command import Command, non_negative_int, positive_float, positive_int
from neuralink.errors import PlacementError
from neuralink.formats.coactivation import CoactivationStats
from neuralink.formats.files import check_output_path
from neuralink.place import orders, plot
from neuralink.place.orders import (
    DEFAULT_METHOD,
    METHODS,
    build_placement,
    check_model_matches,
    place_layers,
    sidecar_bundle_bytes,
)
from neuralink.place.plot import DEFAULT_NEURONS, PLOT_METHODS, plot_coactivation
from neuralink.place.read_cost import ReadCounts, dense_reads, quality_table
from neuralink.place.timing import DEFAULT_TIMING_BUNDLE_BYTES, time_methods, timing_table
from neuralink.runtime.default_model import default_model_path
from neuralink.runtime.device_profile import DeviceCostModel


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stats", nargs="?", type=Path, metavar="STATS",
                        help="calibration co-activation stats (from `neuralink profile`)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="placement file to write (.npz)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                        help=f"placement written to --output (default: {DEFAULT_METHOD})")
    parser.add_argument("--model", type=Path, default=None,
                        help="the profiled GGUF, for its identity and bundle sizes (default: SmolLM2-135M)")
    parser.add_argument("--evaluate", type=Path, default=None, metavar="HELDOUT_STATS",
                        help="print a quality table on held-out stats profiled with --thresholds-from STATS")
    parser.add_argument("--compare", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                        help=f"methods in the quality table or timing (default: all of {', '.join(METHODS)})")
    parser.add_argument("--per-layer", action="store_true", help="also print the quality table of every layer")
    parser.add_argument("--workers", type=positive_int, default=min(2, os.cpu_count() or 1),
                        help="layers placed in parallel, one process each (default: 2)")
    cost = parser.add_argument_group("cost model (--evaluate, and the hotcold method)")
    cost.add_argument("--read-latency-us", type=positive_float, default=DeviceCostModel.read_latency_s * 1e6,
                      help="time of one read besides its transfer, microseconds "
                           f"(default: {DeviceCostModel.read_latency_s * 1e6:g}, UFS at QD1)")
    cost.add_argument("--bandwidth-gbps", type=positive_float, default=DeviceCostModel.bandwidth_bytes_per_s / 1e9,
                      help=f"sequential read bandwidth, GB/s (default: {DeviceCostModel.bandwidth_bytes_per_s / 1e9:g})")
    cost.add_argument("--alignment", type=positive_int, default=DeviceCostModel.alignment,
                      help=f"direct-I/O block: reads cover whole blocks (default: {DeviceCostModel.alignment}; 1 for none)")
    cost.add_argument("--bundle-bytes", type=positive_int, default=None,
                      help="bytes per neuron bundle in every layer (default: the bundle store `neuralink convert` "
                           "writes for --model; 6912, a 7B-class Q4_0 bundle, for --timing-layer)")
    timing = parser.add_argument_group("timing benchmark")
    timing.add_argument("--timing-layer", type=positive_int, default=None, metavar="N_FF",
                        help="time the --compare methods on a synthetic layer of N_FF neurons and exit")
    timing.add_argument("--timing-tokens", type=positive_int, default=8192, help="tokens of that layer (default: 8192)")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown
    cost = DeviceCostModel(args.read_latency_us * 1e-6, args.bandwidth_gbps * 1e9, args.alignment)
    if args.timing_layer is not None:
        bundle = args.bundle_bytes or DEFAULT_TIMING_BUNDLE_BYTES
        print(timing_table(time_methods(args.timing_layer, args.timing_tokens, args.compare, bundle_bytes=bundle,
                                        cost=cost)))
        return 0
    if args.stats is None or (args.output is None and args.evaluate is None):
        raise PlacementError("give STATS and --output and/or --evaluate (or --timing-layer N_FF)")
    model = args.model or default_model_path()
    output = check_output_path(args.output, {"model": model, "stats file": args.stats,
                                             "held-out stats file": args.evaluate}) if args.output is not None else None
    stats = CoactivationStats.load(args.stats, with_masks=False)
    check_model_matches(stats, model, str(args.stats))
    if args.bundle_bytes:
        bundle_bytes = [args.bundle_bytes] * stats.n_layer
    else:
        bundle_bytes = sidecar_bundle_bytes(model, stats.criterion)
    methods = list(dict.fromkeys(([args.method] if output else []) + (args.compare if args.evaluate else [])))

    with tqdm(total=stats.n_layer, unit="layer", desc="place", file=sys.stderr, disable=None) as bar:
        results = place_layers(args.stats, methods, bundle_bytes=bundle_bytes, heldout=args.evaluate, cost=cost,
                               workers=args.workers, progress=lambda done, _total: bar.update(done - bar.n))
    if output is not None:
        build_placement(stats, results, args.method).save(output)
        seconds = sum(r.seconds[args.method] for r in results)
        print(f"{output}: {args.method} placement of {stats.n_layer} layers x {stats.n_ff} neurons "
              f"({seconds:.1f} s of ordering)")
    if args.evaluate is not None:
        heldout = CoactivationStats.load(args.evaluate, with_masks=False)
        gaps = sorted({cost.collapse_gap(b) for b in bundle_bytes})
        print(f"held-out: {heldout.n_tokens} tokens of {', '.join(heldout.sources)}; calibration: "
              f"{stats.n_tokens} tokens of {', '.join(stats.sources)}; {stats.criterion} on {stats.activation}, "
              f"active fraction {heldout.densities().mean():.3f}")
        print(f"cost model: {cost.read_latency_s * 1e6:g} us/read, {cost.bandwidth_bytes_per_s / 1e9:g} GB/s, "
              f"{cost.alignment} B alignment; bundles {sorted(set(bundle_bytes))} B; collapse gap {gaps} neurons")
        totals: dict[str, ReadCounts] = {}
        for method in args.compare:
            totals[method] = sum((r.quality[method] for r in results), ReadCounts())
        totals["dense"] = dense_reads(stats.n_ff, bundle_bytes, heldout.n_tokens, cost)
        print(quality_table(totals))
        if args.per_layer:
            for r in results:
                print(f"\nlayer {r.layer}")
                print(quality_table({m: r.quality[m] for m in args.compare}))
    return 0
def configure_plot_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stats", type=Path, metavar="STATS", help="co-activation stats (from `neuralink profile`)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--layer", type=non_negative_int, default=0, help="layer to draw (default: 0)")
    parser.add_argument("--placement", type=Path, default=None, help="placement file (from `neuralink place`)")
    parser.add_argument("--method", choices=PLOT_METHODS, default=DEFAULT_METHOD,
                        help=f"order to compute when no --placement is given (default: {DEFAULT_METHOD}); "
                             "for hotcold, pass its --placement")
    parser.add_argument("--neurons", type=non_negative_int, default=DEFAULT_NEURONS,
                        help=f"stored positions to show, from --first (default: {DEFAULT_NEURONS}; 0 for all)")
    parser.add_argument("--first", type=non_negative_int, default=0, help="first stored position shown (default: 0)")


def plot_main(args: argparse.Namespace) -> int:
    output = check_output_path(args.output, {"stats file": args.stats, "placement file": args.placement})
    path = plot_coactivation(args.stats, output, layer=args.layer, placement=args.placement, method=args.method,
                             neurons=args.neurons or None, first=args.first)
    print(path)
    return 0


PLACE = Command(orders.__doc__, configure_parser, main)
PLOT = Command(plot.__doc__, configure_plot_parser, plot_main)
