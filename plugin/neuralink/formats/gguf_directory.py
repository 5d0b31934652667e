"""The directory of a GGUF file: header, metadata and where each tensor's bytes lie.

A lean, bounds-checked reader for what conversion and the sidecar need, with
byte spans of every metadata entry (so a converted GGUF can copy them
verbatim) and precise errors for truncated or corrupt files. Tensor data is
never read; string arrays (vocabularies) are skipped, not decoded, which
makes this ~20x faster than ``gguf.GGUFReader`` on a 50k-token vocabulary
(the walk over a string array is the engine's C++).
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType
from gguf import GGMLQuantizationType as QType

from neuralink import _engine
from neuralink.errors import ModelFileError

SUPPORTED_GGUF_VERSIONS = (2, 3)
_ALIGNMENT_KEY = "general.alignment"
_MAX_DIMS = 4  # GGML_MAX_DIMS

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY_TYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class MetadataEntry:
    """One key/value pair. `value` is a Python scalar or str, a numpy array for
    numeric arrays, or None for arrays of strings and of arrays (skipped)."""

    key: str
    type: GGUFValueType
    value: Any
    start: int  # byte span [start, end) of the whole entry, key included
    end: int


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's data lies. `shape` is in ggml order (ne0 first: row length)."""

    name: str
    type: QType
    shape: tuple[int, ...]
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows


@dataclass(frozen=True)
class GgufDirectory:
    """Header, metadata and tensor directory of one GGUF file."""

    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int
    metadata: dict[str, MetadataEntry]
    tensors: dict[str, TensorEntry]  # in file order

    def get(self, key: str, default: Any = None) -> Any:
        entry = self.metadata.get(key)
        return default if entry is None else entry.value

    def require(self, key: str, expected: type | tuple[type, ...]) -> Any:
        """The value of `key`; ModelFileError naming the file if absent or of another kind."""
        entry = self.metadata.get(key)
        if entry is None:
            raise ModelFileError(f"{self.path}: metadata key '{key}' is missing")
        if not isinstance(entry.value, expected) or (expected is int and isinstance(entry.value, bool)):
            raise ModelFileError(f"{self.path}: metadata key '{key}' has type {entry.type.name}")
        return entry.value

    @property
    def architecture(self) -> str:
        return self.require("general.architecture", str)


