"""Write a planned conversion: the permuted GGUF and the sidecar, streamed a tensor (or a layer) at a time.

Both files are written to temporary names and renamed when complete; the
input is never modified.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np

from neuralink.convert.plan import ConversionPlan, Progress, plan_conversion
from neuralink.convert.predictor import LowRankPredictor
from neuralink.errors import ModelFileError
from neuralink.formats.bundle_layout import (
    BundleLayoutName,
    BundlePart,
    BundleParts,
)
from neuralink.formats.constants import (
    KEY_MODEL_ID,
    KEY_PLACEMENT_METHOD,
    KEY_SIDECAR_NAME,
    KEY_SIDECAR_VERSION,
    KEY_SOURCE_SHA256,
    SIDECAR_VERSION,
)
from neuralink.formats.ffn_tensors import (
    Activation,
    DownEncoding,
    down_columns,
    permute_rows,
)
from neuralink.formats.files import commit_pair, conversion_journal, recover_pair, remove_stale_temporaries, temporary_path
from neuralink.formats.ggml_types import ggml_type_name
from neuralink.formats.gguf_directory import read_gguf_directory
from neuralink.formats.permuted_gguf import write_permuted_gguf
from neuralink.formats.placement import Placement
from neuralink import _engine
from neuralink.formats.sidecar import SidecarHeader, SidecarLayer
from neuralink.formats.sidecar_writer import patch_runtime, seal_sidecar, write_unsealed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion wrote, and how far re-encoding moved the down weights."""

    output: Path
    sidecar: Path
    model_id: str
    gguf_down_types: tuple[str, ...]
    gguf_down_errors: tuple[float, ...]  # per layer, relative RMS; 0 when the permutation was exact
    bundle_down_types: tuple[str, ...]
    bundle_down_errors: tuple[float, ...]
    record_bytes: tuple[int, ...]
    seconds: float
    quality: dict[str, Any] = field(default_factory=dict)  # what the quality search measured and chose
    plan: ConversionPlan | None = field(default=None, repr=False)  # what was converted


def _predictor_header(predictor: LowRankPredictor | None) -> dict[str, object]:
    if predictor is None:
        return {}
    return dict(predictor_rank=predictor.rank, predictor_thresholds=tuple(float(t) for t in predictor.thresholds),
                predictor_recall=predictor.recall_target)


def sidecar_layers(plan: ConversionPlan, data: np.ndarray, progress: Progress) -> Iterator[SidecarLayer]:
    """Each layer's sidecar data for `plan` (records in placed order) from the source GGUF's bytes `data`;
    `progress` gets the source bytes consumed, once per layer."""
    placed_b = plan.predictor.placed(plan.placement.orders) if plan.predictor is not None else None
    selection = plan.placement.selection if plan.placement.criterion == "contribution" else None
    n_tokens = max(plan.placement.n_tokens, 1)
    for layer, layout in zip(plan.model.layers, plan.layouts):
        order = np.asarray(plan.placement.orders[layer.il], dtype=np.int64)
        records = np.zeros((plan.model.n_ff, layout.record_bytes), dtype=np.uint8)  # padding stays zero
        down_records = np.zeros((plan.model.n_ff, layout.down_record_bytes), dtype=np.uint8) if layout.split else None

        def fill(part: BundlePart, values: np.ndarray, into: np.ndarray = records) -> None:
            into[:, part.offset:part.offset + part.nbytes] = values

        if layout.gate is not None and layer.gate is not None:
            fill(layout.gate, permute_rows(data, layer.gate, order))
        fill(layout.up, permute_rows(data, layer.up, order))
        down = down_columns(data, layer.down, order, layout.down.type)
        fill(layout.down, down.data, down_records if down_records is not None else records)
        tables: dict[str, np.ndarray] = {}
        if selection is not None:
            # |down column| from the values the engine multiplies: the re-encoded columns
            norms = np.linalg.norm(_engine.dequantize(ggml_type_name(layout.down.type), down.data, plan.model.n_embd),
                                   axis=1).astype(np.float32)
            tables = dict(down_norm=norms,
                          candidate_scale=(selection.up_mean_abs[layer.il][order] * norms).astype(np.float32),
                          candidate_frequency=(selection.candidate_counts[layer.il][order] / n_tokens).astype(np.float32))
        yield SidecarLayer(
            order=order.astype(np.int32),
            frequencies=np.asarray(plan.placement.frequencies[layer.il], dtype=np.float32)[order],
            chain_starts=np.asarray(plan.placement.chain_starts[layer.il], dtype=np.int32),
            bundles=records,
            down_error=down.rel_rms_error,
            predictor_a=plan.predictor.layers[layer.il].a if plan.predictor is not None else None,
            predictor_b=placed_b[layer.il] if placed_b is not None else None,
            down_records=down_records,
            **tables,
        )
        progress(sum(t.nbytes for t in layer.permuted))


