"""Convert a GGUF model for neuralink: reorder its FFN neurons and write their bundle store.

Writes two files next to each other:
  <name>.neuralink.gguf     the model with every FFN tensor permuted to the
                            placement's neuron order (gate/up rows, their
                            biases, down columns); stock llama.cpp runs it.
  <name>.neuralink.sidecar  the placement and the bundle store the engine
                            reads from flash (docs/sidecar.md).
With --calibration, the end of the text is kept aside: the model is profiled
and placed on the rest, and once the pair is written a quality search picks
the sparsest per-layer densities whose perplexity on the held-out text stays
within --ppl-budget of every neuron (default +1 %); the sidecar records what
was chosen and measured (how far from the source model's predictions too),
and neuralink.Llama runs it by default. Both files
are written to temporary names and committed together (a kill leaves the old
pair or the new one); the input is never modified. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from neuralink.command import Command, fraction_argument, non_negative_int, positive_float, positive_int
from neuralink.convert.pipeline import convert_from_text
from neuralink.convert.plan import check_writable, plan_conversion
from neuralink.convert.quality import (
    ALLOCATIONS,
    DEFAULT_BUDGET,
    DEFAULT_HELDOUT_TOKENS,
    DEFAULT_KLD_BUDGET,
    against_source_text,
    bound_text,
    divergence_text,
    reencoding_warning,
)
from neuralink.convert.writer import ConversionResult, run_conversion
from neuralink.errors import OptionError
from neuralink.formats.bundle_layout import BUNDLE_LAYOUTS, BUNDLE_PARTS
from neuralink.formats.ffn_tensors import ACTIVATIONS, DOWN_ENCODINGS
from neuralink.formats.files import check_not_input
from neuralink.formats.ggml_types import ggml_type_name
from neuralink.place.orders import DEFAULT_METHOD, METHODS
from neuralink.profile.activity import DEFAULT_CRITERION, GATED_CRITERIA


def _error_summary(errors: tuple[float, ...]) -> str:
    return f"{min(errors):.2e} / {float(np.mean(errors)):.2e} / {max(errors):.2e}"


def _types_summary(types: tuple[str, ...]) -> str:
    return ", ".join(sorted(set(types)))


def print_summary(result: ConversionResult) -> None:
    """The CLI's report of a finished conversion."""
    plan = result.plan
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
    q = result.quality
    if "perplexity_change" in q:
        print(f"\nquality check on {q.get('heldout_tokens', '?')} held-out tokens: {q.get('chosen')} -> perplexity "
              f"{100 * q['perplexity_change']:+.2f} %{bound_text(q)} (budget {100 * q.get('budget', 0):.1f} %)"
              f"{divergence_text(q)}, up rows read {q.get('up_density', 1.0):.3f}, down columns "
              f"{q.get('down_density', 1.0):.3f} of (token, neuron) pairs")
        if moved := against_source_text(q):
            print(moved)
        if warning := reencoding_warning(q):
            print(warning)
        if "lowrank" in q:
            lr = q["lowrank"]
            print(f"low-rank predictor (rank {lr['rank']}, {lr['resident_bytes'] / 2**20:.1f} MiB resident, no gate row): "
                  f"held-out recall {lr['heldout']['recall']:.4f} of those pairs reading "
                  f"{lr['heldout']['predicted_density']:.3f} of the records, perplexity "
                  f"{100 * lr['perplexity_change']:+.2f} %{bound_text(lr)}"
                  + ("" if lr["within_budget"] else " (outside the budget)"))
        print(f"default predictor: {q.get('predictor')}"
              + ("" if q.get("validated") else " (the measured setting is outside the budget, so neuralink.Llama "
                 "reads every neuron unless predictor='gate' is passed)"))
    elif plan.placement.criterion != "relu":
        print("\nno quality check (no --calibration): neuralink.Llama reads every neuron by default")


