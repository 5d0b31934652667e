"""A neuron's bundle record: which parts it holds, their layout, the byte ranges of runs, decoded weights.

A bundle is one neuron's [gate row | up row | down column] as the sidecar
stores it (docs/sidecar.md): in one record ("joint"), or as a [gate | up]
record and a down record in a region of its own ("split").
`neuralink.formats.sidecar` writes and reads records laid out here; placement
sizes its cost model from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from neuralink import _engine
from neuralink.errors import ModelFileError
from neuralink.formats.constants import BUNDLE_PART_ALIGNMENT, SIDECAR_ALIGNMENT
from neuralink.formats.ffn_tensors import DownEncoding, FfnModel, choose_bundle_down_type
from neuralink.formats.ggml_types import ggml_type_name


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
    """The layout of one layer's records, each part padded to 4 bytes: [gate | up | down] ("joint"), or
    [gate | up] records plus [down] records of `down_record_bytes` in a region of their own ("split")."""

    n_embd: int
    up: BundlePart
    down: BundlePart  # split: its offset is within the down record
    gate: BundlePart | None
    record_bytes: int  # of a [gate | up | down] or [gate | up] record
    split: bool = False
    down_record_bytes: int = 0  # split only

    @classmethod
    def build(cls, n_embd: int, up_type: QType, down_type: QType, gate_type: QType | None = None,
              split: bool = False) -> BundleLayout:
        """Lay out gate (if any), up and down one after the other (down in its own record when `split`);
        ValueError if n_embd does not fit a type."""
        offset = 0
        parts: list[BundlePart | None] = []
        down_record = 0
        for name, qtype in (("gate", gate_type), ("up", up_type), ("down", down_type)):
            if qtype is None:
                parts.append(None)
                continue
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if n_embd % block:
                raise ValueError(f"n_embd = {n_embd} values do not fit {ggml_type_name(qtype)} blocks of {block}")
            nbytes = _engine.row_bytes(ggml_type_name(qtype), n_embd)
            if name == "down" and split:
                parts.append(BundlePart(qtype, 0, nbytes))
                down_record = _pad(nbytes, BUNDLE_PART_ALIGNMENT)
                continue
            parts.append(BundlePart(qtype, offset, nbytes))
            offset += _pad(nbytes, BUNDLE_PART_ALIGNMENT)
        gate, up, down = parts
        assert up is not None and down is not None
        return cls(n_embd, up, down, gate, offset, split, down_record)

    @property
    def layout(self) -> str:
        """"split" or "joint", as the sidecar records it."""
        return "split" if self.split else "joint"

    @property
    def neuron_bytes(self) -> int:
        """All bytes of one neuron's records."""
        return self.record_bytes + self.down_record_bytes

    @property
    def parts(self) -> dict[str, BundlePart]:
        named = {"gate": self.gate, "up": self.up, "down": self.down}
        return {name: part for name, part in named.items() if part is not None}


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


BundleParts = Literal["auto", "gate-up-down", "up-down"]


BUNDLE_PARTS: tuple[BundleParts, ...] = ("auto", "gate-up-down", "up-down")


# activity criteria the gate predictor can evaluate from resident gate rows (see docs/engine.md): the
# contribution criterion decides whose up row to read from the gate, and the rest once the up row is there
GATE_ONLY_CRITERIA = ("gate_magnitude", "relu", "contribution")

BundleLayoutName = Literal["auto", "joint", "split"]
BUNDLE_LAYOUTS: tuple[BundleLayoutName, ...] = ("auto", "joint", "split")


def bundle_split(layout: BundleLayoutName, criterion: str) -> bool:
    """Whether down columns get a region of their own: "auto" splits them for the contribution criterion,
    where a neuron's up row decides whether its down column is needed."""
    if layout not in BUNDLE_LAYOUTS:
        raise ValueError(f"unknown bundle layout {layout!r}; expected one of {BUNDLE_LAYOUTS}")
    return layout == "split" or (layout == "auto" and criterion == "contribution")


def bundle_has_gate(model: FfnModel, parts: BundleParts, criterion: str) -> bool:
    """Whether records hold gate rows: never for non-gated FFNs; with "auto", unless the gate
    predictor applies (a gate-only criterion), which keeps gate rows resident and reads up+down only."""
    if not model.gated or parts == "up-down":
        return False
    return parts == "gate-up-down" or criterion not in GATE_ONLY_CRITERIA


def bundle_layouts(model: FfnModel, bundle_down_type: DownEncoding = "auto",
                   gate: bool = True, split: bool = False) -> tuple[BundleLayout, ...]:
    """Each layer's sidecar record layout: gate (if `gate`) and up in their GGUF types, down in the chosen
    encoding, in the same record or (`split`) in one of its own."""
    try:
        return tuple(
            BundleLayout.build(
                model.n_embd, layer.up.type, choose_bundle_down_type(layer.down.type, model.n_embd, bundle_down_type),
                layer.gate.type if layer.gate is not None and gate else None, split,
            )
            for layer in model.layers
        )
    except ValueError as e:  # a gate/up row always fits its own type: only a corrupt file gets here
        raise ModelFileError(f"{model.directory.path}: {e}") from None
