"""Co-activation statistics: which FFN neurons were active for which token.

Written by ``neuralink profile``, read by ``neuralink place`` and ``neuralink
plot``. The file keeps every token's active-neuron mask, bit-packed, one
layer per array: co-activation counts are derived from the masks one layer at
a time (``coactivation_counts``), so no n_ff x n_ff matrix is ever stored and
held-out text can be scored token by token. The format is in docs/profile.md.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from neuralink.errors import ModelFileError
from neuralink.formats.files import check_npz_file, save_npz

COACTIVATION_FORMAT_VERSION = 1
COACTIVATION_KIND = "neuralink.formats.coactivation"

# "relu": the FFN zeroes inactive neurons itself; "magnitude": |act(gate) * up| (the input of ffn_down)
# > a per-layer threshold; "gate_magnitude": |act(gate)| > a per-layer threshold (CATS), which a
# runtime can decide from the gate rows alone; "contribution": |act(gate) * up| * |down column| > a
# per-layer threshold, among the candidates |act(gate)| * E|up| * |down column| > another (docs/profile.md)
Criterion = Literal["relu", "magnitude", "gate_magnitude", "contribution"]
CRITERIA: tuple[Criterion, ...] = get_args(Criterion)

# bit k of mask byte b is neuron 8b + k
MASK_BIT_ORDER: Literal["little"] = "little"
# float32 sums of 0/1 values stay exact below 2**24
_EXACT_FLOAT32_COUNT = 1 << 24
_COUNT_CHUNK_TOKENS = 2048


def pack_masks(active: np.ndarray) -> np.ndarray:
    """Bit-pack a boolean (n_tokens, n_ff) mask into uint8 (n_tokens, ceil(n_ff / 8))."""
    return np.packbits(active, axis=1, bitorder=MASK_BIT_ORDER)


def unpack_masks(packed: np.ndarray, n_ff: int) -> np.ndarray:
    """The boolean (n_tokens, n_ff) mask of `pack_masks` output."""
    return np.unpackbits(packed, axis=1, count=n_ff, bitorder=MASK_BIT_ORDER).view(bool)


# densities of the score quantile tables: QUANTILE_POINTS evenly from 0 to 1
QUANTILE_POINTS = 1001


@dataclass
class SelectionStats:
    """What a threshold at any density needs, per layer (original neuron indexing).

    score_quantiles[l, w, k] is the score that a fraction k / (QUANTILE_POINTS - 1)
    of layer l's calibration (token, neuron) scores exceeds, for w = 0 the final
    score (the criterion's value) and w = 1 the candidate score (what is known
    before reading: |act(gate)| * candidate scale); up_mean_abs[l, i] is E|up_i|
    and candidate_counts[l, i] the tokens in which neuron i was a candidate.
    """

    score_quantiles: np.ndarray  # float32 (n_layer, 2, QUANTILE_POINTS)
    up_mean_abs: np.ndarray  # float32 (n_layer, n_ff)
    candidate_counts: np.ndarray  # int64 (n_layer, n_ff)
    candidate_thresholds: np.ndarray  # float32 (n_layer,): at the profile's candidate density

    def threshold(self, layer: int, density: float, candidate: bool = False) -> float:
        """The score that a fraction `density` of layer `layer`'s calibration scores exceeds (interpolated)."""
        table = self.score_quantiles[layer, 1 if candidate else 0]
        if density >= 1.0:
            return 0.0
        grid = np.linspace(0.0, 1.0, table.size)
        return float(max(np.interp(density, grid, table), 0.0))

    ARRAYS = ("score_quantiles", "up_mean_abs", "candidate_counts", "candidate_thresholds")

    def arrays(self, prefix: str = "selection_") -> dict[str, np.ndarray]:
        return {prefix + name: np.asarray(getattr(self, name)) for name in self.ARRAYS}

    @classmethod
    def from_arrays(cls, z: object, prefix: str = "selection_") -> SelectionStats | None:
        if prefix + "score_quantiles" not in z:  # type: ignore[operator]
            return None
        return cls(**{name: np.asarray(z[prefix + name]) for name in cls.ARRAYS})  # type: ignore[index]


