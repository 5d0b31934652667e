"""What a sidecar holds (docs/sidecar.md), shared by its writer and its reader.

The header (metadata), each layer's tables and records, the model id a
sidecar's contents determine, and which tensors the table checksum covers.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from neuralink.formats.bundle_layout import BundleLayout
from neuralink.formats.constants import (
    DEFAULT_PREDICTORS,
    SIDECAR_BUNDLES,
    SIDECAR_CHECKSUMS,
    SIDECAR_DOWN_COLUMNS,
    SIDECAR_PREDICTOR_NAME_BYTES,
    SIDECAR_QUALITY_BYTES,
    SIDECAR_VERSION,
)
from neuralink.formats.ffn_tensors import Activation

Layout = Literal["joint", "split"]


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
    thresholds: tuple[float, ...]  # per layer: the profile's activity threshold (the placement's "active")
    version: int = SIDECAR_VERSION
    bundle_gate: bool | None = None  # records hold the gate row; None: whenever the model is gated
    predictor_rank: int = 0  # of the low-rank activity predictor; 0: none
    predictor_thresholds: tuple[float, ...] = ()  # per layer: predicted score above which a neuron is read
    predictor_recall: float = 0.0  # the calibration recall its thresholds were tuned for
    layout: Layout = "joint"
    # per layer (activity, candidate): what the engine runs with; None: (thresholds[l], 0)
    runtime_thresholds: tuple[tuple[float, float], ...] | None = None
    # what the conversion measured and chose (densities, perplexities, the validated predictor), JSON-able
    quality: dict[str, Any] = field(default_factory=dict)
    # what runs by default: the predictor the quality search validated, else "dense"
    default_predictor: str = "dense"

    def __post_init__(self) -> None:
        if self.bundle_gate is None:
            object.__setattr__(self, "bundle_gate", self.gated)
        if self.bundle_gate and not self.gated:
            raise ValueError("a non-gated model has no gate rows to bundle")
        if self.runtime_thresholds is None:
            object.__setattr__(self, "runtime_thresholds", tuple((float(t), 0.0) for t in self.thresholds))
        if self.layout not in ("joint", "split"):
            raise ValueError(f"layout must be 'joint' or 'split', not {self.layout!r}")

    @property
    def contribution(self) -> bool:
        return self.criterion == "contribution"


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
    down_records: np.ndarray | None = None  # split: uint8 (n_ff, down_record_bytes)
    # contribution criterion: E|up| * |down column|, |down column|, how often the up row is read
    candidate_scale: np.ndarray | None = None
    down_norm: np.ndarray | None = None
    candidate_frequency: np.ndarray | None = None


def encode_quality(quality: dict[str, Any]) -> np.ndarray:
    """The quality record as the sidecar stores it: JSON, UTF-8, zero-padded to SIDECAR_QUALITY_BYTES."""
    raw = json.dumps(quality, sort_keys=True, separators=(",", ":")).encode()
    if len(raw) > SIDECAR_QUALITY_BYTES:
        raise ValueError(f"quality record of {len(raw)} bytes exceeds {SIDECAR_QUALITY_BYTES}")
    out = np.zeros(SIDECAR_QUALITY_BYTES, dtype=np.uint8)
    out[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out


def validated_predictor(quality: dict[str, Any]) -> str:
    """The predictor a quality record allows by default: the one it validated within its budget, else "dense"."""
    predictor = quality.get("predictor")
    return str(predictor) if quality.get("validated") and predictor in DEFAULT_PREDICTORS else "dense"


def encode_predictor_name(name: str) -> np.ndarray:
    if name not in DEFAULT_PREDICTORS:
        raise ValueError(f"default predictor must be one of {DEFAULT_PREDICTORS}, not {name!r}")
    out = np.zeros(SIDECAR_PREDICTOR_NAME_BYTES, dtype=np.uint8)
    out[: len(name)] = np.frombuffer(name.encode(), dtype=np.uint8)
    return out


def decode_quality(data: np.ndarray) -> dict[str, Any]:
    raw = bytes(data).rstrip(b"\0")
    return json.loads(raw.decode()) if raw else {}


def is_record_tensor(name: str) -> bool:
    """Bundle and down-column regions: covered by per-record checksums, not by the table checksum."""
    return name.endswith(SIDECAR_BUNDLES.removeprefix("blk.{bid}")) or \
        name.endswith(SIDECAR_DOWN_COLUMNS.removeprefix("blk.{bid}"))


def is_table_tensor(name: str) -> bool:
    """Every tensor but the record regions and the checksums themselves."""
    return not is_record_tensor(name) and name != SIDECAR_CHECKSUMS


def sidecar_model_id(source_sha256: str, placement_method: str, layout: str, criterion: str,
                     orders: Sequence[np.ndarray], layouts: Sequence[BundleLayout]) -> str:
    """The model id a sidecar's contents determine: a digest of its source, placement and record layout.

    The converted GGUF carries the same id; a sidecar whose recomputed id
    differs from the stored one has been altered.
    """
    h = hashlib.sha256(f"neuralink/{SIDECAR_VERSION}/{source_sha256}/{placement_method}/{layout}/{criterion}".encode())
    for order, lay in zip(orders, layouts):
        h.update(np.ascontiguousarray(order, dtype="<i4").tobytes())
        gate = int(lay.gate.type) if lay.gate is not None else 0xFFFFFFFF
        h.update(struct.pack("<5I", gate, lay.up.type, lay.down.type, lay.record_bytes, lay.down_record_bytes))
    return "nl2-" + h.hexdigest()[:32]
