"""Convert a GGUF model for neuralink: reorder its FFN neurons and write their bundle store.

Writes two files next to each other:
  <name>.neuralink.gguf     the model with every FFN tensor permuted to the
                            placement's neuron order (gate/up rows, their
                            biases, down columns); stock llama.cpp runs it.
  <name>.neuralink.sidecar  the placement and the bundle store the engine
                            reads from flash (docs/sidecar.md).
Both are written to temporary files and renamed when complete; the input is
never modified. See docs/convert.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from gguf import GGMLQuantizationType as QType

from neuralink.formats.files import temporary_path
from neuralink.formats.constants import (
    CONVERTED_SUFFIX,
    KEY_MODEL_ID,
    KEY_PLACEMENT_METHOD,
    KEY_SIDECAR_NAME,
    KEY_SIDECAR_VERSION,
    KEY_SOURCE_SHA256,
    SIDECAR_SUFFIX,
    SIDECAR_VERSION,
)
from neuralink.errors import ModelFileError
from neuralink.formats.ffn_tensors import (
    DOWN_ENCODINGS,
    Activation,
    DownEncoding,
    FfnModel,
    choose_down_type,
    decode_matrix,
    down_columns,
    inspect_ffn_model,
    permute_rows,
)
from neuralink.formats.permuted_gguf import write_permuted_gguf
from neuralink.formats.placement import Placement, file_sha256
from neuralink.convert.predictor import LowRankPredictor, capture_ffn_inputs, fit_lowrank
from neuralink.formats.sidecar import BundleLayout, BundlePart, SidecarHeader, SidecarLayer, write_sidecar
from neuralink.models.synthetic import ggml_type_name

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of source bytes just processed
StageProgress = Callable[[str, int, int], None]  # (stage, done, total) of profiling and placement


@dataclass(frozen=True)
class ConversionPlan:
    """A validated conversion: inputs checked, output types and layouts chosen, nothing written yet."""

    model: FfnModel
    placement: Placement
    output: Path
    sidecar: Path
    source_sha256: str
    model_id: str
    gguf_down_types: tuple[QType, ...]  # per layer: ffn_down's type in the converted GGUF
    layouts: tuple[BundleLayout, ...]  # per layer: the sidecar's bundle record
    predictor: LowRankPredictor | None = None  # written into the sidecar when given

    @property
    def work_bytes(self) -> int:
        """Units of work `progress` reports: source tensor bytes, once per output file."""
        return 2 * sum(t.nbytes for t in self.model.directory.tensors.values())


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


def default_output_paths(model_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """<dir>/<stem>.neuralink.gguf and <dir>/<stem>.neuralink.sidecar for <dir>/<stem>.gguf."""
    model_path = Path(model_path)
    stem = model_path.name.removesuffix(".gguf").removesuffix(".neuralink")
    return model_path.with_name(stem + CONVERTED_SUFFIX), model_path.with_name(stem + SIDECAR_SUFFIX)


def _sidecar_for(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".gguf").removesuffix(".neuralink") + SIDECAR_SUFFIX)


def check_writable(path: Path) -> None:
    directory = path.parent
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory; give a file name for the output")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise ModelFileError(f"{path}: cannot write the output there: {e.strerror or e}") from None


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _check_placement(placement: Placement, where: str, model: FfnModel, sha256: str) -> None:
    placement.validate(where)
    sizes = {len(order) for order in placement.orders}
    if placement.n_layer != model.n_layer or sizes != {model.n_ff}:
        raise ModelFileError(
            f"{where}: placement has {placement.n_layer} layers of {sorted(sizes)} neurons, but "
            f"{model.directory.path} has {model.n_layer} layers of {model.n_ff}: it belongs to another model"
        )
    if placement.model_sha256 != sha256:
        raise ModelFileError(
            f"{where}: placement was made for the model with sha256 {placement.model_sha256[:16]}..., "
            f"but {model.directory.path} has sha256 {sha256[:16]}...: profile and place this model"
        )


def _model_id(source_sha256: str, placement: Placement, gguf_types: tuple[QType, ...],
              layouts: tuple[BundleLayout, ...]) -> str:
    # a digest of everything that decides the converted bytes: same inputs, same id
    h = hashlib.sha256(f"neuralink/{SIDECAR_VERSION}/{source_sha256}/{placement.method}".encode())
    for il, order in enumerate(placement.orders):
        h.update(np.ascontiguousarray(order, dtype="<i4").tobytes())
        h.update(struct.pack("<3I", gguf_types[il], layouts[il].down.type, layouts[il].record_bytes))
    return "nl1-" + h.hexdigest()[:32]


BundleParts = Literal["auto", "gate-up-down", "up-down"]
BUNDLE_PARTS: tuple[BundleParts, ...] = ("auto", "gate-up-down", "up-down")
# activity criteria the gate predictor can evaluate from the gate alone (see docs/engine.md)
GATE_ONLY_CRITERIA = ("gate_magnitude", "relu")


def bundle_has_gate(model: FfnModel, parts: BundleParts, criterion: str) -> bool:
    """Whether records hold gate rows: never for non-gated FFNs; with "auto", unless the gate
    predictor applies (a gate-only criterion), which keeps gate rows resident and reads up+down only."""
    if not model.gated or parts == "up-down":
        return False
    return parts == "gate-up-down" or criterion not in GATE_ONLY_CRITERIA


def bundle_layouts(model: FfnModel, bundle_down_type: DownEncoding = "auto",
                   gate: bool = True) -> tuple[BundleLayout, ...]:
    """Each layer's sidecar record layout: gate (if `gate`) and up in their GGUF types, down in the chosen encoding."""
    try:
        return tuple(
            BundleLayout.build(
                model.n_embd, layer.up.type, choose_down_type(layer.down.type, model.n_embd, bundle_down_type),
                layer.gate.type if layer.gate is not None and gate else None,
            )
            for layer in model.layers
        )
    except ValueError as e:  # a gate/up row always fits its own type: only a corrupt file gets here
        raise ModelFileError(f"{model.directory.path}: {e}") from None


