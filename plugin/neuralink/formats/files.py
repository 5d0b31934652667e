"""Atomic file output: write under a temporary name beside the target, rename into place on success.

Every file neuralink writes goes through here, so an error, Ctrl-C or a full
disk never leaves a half-written output under the name a user asked for.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """A unique hidden name beside `path`: ``.<name>.<pid>.<random>.tmp`` (same file system, so rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to `path` when the block succeeds, remove it when it raises."""
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_gguf(path: str | os.PathLike[str], arch: str, **options: object) -> Iterator[gguf.GGUFWriter]:
    """A gguf-py writer on a temporary file that becomes `path` when the block succeeds (the block writes
    header, metadata and tensors); the writer is closed either way."""
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch, **options)
        try:
            yield writer
        finally:
            writer.close()


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write `arrays` as an uncompressed .npz at `path`, atomically; returns `path`."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) at `path`, atomically; returns `path`."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


__all__ = ["atomic_gguf", "atomic_output", "save_npz", "temporary_path", "write_text"]
