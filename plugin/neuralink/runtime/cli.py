"""``neuralink device-profile``: the command line of the storage probe (neuralink.runtime.device_probe)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from neuralink.command import Command, size_argument
from neuralink.formats.files import check_output_path
from neuralink.runtime import device_probe
from neuralink.runtime.device_probe import (
    DEFAULT_PROBE_BYTES,
    DEFAULT_SECONDS_PER_POINT,
    cost_table,
    describe_measurement,
    grid_table,
    load_or_measure,
    write_outputs,
)
from neuralink.runtime.device_profile import DEFAULT_DEPTHS, DEFAULT_SIZES


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", type=Path, default=Path("."), metavar="PATH",
                        help="a file or directory on the storage to profile, e.g. a model's sidecar (default: .)")
    parser.add_argument("--remeasure", action="store_true", help="measure even if the device has a cached profile")
    parser.add_argument("--sizes", nargs="+", type=size_argument, default=list(DEFAULT_SIZES), metavar="SIZE",
                        help="read sizes, multiples of 4K; K/M/G and KiB/MiB/GiB are binary, kB/MB/GB decimal "
                             "(default: 4K 8K ... 4M)")
    parser.add_argument("--depths", nargs="+", type=int, default=list(DEFAULT_DEPTHS), metavar="N",
                        help="queue depths: reads in flight (default: 1 2 4 8 16 32)")
    parser.add_argument("--seconds-per-point", type=float, default=DEFAULT_SECONDS_PER_POINT, metavar="S",
                        help=f"time spent on each (size, depth) (default: {DEFAULT_SECONDS_PER_POINT:g})")
    parser.add_argument("--probe-bytes", type=size_argument, default=DEFAULT_PROBE_BYTES, metavar="SIZE",
                        help="size of the temporary probe file written when PATH is a directory or a smaller "
                             "file (default: 256M)")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="where profiles are cached per device (default: ~/.cache/neuralink/devices)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the profile here (JSON)")
    parser.add_argument("--png", type=Path, default=None, metavar="OUT",
                        help="draw bandwidth and IOPS against read size here (PNG)")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown

    json_path = check_output_path(args.json) if args.json is not None else None
    png_path = check_output_path(args.png) if args.png is not None else None
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # created on the first run only: a cached profile shows no bar
            bar = tqdm(total=total, unit="run", desc="device-profile", file=sys.stderr, disable=None)
        bar.update(done - bar.n)

    try:
        profile = load_or_measure(args.path, cache_dir=args.cache_dir, remeasure=args.remeasure, sizes=args.sizes,
                                  depths=args.depths, seconds_per_point=args.seconds_per_point,
                                  probe_bytes=args.probe_bytes, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    write_outputs(profile, json_path, png_path)
    print(describe_measurement(profile))
    print(f"\nIOPS and bandwidth of random reads\n\n{grid_table(profile)}")
    print(f"\nread cost model and access collapse (merge runs whose gap is at most the collapse gap)\n\n"
          f"{cost_table(profile)}")
    for path in (json_path, png_path):
        if path is not None:
            print(f"wrote {path}")
    return 0


DEVICE_PROFILE = Command(device_probe.__doc__, configure_parser, main)