def check_model_and_outputs(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    sidecar: str | os.PathLike[str] | None = None,
    *,
    activation: Activation | None = None,
    force: bool = False,
) -> tuple[FfnModel, Path, Path]:
    """The model's FFN tensors and the two output paths, once both are known to be usable.

    Cheap (reads the model's directory only): run it before minutes of
    profiling. Raises ModelFileError for unreadable or truncated models,
    already converted input without `force`, and unwritable or clashing
    outputs; UnsupportedModelError for architectures and FFN forms.
    """
    model_path = Path(model_path)
    model = inspect_ffn_model(model_path, activation)
    if model.converted and not force:
        raise ModelFileError(
            f"{model_path}: already converted by neuralink (model id {model.directory.get(KEY_MODEL_ID)!r}); "
            "convert the original model, or force it"
        )
    output = Path(output) if output is not None else default_output_paths(model_path)[0]
    sidecar = Path(sidecar) if sidecar is not None else _sidecar_for(output)
    for path in (output, sidecar):
        if path.resolve() == model_path.resolve() or _same_file(path, model_path):
            raise ModelFileError(f"{path}: is the input model; the input is never overwritten")
    if output.resolve() == sidecar.resolve():
        raise ModelFileError(f"{output}: the converted model and the sidecar need different file names")
    check_writable(output)
    check_writable(sidecar)
    return model, output, sidecar


