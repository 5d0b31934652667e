#!/usr/bin/env python3
"""Write a code corpus from this Python's own standard library sources, for calibrating and evaluating code models.

    python scripts/stdlib_corpus.py OUT.jsonl --names a-l     # modules whose file name starts with a..l
    python scripts/stdlib_corpus.py OUT.jsonl --names m-z

One JSON line per module ({"text": source}), in sorted file-name order, so the
same Python version gives the same corpus. Calibrate on one range and
evaluate on the other: the two share no file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path


def stdlib_modules(first: str, last: str) -> list[Path]:
    """The top-level .py files of the standard library whose name starts with a letter in first..last."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if first <= p.name[0].lower() <= last)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="the .jsonl file to write")
    parser.add_argument("--names", default="a-l", metavar="X-Y", help="first letters of the modules (default: a-l)")
    args = parser.parse_args()
    first, _, last = args.names.lower().partition("-")
    if len(first) != 1 or len(last) != 1 or not first <= last:
        parser.error(f"--names takes a letter range such as a-l, not {args.names!r}")
    modules = stdlib_modules(first, last)
    if not modules:
        parser.error(f"no standard library module of {sysconfig.get_paths()['stdlib']} starts with {args.names}")
    tmp = args.output.with_name(f".{args.output.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for path in modules:
            out.write(json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")}) + "\n")
    os.replace(tmp, args.output)
    print(f"{args.output}: {len(modules)} modules, {sum(p.stat().st_size for p in modules) / 1e6:.1f} MB",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
