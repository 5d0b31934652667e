"""What a sidecar holds, as Python values: record layouts, the header, byte ranges, one layer's data (docs/sidecar.md).

`neuralink.formats.sidecar` writes and reads these; this module only describes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from neuralink import _engine
from neuralink.formats.constants import BUNDLE_PART_ALIGNMENT, SIDECAR_ALIGNMENT, SIDECAR_VERSION
from neuralink.formats.ffn_tensors import Activation
from neuralink.models.synthetic import ggml_type_name


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class BundlePart:
    """One weight vector inside a bundle record: n_embd values of `type` at `offset`."""

    type: QType
    offset: int
    nbytes: int

    def decode(self, record: np.ndarray, n_embd: int) -> np.ndarray:
        raw = record[self.offset:self.offset + self.nbytes].reshape(1, self.nbytes)
        return _engine.dequantize(ggml_type_name(self.type), raw, n_embd)[0]


@dataclass(frozen=True)
class BundleLayout:
    """The layout of one layer's bundle record: [gate | up | down], each part padded to 4 bytes."""

    n_embd: int
    up: BundlePart
    down: BundlePart
    gate: BundlePart | None
    record_bytes: int

    @classmethod
    def build(cls, n_embd: int, up_type: QType, down_type: QType, gate_type: QType | None = None) -> BundleLayout:
        """Lay out gate (if any), up and down one after the other; ValueError if n_embd does not fit a type."""
        offset = 0
        parts: list[BundlePart | None] = []
        for qtype in (gate_type, up_type, down_type):
            if qtype is None:
                parts.append(None)
                continue
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if n_embd % block:
                raise ValueError(f"n_embd = {n_embd} values do not fit {ggml_type_name(qtype)} blocks of {block}")
            nbytes = _engine.row_bytes(ggml_type_name(qtype), n_embd)
            parts.append(BundlePart(qtype, offset, nbytes))
            offset += _pad(nbytes, BUNDLE_PART_ALIGNMENT)
        gate, up, down = parts
        assert up is not None and down is not None
        return cls(n_embd, up, down, gate, offset)

    @property
    def parts(self) -> dict[str, BundlePart]:
        named = {"gate": self.gate, "up": self.up, "down": self.down}
        return {name: part for name, part in named.items() if part is not None}


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
class ByteRange:
    """A byte range [offset, offset + length) of the sidecar file."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    def aligned(self, alignment: int = SIDECAR_ALIGNMENT) -> ByteRange:
        """The smallest range with offset and length multiples of `alignment` that covers this one."""
        start = self.offset // alignment * alignment
        return ByteRange(start, _pad(self.end, alignment) - start)


@dataclass(frozen=True)
class NeuronWeights:
    """One neuron's weights decoded to float32, each of n_embd values."""

    gate: np.ndarray | None
    up: np.ndarray
    down: np.ndarray


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
