"""Files neuralink reads and writes: atomic output, output paths checked up front, content digests.

Every file neuralink writes goes through here: it is written under a
temporary name beside the target and renamed into place on success, so an
error, Ctrl-C or a full disk never leaves a half-written output under the
name a user asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path

import gguf
import numpy as np

from neuralink.errors import ModelFileError, OutputPathError


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


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """SHA-256 of a whole file, hex: the identity of a model file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def conversion_journal(model_path: str | os.PathLike[str]) -> Path:
    """Where a conversion writing `model_path` keeps its commit journal: a hidden file beside it."""
    path = Path(model_path)
    return path.with_name(f".{path.name}.commit")


def commit_pair(renames: list[tuple[Path, Path]], journal: Path) -> None:
    """Rename every (temporary, final) pair so that a kill at any instant leaves the old files or the new ones.

    The journal (written atomically first) lists the renames; `recover_pair`
    completes them after a kill, and every reader of the pair calls it first.
    """
    write_text(journal, json.dumps([[os.fspath(a), os.fspath(b)] for a, b in renames]))
    _fsync_directory(journal.parent)
    recover_pair(journal)


def recover_pair(journal: Path) -> bool:
    """Complete the renames an interrupted `commit_pair` left in `journal`; True when there was one."""
    try:
        renames = json.loads(journal.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        journal.unlink(missing_ok=True)  # unreadable: it was never completely written, so nothing was renamed
        return False
    for tmp, final in renames:
        if os.path.exists(tmp):
            os.replace(tmp, final)
    _fsync_directory(journal.parent)
    journal.unlink(missing_ok=True)
    return True


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries earlier writers of `path` left behind (``.<name>.<pid>.<random>.tmp`` of a
    process that is gone); returns them."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        parts = tmp.name.removeprefix(f".{path.name}.").split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid == os.getpid() or _alive(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_file_magic(path: str | os.PathLike[str], magic: bytes, what: str, kind: str) -> Path:
    """`path` as a Path if it is a readable file starting with `magic`; ModelFileError naming it otherwise (`what`
    the file is for, `kind` the format the magic stands for), before a reader guesses at another format."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such {what}")
    try:
        with open(path, "rb") as f:
            head = f.read(len(magic))
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if head != magic:
        raise ModelFileError(f"{path}: not a {kind} (starts with {head!r}, expected {magic!r})")
    return path


def check_npz_file(path: str | os.PathLike[str], what: str) -> None:
    """check_file_magic for numpy's .npz files (zip archives): a text file had been read as a pickle."""
    check_file_magic(path, b"PK\x03\x04", what, f"{what} (.npz archive)")


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (the same resolved path, or one file under two names)."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def check_not_input(path: str | os.PathLike[str], inputs: Mapping[str, str | os.PathLike[str] | None]) -> None:
    """OutputPathError when the output `path` is one of `inputs` (what each is: its path, None for one not given)."""
    for what, given in inputs.items():
        if given is not None and same_file(path, given):
            raise OutputPathError(f"{path}: is the {what}; an input is never overwritten (choose another output)")


def check_output_path(path: str | os.PathLike[str],
                      inputs: Mapping[str, str | os.PathLike[str] | None] | None = None) -> Path:
    """`path` if a file can be created there and it is none of `inputs` (check_not_input); OutputPathError naming
    what is wrong otherwise."""
    path = Path(path)
    check_not_input(path, inputs or {})
    if path.is_dir():
        raise OutputPathError(f"{path}: is a directory, expected a file name for the output")
    if not path.parent.is_dir():
        raise OutputPathError(f"{path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: directory {path.parent} is not writable")
    return path


__all__ = [
    "OutputPathError", "atomic_gguf", "atomic_output", "check_file_magic", "check_not_input", "check_npz_file",
    "check_output_path", "commit_pair", "conversion_journal", "file_sha256", "recover_pair",
    "remove_stale_temporaries", "same_file", "save_npz", "temporary_path", "write_text",
]