@dataclass
class CoactivationStats:
    """Per-layer, per-token active-neuron masks of one model over one text.

    masks[l] is uint8 (n_tokens, ceil(n_ff / 8)), bit-packed (``pack_masks``);
    activation_counts[l, i] is the number of tokens in which neuron i of layer
    l was active: with criterion "relu" when its activation is non-zero
    (thresholds are 0), otherwise when the magnitude of `activation` exceeds
    thresholds[l]. `activation` names what was thresholded, in llama.cpp's
    tensor names: "ffn_swiglu" (the input of ffn_down, criterion
    "magnitude"), "silu(ffn_gate)" (criterion "gate_magnitude"), "ffn_sqr(relu)".
    """

    model_sha256: str
    model_name: str
    architecture: str
    activation: str
    criterion: Criterion
    target_density: float
    thresholds: np.ndarray
    n_ff: int
    window: int
    sources: tuple[str, ...]
    n_tokens: int
    activation_counts: np.ndarray
    masks: list[np.ndarray] | None
    selection: SelectionStats | None = None  # the contribution criterion's tables

    @property
    def n_layer(self) -> int:
        return len(self.thresholds)

    def frequencies(self, layer: int) -> np.ndarray:
        """P(neuron i active) in `layer`, float64 (n_ff,)."""
        return self.activation_counts[layer] / max(self.n_tokens, 1)

    def densities(self) -> np.ndarray:
        """Fraction of active neurons per layer, float64 (n_layer,)."""
        return self.activation_counts.sum(axis=1) / max(self.n_tokens * self.n_ff, 1)

    def packed_masks(self, layer: int) -> np.ndarray:
        """Bit-packed (n_tokens, ceil(n_ff / 8)) masks of `layer`; ValueError if loaded without masks."""
        if self.masks is None:
            raise ValueError("these co-activation stats were loaded without masks")
        return self.masks[layer]

    def layer_masks(self, layer: int) -> np.ndarray:
        """Boolean (n_tokens, n_ff) active masks of `layer`."""
        return unpack_masks(self.packed_masks(layer), self.n_ff)

    def validate(self, where: str = "co-activation stats") -> None:
        """Raise ModelFileError unless shapes, counts and criterion agree."""
        n_layer, n_ff = self.n_layer, self.n_ff
        if self.criterion not in CRITERIA:
            raise ModelFileError(f"{where}: criterion {self.criterion!r} is not one of {CRITERIA}")
        if self.activation_counts.shape != (n_layer, n_ff):
            raise ModelFileError(
                f"{where}: activation counts of shape {self.activation_counts.shape} "
                f"for {n_layer} layers of {n_ff} neurons"
            )
        if np.any(self.activation_counts < 0) or np.any(self.activation_counts > self.n_tokens):
            raise ModelFileError(f"{where}: activation counts outside 0..{self.n_tokens}")
        if self.masks is None:
            return
        if len(self.masks) != n_layer:
            raise ModelFileError(f"{where}: {len(self.masks)} mask arrays for {n_layer} layers")
        n_bytes = math.ceil(n_ff / 8)
        for il, packed in enumerate(self.masks):
            if packed.dtype != np.uint8 or packed.shape != (self.n_tokens, n_bytes):
                raise ModelFileError(
                    f"{where}: layer {il} masks are {packed.dtype} {packed.shape}, "
                    f"expected uint8 ({self.n_tokens}, {n_bytes})"
                )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to `path` (.npz, uncompressed) through a temporary file and a rename."""
        self.validate()
        if self.masks is None:
            raise ValueError("cannot save co-activation stats loaded without masks")
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(COACTIVATION_FORMAT_VERSION),
            "kind": np.array(COACTIVATION_KIND),
            "model_sha256": np.array(self.model_sha256),
            "model_name": np.array(self.model_name),
            "architecture": np.array(self.architecture),
            "activation": np.array(self.activation),
            "criterion": np.array(self.criterion),
            "target_density": np.array(self.target_density, dtype=np.float64),
            "thresholds": np.asarray(self.thresholds, dtype=np.float32),
            "n_ff": np.array(self.n_ff, dtype=np.int64),
            "window": np.array(self.window, dtype=np.int64),
            "n_tokens": np.array(self.n_tokens, dtype=np.int64),
            "sources": np.array(self.sources, dtype=str),
            "activation_counts": np.asarray(self.activation_counts, dtype=np.int64),
        }
        arrays.update((f"masks_{il}", packed) for il, packed in enumerate(self.masks))
        if self.selection is not None:
            arrays.update(self.selection.arrays())
        return save_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, with_masks: bool = True) -> CoactivationStats:
        """Read a stats file; without masks (`with_masks=False`) only counts and thresholds load."""
        check_npz_file(path, "neuralink co-activation stats file")
        try:
            with np.load(path, allow_pickle=False) as z:
                _check_header(z, path)
                n_layer = len(z["thresholds"])
                masks = [z[f"masks_{il}"] for il in range(n_layer)] if with_masks else None
                stats = cls(
                    model_sha256=str(z["model_sha256"]),
                    model_name=str(z["model_name"]),
                    architecture=str(z["architecture"]),
                    activation=str(z["activation"]),
                    criterion=str(z["criterion"]),  # type: ignore[arg-type]  # checked by validate()
                    target_density=float(z["target_density"]),
                    thresholds=z["thresholds"],
                    n_ff=int(z["n_ff"]),
                    window=int(z["window"]),
                    sources=tuple(str(s) for s in z["sources"]),
                    n_tokens=int(z["n_tokens"]),
                    activation_counts=z["activation_counts"],
                    masks=masks,
                    selection=SelectionStats.from_arrays(z),
                )
        except ModelFileError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ModelFileError(f"{path}: not a neuralink co-activation stats file ({e})") from None
        stats.validate(str(path))
        return stats


def _check_header(z: np.lib.npyio.NpzFile, path: str | os.PathLike[str]) -> None:
    if "kind" not in z.files or str(z["kind"]) != COACTIVATION_KIND:
        raise ModelFileError(f"{path}: not a neuralink co-activation stats file (no kind {COACTIVATION_KIND!r})")
    version = int(z["format_version"])
    if version != COACTIVATION_FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: co-activation stats format version {version}, expected {COACTIVATION_FORMAT_VERSION}"
        )


def load_layer_masks(path: str | os.PathLike[str], layer: int) -> np.ndarray:
    """One layer's packed masks from a stats file, without reading the other layers."""
    try:
        with np.load(path, allow_pickle=False) as z:
            _check_header(z, path)
            return z[f"masks_{layer}"]
    except ModelFileError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ModelFileError(f"{path}: cannot read layer {layer} masks ({e})") from None


