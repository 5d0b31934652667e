"""The sidecar: a converted model's neuron placement and its bundle store (docs/sidecar.md).

A GGUF container (general.architecture ``neuralink_sidecar``, general.alignment
4096) holding, per layer, the neuron order, frequencies and chain starts, and
the bundle store: n_ff equal-size records in placed order, record k being
[gate row | up row | down column] of the neuron stored at position k. A run of
consecutive positions is one contiguous byte range, so one direct-I/O read of
its 4 KiB-aligned superset fetches it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType

from neuralink.errors import ModelFileError
from neuralink.formats.bundle_layout import BundleLayout, BundlePart, ByteRange, NeuronWeights
from neuralink.formats.constants import (
    KEY_ACTIVATION,
    KEY_BUNDLE_DOWN_OFFSET,
    KEY_BUNDLE_DOWN_SOURCE_TYPE,
    KEY_BUNDLE_DOWN_TYPE,
    KEY_BUNDLE_GATE,
    KEY_BUNDLE_GATE_OFFSET,
    KEY_BUNDLE_GATE_TYPE,
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
    SIDECAR_BUNDLES,
    SIDECAR_CHAIN_STARTS,
    SIDECAR_DOWN_ERROR,
    SIDECAR_NEURON_FREQUENCY,
    SIDECAR_NEURON_ORDER,
    SIDECAR_PREDICTOR_A,
    SIDECAR_PREDICTOR_B,
    SIDECAR_VERSION,
    ffn_tensor_name,
)
from neuralink.formats.ffn_tensors import ACTIVATIONS, Activation
from neuralink.formats.files import atomic_gguf
from neuralink.formats.gguf_directory import GgufDirectory, TensorEntry, read_gguf_directory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SidecarHeader:
    """Everything a sidecar says about the model and placement it belongs to."""

    model_id: str  # also in the converted GGUF's metadata: the pair must match
    source_sha256: str  # of the original GGUF the conversion started from
    source_architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    gated: bool
    activation: Activation
    placement_method: str
    criterion: str
    n_tokens: int  # calibration tokens the placement was profiled on
    thresholds: tuple[float, ...]  # per layer: activation magnitude defining "active"
    version: int = SIDECAR_VERSION
    bundle_gate: bool | None = None  # records hold the gate row; None: whenever the model is gated
    predictor_rank: int = 0  # of the low-rank activity predictor; 0: none
    predictor_thresholds: tuple[float, ...] = ()  # per layer: predicted score above which a neuron is read
    predictor_recall: float = 0.0  # the calibration recall its thresholds were tuned for

    def __post_init__(self) -> None:
        if self.bundle_gate is None:
            object.__setattr__(self, "bundle_gate", self.gated)
        if self.bundle_gate and not self.gated:
            raise ValueError("a non-gated model has no gate rows to bundle")


@dataclass(frozen=True)
class SidecarLayer:
    """What the writer stores for one layer, all in placed order."""

    order: np.ndarray  # int32 [n_ff]: original index of the neuron at each position
    frequencies: np.ndarray  # float32 [n_ff]: activation frequency of the neuron at each position
    chain_starts: np.ndarray  # int32: positions where a chain of linked neurons begins
    bundles: np.ndarray  # uint8 (n_ff, record_bytes)
    down_error: float  # relative RMS error of the re-encoded down columns
    predictor_a: np.ndarray | None = None  # float32 (rank, n_embd)
    predictor_b: np.ndarray | None = None  # float32 (n_ff, rank), placed order


_TYPE_KEYS = {"gate": KEY_BUNDLE_GATE_TYPE, "up": KEY_BUNDLE_UP_TYPE, "down": KEY_BUNDLE_DOWN_TYPE}
_OFFSET_KEYS = {"gate": KEY_BUNDLE_GATE_OFFSET, "up": KEY_BUNDLE_UP_OFFSET, "down": KEY_BUNDLE_DOWN_OFFSET}


def _layout_arrays(layouts: Sequence[BundleLayout]) -> dict[str, list[int]]:
    # per-layer uint32 arrays; a non-gated model has no gate keys at all
    arrays = {KEY_BUNDLE_RECORD_BYTES: [lay.record_bytes for lay in layouts]}
    for part in layouts[0].parts:
        arrays[_TYPE_KEYS[part]] = [int(lay.parts[part].type) for lay in layouts]
        arrays[_OFFSET_KEYS[part]] = [lay.parts[part].offset for lay in layouts]
    return arrays


def write_sidecar(
    path: str | os.PathLike[str],
    header: SidecarHeader,
    layouts: Sequence[BundleLayout],
    down_source_types: Sequence[QType],
    chain_counts: Sequence[int],
    layers: Iterable[SidecarLayer],
) -> Path:
    """Write a sidecar to `path` through a temporary file and a rename, one layer at a time.

    `layers` is consumed lazily (a generator keeps one layer's bundles in
    memory at a time) and must yield n_layer layers matching `layouts` and
    `chain_counts`, which fix the file's directory before any data is written.
    """
    path = Path(path)
    n_layer, n_ff = header.n_layer, header.n_ff
    if not (len(layouts) == len(down_source_types) == len(chain_counts) == len(header.thresholds) == n_layer):
        raise ValueError(f"sidecar for {n_layer} layers needs one layout, source type, chain count and threshold each")
    if any((lay.gate is not None) != header.bundle_gate for lay in layouts):
        raise ValueError("bundle layouts disagree with header.bundle_gate")

    with atomic_gguf(path, SIDECAR_ARCHITECTURE) as writer:
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

        int32, float32, int8 = np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.int8)
        for il, (layout, n_chains) in enumerate(zip(layouts, chain_counts)):
            writer.add_tensor_info(ffn_tensor_name(SIDECAR_NEURON_ORDER, il), (n_ff,), int32, 4 * n_ff)
            writer.add_tensor_info(ffn_tensor_name(SIDECAR_NEURON_FREQUENCY, il), (n_ff,), float32, 4 * n_ff)
            writer.add_tensor_info(ffn_tensor_name(SIDECAR_CHAIN_STARTS, il), (n_chains,), int32, 4 * n_chains)
            writer.add_tensor_info(ffn_tensor_name(SIDECAR_BUNDLES, il), (n_ff, layout.record_bytes), int8,
                                   n_ff * layout.record_bytes)
            if rank:
                n_embd = header.n_embd
                writer.add_tensor_info(ffn_tensor_name(SIDECAR_PREDICTOR_A, il), (rank, n_embd), float32,
                                       4 * rank * n_embd)
                writer.add_tensor_info(ffn_tensor_name(SIDECAR_PREDICTOR_B, il), (n_ff, rank), float32, 4 * n_ff * rank)
        writer.add_tensor_info(SIDECAR_DOWN_ERROR, (n_layer,), float32, 4 * n_layer)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        down_errors: list[float] = []
        for il, layer in enumerate(layers):
            if il >= n_layer:
                raise ValueError(f"more than n_layer = {n_layer} layers given")
            expected_bundles = (n_ff, layouts[il].record_bytes)
            if layer.bundles.shape != expected_bundles or layer.chain_starts.shape != (chain_counts[il],):
                raise ValueError(
                    f"layer {il}: bundles {layer.bundles.shape} and chain starts {layer.chain_starts.shape}, "
                    f"expected {expected_bundles} and ({chain_counts[il]},)"
                )
            writer.write_tensor_data(np.ascontiguousarray(layer.order, dtype=np.int32))
            writer.write_tensor_data(np.ascontiguousarray(layer.frequencies, dtype=np.float32))
            writer.write_tensor_data(np.ascontiguousarray(layer.chain_starts, dtype=np.int32))
            writer.write_tensor_data(np.ascontiguousarray(layer.bundles).view(np.int8))
            if rank:
                a, b = layer.predictor_a, layer.predictor_b
                if a is None or b is None or a.shape != (rank, header.n_embd) or b.shape != (n_ff, rank):
                    raise ValueError(f"layer {il}: the rank-{rank} predictor needs A ({rank}, {header.n_embd}) "
                                     f"and B ({n_ff}, {rank})")
                writer.write_tensor_data(np.ascontiguousarray(a, dtype=np.float32))
                writer.write_tensor_data(np.ascontiguousarray(b, dtype=np.float32))
            down_errors.append(layer.down_error)
        if len(down_errors) != n_layer:
            raise ValueError(f"{len(down_errors)} layers given, the sidecar declares {n_layer}")
        writer.write_tensor_data(np.asarray(down_errors, dtype=np.float32))
    log.info("wrote sidecar %s (%d layers, %d neurons each)", path, n_layer, n_ff)
    return path


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

        Everything is checked from the file's directory before anything is
        mapped: container, version, alignment, per-layer layouts and tensor
        shapes. Raises ModelFileError naming the file (and both files for a
        mismatched pair).
        """
        path = Path(path)
        directory = read_gguf_directory(path)
        header, layouts, down_source_types = _read_header(directory)
        _check_tensors(directory, header, layouts)
        if model_path is not None:
            model_id = read_gguf_directory(model_path).get(KEY_MODEL_ID)
            if model_id != header.model_id:
                found = f"model id {model_id!r}" if model_id is not None else "no neuralink model id (not converted)"
                raise ModelFileError(
                    f"sidecar {path} belongs to model id {header.model_id!r}, but {model_path} has {found}: "
                    "convert the model again or pass the sidecar written with it"
                )
        sidecar = cls(path, header, layouts, down_source_types, directory)
        for il in range(header.n_layer):
            order, starts = sidecar.order(il), sidecar.chain_starts(il)
            if not np.array_equal(np.sort(order), np.arange(header.n_ff)):
                sidecar.close()
                raise ModelFileError(f"{path}: layer {il} neuron order is not a permutation of 0..{header.n_ff - 1}")
            if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= header.n_ff:
                sidecar.close()
                raise ModelFileError(f"{path}: layer {il} chain starts must increase from 0 and stay below n_ff")
        return sidecar

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

    def store_offset(self, il: int) -> int:
        """Absolute file offset of layer `il`'s record 0 (a multiple of 4096)."""
        self._check_layer(il)
        return self._tensors[ffn_tensor_name(SIDECAR_BUNDLES, il)].offset

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
        n_embd = self.header.n_embd
        gate = layout.gate.decode(record, n_embd) if layout.gate is not None else None
        return NeuronWeights(gate, layout.up.decode(record, n_embd), layout.down.decode(record, n_embd))


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


