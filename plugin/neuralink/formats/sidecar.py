"""The sidecar: a converted model's neuron placement and its bundle store (docs/sidecar.md).

A GGUF container (general.architecture ``neuralink_sidecar``, general.alignment
4096) holding, per layer, the neuron order, frequencies and chain starts, and
the bundle store: n_ff equal-size records in placed order, record k being
[gate row | up row | down column] of the neuron stored at position k (or, in
the split layout, [gate | up] records and a second region of down columns).
A run of consecutive positions is one contiguous byte range, so one
direct-I/O read of its 4 KiB-aligned superset fetches it. Every record, the
header and the tables carry checksums, verified when the sidecar is opened
(`Sidecar.open`; records with `verify_records`) and by the engine on every read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from neuralink.errors import ModelFileError
from neuralink.formats.bundle_layout import BundleLayout, BundlePart, ByteRange, NeuronWeights
from neuralink.formats.checksum import records_checksums
from neuralink.formats.constants import (
    DEFAULT_PREDICTORS,
    KEY_ACTIVATION,
    KEY_BUNDLE_DOWN_OFFSET,
    KEY_BUNDLE_DOWN_SOURCE_TYPE,
    KEY_BUNDLE_DOWN_TYPE,
    KEY_BUNDLE_GATE,
    KEY_BUNDLE_GATE_OFFSET,
    KEY_BUNDLE_GATE_TYPE,
    KEY_BUNDLE_LAYOUT,
    KEY_BUNDLE_DOWN_RECORD_BYTES,
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
    SIDECAR_DOWN_COLUMNS,
    SIDECAR_DOWN_ERROR,
    SIDECAR_DOWN_HASH,
    SIDECAR_DOWN_NORM,
    SIDECAR_NEURON_FREQUENCY,
    SIDECAR_NEURON_ORDER,
    SIDECAR_PREDICTOR_A,
    SIDECAR_PREDICTOR_B,
    SIDECAR_DEFAULT_PREDICTOR,
    SIDECAR_PREDICTOR_NAME_BYTES,
    SIDECAR_QUALITY,
    SIDECAR_QUALITY_BYTES,
    SIDECAR_RUNTIME_THRESHOLDS,
    SIDECAR_VERSION,
    ffn_tensor_name,
)
from neuralink.formats.ffn_tensors import ACTIVATIONS
from neuralink.formats.gguf_directory import GgufDirectory, TensorEntry, read_gguf_directory
from neuralink.formats.sidecar_records import SidecarHeader, SidecarLayer, decode_quality, sidecar_model_id
from neuralink.formats.sidecar_writer import sidecar_checksums, write_sidecar

log = logging.getLogger(__name__)


class Sidecar:
    """A sidecar file, mapped read-only. Open with :meth:`Sidecar.open`."""

    def __init__(self, path: Path, header: SidecarHeader, layouts: tuple[BundleLayout, ...],
                 down_source_types: tuple[QType, ...], directory: GgufDirectory) -> None:
        self.path = path
        self.header = header
        self.layouts = layouts
        self.down_source_types = down_source_types
        self._tensors = directory.tensors
        self._data: np.memmap | None = np.memmap(path, dtype=np.uint8, mode="r")

    @classmethod
    def open(cls, path: str | os.PathLike[str], model_path: str | os.PathLike[str] | None = None) -> Sidecar:
        """Validate and map a sidecar; with `model_path`, also check it belongs to that converted GGUF.

        Checked before anything else is used: container, version, alignment,
        the header and table checksums, per-layer layouts, tensor shapes, the
        range of every threshold and table, and the model id recomputed from
        the contents. Raises ModelFileError naming the file (and both files
        for a mismatched pair).
        """
        path = Path(path)
        directory = read_gguf_directory(path)
        header, layouts, down_source_types = _read_header(directory)
        _check_tensors(directory, header, layouts)
        head, tables = sidecar_checksums(path)
        stored = np.memmap(path, dtype="<u8", mode="r", offset=directory.tensors[SIDECAR_CHECKSUMS].offset, shape=(2,))
        if int(stored[0]) != head:
            raise ModelFileError(f"{path}: header checksum mismatch: the metadata or tensor directory is corrupt")
        if int(stored[1]) != tables:
            raise ModelFileError(f"{path}: table checksum mismatch: a neuron order, frequency, threshold, checksum "
                                 "or predictor table is corrupt")
        del stored
        sidecar = cls(path, header, layouts, down_source_types, directory)
        try:
            sidecar._validate_tables()
        except ModelFileError:
            sidecar.close()
            raise
        if model_path is not None:
            model_id = read_gguf_directory(model_path).get(KEY_MODEL_ID)
            if model_id != header.model_id:
                sidecar.close()
                found = f"model id {model_id!r}" if model_id is not None else "no neuralink model id (not converted)"
                raise ModelFileError(
                    f"sidecar {path} belongs to model id {header.model_id!r}, but {model_path} has {found}: "
                    "convert the model again or pass the sidecar written with it"
                )
        return sidecar

    def _validate_tables(self) -> None:
        header, path = self.header, self.path
        orders = []
        for il in range(header.n_layer):
            order, starts = self.order(il), self.chain_starts(il)
            if not np.array_equal(np.sort(order), np.arange(header.n_ff)):
                raise ModelFileError(f"{path}: layer {il} neuron order is not a permutation of 0..{header.n_ff - 1}")
            if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= header.n_ff:
                raise ModelFileError(f"{path}: layer {il} chain starts must increase from 0 and stay below n_ff")
            tables = [("neuron frequency", self.frequencies(il), 1.0)]
            if header.contribution:
                tables += [("candidate frequency", self.candidate_frequencies(il), 1.0),
                           ("candidate scale", self.candidate_scale(il), np.inf),
                           ("down norm", self.down_norms(il), np.inf)]
            for what, values, high in tables:
                if not np.all(np.isfinite(values) & (values >= 0) & (values <= high)):
                    raise ModelFileError(f"{path}: layer {il} {what} holds values outside [0, {high}]")
            orders.append(order)
        runtime = np.asarray(header.runtime_thresholds)
        if not np.all(np.isfinite(runtime)) or np.any(runtime < 0):
            raise ModelFileError(f"{path}: runtime thresholds must be finite values >= 0")
        expected = sidecar_model_id(header.source_sha256, header.placement_method, header.layout, header.criterion,
                                    orders, self.layouts)
        if expected != header.model_id:
            raise ModelFileError(f"{path}: model id {header.model_id!r} does not match its contents ({expected!r}): "
                                 "the sidecar was altered; convert the model again")

    def __enter__(self) -> Sidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the file (views returned earlier must not be used afterwards)."""
        self._data = None

    def _tensor(self, template: str, il: int | None = None) -> np.ndarray:
        if self._data is None:
            raise ValueError(f"{self.path}: sidecar is closed")
        entry = self._tensors[template if il is None else ffn_tensor_name(template, il)]
        return self._data[entry.offset:entry.offset + entry.nbytes]

    def _check_layer(self, il: int) -> None:
        if not 0 <= il < self.header.n_layer:
            raise IndexError(f"layer {il} outside 0..{self.header.n_layer - 1}")

    def order(self, il: int) -> np.ndarray:
        """int32 [n_ff]: the original index of the neuron stored at each position of layer `il`."""
        self._check_layer(il)
        return self._tensor(SIDECAR_NEURON_ORDER, il).view("<i4")

    def frequencies(self, il: int) -> np.ndarray:
        """float32 [n_ff]: calibration activation frequency of the neuron at each position (placed order)."""
        self._check_layer(il)
        return self._tensor(SIDECAR_NEURON_FREQUENCY, il).view("<f4")

    def candidate_frequencies(self, il: int) -> np.ndarray:
        """float32 [n_ff]: how often each position's up row is read (contribution criterion; else frequencies)."""
        self._check_layer(il)
        if not self.header.contribution:
            return self.frequencies(il)
        return self._tensor(SIDECAR_CANDIDATE_FREQUENCY, il).view("<f4")

    def candidate_scale(self, il: int) -> np.ndarray:
        """float32 [n_ff]: E|up| * |down column| of each position (contribution criterion)."""
        self._check_layer(il)
        return self._tensor(SIDECAR_CANDIDATE_SCALE, il).view("<f4")

    def down_norms(self, il: int) -> np.ndarray:
        """float32 [n_ff]: |down column| of each position (contribution criterion)."""
        self._check_layer(il)
        return self._tensor(SIDECAR_DOWN_NORM, il).view("<f4")

    def chain_starts(self, il: int) -> np.ndarray:
        """int32: the positions where chains of linked neurons begin (the first is 0)."""
        self._check_layer(il)
        return self._tensor(SIDECAR_CHAIN_STARTS, il).view("<i4")

    def predictor(self, il: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer `il`'s low-rank predictor: A (rank, n_embd) and B (n_ff, rank, placed order), float32 views."""
        self._check_layer(il)
        rank = self.header.predictor_rank
        if not rank:
            raise ValueError(f"{self.path}: has no low-rank predictor")
        a = self._tensor(SIDECAR_PREDICTOR_A, il).view("<f4").reshape(rank, self.header.n_embd)
        return a, self._tensor(SIDECAR_PREDICTOR_B, il).view("<f4").reshape(self.header.n_ff, rank)

    @property
    def down_errors(self) -> np.ndarray:
        """float32 [n_layer]: relative RMS error of each layer's re-encoded down columns (0 when exact)."""
        return self._tensor(SIDECAR_DOWN_ERROR).view("<f4")

    def bundle_store(self, il: int) -> np.ndarray:
        """uint8 (n_ff, record_bytes): layer `il`'s records, a read-only view of the mapped file."""
        self._check_layer(il)
        return self._tensor(SIDECAR_BUNDLES, il).reshape(self.header.n_ff, self.layouts[il].record_bytes)

    def down_store(self, il: int) -> np.ndarray:
        """uint8 (n_ff, down_record_bytes): layer `il`'s down columns (split layout), a read-only view."""
        self._check_layer(il)
        if not self.layouts[il].split:
            raise ValueError(f"{self.path}: the joint layout keeps down columns inside the bundle records")
        return self._tensor(SIDECAR_DOWN_COLUMNS, il).reshape(self.header.n_ff, self.layouts[il].down_record_bytes)

    def verify_records(self, il: int) -> None:
        """Check every record of layer `il` against its checksum; ModelFileError naming the first bad one."""
        stores = [(self.bundle_store(il), SIDECAR_BUNDLE_HASH, "bundle")]
        if self.layouts[il].split:
            stores.append((self.down_store(il), SIDECAR_DOWN_HASH, "down column"))
        for records, template, what in stores:
            bad = np.flatnonzero(records_checksums(records) != self._tensor(template, il).view("<u8"))
            if bad.size:
                raise ModelFileError(f"{self.path}: layer {il}, neuron {int(bad[0])}: {what} record fails its "
                                     f"checksum ({bad.size} of {len(records)} records do)")

    def store_offset(self, il: int) -> int:
        """Absolute file offset of layer `il`'s record 0 (a multiple of 4096)."""
        self._check_layer(il)
        return self._tensors[ffn_tensor_name(SIDECAR_BUNDLES, il)].offset

    def down_store_offset(self, il: int) -> int:
        """Absolute file offset of layer `il`'s down record 0 (split layout; a multiple of 4096)."""
        self._check_layer(il)
        return self._tensors[ffn_tensor_name(SIDECAR_DOWN_COLUMNS, il)].offset

    def record_range(self, il: int, start: int, stop: int) -> ByteRange:
        """The bytes of the records at positions [start, stop) of layer `il`: one contiguous range."""
        self._check_layer(il)
        if not 0 <= start < stop <= self.header.n_ff:
            raise IndexError(f"positions [{start}, {stop}) outside [0, {self.header.n_ff})")
        record = self.layouts[il].record_bytes
        return ByteRange(self.store_offset(il) + start * record, (stop - start) * record)

    def decode(self, il: int, position: int) -> NeuronWeights:
        """The weights of the neuron stored at `position` of layer `il`, decoded to float32."""
        layout = self.layouts[il]
        record = self.bundle_store(il)[position]
        down_record = self.down_store(il)[position] if layout.split else record
        n_embd = self.header.n_embd
        gate = layout.gate.decode(record, n_embd) if layout.gate is not None else None
        return NeuronWeights(gate, layout.up.decode(record, n_embd), layout.down.decode(down_record, n_embd))


def _layer_array(directory: GgufDirectory, key: str, n_layer: int) -> np.ndarray:
    entry = directory.metadata.get(key)
    if entry is None or not isinstance(entry.value, np.ndarray) or entry.value.shape != (n_layer,):
        raise ModelFileError(f"{directory.path}: metadata '{key}' must be an array of {n_layer} values (one per layer)")
    return entry.value


def _read_type(path: Path, key: str, il: int, raw: int) -> QType:
    try:
        qtype = QType(int(raw))
    except ValueError:
        raise ModelFileError(f"{path}: {key}[{il}] = {raw} is not a ggml type") from None
    if qtype not in gguf.GGML_QUANT_SIZES:
        raise ModelFileError(f"{path}: {key}[{il}] = {qtype.name} has no known layout")
    return qtype


def _read_predictor_header(directory: GgufDirectory, n_layer: int, n_embd: int) -> dict[str, Any]:
    rank = directory.get(KEY_PREDICTOR_RANK)
    if rank is None:
        return {}
    if not isinstance(rank, int) or not 0 < rank <= n_embd:
        raise ModelFileError(f"{directory.path}: {KEY_PREDICTOR_RANK} must be an integer in 1..{n_embd}, not {rank!r}")
    thresholds = _layer_array(directory, KEY_PREDICTOR_THRESHOLDS, n_layer)
    if not np.all(np.isfinite(thresholds)):
        raise ModelFileError(f"{directory.path}: {KEY_PREDICTOR_THRESHOLDS} holds values that are not finite")
    return dict(predictor_rank=rank, predictor_thresholds=tuple(float(t) for t in thresholds),
                predictor_recall=float(directory.get(KEY_PREDICTOR_RECALL, 0.0)))


def _small_tensor(directory: GgufDirectory, name: str, dtype: str, count: int) -> np.ndarray:
    entry = directory.tensors.get(name)
    if entry is None or entry.nbytes != count * np.dtype(dtype).itemsize:
        raise ModelFileError(f"{directory.path}: tensor '{name}' is missing or has the wrong size")
    return np.fromfile(directory.path, dtype=dtype, count=count, offset=entry.offset)


def _read_header(directory: GgufDirectory) -> tuple[SidecarHeader, tuple[BundleLayout, ...], tuple[QType, ...]]:
    path = directory.path
    arch = directory.get("general.architecture")
    if arch != SIDECAR_ARCHITECTURE:
        raise ModelFileError(f"{path}: not a neuralink sidecar (general.architecture is {arch!r}, "
                             f"expected {SIDECAR_ARCHITECTURE!r})")
    version = directory.require(KEY_SIDECAR_VERSION, int)
    if version != SIDECAR_VERSION:
        fix = ("it was written by an older neuralink: convert the model again (neuralink convert)"
               if version < SIDECAR_VERSION else "it was written by a newer neuralink: update this one")
        raise ModelFileError(f"{path}: sidecar format version {version}; this neuralink reads version "
                             f"{SIDECAR_VERSION}: {fix}")
    if directory.alignment != SIDECAR_ALIGNMENT:
        raise ModelFileError(f"{path}: general.alignment is {directory.alignment}, expected {SIDECAR_ALIGNMENT}")

    n_layer, n_embd, n_ff = (directory.require(key, int) for key in (KEY_N_LAYER, KEY_N_EMBD, KEY_N_FF))
    if not (0 < n_layer <= 4096 and 0 < n_embd <= 1 << 20 and 0 < n_ff <= 1 << 22):
        raise ModelFileError(f"{path}: implausible n_layer, n_embd, n_ff ({n_layer}, {n_embd}, {n_ff})")
    gated = directory.require(KEY_GATED, bool)
    bundle_gate = directory.require(KEY_BUNDLE_GATE, bool)
    if bundle_gate and not gated:
        raise ModelFileError(f"{path}: {KEY_BUNDLE_GATE} is set for a non-gated model")
    activation = directory.require(KEY_ACTIVATION, str)
    if activation not in ACTIVATIONS:
        raise ModelFileError(f"{path}: unknown activation {activation!r}")
    layout = directory.require(KEY_BUNDLE_LAYOUT, str)
    if layout not in ("joint", "split"):
        raise ModelFileError(f"{path}: {KEY_BUNDLE_LAYOUT} is {layout!r}, expected 'joint' or 'split'")
    criterion = directory.require(KEY_PLACEMENT_CRITERION, str)
    if criterion not in ("relu", "gate_magnitude", "magnitude", "contribution"):
        raise ModelFileError(f"{path}: unknown activity criterion {criterion!r}")
    if criterion == "contribution" and not gated:
        raise ModelFileError(f"{path}: criterion 'contribution' needs a gated FFN")
    thresholds = _layer_array(directory, KEY_PLACEMENT_THRESHOLDS, n_layer)
    if not np.all(np.isfinite(thresholds)) or np.any(thresholds < 0):
        raise ModelFileError(f"{path}: {KEY_PLACEMENT_THRESHOLDS} must be finite values >= 0")
    runtime = _small_tensor(directory, SIDECAR_RUNTIME_THRESHOLDS, "<f4", 2 * n_layer).reshape(n_layer, 2)
    quality_raw = _small_tensor(directory, SIDECAR_QUALITY, "u1", SIDECAR_QUALITY_BYTES)
    try:
        quality = decode_quality(quality_raw)
    except ValueError:
        raise ModelFileError(f"{path}: the quality record is not valid JSON") from None
    default_predictor = bytes(_small_tensor(directory, SIDECAR_DEFAULT_PREDICTOR, "u1",
                                            SIDECAR_PREDICTOR_NAME_BYTES)).rstrip(b"\0").decode(errors="replace")
    if default_predictor not in DEFAULT_PREDICTORS:
        raise ModelFileError(f"{path}: default predictor {default_predictor!r}, expected one of {DEFAULT_PREDICTORS}")
    predictor_header = _read_predictor_header(directory, n_layer, n_embd)
    if default_predictor == "lowrank" and not predictor_header.get("predictor_rank"):
        raise ModelFileError(f"{path}: default predictor 'lowrank', but the sidecar has no low-rank predictor")
    header = SidecarHeader(
        model_id=directory.require(KEY_MODEL_ID, str),
        source_sha256=directory.require(KEY_SOURCE_SHA256, str),
        source_architecture=directory.require(KEY_SOURCE_ARCHITECTURE, str),
        n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, gated=gated, activation=activation,  # type: ignore[arg-type]
        placement_method=directory.require(KEY_PLACEMENT_METHOD, str),
        criterion=criterion,
        n_tokens=directory.require(KEY_PLACEMENT_N_TOKENS, int),
        thresholds=tuple(float(t) for t in thresholds),
        version=version,
        bundle_gate=bundle_gate,
        layout=layout,  # type: ignore[arg-type]
        runtime_thresholds=tuple((float(a), float(b)) for a, b in runtime),
        quality=quality,
        default_predictor=default_predictor,
        **predictor_header,
    )

    split = layout == "split"
    part_names = ("gate", "up", "down") if bundle_gate else ("up", "down")
    keys = [KEY_BUNDLE_RECORD_BYTES] + [k[p] for k in (_TYPE_KEYS, _OFFSET_KEYS) for p in part_names]
    if split:
        keys.append(KEY_BUNDLE_DOWN_RECORD_BYTES)
    columns = {key: _layer_array(directory, key, n_layer) for key in keys}
    source_types = _layer_array(directory, KEY_BUNDLE_DOWN_SOURCE_TYPE, n_layer)
    layouts = []
    for il in range(n_layer):
        types = {p: _read_type(path, _TYPE_KEYS[p], il, columns[_TYPE_KEYS[p]][il]) for p in part_names}
        try:
            lay = BundleLayout.build(n_embd, types["up"], types["down"], types.get("gate"), split)
        except ValueError as e:
            raise ModelFileError(f"{path}: layer {il}: {e}") from None
        stored = {"record_bytes": int(columns[KEY_BUNDLE_RECORD_BYTES][il])}
        stored.update({p: int(columns[_OFFSET_KEYS[p]][il]) for p in part_names})
        expected = {"record_bytes": lay.record_bytes}
        expected.update({p: part.offset for p, part in lay.parts.items()})
        if split:
            stored["down_record_bytes"] = int(columns[KEY_BUNDLE_DOWN_RECORD_BYTES][il])
            expected["down_record_bytes"] = lay.down_record_bytes
        if stored != expected:
            raise ModelFileError(
                f"{path}: layer {il} bundle layout {stored} differs from the one its types imply {expected}"
            )
        layouts.append(lay)
    down_source_types = tuple(
        _read_type(path, KEY_BUNDLE_DOWN_SOURCE_TYPE, il, raw) for il, raw in enumerate(source_types)
    )
    return header, tuple(layouts), down_source_types


def _check_tensors(directory: GgufDirectory, header: SidecarHeader, layouts: Sequence[BundleLayout]) -> None:
    n_ff, path = header.n_ff, directory.path

    def check(name: str, qtype: QType, shape: tuple[int, ...]) -> TensorEntry:
        entry = directory.tensors.get(name)
        if entry is None:
            raise ModelFileError(f"{path}: tensor '{name}' is missing")
        if entry.type != qtype or entry.shape != shape:
            raise ModelFileError(f"{path}: tensor '{name}' is {entry.type.name} {list(entry.shape)}, "
                                 f"expected {qtype.name} {list(shape)}")
        if entry.offset % SIDECAR_ALIGNMENT:
            raise ModelFileError(
                f"{path}: tensor '{name}' starts at {entry.offset}, not on a {SIDECAR_ALIGNMENT}-byte boundary"
            )
        return entry

    for il, layout in enumerate(layouts):
        check(ffn_tensor_name(SIDECAR_NEURON_ORDER, il), QType.I32, (n_ff,))
        check(ffn_tensor_name(SIDECAR_NEURON_FREQUENCY, il), QType.F32, (n_ff,))
        chain_name = ffn_tensor_name(SIDECAR_CHAIN_STARTS, il)
        chains = directory.tensors.get(chain_name)
        n_chains = chains.shape[0] if chains is not None else 0
        if not 1 <= n_chains <= n_ff:
            raise ModelFileError(f"{path}: tensor '{chain_name}' must hold 1 to {n_ff} chain starts")
        check(chain_name, QType.I32, (n_chains,))
        if header.contribution:
            for template in (SIDECAR_CANDIDATE_FREQUENCY, SIDECAR_CANDIDATE_SCALE, SIDECAR_DOWN_NORM):
                check(ffn_tensor_name(template, il), QType.F32, (n_ff,))
        check(ffn_tensor_name(SIDECAR_BUNDLE_HASH, il), QType.I64, (n_ff,))
        check(ffn_tensor_name(SIDECAR_BUNDLES, il), QType.I8, (layout.record_bytes, n_ff))
        if layout.split:
            check(ffn_tensor_name(SIDECAR_DOWN_HASH, il), QType.I64, (n_ff,))
            check(ffn_tensor_name(SIDECAR_DOWN_COLUMNS, il), QType.I8, (layout.down_record_bytes, n_ff))
        if header.predictor_rank:
            check(ffn_tensor_name(SIDECAR_PREDICTOR_A, il), QType.F32, (header.n_embd, header.predictor_rank))
            check(ffn_tensor_name(SIDECAR_PREDICTOR_B, il), QType.F32, (header.predictor_rank, n_ff))
    check(SIDECAR_DOWN_ERROR, QType.F32, (header.n_layer,))
    check(SIDECAR_RUNTIME_THRESHOLDS, QType.F32, (2, header.n_layer))
    check(SIDECAR_QUALITY, QType.I8, (SIDECAR_QUALITY_BYTES,))
    check(SIDECAR_DEFAULT_PREDICTOR, QType.I8, (SIDECAR_PREDICTOR_NAME_BYTES,))
    check(SIDECAR_CHECKSUMS, QType.I64, (2,))


_TYPE_KEYS = {"gate": KEY_BUNDLE_GATE_TYPE, "up": KEY_BUNDLE_UP_TYPE, "down": KEY_BUNDLE_DOWN_TYPE}
_OFFSET_KEYS = {"gate": KEY_BUNDLE_GATE_OFFSET, "up": KEY_BUNDLE_UP_OFFSET, "down": KEY_BUNDLE_DOWN_OFFSET}

__all__ = [
    "BundleLayout", "BundlePart", "ByteRange", "NeuronWeights", "Sidecar", "SidecarHeader", "SidecarLayer",
    "write_sidecar",
]