def coactivation_counts(packed: np.ndarray, n_ff: int) -> np.ndarray:
    """C[i, j] = number of tokens in which neurons i and j were both active; float32 (n_ff, n_ff).

    Computed as masks^T masks with BLAS, over chunks of tokens and blocks of
    rows, upper triangle only, then mirrored; the diagonal holds the
    activation counts. Peak memory is the n_ff^2 result plus two
    chunk-sized buffers (2048 tokens x n_ff float32 each).
    """
    n_tokens = packed.shape[0]
    dtype = np.float32 if n_tokens < _EXACT_FLOAT32_COUNT else np.float64
    counts = np.zeros((n_ff, n_ff), dtype=dtype)
    block = _COUNT_CHUNK_TOKENS
    for start in range(0, n_tokens, _COUNT_CHUNK_TOKENS):
        chunk = unpack_masks(packed[start : start + _COUNT_CHUNK_TOKENS], n_ff).astype(dtype)
        for row in range(0, n_ff, block):
            # rows [row, row + block) against columns from `row` on: each pair once, in place
            counts[row : row + block, row:] += chunk[:, row : row + block].T @ chunk[:, row:]
    for row in range(0, n_ff, block):
        counts[row + block :, row : row + block] = counts[row : row + block, row + block :].T
    return counts
