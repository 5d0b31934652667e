"""``neuralink perplexity`` (with its ``--sweep``) and ``neuralink predictor``: the command line of evaluation."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neuralink.command import Command, positive_int
from neuralink.errors import ModelFileError, NeuralinkError, OptionError, SweepError
from neuralink.evaluate import perplexity as perplexity_module
from neuralink.evaluate import predictor_quality
from neuralink.evaluate.density_sweep import (
    DEFAULT_CALIBRATION_TOKENS,
    DEFAULT_DENSITIES,
    format_sweep,
    parse_budget,
    parse_densities,
    perplexity_sweep,
    plot_sweep,
)
from neuralink.evaluate.perplexity import (
    PerplexityResult,
    paired_nll_difference,
    perplexity,
)
from neuralink.evaluate.predictor_quality import evaluate_predictor
from neuralink.runtime.scoring import REFERENCE_TOP
from neuralink.runtime.sidecar_lookup import find_sidecar


def print_table(results: Sequence[PerplexityResult]) -> None:
    """Results side by side, each compared with the first on the same tokens (the CLI's output)."""
    base = results[0]
    print(f"{'model':<44} {'tokens':>6} {'NLL':>8} {'PPL':>9} {'PPL vs first':>12} {'dNLL +- s.e.':>18} "
          f"{'KLD +- s.e.':>18} {'top-1 same':>10} {'s':>6}")
    for r in results:
        name = r.model if len(r.model) <= 44 else "..." + r.model[-41:]
        change = f"{100 * (r.perplexity / base.perplexity - 1):+.3f}%"
        try:
            mean, error = paired_nll_difference(r, base)
            paired = f"{mean:+.5f} +- {error:.5f}"
        except ValueError:
            paired = "(other tokens)"
        if r is base:
            kld, top = "", ""
        elif r.divergence is None:
            kld, top = "(other tokens)", ""
        else:
            kld = f"{r.divergence.mean_kld:.5f} +- {r.divergence.kld_standard_error:.5f}"
            top = f"{r.divergence.top_agreement:.4f}"
        print(f"{name:<44} {r.n_scored:>6} {r.nll:>8.5f} {r.perplexity:>9.4f} {change:>12} {paired:>18} "
              f"{kld:>18} {top:>10} {r.seconds:>6.1f}")
    print(f"(n_ctx {base.n_ctx}, stride {base.stride}, {base.n_windows} windows; KLD: KL divergence from the "
          f"first model's next-token distribution, its {REFERENCE_TOP} most likely tokens and the rest as one, "
          "in nats per token; top-1 same: the fraction of tokens where both rank the same next token first)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, action="append", required=True,
                        help="GGUF model; repeat to compare several on the same tokens (first is the reference)")
    parser.add_argument("--text", type=Path, required=True, help="UTF-8 text file to score")
    parser.add_argument("--n-ctx", type=positive_int, default=512, help="window length in tokens (default: 512)")
    parser.add_argument("--stride", type=positive_int, default=None, help="tokens between window starts (default: n_ctx/2)")
    parser.add_argument("--max-tokens", type=positive_int, default=4096, help="tokens of the text to use (default: 4096)")
    parser.add_argument("--threads", dest="n_threads", type=positive_int, default=None, help="compute threads")
    sweep = parser.add_argument_group(
        "density sweep (--sweep): one converted model, stock llama.cpp against the engine at several densities")
    sweep.add_argument("--sweep", action="store_true",
                       help="score the converted --model with stock llama.cpp, the engine dense, and each predictor "
                            "at each density; report the sparsest density within --budget (docs/perplexity.md)")
    sweep.add_argument("--calibration", type=Path, action="append", default=[], metavar="TEXT",
                       help="text on which each density's thresholds are placed (the conversion's calibration text; "
                            "not the scored text); repeatable")
    sweep.add_argument("--sidecar", type=Path, default=None, help="the model's sidecar (default: the one it names)")
    sweep.add_argument("--densities", default=",".join(f"{d:g}" for d in DEFAULT_DENSITIES),
                       help="target densities, comma-separated (default: %(default)s)")
    sweep.add_argument("--predictors", default=None,
                       help="comma-separated, of gate, lowrank, oracle (default: every applicable one)")
    sweep.add_argument("--budget", default="5",
                       help="perplexity increase allowed over stock llama.cpp, in percent (default: 5)")
    sweep.add_argument("--calibration-tokens", type=positive_int, default=DEFAULT_CALIBRATION_TOKENS,
                       help=f"calibration tokens for the thresholds (default: {DEFAULT_CALIBRATION_TOKENS})")
    sweep.add_argument("--png", type=Path, default=None, help="also draw perplexity against active fraction here")


def check_windows(args: argparse.Namespace) -> None:
    """OptionError naming --n-ctx or --stride when they cannot make scoring windows: before any model loads."""
    if args.n_ctx < 2:
        raise OptionError(f"--n-ctx {args.n_ctx}: a window needs at least 2 tokens (one to predict from)")
    if args.stride is not None and args.stride > args.n_ctx:
        raise OptionError(f"--stride {args.stride}: at most --n-ctx ({args.n_ctx}), or tokens between windows "
                          "would never be scored")


def main(args: argparse.Namespace) -> int:
    check_windows(args)
    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NeuralinkError(f"{args.text}: cannot read the text: {e}") from None
    if args.sweep:
        return sweep_main(args, text)
    sweep_only = [flag for flag, given in (("--calibration", args.calibration), ("--sidecar", args.sidecar),
                                           ("--predictors", args.predictors), ("--png", args.png)) if given]
    if sweep_only:
        raise NeuralinkError(f"{', '.join(sweep_only)}: only with --sweep")
    results = []
    for model in args.model:
        print(f"scoring {model} ...", file=sys.stderr)
        try:
            results.append(perplexity(model, text, n_ctx=args.n_ctx, stride=args.stride,
                                      max_tokens=args.max_tokens, n_threads=args.n_threads,
                                      keep_top=REFERENCE_TOP if not results and len(args.model) > 1 else 0,
                                      reference=results[0] if results else None))
        except ModelFileError:
            raise  # names the model already
        except ValueError as e:  # bad window settings or too short a text
            raise NeuralinkError(f"{model} on {args.text}: {e}") from None
    print_table(results)
    return 0


def sweep_main(args: argparse.Namespace, text: str) -> int:
    """`neuralink perplexity --sweep`: the table on stdout, progress on stderr, a PNG if asked."""
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown
    if len(args.model) != 1:
        raise SweepError("--sweep scores one converted model; give --model once")
    if not args.calibration:
        raise SweepError("--sweep needs --calibration TEXT (the conversion's calibration text) to place "
                         "the thresholds of each density")
    for path in args.calibration:
        if not Path(path).is_file():
            raise SweepError(f"{path}: no such calibration text")
    if args.png is not None and not Path(args.png).parent.resolve().is_dir():
        raise SweepError(f"{args.png}: its directory does not exist")
    densities = parse_densities(args.densities)
    budget = parse_budget(args.budget)
    predictors = [p.strip() for p in args.predictors.split(",") if p.strip()] if args.predictors else None
    print(f"placing thresholds for densities {', '.join(f'{d:g}' for d in densities)} on "
          f"{args.calibration_tokens} tokens of {', '.join(map(str, args.calibration))} ...", file=sys.stderr)
    bar = tqdm(total=None, unit="window", file=sys.stderr, dynamic_ncols=True)

    def show(done: int, total: int, name: str) -> None:
        bar.total = total
        bar.set_description(name, refresh=False)
        bar.n = done
        bar.refresh()

    try:
        sweep = perplexity_sweep(args.model[0], text, args.calibration, sidecar=args.sidecar, densities=densities,
                                 predictors=predictors, budget=budget, calibration_tokens=args.calibration_tokens,
                                 n_ctx=args.n_ctx, stride=args.stride, max_tokens=args.max_tokens,
                                 n_threads=args.n_threads, progress=show)
    except NeuralinkError:
        raise
    except ValueError as e:  # window settings, too short a text
        raise SweepError(f"{args.model[0]}: {e}") from None
    finally:
        bar.close()
    print(format_sweep(sweep))
    if args.png is not None:
        plot_sweep(sweep, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


def configure_predictor_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="+", type=str, help="held-out text(s): .txt, or .jsonl with a \"text\" field")
    parser.add_argument("--model", required=True, help="converted GGUF whose sidecar holds a low-rank predictor")
    parser.add_argument("--sidecar", default=None, help="its sidecar (default: the one named in the model)")
    parser.add_argument("--max-tokens", type=positive_int, default=2048, help="tokens to evaluate on (default: 2048)")
    parser.add_argument("--threads", type=positive_int, default=None)


def predictor_main(args: argparse.Namespace) -> int:
    sidecar = args.sidecar or find_sidecar(args.model)
    if sidecar is None:
        raise ModelFileError(f"{args.model}: names no sidecar beside it; pass --sidecar")
    reports = evaluate_predictor(args.model, sidecar, args.text, max_tokens=args.max_tokens, threads=args.threads)
    print("| layer | recall | precision | predicted density | true density |")
    print("| --- | --- | --- | --- | --- |")
    for r in reports:
        print(f"| {r.il} | {r.recall:.4f} | {r.precision:.3f} | {r.predicted_density:.3f} | {r.true_density:.3f} |")
    mean = lambda key: float(np.mean([getattr(r, key) for r in reports]))  # noqa: E731
    print(f"| mean | {mean('recall'):.4f} | {mean('precision'):.3f} | {mean('predicted_density'):.3f} "
          f"| {mean('true_density'):.3f} |")
    return 0


PERPLEXITY = Command(perplexity_module.__doc__, configure_parser, main)
PREDICTOR = Command(predictor_quality.__doc__, configure_predictor_parser, predictor_main)