def _range_checksums(gguf_path: Path, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    return np.array([(offset, nbytes, _engine.file_block_checksum(os.fspath(gguf_path), offset, nbytes))
                     for offset, nbytes in ranges], dtype=np.uint64)


def model_checksums(gguf_path: Path, replaced: set[str]) -> np.ndarray:
    """(offset, nbytes, checksum) of the header of the GGUF at `gguf_path` and of each of its tensors not in
    `replaced`: the bytes llama.cpp reads from a converted model, for loaders to verify (llama.cpp has no
    checksums of its own)."""
    directory = read_gguf_directory(gguf_path)
    return _range_checksums(gguf_path, [(0, directory.data_offset)] + [
        (t.offset, t.nbytes) for t in directory.tensors.values() if t.name not in replaced])


def down_row_checksums(gguf_path: Path, names: Sequence[str]) -> np.ndarray:
    """(offset, nbytes, checksum) of the tensors `names` (each layer's ffn_down, in layer order) of the GGUF at
    `gguf_path`: rows the engine may hold instead of the sidecar's down columns, verified as it reads them."""
    tensors = read_gguf_directory(gguf_path).tensors
    return _range_checksums(gguf_path, [(tensors[name].offset, tensors[name].nbytes) for name in names])


def initial_runtime_thresholds(placement: Placement) -> tuple[tuple[float, float], ...]:
    """(activity, candidate) per layer before any quality search: the profile's own thresholds."""
    if placement.criterion == "contribution" and placement.selection is not None:
        return tuple((float(t), float(c)) for t, c in zip(placement.thresholds, placement.selection.candidate_thresholds))
    return tuple((float(t), 0.0) for t in placement.thresholds)


# called with the temporary converted GGUF and sidecar before they are committed: the runtime
# (activity, candidate) thresholds to run with and the quality record to keep, or None to keep both as written
Validate = Callable[[Path, Path], "tuple[Sequence[tuple[float, float]], dict[str, Any]] | None"]


def run_conversion(plan: ConversionPlan, progress: Progress | None = None,
                   validate: Validate | None = None) -> ConversionResult:
    """Write the converted GGUF and the sidecar of `plan`, streaming one tensor (or layer) at a time.

    Both files are written under temporary names, `validate` may then measure
    them and choose the runtime thresholds, and the pair is committed with a
    journal (``commit_pair``): a kill at any instant leaves the old pair or the
    new one. On any error no output is left behind. Temporaries that earlier,
    killed conversions left are removed first.
    """
    progress = progress or (lambda n: None)
    start = time.perf_counter()
    model = plan.model
    for path in (plan.output, plan.sidecar):
        for stale in remove_stale_temporaries(path):
            log.info("removed %s, left by an interrupted conversion", stale)
    recover_pair(conversion_journal(plan.output))
    data = np.memmap(model.directory.path, dtype=np.uint8, mode="r")
    tmp = temporary_path(plan.output)
    tmp_sidecar = temporary_path(plan.sidecar)
    quality: dict[str, Any] = {"validated": False}
    try:
        metadata = {
            KEY_MODEL_ID: plan.model_id,
            KEY_SIDECAR_VERSION: SIDECAR_VERSION,
            KEY_SIDECAR_NAME: plan.sidecar.name,
            KEY_SOURCE_SHA256: plan.source_sha256,
            KEY_PLACEMENT_METHOD: plan.placement.method,
        }
        gguf_errors = write_permuted_gguf(model, data, plan.placement.orders, plan.gguf_down_types, metadata, tmp,
                                          progress)
        # the source bytes the sidecar pass reads but that no layer covers (attention, embeddings) count as done
        progress(sum(t.nbytes for t in model.directory.tensors.values())
                 - sum(t.nbytes for layer in model.layers for t in layer.permuted))
        bundle_errors: list[float] = []

        def recorded(layers: Iterator[SidecarLayer]) -> Iterator[SidecarLayer]:
            for layer in layers:
                bundle_errors.append(layer.down_error)
                yield layer

        header = SidecarHeader(
            model_id=plan.model_id,
            source_sha256=plan.source_sha256,
            source_architecture=model.architecture,
            n_layer=model.n_layer,
            n_embd=model.n_embd,
            n_ff=model.n_ff,
            gated=model.gated,
            activation=model.activation,
            placement_method=plan.placement.method,
            criterion=plan.placement.criterion,
            n_tokens=plan.placement.n_tokens,
            thresholds=tuple(float(t) for t in plan.placement.thresholds),
            bundle_gate=plan.layouts[0].gate is not None,
            layout=plan.layouts[0].layout,  # type: ignore[arg-type]
            runtime_thresholds=initial_runtime_thresholds(plan.placement),
            quality={"validated": False},
            **_predictor_header(plan.predictor),
        )
        write_unsealed(tmp_sidecar, header, plan.layouts, [layer.down.type for layer in model.layers],
                       [len(starts) for starts in plan.placement.chain_starts],
                       recorded(sidecar_layers(plan, data, progress)),
                       # the engine reads up and down from the sidecar only; gate rows and biases from the GGUF
                       model_checksums(tmp, {t.name for layer in model.layers for t in (layer.up, layer.down)}),
                       # and, holding the whole store in DRAM, the down rows (SparseFfn::use_down_rows)
                       down_row_checksums(tmp, [layer.down.name for layer in model.layers]))
        seal_sidecar(tmp_sidecar)
        if validate is not None:
            chosen = validate(tmp, tmp_sidecar)
            if chosen is not None:
                runtime, quality = chosen
                patch_runtime(tmp_sidecar, runtime, quality)
        commit_pair([(tmp_sidecar, plan.sidecar), (tmp, plan.output)], conversion_journal(plan.output))
    except OSError as e:
        raise ModelFileError(f"writing {plan.output} and {plan.sidecar} failed: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)
        del data
    seconds = time.perf_counter() - start
    log.info("converted %s -> %s + %s in %.1f s", model.directory.path, plan.output, plan.sidecar, seconds)
    return ConversionResult(
        output=plan.output,
        sidecar=plan.sidecar,
        model_id=plan.model_id,
        gguf_down_types=tuple(ggml_type_name(t) for t in plan.gguf_down_types),
        gguf_down_errors=tuple(gguf_errors),
        bundle_down_types=tuple(ggml_type_name(lay.down.type) for lay in plan.layouts),
        bundle_down_errors=tuple(bundle_errors),
        record_bytes=tuple(lay.record_bytes for lay in plan.layouts),
        seconds=seconds,
        quality=quality,
        plan=plan,
    )


def convert_model(
    model_path: str | os.PathLike[str],
    placement: Placement | str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    sidecar: str | os.PathLike[str] | None = None,
    *,
    down_type: DownEncoding = "auto",
    bundle_down_type: DownEncoding = "auto",
    bundle_parts: BundleParts = "auto",
    bundle_layout: BundleLayoutName = "auto",
    predictor: LowRankPredictor | None = None,
    activation: Activation | None = None,
    force: bool = False,
    progress: Progress | None = None,
    validate: Validate | None = None,
) -> ConversionResult:
    """Convert `model_path` with `placement`: :func:`plan_conversion`, then :func:`run_conversion`."""
    plan = plan_conversion(model_path, placement, output, sidecar, down_type=down_type,
                           bundle_down_type=bundle_down_type, bundle_parts=bundle_parts, bundle_layout=bundle_layout,
                           predictor=predictor, activation=activation, force=force)
    return run_conversion(plan, progress, validate)