def plan_conversion(
    model_path: str | os.PathLike[str],
    placement: Placement | str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    sidecar: str | os.PathLike[str] | None = None,
    *,
    down_type: DownEncoding = "auto",
    bundle_down_type: DownEncoding = "auto",
    bundle_parts: BundleParts = "auto",
    predictor: LowRankPredictor | None = None,
    activation: Activation | None = None,
    force: bool = False,
) -> ConversionPlan:
    """Check the inputs and outputs of a conversion and choose its encodings; writes nothing.

    Raises what :func:`check_model_and_outputs` raises, and ModelFileError
    for an unreadable placement or one made for another model.
    """
    if down_type not in DOWN_ENCODINGS or bundle_down_type not in DOWN_ENCODINGS:
        raise ValueError(f"down encodings must be one of {DOWN_ENCODINGS}")
    if bundle_parts not in BUNDLE_PARTS:
        raise ValueError(f"bundle parts must be one of {BUNDLE_PARTS}")
    model_path = Path(model_path)
    model, output, sidecar = check_model_and_outputs(model_path, output, sidecar, activation=activation, force=force)

    where = "placement"
    if not isinstance(placement, Placement):
        where = str(placement)
        placement = Placement.load(placement)
    log.info("hashing %s", model_path)
    sha256 = file_sha256(model_path)
    _check_placement(placement, where, model, sha256)

    gguf_types = tuple(choose_down_type(layer.down.type, model.n_ff, down_type) for layer in model.layers)
    layouts = bundle_layouts(model, bundle_down_type, bundle_has_gate(model, bundle_parts, placement.criterion))
    if predictor is not None and len(predictor.layers) != model.n_layer:
        raise ValueError(f"the predictor has {len(predictor.layers)} layers, {model_path} has {model.n_layer}")
    return ConversionPlan(model, placement, output, sidecar, sha256, _model_id(sha256, placement, gguf_types, layouts),
                          gguf_types, layouts, predictor)


def _predictor_header(predictor: LowRankPredictor | None) -> dict[str, object]:
    if predictor is None:
        return {}
    return dict(predictor_rank=predictor.rank, predictor_thresholds=tuple(float(t) for t in predictor.thresholds),
                predictor_recall=predictor.recall_target)


def sidecar_layers(plan: ConversionPlan, data: np.ndarray, progress: Progress) -> Iterator[SidecarLayer]:
    """Each layer's sidecar data for `plan` (records in placed order) from the source GGUF's bytes `data`;
    `progress` gets the source bytes consumed, once per layer."""
    placed_b = plan.predictor.placed(plan.placement.orders) if plan.predictor is not None else None
    for layer, layout in zip(plan.model.layers, plan.layouts):
        order = np.asarray(plan.placement.orders[layer.il], dtype=np.int64)
        records = np.empty((plan.model.n_ff, layout.record_bytes), dtype=np.uint8)
        records[:] = 0  # padding between parts stays zero
        def fill(part: BundlePart, values: np.ndarray) -> None:
            records[:, part.offset:part.offset + part.nbytes] = values

        if layout.gate is not None and layer.gate is not None:
            fill(layout.gate, permute_rows(data, layer.gate, order))
        fill(layout.up, permute_rows(data, layer.up, order))
        down = down_columns(data, layer.down, order, layout.down.type)
        fill(layout.down, down.data)
        yield SidecarLayer(
            order=order.astype(np.int32),
            frequencies=np.asarray(plan.placement.frequencies[layer.il], dtype=np.float32)[order],
            chain_starts=np.asarray(plan.placement.chain_starts[layer.il], dtype=np.int32),
            bundles=records,
            down_error=down.rel_rms_error,
            predictor_a=plan.predictor.layers[layer.il].a if plan.predictor is not None else None,
            predictor_b=placed_b[layer.il] if placed_b is not None else None,
        )
        progress(sum(t.nbytes for t in layer.permuted))


