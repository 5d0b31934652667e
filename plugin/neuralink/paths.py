"""Where neuralink keeps what it makes once and reuses: one rule for every cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """$NEURALINK_CACHE/<kind>, default ~/.cache/neuralink/<kind> ($XDG_CACHE_HOME honoured), as scripts/setup.sh."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("NEURALINK_CACHE") or base / "neuralink") / kind


__all__ = ["cache_dir"]
