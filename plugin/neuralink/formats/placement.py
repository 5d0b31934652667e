"""The placement record: per layer, the order in which neurons are stored.

Written by ``neuralink place``, read by ``neuralink convert``. One ``.npz``
file, written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neuralink.errors import ModelFileError
from neuralink.formats.coactivation import SelectionStats
from neuralink.formats.files import check_npz_file, save_npz

# 2: the contribution criterion's selection tables, when the profile has them
PLACEMENT_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class Placement:
    """Neuron order of every FFN layer, with the profile it came from.

    orders[l][k] is the ORIGINAL index of the neuron stored at position k of
    layer l (a permutation of range(n_ff)). chain_starts[l] holds the sorted
    positions where a chain (a linked run of co-activated neurons) begins; the
    first is 0. frequencies[l][i] is P(neuron i active) on the calibration
    text, in original indexing. thresholds[l] is the activation-magnitude
    threshold that defined "active" (0 for native ReLU zeros).
    """

    method: str
    orders: list[np.ndarray]
    chain_starts: list[np.ndarray]
    frequencies: list[np.ndarray]
    thresholds: np.ndarray
    criterion: str
    n_tokens: int
    model_sha256: str
    selection: SelectionStats | None = None  # contribution criterion: score quantiles, E|up|, candidate counts

    @property
    def n_layer(self) -> int:
        return len(self.orders)

    def validate(self, where: str = "placement") -> None:
        """Raise ModelFileError unless every layer's order is a permutation and the rest fits."""
        if not (len(self.chain_starts) == len(self.frequencies) == self.n_layer == len(self.thresholds)):
            raise ModelFileError(f"{where}: per-layer arrays disagree on the number of layers")
        for il, order in enumerate(self.orders):
            n_ff = len(order)
            if not np.array_equal(np.sort(order), np.arange(n_ff)):
                raise ModelFileError(f"{where}: layer {il} order is not a permutation of 0..{n_ff - 1}")
            starts = self.chain_starts[il]
            if len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n_ff:
                raise ModelFileError(f"{where}: layer {il} chain starts must be increasing from 0 below {n_ff}")
            if len(self.frequencies[il]) != n_ff:
                raise ModelFileError(f"{where}: layer {il} has {len(self.frequencies[il])} frequencies for {n_ff} neurons")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to `path` (.npz) through a temporary file and a rename."""
        self.validate()
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(PLACEMENT_FORMAT_VERSION),
            "method": np.array(self.method),
            "criterion": np.array(self.criterion),
            "n_tokens": np.array(self.n_tokens),
            "model_sha256": np.array(self.model_sha256),
            "thresholds": np.asarray(self.thresholds, dtype=np.float32),
        }
        for il in range(self.n_layer):
            arrays[f"order_{il}"] = np.asarray(self.orders[il], dtype=np.int32)
            arrays[f"chain_starts_{il}"] = np.asarray(self.chain_starts[il], dtype=np.int32)
            arrays[f"frequencies_{il}"] = np.asarray(self.frequencies[il], dtype=np.float32)
        if self.selection is not None:
            arrays.update(self.selection.arrays())
        return save_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Placement:
        """Read a placement file; ModelFileError naming the file when it is not one."""
        check_npz_file(path, "neuralink placement file")
        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["format_version"])
                if version not in READABLE_VERSIONS:
                    raise ModelFileError(
                        f"{path}: placement format version {version}, expected {PLACEMENT_FORMAT_VERSION}"
                    )
                n_layer = len(z["thresholds"])
                placement = cls(
                    method=str(z["method"]),
                    orders=[z[f"order_{il}"] for il in range(n_layer)],
                    chain_starts=[z[f"chain_starts_{il}"] for il in range(n_layer)],
                    frequencies=[z[f"frequencies_{il}"] for il in range(n_layer)],
                    thresholds=z["thresholds"],
                    criterion=str(z["criterion"]),
                    n_tokens=int(z["n_tokens"]),
                    model_sha256=str(z["model_sha256"]),
                    selection=SelectionStats.from_arrays(z),
                )
        except ModelFileError:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise ModelFileError(f"{path}: not a neuralink placement file ({e})") from None
        placement.validate(str(path))
        return placement
