"""The files `neuralink bench io` replays reads from, all on one storage.

- a bundle store per neuron order (identity, frequency, the placement): a real
  sidecar, written the way `neuralink convert` writes one (the converted GGUF
  itself is not needed: only the bundle store is read);
- the llama.cpp-style tensors: per layer, the gate rows, up rows and down
  "rows" as three separate 4 KiB-aligned tensors in original neuron order.
  A neuron's down weights are a strided column of ``ffn_down``, so they are
  stored transposed (neuron-major), encoded exactly as in the bundles; gate
  and up rows are the model's own bytes. Built from the identity sidecar.

Files already present in the replay directory are reused when they hold the
same content (the sidecar's model id, the tensor file's source id).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neuralink.convert.plan import plan_conversion
from neuralink.convert.writer import sidecar_layers
from neuralink.errors import ModelFileError
from neuralink.formats.bundle_layout import BundleParts
from neuralink.formats.constants import SIDECAR_ALIGNMENT, ffn_tensor_name
from neuralink.formats.ffn_tensors import DownEncoding
from neuralink.formats.files import atomic_gguf
from neuralink.formats.gguf_directory import read_gguf_directory
from neuralink.formats.placement import Placement
from neuralink.formats.sidecar import Sidecar, SidecarHeader, write_sidecar

log = logging.getLogger(__name__)

TENSOR_FILE_ARCHITECTURE = "neuralink_replay"
KEY_REPLAY_SOURCE = "neuralink.replay.source_model_id"
TENSOR_PART_TEMPLATE = "blk.{bid}.replay_{part}"
LayerProgress = Callable[[int], None]  # called with 1 per layer written


@dataclass(frozen=True)
class ReplayLayout:
    """Where a variant's records lie in a replay file.

    regions[i] = (file offset, record bytes, records); steps[s] = the regions
    one layer evaluation reads (one bundle store, or a layer's gate/up/down).
    """

    path: Path
    regions: tuple[tuple[int, int, int], ...]
    steps: tuple[tuple[int, ...], ...]
    bundle_bytes: tuple[int, ...]  # per step: bytes of one neuron's whole bundle (what "one bundle" means)

    @property
    def store_bytes(self) -> int:
        return sum(record * n for _, record, n in self.regions)


def placement_with_order(template: Placement, method: str, orders: list[np.ndarray]) -> Placement:
    """`template`'s profile (frequencies, thresholds, criterion, the contribution criterion's selection tables,
    model) with other neuron orders."""
    return Placement(
        method=method, orders=[np.asarray(o, dtype=np.int32) for o in orders],
        chain_starts=[np.array([0], dtype=np.int32) for _ in orders], frequencies=template.frequencies,
        thresholds=template.thresholds, criterion=template.criterion, n_tokens=template.n_tokens,
        model_sha256=template.model_sha256, selection=template.selection,
    )


def frequency_orders(placement: Placement) -> list[np.ndarray]:
    """Each layer's neurons by decreasing calibration frequency (the paper's Neuralink-S), ties in index order."""
    return [np.argsort(-np.asarray(f, dtype=np.float64), kind="stable") for f in placement.frequencies]


def write_bundle_store(
    model: str | os.PathLike[str], placement: Placement, path: Path, *, bundle_parts: BundleParts = "auto",
    bundle_down_type: DownEncoding = "auto", progress: LayerProgress | None = None,
) -> tuple[Path, bool]:
    """The sidecar of `placement` at `path` (written, or reused when it has the same model id); (path, reused).

    Records are always joint (a neuron's parts side by side, one region per layer), the paper's bundles, also
    for the contribution criterion, whose converted stores split the down columns off."""
    plan = plan_conversion(model, placement, path.with_name(path.name + ".unused.gguf"), path,
                           bundle_parts=bundle_parts, bundle_down_type=bundle_down_type, bundle_layout="joint")
    if path.is_file():
        try:
            with Sidecar.open(path) as existing:
                if existing.header.model_id == plan.model_id:
                    log.info("reusing %s", path)
                    return path, True
        except ModelFileError as e:
            log.info("rewriting %s: %s", path, e)
    source = plan.model
    data = np.memmap(source.directory.path, dtype=np.uint8, mode="r")
    header = SidecarHeader(
        model_id=plan.model_id, source_sha256=plan.source_sha256, source_architecture=source.architecture,
        n_layer=source.n_layer, n_embd=source.n_embd, n_ff=source.n_ff, gated=source.gated,
        activation=source.activation, placement_method=placement.method, criterion=placement.criterion,
        n_tokens=placement.n_tokens, thresholds=tuple(float(t) for t in placement.thresholds),
        bundle_gate=plan.layouts[0].gate is not None,
    )
    def advance(_source_bytes: int) -> None:
        # sidecar_layers reports once per layer
        if progress is not None:
            progress(1)

    try:
        write_sidecar(path, header, plan.layouts, [layer.down.type for layer in source.layers],
                      [len(s) for s in placement.chain_starts], sidecar_layers(plan, data, advance))
    except OSError as e:
        raise ModelFileError(f"{path}: cannot write the replay file ({e.strerror or e})") from None
    finally:
        del data
    return path, False


def bundle_store_layout(path: Path) -> ReplayLayout:
    """The regions of a sidecar's bundle stores: one per layer, one step per layer."""
    with Sidecar.open(path) as sidecar:
        n_ff = sidecar.header.n_ff
        regions = tuple((sidecar.store_offset(il), lay.record_bytes, n_ff) for il, lay in enumerate(sidecar.layouts))
    return ReplayLayout(path, regions, tuple((il,) for il in range(len(regions))),
                        tuple(record for _, record, _ in regions))


def _tensor_file_matches(path: Path, source_id: str, expected: dict[str, tuple[int, int]]) -> bool:
    try:
        directory = read_gguf_directory(path)
    except ModelFileError:
        return False
    if directory.get(KEY_REPLAY_SOURCE) != source_id:
        return False
    return all(name in directory.tensors and directory.tensors[name].shape == shape for name, shape in expected.items())


def write_tensor_file(identity_sidecar: Path, path: Path, progress: LayerProgress | None = None) -> tuple[Path, bool]:
    """Gate, up and down rows of every layer as separate tensors in original order; (path, reused)."""
    with Sidecar.open(identity_sidecar) as sidecar:
        header = sidecar.header
        if not all(np.array_equal(sidecar.order(il), np.arange(header.n_ff)) for il in range(header.n_layer)):
            raise ModelFileError(f"{identity_sidecar}: not in original neuron order")
        names = {(il, part): ffn_tensor_name(TENSOR_PART_TEMPLATE.replace("{part}", part), il)
                 for il, layout in enumerate(sidecar.layouts) for part in layout.parts}
        # ggml order: ne0 (the row) first
        expected = {name: (sidecar.layouts[il].parts[part].nbytes, header.n_ff) for (il, part), name in names.items()}
        if path.is_file() and _tensor_file_matches(path, header.model_id, expected):
            log.info("reusing %s", path)
            return path, True
        int8 = np.dtype(np.int8)
        try:
            with atomic_gguf(path, TENSOR_FILE_ARCHITECTURE) as writer:
                writer.add_custom_alignment(SIDECAR_ALIGNMENT)
                writer.add_string(KEY_REPLAY_SOURCE, header.model_id)
                for name, (nbytes, n_ff) in expected.items():
                    writer.add_tensor_info(name, (n_ff, nbytes), int8, n_ff * nbytes)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for il, layout in enumerate(sidecar.layouts):
                    store = sidecar.bundle_store(il)
                    for part in layout.parts.values():
                        rows = np.ascontiguousarray(store[:, part.offset:part.offset + part.nbytes])
                        writer.write_tensor_data(rows.view(np.int8))
                    if progress is not None:
                        progress(1)
        except OSError as e:
            raise ModelFileError(f"{path}: cannot write the replay file ({e.strerror or e})") from None
    return path, False


def tensor_file_layout(path: Path, bundle_bytes: tuple[int, ...]) -> ReplayLayout:
    """The regions of a tensor file: one per layer and part; one step (all parts of a layer) per layer."""
    directory = read_gguf_directory(path)
    regions: list[tuple[int, int, int]] = []
    steps: list[tuple[int, ...]] = []
    for il in range(len(bundle_bytes)):
        step = []
        for part in ("gate", "up", "down"):
            entry = directory.tensors.get(ffn_tensor_name(TENSOR_PART_TEMPLATE.replace("{part}", part), il))
            if entry is None:
                continue
            step.append(len(regions))
            regions.append((entry.offset, entry.shape[0], entry.shape[1]))
        if not step:
            raise ModelFileError(f"{path}: layer {il} has no replay tensors")
        steps.append(tuple(step))
    return ReplayLayout(path, tuple(regions), tuple(steps), bundle_bytes)


__all__ = [
    "ReplayLayout", "bundle_store_layout", "frequency_orders", "placement_with_order", "tensor_file_layout",
    "write_bundle_store", "write_tensor_file",
]
