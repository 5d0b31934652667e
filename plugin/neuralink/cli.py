"""The ``neuralink`` command: a dispatcher over one module per subcommand.

Each subcommand module has a docstring (its help), ``configure_parser(parser)``
and ``main(args)``, which passes the parsed arguments to a plain function.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from neuralink.errors import NeuralinkError

# subcommand -> module implementing it
SUBCOMMANDS: dict[str, str] = {
    "demo": "neuralink.demo",
    "bench": "neuralink.evaluate.bench",
    "profile": "neuralink.profile.activity",
    "place": "neuralink.place.orders",
    "plot": "neuralink.place.plot",
    "convert": "neuralink.convert.conversion",
    "perplexity": "neuralink.evaluate.perplexity",
    "predictor": "neuralink.convert.predictor",
    "device-profile": "neuralink.runtime.device_probe",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuralink",
        description="Run llama.cpp models whose FFN weights stay on flash storage.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.configure_parser(p)
        p.set_defaults(_main=module.main)
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
