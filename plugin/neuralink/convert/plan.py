"""Plan a conversion: check the model, the placement and the outputs, choose encodings and record layouts.

A conversion writes two files next to each other:
  <name>.neuralink.gguf     the model with every FFN tensor permuted to the
                            placement's neuron order (gate/up rows, their
                            biases, down columns); stock llama.cpp runs it.
  <name>.neuralink.sidecar  the placement and the bundle store the engine
                            reads from flash (docs/sidecar.md).
:func:`plan_conversion` checks everything and writes nothing;
``neuralink.convert.writer`` writes the plan. See docs/convert.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType as QType

from neuralink.convert.predictor import LowRankPredictor
from neuralink.errors import ModelFileError, OptionError
from neuralink.formats.bundle_layout import (
    BUNDLE_LAYOUTS,
    BUNDLE_PARTS,
    BundleLayout,
    BundleLayoutName,
    BundleParts,
    bundle_has_gate,
    bundle_layouts,
    bundle_split,
)
from neuralink.formats.constants import (
    CONVERTED_SUFFIX,
    KEY_MODEL_ID,
    SIDECAR_SUFFIX,
)
from neuralink.formats.ffn_tensors import (
    DOWN_ENCODINGS,
    Activation,
    DownEncoding,
    FfnModel,
    choose_down_type,
    inspect_ffn_model,
)
from neuralink.formats.files import file_sha256, same_file, temporary_path
from neuralink.formats.placement import Placement
from neuralink.formats.sidecar_records import sidecar_model_id

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of source bytes just processed


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


def default_output_paths(model_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """<dir>/<stem>.neuralink.gguf and <dir>/<stem>.neuralink.sidecar for <dir>/<stem>.gguf."""
    model_path = Path(model_path)
    stem = model_path.name.removesuffix(".gguf").removesuffix(".neuralink")
    return model_path.with_name(stem + CONVERTED_SUFFIX), model_path.with_name(stem + SIDECAR_SUFFIX)


def _sidecar_for(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".gguf").removesuffix(".neuralink") + SIDECAR_SUFFIX)


def check_writable(path: Path) -> None:
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory; give a file name for the output")
    # an empty file created and removed, named as the writer's temporaries so that one a kill leaves between
    # the two is removed by the next conversion (remove_stale_temporaries)
    probe = temporary_path(path)
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as e:
        raise ModelFileError(f"{path}: cannot write the output there: {e.strerror or e}") from None


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
            "convert the original model, or force it (--force, force=True)"
        )
    output = Path(output) if output is not None else default_output_paths(model_path)[0]
    sidecar = Path(sidecar) if sidecar is not None else _sidecar_for(output)
    for path in (output, sidecar):
        if same_file(path, model_path):
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
    bundle_layout: BundleLayoutName = "auto",
    predictor: LowRankPredictor | None = None,
    activation: Activation | None = None,
    force: bool = False,
) -> ConversionPlan:
    """Check the inputs and outputs of a conversion and choose its encodings; writes nothing.

    Raises what :func:`check_model_and_outputs` raises, and ModelFileError
    for an unreadable placement or one made for another model.
    """
    if down_type not in DOWN_ENCODINGS or bundle_down_type not in DOWN_ENCODINGS:
        raise OptionError(f"down encodings must be one of {DOWN_ENCODINGS}")
    if bundle_parts not in BUNDLE_PARTS:
        raise OptionError(f"bundle parts must be one of {BUNDLE_PARTS}")
    if bundle_layout not in BUNDLE_LAYOUTS:
        raise OptionError(f"bundle layout must be one of {BUNDLE_LAYOUTS}")
    model_path = Path(model_path)
    model, output, sidecar = check_model_and_outputs(model_path, output, sidecar, activation=activation, force=force)

    where = "placement"
    if not isinstance(placement, Placement):
        where = str(placement)
        placement = Placement.load(placement)
    log.info("hashing %s", model_path)
    sha256 = file_sha256(model_path)
    _check_placement(placement, where, model, sha256)

    # the quality search scores the converted GGUF's rows in place of the sidecar's columns: an explicit column
    # type goes to the rows too (unless they have one of their own), so that its cost is in what the search measures
    row_policy = bundle_down_type if down_type == "auto" else down_type
    gguf_types = tuple(choose_down_type(layer.down.type, model.n_ff, row_policy) for layer in model.layers)
    if placement.criterion == "contribution" and placement.selection is None:
        raise ModelFileError(f"{where}: a contribution-criterion placement without its selection tables "
                             "(profile and place the model again)")
    split = bundle_split(bundle_layout, placement.criterion)
    layouts = bundle_layouts(model, bundle_down_type, bundle_has_gate(model, bundle_parts, placement.criterion), split)
    if predictor is not None and len(predictor.layers) != model.n_layer:
        raise OptionError(f"the predictor has {len(predictor.layers)} layers, {model_path} has {model.n_layer}")
    model_id = sidecar_model_id(sha256, placement.method, "split" if split else "joint", placement.criterion,
                                placement.orders, layouts)
    return ConversionPlan(model, placement, output, sidecar, sha256, model_id, gguf_types, layouts, predictor)