def kld_budget_argument(text: str) -> float | None:
    """An argparse type: a divergence budget in nats above 0, or 'none' for no divergence budget."""
    return None if text.strip().lower() == "none" else positive_float(text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the original GGUF model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--placement", type=Path, default=None,
                        help="neuron placement from `neuralink place`, made for this model")
    source.add_argument("--calibration", type=Path, nargs="+", default=None, metavar="TEXT",
                        help="profile and place on these texts (.txt, or .jsonl with a \"text\" field) first; "
                             "several texts are interleaved in pieces, so that the tokens profiled and the "
                             "held-out end both hold each of them: give text like what the model will run "
                             "(code and prose for a code model that is also asked in prose)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="converted GGUF (default: <model>.neuralink.gguf beside the model)")
    parser.add_argument("--sidecar", type=Path, default=None,
                        help="sidecar file (default: <output>.neuralink.sidecar beside the output)")
    parser.add_argument("--down-type", choices=DOWN_ENCODINGS, default="auto",
                        help="type of the converted GGUF's re-encoded ffn_down (default: auto: --bundle-down-type's "
                             "when that is given, so that the quality search scores what the engine computes and "
                             "the record says how far it is from the source model; see docs/convert.md)")
    parser.add_argument("--bundle-down-type", choices=DOWN_ENCODINGS, default="auto",
                        help="type of the sidecar's down columns (default: auto: q5_K for a K-quant ffn_down, see "
                             "docs/convert.md; q4_K reads 18 %% fewer bytes per column where a memory cap leaves "
                             "every token reading the records: 8-31 %% faster there, the more the slower the disk, "
                             "for about twice q5_K's KL divergence from the source model on Qwen2.5-Coder-1.5B)")
    parser.add_argument("--bundle-layout", choices=BUNDLE_LAYOUTS, default="auto",
                        help="joint: one record per neuron; split: down columns in a region of their own, read "
                             "only once the up row shows they are needed (auto: split for the contribution criterion)")
    parser.add_argument("--bundle-parts", choices=BUNDLE_PARTS, default="auto",
                        help="what a neuron's record holds: gate-up-down (the paper's bundle) or up-down (gate rows "
                             "stay resident for the gate predictor); auto: up-down when the criterion is gate-only")
    parser.add_argument("--activation", choices=ACTIVATIONS, default=None,
                        help="FFN activation, for architectures neuralink does not know")
    parser.add_argument("--force", action="store_true", help="convert a model that neuralink already converted")
    calibration = parser.add_argument_group("with --calibration")
    calibration.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                             help=f"placement method (default: {DEFAULT_METHOD})")
    calibration.add_argument("--density", type=fraction_argument, default=None,
                             help="override: one final density (fraction of (token, neuron) pairs whose down column "
                                  "is read) for every layer instead of the quality search; still measured")
    calibration.add_argument("--ppl-budget", type=positive_float, default=100 * DEFAULT_BUDGET, metavar="PERCENT",
                             help=f"perplexity increase the quality search may spend on held-out calibration text, "
                                  f"held by the upper end of a one-sided 90 %% confidence bound on the measured "
                                  f"change (default: {100 * DEFAULT_BUDGET:g}, i.e. +{100 * DEFAULT_BUDGET:g} %%)")
    calibration.add_argument("--kld-budget", type=kld_budget_argument, default=DEFAULT_KLD_BUDGET, metavar="NATS",
                             help=f"also keep the chosen setting's mean KL divergence from every neuron's next-token "
                                  f"predictions on the held-out text at most this (nats per token; default: "
                                  f"{DEFAULT_KLD_BUDGET:g}; 'none' for the perplexity budget alone). Perplexity misses "
                                  f"changes that cancel: on Qwen2.5-Coder-1.5B density 0.45 measured +0.02 %% "
                                  f"perplexity on English and a divergence of 0.034 (docs/convert.md)")
    calibration.add_argument("--allocation", choices=ALLOCATIONS, default="sensitivity",
                             help="per-layer densities from each layer's measured sensitivity (default), or one "
                                  "density for all")
    calibration.add_argument("--heldout-tokens", type=positive_int, default=DEFAULT_HELDOUT_TOKENS,
                             help=f"calibration tokens kept aside for the quality check (default: "
                                  f"{DEFAULT_HELDOUT_TOKENS})")
    calibration.add_argument("--criterion", choices=GATED_CRITERIA, default=DEFAULT_CRITERION,
                             help="what decides a gated FFN's active neurons: contribution (default: "
                                  "|act(gate)*up|*|down column| among candidates picked from the gate; the engine's "
                                  "gate predictor reads up rows, then down columns), gate_magnitude (|act(gate)|, "
                                  "CATS) or magnitude (|act(gate)*up|, for analysis)")
    calibration.add_argument("--max-tokens", type=positive_int, default=4096,
                             help="calibration tokens profiled (default: 4096)")
    calibration.add_argument("--workers", type=positive_int, default=2, help="layers placed in parallel (default: 2)")
    calibration.add_argument("--threads", type=positive_int, default=None, help="llama.cpp threads while profiling")
    calibration.add_argument("--lowrank-rank", type=non_negative_int, default=0, metavar="R",
                             help="also fit a rank-R low-rank activity predictor on the calibration text and store "
                                  "it in the sidecar (for predictor='lowrank'; 0: none). On gated models the records "
                                  "then hold the gate rows, so no gate row stays in RAM (R (n_embd + n_ff) floats a "
                                  "layer instead), at the cost of reading nearly every record; it becomes the "
                                  "default predictor when its measured perplexity is within --ppl-budget")
    calibration.add_argument("--lowrank-recall", type=fraction_argument, default=None,
                             help="fraction of truly active neurons the predictor must find on the calibration "
                                  "text (default: 0.99; under the contribution criterion, of the pairs the "
                                  "validated setting keeps, 0.995: 0.99 on held-out text)")
    calibration.add_argument("--save-placement", type=Path, default=None, metavar="FILE",
                             help="also keep the placement (.npz) for later conversions or evaluation")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown

    if args.lowrank_rank and args.calibration is None:
        raise OptionError("--lowrank-rank fits on the calibration text: give --calibration")
    bars: dict[str, tqdm] = {}
    units = {"profile": "tok", "convert": "B"}

    def show(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit=units.get(stage, "step"), file=sys.stderr,
                                     unit_scale=stage == "convert", disable=None)
        bar.total = total
        bar.update(done - bar.n)

    # what is read is never what is written: outputs named after an input are refused before any work
    inputs = {"input model": args.model, "placement": args.placement,
              **{f"calibration text {i + 1}": text for i, text in enumerate(args.calibration or ())}}
    for output in (args.output, args.sidecar):
        if output is not None:
            check_not_input(output, inputs)
    if args.save_placement is not None:
        check_not_input(args.save_placement, {**inputs, "converted model": args.output, "sidecar": args.sidecar})
    try:
        if args.calibration is None:
            conversion = plan_conversion(args.model, args.placement, args.output, args.sidecar,
                                         down_type=args.down_type, bundle_down_type=args.bundle_down_type,
                                         bundle_parts=args.bundle_parts, bundle_layout=args.bundle_layout,
                                         activation=args.activation, force=args.force)
            done = [0]

            def advance(n: int) -> None:
                done[0] += n
                show("convert", done[0], conversion.work_bytes)

            result = run_conversion(conversion, advance)
        else:
            if args.save_placement is not None:
                check_writable(args.save_placement)
            result = convert_from_text(
                args.model, args.calibration, args.output, args.sidecar, method=args.method, density=args.density,
                criterion=args.criterion, max_tokens=args.max_tokens, budget=args.ppl_budget / 100,
                kld_budget=args.kld_budget,
                allocation=args.allocation, heldout_tokens=args.heldout_tokens, lowrank_rank=args.lowrank_rank,
                lowrank_recall=args.lowrank_recall, down_type=args.down_type, bundle_down_type=args.bundle_down_type,
                bundle_parts=args.bundle_parts, bundle_layout=args.bundle_layout, activation=args.activation,
                force=args.force, workers=args.workers, threads=args.threads, save_placement=args.save_placement,
                progress=show)
    finally:
        for bar in bars.values():
            bar.close()
    print_summary(result)
    return 0


CONVERT = Command(__doc__, configure_parser, main)
