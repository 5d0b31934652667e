"""What a ``neuralink`` subcommand is: its help, its arguments and the function it runs.

Each stage's ``cli.py`` defines its subcommands as :class:`Command` values;
``neuralink.cli`` lists them. ``main`` passes the parsed arguments straight to
a plain library function and prints its result; only this layer prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from neuralink.errors import SizeError
from neuralink.formats.sizes import parse_size


@dataclass(frozen=True)
class Command:
    """A subcommand: `doc` (its first line is the summary), `configure_parser(parser)` and `main(args)`."""

    doc: str | None
    configure_parser: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], int]


def add_commands(parser: argparse.ArgumentParser, commands: Mapping[str, Command], *, dest: str,
                 main_attribute: str) -> None:
    """Add `commands` as subcommands of `parser`; each sets `main_attribute` on the parsed arguments."""
    sub = parser.add_subparsers(dest=dest, required=True, metavar=dest.upper())
    for name, command in commands.items():
        doc = (command.doc or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        command.configure_parser(p)
        p.set_defaults(**{main_attribute: command.main})


def size_argument(text: str) -> int:
    """An argparse type: bytes in "4096", "64K", "1MiB", "120MB" (neuralink.formats.sizes)."""
    try:
        return parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(f"not a positive size: {e}") from None
