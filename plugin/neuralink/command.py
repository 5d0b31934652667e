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


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {value}")
    return value


def fraction_argument(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value