def run_conversion(plan: ConversionPlan, progress: Progress | None = None) -> ConversionResult:
    """Write the converted GGUF and the sidecar of `plan`, streaming one tensor (or layer) at a time.

    Both files are complete before either is renamed into place; on any
    error no output is left behind.
    """
    progress = progress or (lambda n: None)
    start = time.perf_counter()
    model = plan.model
    data = np.memmap(model.directory.path, dtype=np.uint8, mode="r")
    tmp = temporary_path(plan.output)
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
            **_predictor_header(plan.predictor),
        )
        write_sidecar(plan.sidecar, header, plan.layouts, [layer.down.type for layer in model.layers],
                      [len(starts) for starts in plan.placement.chain_starts],
                      recorded(sidecar_layers(plan, data, progress)))
        try:
            os.replace(tmp, plan.output)
        except BaseException:
            plan.sidecar.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise ModelFileError(f"writing {plan.output} and {plan.sidecar} failed: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
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
    predictor: LowRankPredictor | None = None,
    activation: Activation | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ConversionResult:
    """Convert `model_path` with `placement`: :func:`plan_conversion`, then :func:`run_conversion`."""
    plan = plan_conversion(model_path, placement, output, sidecar, down_type=down_type,
                           bundle_down_type=bundle_down_type, bundle_parts=bundle_parts, predictor=predictor,
                           activation=activation, force=force)
    return run_conversion(plan, progress)


def placement_from_text(
    model_path: str | os.PathLike[str],
    texts: Sequence[str | os.PathLike[str]],
    *,
    method: str | None = None,
    density: float | None = None,
    criterion: str | None = None,
    max_tokens: int | None = 4096,
    bundle_bytes: Sequence[int] | None = None,
    workers: int = 2,
    threads: int | None = None,
    progress: StageProgress | None = None,
) -> Placement:
    """Profile `model_path` on the calibration `texts` and place its neurons (`neuralink profile` + `place`).

    `method`, `density` and `criterion` default to those of ``neuralink place``
    and ``neuralink profile``; `bundle_bytes` (per layer, for the placement's
    read-cost model) to the sidecar's records with the default encoding and
    parts. The co-activation masks live in a temporary file only while placing.
    """
    from neuralink.place.orders import DEFAULT_METHOD, METHODS, build_placement, place_layers
    from neuralink.profile.activity import DEFAULT_CRITERION, DEFAULT_DENSITY, profile_model

    chosen = next((m for m in METHODS if m == (method or DEFAULT_METHOD)), None)
    if chosen is None:
        raise ValueError(f"unknown placement method {method!r}; expected one of {METHODS}")
    report = progress or (lambda stage, done, total: None)
    stats = profile_model(model_path, texts, density=density if density is not None else DEFAULT_DENSITY,
                          criterion=criterion or DEFAULT_CRITERION, max_tokens=max_tokens, threads=threads,
                          progress=lambda done, total: report("profile", done, total))
    with tempfile.TemporaryDirectory(prefix="neuralink-convert-") as tmp:
        stats_path = stats.save(Path(tmp) / "calibration.npz")
        if bundle_bytes is None:
            model = inspect_ffn_model(model_path)
            layouts = bundle_layouts(model, gate=bundle_has_gate(model, "auto", stats.criterion))
            bundle_bytes = [lay.record_bytes for lay in layouts]
        results = place_layers(stats_path, [chosen], bundle_bytes=bundle_bytes, workers=workers,
                               progress=lambda done, total: report("place", done, total))
    return build_placement(stats, results, chosen)


def fit_model_predictor(
    model_path: str | os.PathLike[str],
    texts: Sequence[str | os.PathLike[str]],
    placement: Placement,
    *,
    rank: int = 64,
    recall: float = 0.99,
    max_tokens: int = 4096,
    threads: int | None = None,
) -> LowRankPredictor:
    """Fit the low-rank predictor of `model_path` on calibration texts, for the placement's criterion and thresholds."""
    model = inspect_ffn_model(model_path)
    inputs = capture_ffn_inputs(model_path, texts, max_tokens=max_tokens, threads=threads)
    data = np.memmap(model.directory.path, dtype=np.uint8, mode="r")

    def weights(il: int) -> np.ndarray:
        layer = model.layers[il]
        return decode_matrix(data, layer.gate if layer.gate is not None else layer.up)

    return fit_lowrank(inputs, weights, activation=model.activation, criterion=placement.criterion,
                       activity_thresholds=placement.thresholds, rank=rank, recall=recall)


