"""The profile -> place -> convert -> validate pipeline from calibration text, and the predictor fitted on the way.

`convert_from_text` keeps the end of the calibration text aside, profiles
and places on the rest, writes the pair, and runs the quality search on the
held-out part before the pair is committed (neuralink.convert.quality).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from neuralink.convert.contribution_predictor import fit_thresholds, measure_recall, placed_layers
from neuralink.convert.contribution_predictor import summary as recall_summary
from neuralink.convert.plan import check_model_and_outputs, plan_conversion
from neuralink.convert.predictor import LowRankPredictor, capture_ffn_inputs, fit_lowrank
from neuralink.convert.quality import (
    DEFAULT_BUDGET,
    DEFAULT_HELDOUT_TOKENS,
    DEFAULT_KLD_BUDGET,
    Allocation,
    ContributionScorer,
    measure_against_source,
    measure_predictor,
    search,
)
from neuralink.convert.writer import ConversionResult, run_conversion
from neuralink.errors import OptionError, ProfileError
from neuralink.formats.bundle_layout import (
    BundleLayoutName,
    BundleParts,
    bundle_has_gate,
    bundle_layouts,
    bundle_split,
)
from neuralink.formats.ffn_tensors import (
    Activation,
    DownEncoding,
    decode_matrix,
    inspect_ffn_model,
)
from neuralink.formats.placement import Placement
from neuralink.formats.sidecar import Sidecar
from neuralink.formats.sidecar_writer import patch_predictor_thresholds, patch_runtime
from neuralink.place.orders import DEFAULT_METHOD, METHODS, build_placement, place_layers
from neuralink.profile.activity import DEFAULT_CRITERION, profile_model
from neuralink.profile.text import calibration_documents, split_heldout, write_documents

StageProgress = Callable[[str, int, int], None]  # (stage, done, total) of profiling and placement


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

    chosen = next((m for m in METHODS if m == (method or DEFAULT_METHOD)), None)
    if chosen is None:
        raise OptionError(f"unknown placement method {method!r}; expected one of {METHODS}")
    report = progress or (lambda stage, done, total: None)
    stats = profile_model(model_path, texts, density=density,
                          criterion=criterion or DEFAULT_CRITERION, max_tokens=max_tokens, threads=threads,
                          progress=lambda done, total: report("profile", done, total))
    with tempfile.TemporaryDirectory(prefix="neuralink-convert-") as tmp:
        stats_path = stats.save(Path(tmp) / "calibration.npz")
        if bundle_bytes is None:
            model = inspect_ffn_model(model_path)
            layouts = bundle_layouts(model, gate=bundle_has_gate(model, "auto", stats.criterion),
                                     split=bundle_split("auto", stats.criterion))
            bundle_bytes = [lay.neuron_bytes for lay in layouts]
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
    inputs: Sequence[np.ndarray] | None = None,
) -> LowRankPredictor:
    """Fit the low-rank predictor of `model_path` on calibration texts (or on their FFN `inputs`, captured
    already), for the placement's criterion and thresholds. Under the contribution criterion only the gate's
    factors: the thresholds follow the quality search (set_contribution_thresholds)."""
    model = inspect_ffn_model(model_path)
    if inputs is None:
        inputs = capture_ffn_inputs(model_path, texts, max_tokens=max_tokens, threads=threads)
    data = np.memmap(model.directory.path, dtype=np.uint8, mode="r")

    def weights(il: int) -> np.ndarray:
        layer = model.layers[il]
        return decode_matrix(data, layer.gate if layer.gate is not None else layer.up)

    return fit_lowrank(inputs, weights, activation=model.activation, criterion=placement.criterion,
                       activity_thresholds=placement.thresholds, rank=rank, recall=recall)


def set_contribution_thresholds(
    model_path: str | os.PathLike[str],
    converted_path: str | os.PathLike[str],
    sidecar_path: str | os.PathLike[str],
    calibration_inputs: Sequence[np.ndarray],
    heldout: str,
    runtime: Sequence[tuple[float, float]],
    recall: float,
    *,
    heldout_tokens: int = DEFAULT_HELDOUT_TOKENS,
    threads: int | None = None,
    progress: StageProgress | None = None,
) -> dict:
    """Fit the low-rank thresholds of the (temporary) pair `converted_path` + `sidecar_path` to the chosen
    `runtime` thresholds on the calibration inputs of `model_path` (its source) for `recall`, write them into
    the sidecar, and measure the recall they get on the held-out text: the quality record's "lowrank" entry."""
    converted = inspect_ffn_model(converted_path)
    data = np.memmap(converted.directory.path, dtype=np.uint8, mode="r")
    report = progress or (lambda stage, done, total: None)
    with Sidecar.open(sidecar_path) as side:
        header = side.header
        layer = placed_layers(converted, data, side)
        thresholds, calibration = fit_thresholds(calibration_inputs, layer, header.activation, runtime, recall,
                                                 progress=lambda done, total: report("predictor", done, total))
        with tempfile.TemporaryDirectory(prefix="neuralink-heldout-") as tmp:
            text = Path(tmp) / "heldout.txt"
            text.write_text(heldout, encoding="utf-8")
            heldout_inputs = capture_ffn_inputs(model_path, [text], max_tokens=heldout_tokens, threads=threads)
        measured = measure_recall(heldout_inputs, layer, header.activation, runtime, thresholds)
    patch_predictor_thresholds(sidecar_path, thresholds)
    resident = header.n_layer * header.predictor_rank * (header.n_embd + header.n_ff) * np.dtype(np.float32).itemsize
    return {"rank": header.predictor_rank, "recall_target": recall, "resident_bytes": int(resident),
            "calibration": recall_summary(calibration), "heldout": recall_summary(measured),
            "heldout_tokens": int(len(heldout_inputs[0]))}


