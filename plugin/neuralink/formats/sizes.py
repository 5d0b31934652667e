"""Sizes as people write them ("120MB", "1.5GiB", "512M", "4096"), and as neuralink prints them.

One rule for every front end, defined in the engine (neuralink/sizes.h) and
read here through the bindings, so that neuralink-run and the Python package
agree: K, M, G and KiB, MiB, GiB are binary (1024^n); kB, MB, GB are
decimal (1000^n); units are case-insensitive; B or none means bytes.
"""

from __future__ import annotations

from neuralink import _engine
from neuralink.errors import SizeError

KiB, MiB = 1 << 10, 1 << 20
# for --help texts
SIZE_HELP = "SIZE is bytes or a number with a unit: 4096, 64K, 1.5GiB, 120MB (K/M/G and KiB/MiB/GiB binary, kB/MB/GB decimal)"


def parse_size(value: str | int, what: str = "size") -> int:
    """Bytes in `value` (an int, or text as the module doc says); SizeError "cannot read <what> ..." otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SizeError(f"cannot read {what} {value!r}: expected a number of bytes or text such as 120MB")
    if isinstance(value, int):
        if value <= 0:
            raise SizeError(f"cannot read {what} {value}: it must be positive")
        return value
    try:
        return _engine.parse_size(value, what)
    except ValueError as e:
        raise SizeError(str(e)) from None


def format_size(n_bytes: int) -> str:
    """4096 -> "4 KiB", 1048576 -> "1 MiB"."""
    for unit, scale in (("MiB", MiB), ("KiB", KiB)):
        if n_bytes >= scale and n_bytes % scale == 0:
            return f"{n_bytes // scale} {unit}"
    return f"{n_bytes} B"
