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

import argparse
import sys
from pathlib import Path

import numpy as np

from neuralink.command import Command
from neuralink.convert.pipeline import fit_model_predictor, placement_from_text
from neuralink.convert.plan import ConversionPlan, check_model_and_outputs, check_writable, plan_conversion
from neuralink.convert.predictor import LowRankPredictor
from neuralink.convert.writer import ConversionResult, run_conversion
from neuralink.errors import OptionError
from neuralink.formats.bundle_layout import BUNDLE_PARTS, bundle_has_gate, bundle_layouts
from neuralink.formats.ffn_tensors import ACTIVATIONS, DOWN_ENCODINGS
from neuralink.formats.ggml_types import ggml_type_name
from neuralink.formats.placement import Placement
from neuralink.place.orders import DEFAULT_METHOD, METHODS
from neuralink.profile.activity import DEFAULT_CRITERION, GATED_CRITERIA


def _error_summary(errors: tuple[float, ...]) -> str:
    return f"{min(errors):.2e} / {float(np.mean(errors)):.2e} / {max(errors):.2e}"


def _types_summary(types: tuple[str, ...]) -> str:
    return ", ".join(sorted(set(types)))


def print_summary(result: ConversionResult, plan: ConversionPlan) -> None:
    """The CLI's report of a finished conversion."""
    model = plan.model
    mb = 1024 * 1024
    placement = plan.placement
    print(f"converted model  {result.output} ({result.output.stat().st_size / mb:.1f} MiB)")
    print(f"sidecar          {result.sidecar} ({result.sidecar.stat().st_size / mb:.1f} MiB): "
          f"{model.n_layer} layers x {model.n_ff} bundles of {_types_summary(tuple(map(str, result.record_bytes)))} B")
    print(f"model id         {result.model_id}")
    print(f"placement        {placement.method} (criterion {placement.criterion}, {placement.n_tokens} tokens)")
    print()
    print(f"{'down weights':<22} {'type':<10} {'relative RMS error min / mean / max':>36}")
    print(f"{'converted ffn_down':<22} {_types_summary(result.gguf_down_types):<10} "
          f"{_error_summary(result.gguf_down_errors):>36}")
    print(f"{'sidecar down columns':<22} {_types_summary(result.bundle_down_types):<10} "
          f"{_error_summary(result.bundle_down_errors):>36}")
    print(f"\nsource ffn_down type {_types_summary(tuple(ggml_type_name(l.down.type) for l in model.layers))}; "
          f"done in {result.seconds:.1f} s")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the original GGUF model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--placement", type=Path, default=None,
                        help="neuron placement from `neuralink place`, made for this model")
    source.add_argument("--calibration", type=Path, nargs="+", default=None, metavar="TEXT",
                        help="profile and place on these texts (.txt, or .jsonl with a \"text\" field) first")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="converted GGUF (default: <model>.neuralink.gguf beside the model)")
    parser.add_argument("--sidecar", type=Path, default=None,
                        help="sidecar file (default: <output>.neuralink.sidecar beside the output)")
    parser.add_argument("--down-type", choices=DOWN_ENCODINGS, default="auto",
                        help="type of the converted GGUF's re-encoded ffn_down (default: auto, see docs/convert.md)")
    parser.add_argument("--bundle-down-type", choices=DOWN_ENCODINGS, default="auto",
                        help="type of the sidecar's down columns (default: auto)")
    parser.add_argument("--bundle-parts", choices=BUNDLE_PARTS, default="auto",
                        help="what a neuron's record holds: gate-up-down (the paper's bundle) or up-down (gate rows "
                             "stay resident for the gate predictor); auto: up-down when the criterion is gate-only")
    parser.add_argument("--activation", choices=ACTIVATIONS, default=None,
                        help="FFN activation, for architectures neuralink does not know")
    parser.add_argument("--force", action="store_true", help="convert a model that neuralink already converted")
    calibration = parser.add_argument_group("with --calibration")
    calibration.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                             help=f"placement method (default: {DEFAULT_METHOD})")
    calibration.add_argument("--density", type=float, default=None,
                             help="target active fraction of gated FFNs (default: that of `neuralink profile`)")
    calibration.add_argument("--criterion", choices=GATED_CRITERIA, default=DEFAULT_CRITERION,
                             help="what a gated FFN's activity threshold applies to: |act(gate)| (gate_magnitude, "
                                  "default: the engine's exact gate predictor then reads up+down only) or "
                                  "|act(gate)*up| (magnitude: full bundles, predictor lowrank/oracle)")
    calibration.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens (default: 4096)")
    calibration.add_argument("--workers", type=int, default=2, help="layers placed in parallel (default: 2)")
    calibration.add_argument("--threads", type=int, default=None, help="llama.cpp threads while profiling")
    calibration.add_argument("--lowrank-rank", type=int, default=0, metavar="R",
                             help="also fit a rank-R low-rank activity predictor on the calibration text and store "
                                  "it in the sidecar (for predictor='lowrank'; 0: none)")
    calibration.add_argument("--lowrank-recall", type=float, default=0.99,
                             help="fraction of truly active neurons the predictor must find on the calibration "
                                  "text (default: 0.99)")
    calibration.add_argument("--save-placement", type=Path, default=None, metavar="FILE",
                             help="also keep the placement (.npz) for later conversions or evaluation")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown
    def plan(placement: Placement | Path, predictor: LowRankPredictor | None = None) -> ConversionPlan:
        return plan_conversion(args.model, placement, args.output, args.sidecar, down_type=args.down_type,
                               bundle_down_type=args.bundle_down_type, bundle_parts=args.bundle_parts,
                               predictor=predictor, activation=args.activation, force=args.force)

    placement: Placement | Path
    if args.calibration is None:
        placement = args.placement
    else:
        # refuse a bad model or output before minutes of profiling, not after
        model, _, _ = check_model_and_outputs(args.model, args.output, args.sidecar, activation=args.activation,
                                              force=args.force)
        gate = bundle_has_gate(model, args.bundle_parts, "relu" if not model.gated else args.criterion)
        record_bytes = [layout.record_bytes for layout in bundle_layouts(model, args.bundle_down_type, gate)]
        if args.save_placement is not None:
            check_writable(args.save_placement)
        bars: dict[str, tqdm] = {}

        def show(stage: str, done: int, total: int) -> None:
            bar = bars.get(stage) or bars.setdefault(
                stage, tqdm(total=total, desc=stage, unit="tok" if stage == "profile" else "layer", file=sys.stderr,
                            disable=None))
            bar.total = total
            bar.update(done - bar.n)

        try:
            placement = placement_from_text(args.model, args.calibration, method=args.method, density=args.density,
                                            criterion=args.criterion, max_tokens=args.max_tokens, bundle_bytes=record_bytes,
                                            workers=args.workers, threads=args.threads, progress=show)
        finally:
            for bar in bars.values():
                bar.close()
        if args.save_placement is not None:
            placement.save(args.save_placement)
    predictor = None
    if args.lowrank_rank:
        if args.calibration is None:
            raise OptionError("--lowrank-rank fits on the calibration text: give --calibration")
        predictor = fit_model_predictor(args.model, args.calibration, placement, rank=args.lowrank_rank,
                                        recall=args.lowrank_recall, max_tokens=args.max_tokens, threads=args.threads)
    conversion = plan(placement, predictor)
    with tqdm(total=conversion.work_bytes, unit="B", unit_scale=True, desc="convert", file=sys.stderr,
              disable=None) as bar:
        result = run_conversion(conversion, bar.update)
    print_summary(result, conversion)
    return 0


CONVERT = Command(__doc__, configure_parser, main)
