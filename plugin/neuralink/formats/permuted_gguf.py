"""Write a GGUF model with its FFN neurons permuted, everything else kept byte for byte.

The header is rebuilt (tensor offsets move when ffn_down changes type, and
metadata grows), but every original metadata entry is copied as its raw
bytes, every other tensor's data verbatim, and tensors keep their order and
names: llama.cpp refuses a file with extra tensors and ignores unknown keys.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType
from gguf import GGMLQuantizationType as QType

from neuralink import _engine
from neuralink.formats.ffn_tensors import FfnModel, permute_down, permute_rows, permute_vector
from neuralink.formats.ggml_types import ggml_type_name
from neuralink.formats.gguf_directory import TensorEntry


def _pack_string(value: str) -> bytes:
    encoded = value.encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded


def _pack_metadata(key: str, value: str | int) -> bytes:
    if isinstance(value, str):
        return _pack_string(key) + struct.pack("<I", GGUFValueType.STRING) + _pack_string(value)
    return _pack_string(key) + struct.pack("<II", GGUFValueType.UINT32, value)


def _pad_to(f: BinaryIO, alignment: int) -> None:
    f.write(b"\0" * (-f.tell() % alignment))


def write_permuted_gguf(
    model: FfnModel,
    data: np.ndarray,
    orders: Sequence[np.ndarray],
    down_types: Sequence[QType],
    metadata: Mapping[str, str | int],
    path: str | os.PathLike[str],
    progress: Callable[[int], None],
) -> list[float]:
    """Write `model` (mapped as bytes in `data`) to `path` with layer l's neurons in `orders[l]`.

    ffn_down of layer l is stored in `down_types[l]`; `metadata` (strings and
    uint32s) replaces any neuralink.* keys of the source. `progress` gets the
    source bytes of each tensor written. Returns each layer's relative RMS
    error of ffn_down (0.0 where the permutation moved bytes only).
    """
    directory = model.directory
    roles: dict[str, tuple[int, str]] = {}  # tensor name -> (layer, part) for every tensor the permutation touches
    for layer in model.layers:
        for part in ("gate", "up", "down", "gate_bias", "up_bias"):
            tensor: TensorEntry | None = getattr(layer, part)
            if tensor is not None:
                roles[tensor.name] = (layer.il, part)

    def output_type(t: TensorEntry) -> QType:
        role = roles.get(t.name)
        return down_types[role[0]] if role is not None and role[1] == "down" else t.type

    def output_nbytes(t: TensorEntry) -> int:
        qtype = output_type(t)
        return t.nbytes if qtype == t.type else _engine.row_bytes(ggml_type_name(qtype), t.shape[0]) * t.rows

    kept = [entry for key, entry in directory.metadata.items() if not key.startswith("neuralink.")]
    alignment = directory.alignment
    down_errors = [0.0] * model.n_layer
    with open(path, "wb") as f:
        f.write(struct.pack("<IIQQ", GGUF_MAGIC, directory.version, len(directory.tensors), len(kept) + len(metadata)))
        for entry in kept:
            f.write(data[entry.start:entry.end].tobytes())
        for key, value in metadata.items():
            f.write(_pack_metadata(key, value))
        relative = 0
        for t in directory.tensors.values():
            f.write(_pack_string(t.name))
            f.write(struct.pack(f"<I{len(t.shape)}QIQ", len(t.shape), *t.shape, output_type(t), relative))
            relative += -(-output_nbytes(t) // alignment) * alignment
        for t in directory.tensors.values():
            _pad_to(f, alignment)
            role = roles.get(t.name)
            if role is None:
                f.write(data[t.offset:t.offset + t.nbytes])
            else:
                il, part = role
                if part == "down":
                    encoded = permute_down(data, t, orders[il], down_types[il])
                    down_errors[il] = encoded.rel_rms_error
                    f.write(encoded.data)
                elif part in ("gate", "up"):
                    f.write(permute_rows(data, t, orders[il]))
                else:
                    f.write(permute_vector(data, t, orders[il]))
            progress(t.nbytes)
        _pad_to(f, alignment)
    return down_errors
