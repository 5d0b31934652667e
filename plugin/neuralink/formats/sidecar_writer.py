"""Writing a sidecar (docs/sidecar.md): streamed a layer at a time, then sealed with its checksums.

`write_sidecar` writes the whole file under a temporary name; `seal_sidecar`
computes the header and table checksums into it; `patch_runtime` replaces
the runtime thresholds and the quality record of a written (not yet
renamed) sidecar in place and seals it again, so that the conversion's
quality search can run on the very file it then keeps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType

from neuralink import _engine
from neuralink.errors import ModelFileError
from neuralink.formats.bundle_layout import BundleLayout
from neuralink.formats.checksum import checksum, records_checksums
from neuralink.formats.constants import (
    KEY_ACTIVATION,
    KEY_BUNDLE_DOWN_OFFSET,
    KEY_BUNDLE_DOWN_RECORD_BYTES,
    KEY_BUNDLE_DOWN_SOURCE_TYPE,
    KEY_BUNDLE_DOWN_TYPE,
    KEY_BUNDLE_GATE,
    KEY_BUNDLE_GATE_OFFSET,
    KEY_BUNDLE_GATE_TYPE,
    KEY_BUNDLE_LAYOUT,
    KEY_BUNDLE_RECORD_BYTES,
    KEY_BUNDLE_UP_OFFSET,
    KEY_BUNDLE_UP_TYPE,
    KEY_GATED,
    KEY_MODEL_ID,
    KEY_N_EMBD,
    KEY_N_FF,
    KEY_N_LAYER,
    KEY_PLACEMENT_CRITERION,
    KEY_PLACEMENT_METHOD,
    KEY_PLACEMENT_N_TOKENS,
    KEY_PLACEMENT_THRESHOLDS,
    KEY_PREDICTOR_RANK,
    KEY_PREDICTOR_RECALL,
    KEY_PREDICTOR_THRESHOLDS,
    KEY_SIDECAR_VERSION,
    KEY_SOURCE_ARCHITECTURE,
    KEY_SOURCE_SHA256,
    SIDECAR_ALIGNMENT,
    SIDECAR_ARCHITECTURE,
    SIDECAR_BUNDLE_HASH,
    SIDECAR_BUNDLES,
    SIDECAR_CANDIDATE_FREQUENCY,
    SIDECAR_CANDIDATE_SCALE,
    SIDECAR_CHAIN_STARTS,
    SIDECAR_CHECKSUMS,
    SIDECAR_DEFAULT_PREDICTOR,
    SIDECAR_DOWN_COLUMNS,
    SIDECAR_DOWN_ERROR,
    SIDECAR_DOWN_HASH,
    SIDECAR_DOWN_NORM,
    SIDECAR_DOWN_ROW_CHECKSUMS,
    SIDECAR_MODEL_CHECKSUMS,
    SIDECAR_NEURON_FREQUENCY,
    SIDECAR_NEURON_ORDER,
    SIDECAR_PREDICTOR_A,
    SIDECAR_PREDICTOR_B,
    SIDECAR_PREDICTOR_NAME_BYTES,
    SIDECAR_QUALITY,
    SIDECAR_QUALITY_BYTES,
    SIDECAR_RUNTIME_THRESHOLDS,
    ffn_tensor_name,
)
from neuralink.formats.files import atomic_output
from neuralink.formats.gguf_directory import read_gguf_directory
from neuralink.formats.sidecar_records import (
    SidecarHeader,
    SidecarLayer,
    encode_predictor_name,
    encode_quality,
    is_table_tensor,
    validated_predictor,
)

log = logging.getLogger(__name__)

_TYPE_KEYS = {"gate": KEY_BUNDLE_GATE_TYPE, "up": KEY_BUNDLE_UP_TYPE, "down": KEY_BUNDLE_DOWN_TYPE}
_OFFSET_KEYS = {"gate": KEY_BUNDLE_GATE_OFFSET, "up": KEY_BUNDLE_UP_OFFSET, "down": KEY_BUNDLE_DOWN_OFFSET}


def _layout_arrays(layouts: Sequence[BundleLayout]) -> dict[str, list[int]]:
    # per-layer uint32 arrays; a non-gated model has no gate keys at all
    arrays = {KEY_BUNDLE_RECORD_BYTES: [lay.record_bytes for lay in layouts]}
    for part in layouts[0].parts:
        arrays[_TYPE_KEYS[part]] = [int(lay.parts[part].type) for lay in layouts]
        arrays[_OFFSET_KEYS[part]] = [lay.parts[part].offset for lay in layouts]
    if layouts[0].split:
        arrays[KEY_BUNDLE_DOWN_RECORD_BYTES] = [lay.down_record_bytes for lay in layouts]
    return arrays


def _runtime_array(header: SidecarHeader) -> np.ndarray:
    runtime = np.asarray(header.runtime_thresholds, dtype=np.float32).reshape(header.n_layer, 2)
    if not np.all(np.isfinite(runtime)) or np.any(runtime < 0):
        raise ValueError("runtime thresholds must be finite values >= 0")
    return runtime


def _check_layer(il: int, layer: SidecarLayer, header: SidecarHeader, layout: BundleLayout, n_chains: int) -> None:
    n_ff = header.n_ff
    expected = (n_ff, layout.record_bytes)
    if layer.bundles.shape != expected or layer.chain_starts.shape != (n_chains,):
        raise ValueError(f"layer {il}: bundles {layer.bundles.shape} and chain starts {layer.chain_starts.shape}, "
                         f"expected {expected} and ({n_chains},)")
    if layout.split and (layer.down_records is None or layer.down_records.shape != (n_ff, layout.down_record_bytes)):
        raise ValueError(f"layer {il}: the split layout needs down records of shape ({n_ff}, {layout.down_record_bytes})")
    if header.contribution and any(a is None or a.shape != (n_ff,) for a in
                                   (layer.candidate_scale, layer.down_norm, layer.candidate_frequency)):
        raise ValueError(f"layer {il}: the contribution criterion needs candidate scales, down norms and "
                         f"candidate frequencies of {n_ff} neurons")


def write_sidecar(
    path: str | os.PathLike[str],
    header: SidecarHeader,
    layouts: Sequence[BundleLayout],
    down_source_types: Sequence[QType],
    chain_counts: Sequence[int],
    layers: Iterable[SidecarLayer],
    model_checksums: np.ndarray | None = None,
    down_row_checksums: np.ndarray | None = None,
) -> Path:
    """Write and seal a sidecar at `path` through a temporary file and a rename, one layer at a time.

    `layers` is consumed lazily (a generator keeps one layer's records in
    memory at a time) and must yield n_layer layers matching `layouts` and
    `chain_counts`, which fix the file's directory before any data is written.
    """
    path = Path(path)
    with atomic_output(path) as tmp:
        write_unsealed(tmp, header, layouts, down_source_types, chain_counts, layers, model_checksums,
                       down_row_checksums)
        seal_sidecar(tmp)
    log.info("wrote sidecar %s (%d layers, %d neurons each)", path, header.n_layer, header.n_ff)
    return path


def write_unsealed(
    path: Path,
    header: SidecarHeader,
    layouts: Sequence[BundleLayout],
    down_source_types: Sequence[QType],
    chain_counts: Sequence[int],
    layers: Iterable[SidecarLayer],
    model_checksums: np.ndarray | None = None,
    down_row_checksums: np.ndarray | None = None,
) -> None:
    """The sidecar's bytes at `path`, checksums still zero (`seal_sidecar` fills them).

    `model_checksums`: (offset, nbytes, checksum) rows of the converted GGUF's
    header and of every tensor the sidecar does not replace, verified by
    loaders before llama.cpp reads that file. `down_row_checksums`: one such
    row per layer for its `ffn_down`, verified by an engine that reads those
    rows (docs/sidecar.md).
    """
    import gguf  # the writer class; kept here so that readers need no writer

    n_layer, n_ff = header.n_layer, header.n_ff
    if not (len(layouts) == len(down_source_types) == len(chain_counts) == len(header.thresholds) == n_layer):
        raise ValueError(f"sidecar for {n_layer} layers needs one layout, source type, chain count and threshold each")
    if any((lay.gate is not None) != header.bundle_gate for lay in layouts):
        raise ValueError("bundle layouts disagree with header.bundle_gate")
    if any(lay.split != (header.layout == "split") for lay in layouts):
        raise ValueError(f"bundle layouts disagree with the header's layout {header.layout!r}")
    runtime = _runtime_array(header)

    writer = gguf.GGUFWriter(path, SIDECAR_ARCHITECTURE)
    try:
        writer.add_custom_alignment(SIDECAR_ALIGNMENT)
        writer.add_uint32(KEY_SIDECAR_VERSION, header.version)
        writer.add_string(KEY_MODEL_ID, header.model_id)
        writer.add_string(KEY_SOURCE_SHA256, header.source_sha256)
        writer.add_string(KEY_SOURCE_ARCHITECTURE, header.source_architecture)
        writer.add_uint32(KEY_N_LAYER, n_layer)
        writer.add_uint32(KEY_N_EMBD, header.n_embd)
        writer.add_uint32(KEY_N_FF, n_ff)
        writer.add_bool(KEY_GATED, header.gated)
        writer.add_bool(KEY_BUNDLE_GATE, bool(header.bundle_gate))
        writer.add_string(KEY_BUNDLE_LAYOUT, header.layout)
        writer.add_string(KEY_ACTIVATION, header.activation)
        writer.add_string(KEY_PLACEMENT_METHOD, header.placement_method)
        writer.add_string(KEY_PLACEMENT_CRITERION, header.criterion)
        writer.add_uint64(KEY_PLACEMENT_N_TOKENS, header.n_tokens)
        writer.add_key_value(KEY_PLACEMENT_THRESHOLDS, [float(t) for t in header.thresholds],
                             GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
        for key, values in _layout_arrays(layouts).items():
            writer.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT32)
        writer.add_key_value(KEY_BUNDLE_DOWN_SOURCE_TYPE, [int(t) for t in down_source_types],
                             GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT32)
        rank = header.predictor_rank
        if rank:
            if len(header.predictor_thresholds) != n_layer:
                raise ValueError(f"a rank-{rank} predictor needs {n_layer} thresholds")
            writer.add_uint32(KEY_PREDICTOR_RANK, rank)
            writer.add_key_value(KEY_PREDICTOR_THRESHOLDS, [float(t) for t in header.predictor_thresholds],
                                 GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
            writer.add_float32(KEY_PREDICTOR_RECALL, header.predictor_recall)

        i32, f32, i8, i64 = (np.dtype(t) for t in (np.int32, np.float32, np.int8, np.int64))
        for il, (layout, n_chains) in enumerate(zip(layouts, chain_counts)):
            def info(template: str, shape: tuple[int, ...], dtype: np.dtype, il: int = il) -> None:
                writer.add_tensor_info(ffn_tensor_name(template, il), shape, dtype, int(np.prod(shape)) * dtype.itemsize)

            info(SIDECAR_NEURON_ORDER, (n_ff,), i32)
            info(SIDECAR_NEURON_FREQUENCY, (n_ff,), f32)
            info(SIDECAR_CHAIN_STARTS, (n_chains,), i32)
            if header.contribution:
                for template in (SIDECAR_CANDIDATE_FREQUENCY, SIDECAR_CANDIDATE_SCALE, SIDECAR_DOWN_NORM):
                    info(template, (n_ff,), f32)
            info(SIDECAR_BUNDLE_HASH, (n_ff,), i64)
            if layout.split:
                info(SIDECAR_DOWN_HASH, (n_ff,), i64)
            info(SIDECAR_BUNDLES, (n_ff, layout.record_bytes), i8)
            if layout.split:
                info(SIDECAR_DOWN_COLUMNS, (n_ff, layout.down_record_bytes), i8)
            if rank:
                info(SIDECAR_PREDICTOR_A, (rank, header.n_embd), f32)
                info(SIDECAR_PREDICTOR_B, (n_ff, rank), f32)
        writer.add_tensor_info(SIDECAR_DOWN_ERROR, (n_layer,), f32, 4 * n_layer)
        writer.add_tensor_info(SIDECAR_RUNTIME_THRESHOLDS, (n_layer, 2), f32, 8 * n_layer)
        writer.add_tensor_info(SIDECAR_QUALITY, (SIDECAR_QUALITY_BYTES,), i8, SIDECAR_QUALITY_BYTES)
        writer.add_tensor_info(SIDECAR_DEFAULT_PREDICTOR, (SIDECAR_PREDICTOR_NAME_BYTES,), i8,
                               SIDECAR_PREDICTOR_NAME_BYTES)
        if model_checksums is not None:
            model_checksums = np.ascontiguousarray(model_checksums, dtype=np.uint64).view(np.int64)
            if model_checksums.ndim != 2 or model_checksums.shape[1] != 3 or len(model_checksums) == 0:
                raise ValueError("model checksums are (offset, nbytes, checksum) rows")
            writer.add_tensor_info(SIDECAR_MODEL_CHECKSUMS, model_checksums.shape, i64, model_checksums.nbytes)
        if down_row_checksums is not None:
            down_row_checksums = np.ascontiguousarray(down_row_checksums, dtype=np.uint64).view(np.int64)
            if down_row_checksums.shape != (n_layer, 3):
                raise ValueError(f"down row checksums are one (offset, nbytes, checksum) row per layer, {n_layer}")
            writer.add_tensor_info(SIDECAR_DOWN_ROW_CHECKSUMS, down_row_checksums.shape, i64,
                                   down_row_checksums.nbytes)
        writer.add_tensor_info(SIDECAR_CHECKSUMS, (2,), i64, 16)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        down_errors: list[float] = []
        for il, layer in enumerate(layers):
            if il >= n_layer:
                raise ValueError(f"more than n_layer = {n_layer} layers given")
            layout = layouts[il]
            _check_layer(il, layer, header, layout, chain_counts[il])
            write = writer.write_tensor_data
            write(np.ascontiguousarray(layer.order, dtype=np.int32))
            write(np.ascontiguousarray(layer.frequencies, dtype=np.float32))
            write(np.ascontiguousarray(layer.chain_starts, dtype=np.int32))
            if header.contribution:
                for table in (layer.candidate_frequency, layer.candidate_scale, layer.down_norm):
                    write(np.ascontiguousarray(table, dtype=np.float32))
            write(records_checksums(layer.bundles).view(np.int64))
            if layout.split:
                write(records_checksums(layer.down_records).view(np.int64))
            write(np.ascontiguousarray(layer.bundles).view(np.int8))
            if layout.split:
                write(np.ascontiguousarray(layer.down_records).view(np.int8))
            if rank:
                a, b = layer.predictor_a, layer.predictor_b
                if a is None or b is None or a.shape != (rank, header.n_embd) or b.shape != (n_ff, rank):
                    raise ValueError(f"layer {il}: the rank-{rank} predictor needs A ({rank}, {header.n_embd}) "
                                     f"and B ({n_ff}, {rank})")
                write(np.ascontiguousarray(a, dtype=np.float32))
                write(np.ascontiguousarray(b, dtype=np.float32))
            down_errors.append(layer.down_error)
        if len(down_errors) != n_layer:
            raise ValueError(f"{len(down_errors)} layers given, the sidecar declares {n_layer}")
        writer.write_tensor_data(np.asarray(down_errors, dtype=np.float32))
        writer.write_tensor_data(runtime)
        writer.write_tensor_data(encode_quality(header.quality).view(np.int8))
        writer.write_tensor_data(encode_predictor_name(validated_predictor(header.quality)).view(np.int8))
        if model_checksums is not None:
            writer.write_tensor_data(model_checksums)
        if down_row_checksums is not None:
            writer.write_tensor_data(down_row_checksums)
        writer.write_tensor_data(np.zeros(2, dtype=np.int64))
    finally:
        writer.close()


def sidecar_checksums(path: str | os.PathLike[str]) -> tuple[int, int]:
    """The (header, tables) checksums of the sidecar file at `path`, computed from its bytes (by the engine's
    C++ block_checksum64, the definition neuralink.formats.checksum.block_checksum computes with numpy: on
    Qwen2.5-Coder-1.5B's sidecar 0.64 s of every load in numpy, 0.006 s in C++)."""
    directory = read_gguf_directory(path)
    name = os.fspath(path)
    head = _engine.file_block_checksum(name, 0, directory.data_offset)
    tables = [_engine.file_block_checksum(name, t.offset, t.nbytes)
              for tensor_name, t in directory.tensors.items() if is_table_tensor(tensor_name)]
    return head, checksum(np.asarray(tables, dtype="<u8").tobytes())


def _write_tensor(path: Path, name: str, values: np.ndarray) -> None:
    entry = read_gguf_directory(path).tensors.get(name)
    raw = np.ascontiguousarray(values).tobytes()
    if entry is None or entry.nbytes != len(raw):
        raise ModelFileError(f"{path}: has no tensor '{name}' of {len(raw)} bytes to patch")
    with open(path, "r+b") as f:
        f.seek(entry.offset)
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())