def _read_predictor_header(directory: GgufDirectory, n_layer: int, n_embd: int) -> dict[str, object]:
    rank = directory.get(KEY_PREDICTOR_RANK)
    if rank is None:
        return {}
    if not isinstance(rank, int) or not 0 < rank <= n_embd:
        raise ModelFileError(f"{directory.path}: {KEY_PREDICTOR_RANK} must be an integer in 1..{n_embd}, not {rank!r}")
    thresholds = _layer_array(directory, KEY_PREDICTOR_THRESHOLDS, n_layer)
    return dict(predictor_rank=rank, predictor_thresholds=tuple(float(t) for t in thresholds),
                predictor_recall=float(directory.get(KEY_PREDICTOR_RECALL, 0.0)))


def _read_header(directory: GgufDirectory) -> tuple[SidecarHeader, tuple[BundleLayout, ...], tuple[QType, ...]]:
    path = directory.path
    arch = directory.get("general.architecture")
    if arch != SIDECAR_ARCHITECTURE:
        raise ModelFileError(f"{path}: not a neuralink sidecar (general.architecture is {arch!r}, "
                             f"expected {SIDECAR_ARCHITECTURE!r})")
    version = directory.require(KEY_SIDECAR_VERSION, int)
    if version != SIDECAR_VERSION:
        raise ModelFileError(
            f"{path}: sidecar format version {version}; this neuralink reads version {SIDECAR_VERSION}"
        )
    if directory.alignment != SIDECAR_ALIGNMENT:
        raise ModelFileError(f"{path}: general.alignment is {directory.alignment}, expected {SIDECAR_ALIGNMENT}")

    n_layer, n_embd, n_ff = (directory.require(key, int) for key in (KEY_N_LAYER, KEY_N_EMBD, KEY_N_FF))
    if min(n_layer, n_embd, n_ff) <= 0:
        raise ModelFileError(f"{path}: n_layer, n_embd and n_ff must be positive ({n_layer}, {n_embd}, {n_ff})")
    gated = directory.require(KEY_GATED, bool)
    bundle_gate = directory.require(KEY_BUNDLE_GATE, bool)
    if bundle_gate and not gated:
        raise ModelFileError(f"{path}: {KEY_BUNDLE_GATE} is set for a non-gated model")
    activation = directory.require(KEY_ACTIVATION, str)
    if activation not in ACTIVATIONS:
        raise ModelFileError(f"{path}: unknown activation {activation!r}")
    thresholds = _layer_array(directory, KEY_PLACEMENT_THRESHOLDS, n_layer)
    header = SidecarHeader(
        model_id=directory.require(KEY_MODEL_ID, str),
        source_sha256=directory.require(KEY_SOURCE_SHA256, str),
        source_architecture=directory.require(KEY_SOURCE_ARCHITECTURE, str),
        n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, gated=gated, activation=activation,  # type: ignore[arg-type]
        placement_method=directory.require(KEY_PLACEMENT_METHOD, str),
        criterion=directory.require(KEY_PLACEMENT_CRITERION, str),
        n_tokens=directory.require(KEY_PLACEMENT_N_TOKENS, int),
        thresholds=tuple(float(t) for t in thresholds),
        version=version,
        bundle_gate=bundle_gate,
        **_read_predictor_header(directory, n_layer, n_embd),
    )

    part_names = ("gate", "up", "down") if bundle_gate else ("up", "down")
    keys = [KEY_BUNDLE_RECORD_BYTES] + [k[p] for k in (_TYPE_KEYS, _OFFSET_KEYS) for p in part_names]
    columns = {key: _layer_array(directory, key, n_layer) for key in keys}
    source_types = _layer_array(directory, KEY_BUNDLE_DOWN_SOURCE_TYPE, n_layer)
    layouts = []
    for il in range(n_layer):
        types = {p: _read_type(path, _TYPE_KEYS[p], il, columns[_TYPE_KEYS[p]][il]) for p in part_names}
        try:
            layout = BundleLayout.build(n_embd, types["up"], types["down"], types.get("gate"))
        except ValueError as e:
            raise ModelFileError(f"{path}: layer {il}: {e}") from None
        stored = {"record_bytes": int(columns[KEY_BUNDLE_RECORD_BYTES][il])}
        stored.update({p: int(columns[_OFFSET_KEYS[p]][il]) for p in part_names})
        expected = {"record_bytes": layout.record_bytes}
        expected.update({p: part.offset for p, part in layout.parts.items()})
        if stored != expected:
            raise ModelFileError(
                f"{path}: layer {il} bundle layout {stored} differs from the one its types imply {expected}"
            )
        layouts.append(layout)
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
        check(ffn_tensor_name(SIDECAR_BUNDLES, il), QType.I8, (layout.record_bytes, n_ff))
        if header.predictor_rank:
            check(ffn_tensor_name(SIDECAR_PREDICTOR_A, il), QType.F32, (header.n_embd, header.predictor_rank))
            check(ffn_tensor_name(SIDECAR_PREDICTOR_B, il), QType.F32, (header.predictor_rank, n_ff))
    check(SIDECAR_DOWN_ERROR, QType.F32, (header.n_layer,))


__all__ = [
    "BundleLayout", "BundlePart", "ByteRange", "NeuronWeights", "Sidecar", "SidecarHeader", "SidecarLayer",
    "write_sidecar",
]
