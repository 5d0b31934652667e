#!/usr/bin/env python3
"""Convert a GGUF model for neuralink in one command.

    python scripts/convert_gguf.py MODEL.gguf --calibration TEXT.txt [-o OUT.gguf]
    python scripts/convert_gguf.py MODEL.gguf --placement PLACEMENT.npz

With --calibration, profiles the model on the text, places its neurons and
converts it; with --placement, converts with a placement made earlier by
`neuralink place`. Writes MODEL.neuralink.gguf (runs in stock llama.cpp) and
MODEL.neuralink.sidecar (the bundle store neuralink reads from flash).
Same options as `neuralink convert --help`; -v logs progress details.
See docs/convert.md. Needs the environment of `bash scripts/setup.sh`.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    try:
        from neuralink.cli import main as neuralink_main
    except ImportError as e:
        print(f"convert_gguf.py: cannot import neuralink ({e}); run `bash scripts/setup.sh` and use "
              ".venv/bin/python", file=sys.stderr)
        return 1
    if argv[:1] in (["-h"], ["--help"]) or not argv:
        print(__doc__.strip())
        return 0 if argv else 2
    # the dispatcher's own flags go before the subcommand
    verbose = [a for a in argv if a in ("-v", "--verbose")]
    rest = [a for a in argv if a not in ("-v", "--verbose")]
    return neuralink_main([*verbose, "convert", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
