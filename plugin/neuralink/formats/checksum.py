"""The sidecar's 64-bit checksum (cpp/include/neuralink/checksum.h), computed with numpy.

Four lanes over little-endian 64-bit words, v[i % 4] = rotl(v + w_i * P2, 31) * P1
(the xxHash64 construction), a partial last word zero-padded, then the lanes
merged, the length mixed in and the result avalanched. `records_checksums`
hashes every row of a (n, nbytes) uint8 array at once.
"""

from __future__ import annotations

import numpy as np

_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P5 = np.uint64(0x27D4EB2F165667C5)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def records_checksums(records: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint64 [n]: the checksum of each row of `records` (uint8, shape (n, nbytes))."""
    records = np.ascontiguousarray(records, dtype=np.uint8)
    n, nbytes = records.shape
    padded = -(-nbytes // 8) * 8
    if padded != nbytes:
        records = np.concatenate([records, np.zeros((n, padded - nbytes), dtype=np.uint8)], axis=1)
    words = records.view("<u8")
    s = np.uint64(seed)
    with np.errstate(over="ignore"):
        lanes = [np.full(n, s + _P1 + _P2, dtype=np.uint64), np.full(n, s + _P2, dtype=np.uint64),
                 np.full(n, s, dtype=np.uint64), np.full(n, s - _P1, dtype=np.uint64)]
        for i in range(words.shape[1]):
            v = lanes[i % 4]
            lanes[i % 4] = _rotl(v + words[:, i] * _P2, 31) * _P1
        h = _rotl(lanes[0], 1) + _rotl(lanes[1], 7) + _rotl(lanes[2], 12) + _rotl(lanes[3], 18)
        h ^= np.uint64(nbytes) * _P5
        h ^= h >> np.uint64(33)
        h *= _P2
        h ^= h >> np.uint64(29)
        h *= _P3
        h ^= h >> np.uint64(32)
    return h


def checksum(data: bytes | np.ndarray, seed: int = 0) -> int:
    """The checksum of one (short) byte string."""
    raw = np.frombuffer(bytes(data), dtype=np.uint8)
    return int(records_checksums(raw.reshape(1, -1), seed)[0])


CHECKSUM_BLOCK = 4096


def block_checksum(data: bytes | np.ndarray) -> int:
    """A long range's checksum: `checksum` of the little-endian array of the checksums of its 4 KiB blocks."""
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else \
        np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    full = raw.size // CHECKSUM_BLOCK
    parts = [records_checksums(raw[: full * CHECKSUM_BLOCK].reshape(full, CHECKSUM_BLOCK))] if full else []
    if raw.size % CHECKSUM_BLOCK:
        parts.append(records_checksums(raw[full * CHECKSUM_BLOCK:].reshape(1, -1)))
    blocks = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    return checksum(blocks.astype("<u8").tobytes())