class _Cursor:
    def __init__(self, path: Path, buf: mmap.mmap | bytes) -> None:
        self.path, self.buf, self.pos = path, buf, 0

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise ModelFileError(
                f"{self.path}: truncated or corrupt GGUF: {what} at offset {start} needs {n} bytes, "
                f"the file has {len(self.buf)}"
            )
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"{self.path}: {what} at offset {start} is not UTF-8") from None

    def skip_string(self, what: str) -> None:
        self.take(self.unpack("<Q", f"length of {what}"), what)

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.unpack("<I", what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise ModelFileError(f"{self.path}: {what} at offset {self.pos - 4} is unknown type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype], what)
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        item_type = self.value_type(f"item type of {what}")
        count = self.unpack("<Q", f"length of {what}")
        if item_type in _NUMPY_TYPES:
            dtype = np.dtype(_NUMPY_TYPES[item_type])
            start = self.take(count * dtype.itemsize, what)
            return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).copy()
        if item_type == GGUFValueType.STRING:
            # a vocabulary's 152k strings: walked in C++ (0.3 s in Python); walked here again only to say
            # which string is truncated where
            end = _engine.gguf_strings_end(self.buf, self.pos, count)
            if end <= len(self.buf):
                self.pos = end
                return None
        for i in range(count):  # strings or nested arrays: walk over them without decoding
            if item_type == GGUFValueType.STRING:
                self.skip_string(f"{what}[{i}]")
            else:
                self.value(item_type, f"{what}[{i}]")
        return None


def _tensor_nbytes(path: Path, name: str, qtype: QType, shape: tuple[int, ...]) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[0] % block:
        raise ModelFileError(
            f"{path}: tensor '{name}' rows of {shape[0]} values do not fit {qtype.name} blocks of {block}"
        )
    return shape[0] // block * type_size * int(np.prod(shape[1:], dtype=np.int64))


def read_gguf_directory(path: str | os.PathLike[str]) -> GgufDirectory:
    """Parse a GGUF file's header, metadata and tensor directory without reading tensor data.

    Raises ModelFileError naming the file for a missing file, bad magic or
    version, truncated or corrupt header, misaligned tensor offsets, or tensor
    data extending past the end of the file.

    The last few directories parsed are kept, keyed by the file's identity
    and modification times: loading a converted model reads the same two
    files' directories four times. A file modified in the last few seconds
    is parsed again every time (file times tick in jiffies: two writes of the
    same size could share one). Treat the result as read-only.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied") from None
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _SETTLED_NS:
        return _read_directory.__wrapped__(path, ())
    return _read_directory(path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


# how long after its last change a file's directory may be kept
_SETTLED_NS = 5_000_000_000


@functools.lru_cache(maxsize=8)
def _read_directory(path: Path, identity: tuple[int, ...]) -> GgufDirectory:
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 24:
                raise ModelFileError(f"{path}: not a GGUF file ({file_size} bytes, shorter than a GGUF header)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, file_size)
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, not a GGUF file") from None
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied") from None


def _parse(path: Path, buf: mmap.mmap, file_size: int) -> GgufDirectory:
    cur = _Cursor(path, buf)
    magic = cur.unpack("<I", "magic")
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    version = cur.unpack("<I", "version")
    if version not in SUPPORTED_GGUF_VERSIONS:
        hint = " (big-endian files are not supported)" if version & 0xFFFF == 0 else ""
        raise ModelFileError(f"{path}: GGUF version {version} is not supported{hint}")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    # every entry takes at least 12 bytes: refuse absurd counts before looping over them
    if (n_tensors + n_kv) * 12 > file_size:
        raise ModelFileError(f"{path}: corrupt GGUF header ({n_kv} metadata entries, {n_tensors} tensors)")

    metadata: dict[str, MetadataEntry] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string("metadata key")
        vtype = cur.value_type(f"type of '{key}'")
        value = cur.value(vtype, f"value of '{key}'")
        if key in metadata:
            raise ModelFileError(f"{path}: metadata key '{key}' appears twice")
        metadata[key] = MetadataEntry(key, vtype, value, start, cur.pos)

    alignment = GGUF_DEFAULT_ALIGNMENT
    if _ALIGNMENT_KEY in metadata:
        entry = metadata[_ALIGNMENT_KEY]
        if entry.type != GGUFValueType.UINT32 or entry.value == 0 or entry.value & (entry.value - 1):
            raise ModelFileError(f"{path}: {_ALIGNMENT_KEY} must be a power of two (uint32), got {entry.value!r}")
        alignment = entry.value

    infos: list[tuple[str, QType, tuple[int, ...], int]] = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        n_dims = cur.unpack("<I", f"dimension count of '{name}'")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelFileError(f"{path}: tensor '{name}' has {n_dims} dimensions")
        shape = tuple(cur.unpack("<Q", f"shape of '{name}'") for _ in range(n_dims))
        raw_type = cur.unpack("<I", f"type of '{name}'")
        try:
            qtype = QType(raw_type)
        except ValueError:
            raise ModelFileError(f"{path}: tensor '{name}' has unknown ggml type {raw_type}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise ModelFileError(f"{path}: tensor '{name}' has ggml type {qtype.name}, which has no layout")
        infos.append((name, qtype, shape, cur.unpack("<Q", f"offset of '{name}'")))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorEntry] = {}
    for name, qtype, shape, relative in infos:
        if name in tensors:
            raise ModelFileError(f"{path}: tensor '{name}' appears twice")
        if relative % alignment:
            raise ModelFileError(f"{path}: tensor '{name}' data offset {relative} is not a multiple of {alignment}")
        nbytes = _tensor_nbytes(path, name, qtype, shape)
        offset = data_offset + relative
        if offset + nbytes > file_size:
            raise ModelFileError(
                f"{path}: tensor '{name}' data [{offset}, {offset + nbytes}) lies beyond the end of the file "
                f"({file_size} bytes): truncated file?"
            )
        tensors[name] = TensorEntry(name, qtype, shape, offset, nbytes)
    return GgufDirectory(path, version, file_size, alignment, data_offset, metadata, tensors)
