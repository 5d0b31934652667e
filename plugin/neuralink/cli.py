"""The ``neuralink`` command: a dispatcher over the subcommands each stage's ``cli.py`` defines.

A subcommand is a :class:`neuralink.command.Command`: its help, its
``configure_parser(parser)`` and its ``main(args)``, which passes the parsed
arguments to a plain library function.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from neuralink import demo
from neuralink.command import Command, add_commands
from neuralink.convert import cli as convert_cli
from neuralink.errors import NeuralinkError
from neuralink.evaluate import cli as evaluate_cli
from neuralink.evaluate.bench import cli as bench_cli
from neuralink.models import cli as models_cli
from neuralink.place import cli as place_cli
from neuralink.profile import cli as profile_cli
from neuralink.runtime import cli as runtime_cli

# the subcommands, in the order of the pipeline they serve
SUBCOMMANDS: dict[str, Command] = {
    "demo": demo.DEMO,
    "serve": runtime_cli.SERVE,
    "fetch": models_cli.FETCH,
    "bench": bench_cli.BENCH,
    "profile": profile_cli.PROFILE,
    "place": place_cli.PLACE,
    "plot": place_cli.PLOT,
    "convert": convert_cli.CONVERT,
    "perplexity": evaluate_cli.PERPLEXITY,
    "predictor": evaluate_cli.PREDICTOR,
    "device-profile": runtime_cli.DEVICE_PROFILE,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuralink",
        description="Run llama.cpp models whose FFN weights stay on flash storage.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    add_commands(parser, SUBCOMMANDS, dest="command", main_attribute="_main")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._main(args) or 0)
    except NeuralinkError as e:
        print(f"neuralink {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"neuralink {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (e.g. `| head`): stop quietly, as Unix tools do, and keep
        # Python's exit-time flush of stdout from failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