DEFAULT_RECALL = 0.99
# the contribution criterion's pairs found on the calibration tokens: Qwen2.5-Coder-1.5B held out 0.988 at 0.99,
# 0.994 at 0.995 (benchmarks.md, twenty-second pass)
CONTRIBUTION_RECALL = 0.995

HELDOUT_CHARS_PER_TOKEN = 4  # English and code both tokenize to ~3.5-4.5 characters a token


def convert_from_text(
    model_path: str | os.PathLike[str],
    texts: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str] | None = None,
    sidecar: str | os.PathLike[str] | None = None,
    *,
    method: str | None = None,
    density: float | None = None,
    criterion: str | None = None,
    max_tokens: int | None = 4096,
    budget: float = DEFAULT_BUDGET,
    kld_budget: float | None = DEFAULT_KLD_BUDGET,
    allocation: Allocation = "sensitivity",
    heldout_tokens: int = DEFAULT_HELDOUT_TOKENS,
    lowrank_rank: int = 0,
    lowrank_recall: float | None = None,
    down_type: DownEncoding = "auto",
    bundle_down_type: DownEncoding = "auto",
    bundle_parts: BundleParts = "auto",
    bundle_layout: BundleLayoutName = "auto",
    activation: Activation | None = None,
    force: bool = False,
    workers: int = 2,
    threads: int | None = None,
    save_placement: str | os.PathLike[str] | None = None,
    progress: StageProgress | None = None,
) -> ConversionResult:
    """Convert `model_path` from calibration `texts`, validated on their held-out end (module doc).

    `density` fixes one final density for every layer instead of searching
    (still measured and recorded); `budget` is the perplexity increase the
    search may spend (0.01: +1 %), and `kld_budget` (nats per token, 0.01
    by default, or None) the KL divergence from every neuron's predictions
    it may also spend (the contribution criterion's search only). With `lowrank_rank` a
    low-rank predictor is fitted too and validated the same way; on gated
    FFNs its records then hold the gate rows (unless `bundle_parts` says
    otherwise), which it needs not keep resident, and under the contribution
    criterion its thresholds follow the search's (set_contribution_thresholds).
    It is the default predictor when its own perplexity is within the budget.
    """
    report = progress or (lambda stage, done, total: None)
    model, output_path, sidecar_path = check_model_and_outputs(model_path, output, sidecar, activation=activation,
                                                              force=force)
    criterion = criterion or DEFAULT_CRITERION
    effective = criterion if model.gated else "relu"
    documents = calibration_documents(texts)
    profile_docs, heldout = split_heldout(documents, heldout_tokens * HELDOUT_CHARS_PER_TOKEN)
    if not heldout.strip():
        raise OptionError(f"{', '.join(map(str, texts))}: too little calibration text to keep any aside for "
                          "the quality check")
    if lowrank_rank and model.gated and bundle_parts == "auto":
        bundle_parts = "gate-up-down"  # the compact predictor's point: no gate row resident
    with tempfile.TemporaryDirectory(prefix="neuralink-convert-") as tmp:
        profile_text = Path(tmp) / "profile.jsonl"
        write_documents(profile_text, profile_docs)
        gate = bundle_has_gate(model, bundle_parts, effective)
        split = bundle_split(bundle_layout, effective)
        record_bytes = [lay.neuron_bytes for lay in bundle_layouts(model, bundle_down_type, gate, split)]
        try:
            placement = placement_from_text(model_path, [profile_text], method=method, density=density,
                                            criterion=criterion, max_tokens=max_tokens, bundle_bytes=record_bytes,
                                            workers=workers, threads=threads, progress=report)
        except ProfileError as e:
            # profiled from a temporary copy of the text less its held-out end: name the user's files
            names = f"{', '.join(map(str, texts))} (less the {len(heldout)} characters kept aside)"
            raise ProfileError(str(e).replace(os.fspath(profile_text), names)) from None
        if save_placement is not None:
            placement.save(save_placement)
        predictor = None
        calibration_inputs = None
        if lowrank_rank:
            if lowrank_recall is None:
                lowrank_recall = CONTRIBUTION_RECALL if placement.criterion == "contribution" else DEFAULT_RECALL
            calibration_inputs = capture_ffn_inputs(model_path, [profile_text], max_tokens=max_tokens or 4096,
                                                    threads=threads)
            predictor = fit_model_predictor(model_path, [profile_text], placement, rank=lowrank_rank,
                                            recall=lowrank_recall, inputs=calibration_inputs)
            if placement.criterion != "contribution":
                calibration_inputs = None

    def validate(gguf: Path, side: Path) -> tuple[list[tuple[float, float]], dict]:
        if placement.criterion == "contribution":
            assert placement.selection is not None
            scorer = ContributionScorer(gguf, side, heldout, max_tokens=heldout_tokens, threads=threads)
            try:
                setting, record = search(scorer, placement.selection, model.n_layer, budget=budget,
                                         kld_budget=kld_budget, allocation=allocation, fixed_density=density,
                                         progress=report)
                record["against_source"] = measure_against_source(scorer, model_path, record, setting)
            finally:
                scorer.close()
            if predictor is not None and record.get("validated"):
                assert calibration_inputs is not None
                patch_runtime(side, setting.runtime, record)  # the predictor is measured at the chosen setting
                record["lowrank"] = set_contribution_thresholds(
                    model_path, gguf, side, calibration_inputs, heldout, setting.runtime, predictor.recall_target,
                    heldout_tokens=heldout_tokens, threads=threads, progress=report)
                measured = measure_predictor(gguf, side, heldout, "lowrank", budget=budget, threads=threads)
                record["lowrank"].update({key: measured[key] for key in (
                    "perplexity_change", "upper_bound", "within_budget", "up_density", "down_density")})
                if measured["within_budget"]:
                    record["predictor"] = "lowrank"
            return setting.runtime, record
        # the sidecar's own thresholds, with the predictor a user would get
        candidate = "lowrank" if predictor is not None else ("gate" if model.gated else "dense")
        record = measure_predictor(gguf, side, heldout, candidate, budget=budget, threads=threads)
        runtime = [(float(t), 0.0) for t in placement.thresholds]
        return runtime, record

    plan = plan_conversion(model_path, placement, output_path, sidecar_path, down_type=down_type,
                           bundle_down_type=bundle_down_type, bundle_parts=bundle_parts, bundle_layout=bundle_layout,
                           predictor=predictor, activation=activation, force=force)
    bytes_done = [0]

    def convert_progress(n: int) -> None:
        bytes_done[0] += n
        report("convert", bytes_done[0], plan.work_bytes)

    return run_conversion(plan, convert_progress, validate)