def seal_sidecar(path: str | os.PathLike[str]) -> None:
    """Compute the header and table checksums of the sidecar at `path` and write them into it."""
    path = Path(path)
    head, tables = sidecar_checksums(path)
    _write_tensor(path, SIDECAR_CHECKSUMS, np.array([head, tables], dtype="<u8"))


def patch_runtime(path: str | os.PathLike[str], runtime_thresholds: Sequence[tuple[float, float]],
                  quality: dict[str, Any]) -> None:
    """Replace the runtime thresholds, the quality record and the default predictor it validates (else
    "dense") of the sidecar at `path`, then seal it again.

    For a sidecar not yet renamed into place (the conversion's temporary
    file): patching a sidecar in use would change it under a running engine.
    """
    path = Path(path)
    runtime = np.asarray(runtime_thresholds, dtype=np.float32)
    if runtime.ndim != 2 or runtime.shape[1] != 2 or not np.all(np.isfinite(runtime)) or np.any(runtime < 0):
        raise ValueError("runtime thresholds must be (activity, candidate) pairs of finite values >= 0")
    _write_tensor(path, SIDECAR_RUNTIME_THRESHOLDS, runtime)
    _write_tensor(path, SIDECAR_QUALITY, encode_quality(quality))
    _write_tensor(path, SIDECAR_DEFAULT_PREDICTOR, encode_predictor_name(validated_predictor(quality)))
    seal_sidecar(path)


def patch_predictor_thresholds(path: str | os.PathLike[str], thresholds: Sequence[float]) -> None:
    """Replace the low-rank predictor's per-layer thresholds of the sidecar at `path` in place (a float32 array
    of the same length in the header), then seal it again. For the conversion's temporary file, as
    patch_runtime: the contribution criterion's predictor thresholds follow the runtime thresholds the quality
    search chooses after the sidecar is written."""
    path = Path(path)
    values = np.asarray(thresholds, dtype="<f4")
    if values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("predictor thresholds must be finite values >= 0, one per layer")
    entry = read_gguf_directory(path).metadata.get(KEY_PREDICTOR_THRESHOLDS)
    if entry is None or not isinstance(entry.value, np.ndarray) or entry.value.dtype != np.dtype("<f4") \
            or entry.value.size != values.size:
        raise ModelFileError(f"{path}: has no {values.size} float32 predictor thresholds to patch")
    # an array entry ends with its values
    with open(path, "r+b") as f:
        f.seek(entry.end - values.nbytes)
        f.write(values.tobytes())
        f.flush()
        os.fsync(f.fileno())
    seal_sidecar(path)
