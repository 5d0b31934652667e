"""``neuralink bench dense / e2e / io``: the command line of the benchmarks."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from neuralink import _engine
from neuralink.command import (
    Command,
    add_commands,
    fraction_argument,
    non_negative_int,
    positive_float,
    positive_int,
    size_argument,
)
from neuralink.errors import BenchIoError, ModelFileError, NeuralinkError, OptionError
from neuralink.evaluate import agreement, bench
from neuralink.evaluate.agreement import PROMPTS as AGREEMENT_PROMPTS
from neuralink.evaluate.agreement import agreement_summary, format_agreement, greedy_agreements
from neuralink.evaluate.bench import dense, e2e, io
from neuralink.evaluate.bench.dense import PROMPTS, run_dense_benchmark
from neuralink.evaluate.bench.dense import format_table as dense_table
from neuralink.evaluate.bench.e2e import DEFAULT_CAPS, SHARED_TEXT, E2eSettings, plot, run_e2e
from neuralink.evaluate.bench.native import RUNNER_VARIANTS
from neuralink.evaluate.bench.worker import NEURALINK_VARIANTS
from neuralink.evaluate.bench.e2e import format_table as e2e_table
from neuralink.evaluate.bench.io import DEFAULT_CACHE_FRACTION, _made_dir, bench_io, report_text, result_json
from neuralink.evaluate.bench.io_inputs import (
    DEFAULT_CALIBRATION_TOKENS,
    DEFAULT_MAX_TOKENS,
    PLACEMENT_METHODS,
    need_file,
    prepare_inputs,
)
from neuralink.evaluate.bench.io_variants import CACHE_RULES, VARIANTS, plot_results
from neuralink.evaluate.density_sweep import density_thresholds, parse_densities
from neuralink.formats.bundle_layout import BUNDLE_PARTS
from neuralink.formats.constants import KEY_SOURCE_SHA256
from neuralink.formats.ffn_tensors import DOWN_ENCODINGS
from neuralink.formats.files import atomic_output, check_output_path, file_sha256, write_text
from neuralink.formats.gguf_directory import read_gguf_directory
from neuralink.formats.sizes import format_size
from neuralink.profile.activations import check_gguf_file
from neuralink.profile.activity import GATED_CRITERIA
from neuralink.runtime.default_model import default_model_path
from neuralink.runtime.sidecar_lookup import find_sidecar


def configure_dense_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="GGUF model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=positive_int, default=128, help="tokens decoded after each prompt (default: 128)")
    parser.add_argument("--runs", type=positive_int, default=3, help="rounds over the prompts (default: 3)")
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")


def dense_main(args: argparse.Namespace) -> int:
    model = check_gguf_file(args.model or default_model_path())
    try:
        rows = run_dense_benchmark(model, args.tokens, args.runs, args.threads)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file" (a truncated GGUF)
        raise ModelFileError(f"{model}: {e}") from None
    print(f"model: {model}\n{len(PROMPTS)} prompts x {args.runs} runs, {args.tokens} decoded tokens each, median\n")
    print(dense_table(rows))
    return 0


def configure_e2e_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="converted GGUF (neuralink convert)")
    parser.add_argument("--sidecar", type=Path, default=None, help="its sidecar (default: the one named in the model)")
    parser.add_argument("--stock-model", type=Path, default=None,
                        help="GGUF stock llama.cpp runs (default: the converted model, same weights)")
    parser.add_argument("--caps", nargs="+", default=list(DEFAULT_CAPS), help="memory caps (e.g. 120MB: MB is 10^6 bytes, MiB and M 2^20), 'none' for uncapped")
    parser.add_argument("--variants", nargs="+", choices=["stock", *NEURALINK_VARIANTS, *RUNNER_VARIANTS],
                        default=["stock", "neuralink"],
                        help="what runs in each cap (default: stock neuralink); neuralink: neuralink.Llama's "
                             "defaults (ffn='auto': llama.cpp's own FFN where the whole model fits the memory there "
                             "is, as uncapped; so do neuralink-generate and neuralink-nodraft); neuralink-engine: the "
                             "engine always (ffn='engine', as every other variant below); neuralink-adaptive: neuralink with "
                             "adaptive_collapse=True; neuralink-pinned, neuralink-stream: neuralink with that "
                             "cache_policy instead of auto's choice; neuralink-columns: neuralink with "
                             "down_rows=False (the sidecar's down columns where the store is held whole); "
                             "neuralink-generate: neuralink decoding through llama-cpp-python's generate() and "
                             "sampler, as completions do (the others call eval and take the argmax), with the "
                             "prompt lookup drafts neuralink.Llama decides on; neuralink-nodraft: the same without "
                             "drafts; neuralink-draft: with drafts of --draft-tokens always; neuralink-noscreen: "
                             "neuralink with output_screen=False (the output matrix resident, as llama.cpp reads "
                             "it, where a budget would screen it); runner: the native "
                             "runner neuralink-run (--runner) with its defaults, one process per prompt; "
                             "runner-nodraft: the same with --prompt-lookup 0; runner-engine: runner-nodraft with "
                             "--ffn engine (the engine even where the model fits whole); runner-noscreen: runner-nodraft with "
                             "--output-screen off; runner-stock: stock llama.cpp in the same "
                             "binary (--stock-ffn on --stock-model), the runner variants' baseline; to compare them "
                             "side by side")
    parser.add_argument("--prompts-from", type=Path, default=SHARED_TEXT,
                        help=f"text to take prompts from (default: {SHARED_TEXT}; built-in prompts if absent)")
    parser.add_argument("--prompts", type=positive_int, default=3, help="number of prompts (default: 3)")
    parser.add_argument("--tokens", type=positive_int, default=32, help="tokens decoded per prompt (default: 32)")
    parser.add_argument("--runs", type=positive_int, default=3, help="runs per cell, median reported (default: 3)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--n-ctx", type=positive_int, default=512)
    parser.add_argument("--n-batch", type=positive_int, default=64)
    parser.add_argument("--predictor", default=None)
    parser.add_argument("--cache-policy", default="auto", help="neuralink.Llama's cache_policy (default: auto)")
    parser.add_argument("--density", type=fraction_argument, default=None,
                        help="run neuralink at this target density instead of the sidecar's (thresholds placed on "
                             "--calibration text, as `neuralink perplexity --sweep` does)")
    parser.add_argument("--calibration", type=Path, nargs="+", default=None, metavar="TEXT",
                        help="calibration text for --density (the conversion's)")
    parser.add_argument("--budget-fraction", type=fraction_argument, default=0.95,
                        help="neuralink's memory_budget as a fraction of the cap, and at least 24 MiB below it "
                             "(headroom for the page cache the cgroup charges beside the process)")
    parser.add_argument("--ttft-tokens", type=int, default=256,
                        help="after decoding, time one prompt of this many tokens (from --prompts-from) to its first "
                             "token in the same process, caches as the decodes left them; 0 skips; not timed for the runner "
                             "variants (default: 256)")
    parser.add_argument("--draft-tokens", type=positive_int, default=4,
                        help="neuralink-draft: tokens prompt lookup proposes per verification (default: 4)")
    parser.add_argument("--runner", type=Path, default=None,
                        help="neuralink-run for the runner variants (scripts/build_aarch64.sh native builds it and "
                             "names it in its manifest)")
    parser.add_argument("--timeout", type=positive_float, default=900.0, help="seconds per run before giving up")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--png", type=Path, default=None, help="write the tok/s vs cap curve here")


def _write_density_thresholds(args: argparse.Namespace, sidecar: Path, path: Path) -> Path:
    """Per-layer thresholds for --density on --calibration, as the worker's JSON file."""
    if not args.calibration:
        raise NeuralinkError("--density needs --calibration TEXT (the text the model was converted from)")
    (found,) = density_thresholds(args.model, sidecar, args.calibration, [args.density], threads=args.threads)
    options = {"thresholds": [float(t) for t in found.thresholds]}
    if found.predictor_thresholds is not None:
        options["predictor_thresholds"] = [float(t) for t in found.predictor_thresholds]
    print(f"density {args.density}: thresholds placed on {', '.join(map(str, args.calibration))}, calibration "
          f"active fraction {float(found.calibration_density.mean()):.3f}", file=sys.stderr)
    return write_text(path, json.dumps(options))


def e2e_main(args: argparse.Namespace) -> int:
    # refuse bad outputs before the runs, not after
    json_path = check_output_path(args.json) if args.json is not None else None
    png_path = check_output_path(args.png) if args.png is not None else None
    if not 0 <= args.ttft_tokens < args.n_ctx:
        raise OptionError(f"--ttft-tokens {args.ttft_tokens}: expected 0 (skip) up to --n-ctx - 1 ({args.n_ctx - 1})")
    if set(args.variants) & set(RUNNER_VARIANTS):
        if args.runner is None or not args.runner.is_file():
            raise OptionError(f"--variants {' '.join(sorted(set(args.variants) & set(RUNNER_VARIANTS)))} need "
                              f"--runner NEURALINK_RUN (given: {args.runner}); scripts/build_aarch64.sh native builds it")
        if args.density is not None:
            raise OptionError("--density places thresholds neuralink.Llama takes; the runner variants run the "
                              "sidecar's own")
    sidecar = args.sidecar or find_sidecar(args.model)
    if sidecar is None:
        raise ModelFileError(f"{args.model}: names no sidecar beside it; pass --sidecar")
    with tempfile.TemporaryDirectory(prefix="neuralink-e2e-") as tmp:
        thresholds_file = None
        if args.density is not None:
            thresholds_file = _write_density_thresholds(args, sidecar, Path(tmp) / "thresholds.json")
        settings = E2eSettings(
            model=args.model, sidecar=sidecar, stock_model=args.stock_model or args.model, caps=tuple(args.caps),
            variants=tuple(args.variants), prompts_from=args.prompts_from, prompts=args.prompts, tokens=args.tokens,
            runs=args.runs, threads=args.threads, n_ctx=args.n_ctx, n_batch=args.n_batch, predictor=args.predictor,
            cache_policy=args.cache_policy, budget_fraction=args.budget_fraction, timeout=args.timeout,
            thresholds_file=thresholds_file, ttft_tokens=args.ttft_tokens,
            draft_tokens=args.draft_tokens, runner=args.runner)
        results = run_e2e(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(e2e_table(results))
    if json_path is not None:
        write_text(json_path, json.dumps([vars(r) for r in results], indent=1, default=str))
    if png_path is not None:
        plot(results, png_path)
    crashed = [r for r in results if r.crashed]
    for r in crashed:
        print(f"neuralink bench e2e: error: {r.note}", file=sys.stderr)
    return 1 if crashed else 0


def _cache_rule(text: str) -> tuple[str, str]:
    name, sep, rule = text.partition("=")
    if not sep or name not in VARIANTS or rule not in CACHE_RULES:
        raise argparse.ArgumentTypeError(f"expected VARIANT=RULE, VARIANT in {VARIANTS}, RULE in {CACHE_RULES}")
    return name, rule


def configure_io_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="the original GGUF (default: SmolLM2-135M)")
    cal = parser.add_mutually_exclusive_group()
    cal.add_argument("--calibration", type=Path, nargs="+", default=None, metavar="TEXT",
                     help="calibration text: profiled for the thresholds and the placement")
    cal.add_argument("--calibration-stats", type=Path, default=None, metavar="STATS",
                     help="calibration profile already made (`neuralink profile`)")
    held = parser.add_mutually_exclusive_group(required=True)
    held.add_argument("--text", type=Path, nargs="+", default=None, metavar="HELDOUT",
                      help="held-out text whose activation trace is replayed")
    held.add_argument("--trace", type=Path, default=None, metavar="STATS",
                      help="held-out profile already made with the calibration's thresholds")
    parser.add_argument("--placement", type=Path, default=None, help="placement file (default: place the calibration)")
    parser.add_argument("--placement-method", choices=PLACEMENT_METHODS, default="neuralink",
                        help="how the neuralink variant's order is made when placing (default: neuralink)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="VARIANT",
                        help=f"variants to replay (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS,
                        help=f"held-out tokens replayed (default: {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--calibration-tokens", type=positive_int, default=DEFAULT_CALIBRATION_TOKENS,
                        help=f"calibration tokens profiled (default: {DEFAULT_CALIBRATION_TOKENS})")
    parser.add_argument("--density", type=fraction_argument, default=None, help="target active fraction of gated FFNs "
                        "when profiling the calibration (default: that of `neuralink profile`)")
    parser.add_argument("--criterion", choices=GATED_CRITERIA, default=None,
                        help="activity criterion of gated FFNs when profiling (default: that of `neuralink profile`)")
    parser.add_argument("--cache-fraction", type=fraction_argument, default=DEFAULT_CACHE_FRACTION,
                        help="DRAM for every variant's cache, as a fraction of the FFN bundle store (default: 0.05)")
    parser.add_argument("--cache-bytes", type=size_argument, default=None, metavar="SIZE",
                        help="the cache budget as a size instead (e.g. 4MB = 4,000,000 bytes, 4MiB = 4,194,304)")
    parser.add_argument("--cache", type=_cache_rule, action="append", default=[], metavar="VARIANT=RULE",
                        help=f"replace a variant's cache rule (one of {', '.join(CACHE_RULES)}); repeatable")
    parser.add_argument("--queue-depth", type=positive_int, default=_engine.DEFAULT_QUEUE_DEPTH,
                        help=f"reads in flight (default: {_engine.DEFAULT_QUEUE_DEPTH}, the engine's)")
    parser.add_argument("--collapse-gap", type=non_negative_int, default=None, metavar="BYTES",
                        help="largest gap read through by access collapse (default: from the cached device profile "
                             "at the queue depth, else the default cost model)")
    parser.add_argument("--max-read-bytes", type=size_argument, default=_engine.DEFAULT_MAX_READ_BYTES,
                        metavar="SIZE", help=f"split longer reads (default: {format_size(_engine.DEFAULT_MAX_READ_BYTES)}, "
                                             "the engine's)")
    parser.add_argument("--io-backend", choices=("auto", "uring", "pread"), default="auto",
                        help="io_uring ring or pread pool (default: auto, as the engine)")
    parser.add_argument("--bundle-parts", choices=BUNDLE_PARTS, default="auto",
                        help="what a neuron read holds, as `neuralink convert` (default: auto: up+down when the "
                             "gate predictor keeps gate rows resident, else gate+up+down)")
    parser.add_argument("--bundle-down-type", choices=DOWN_ENCODINGS, default="auto",
                        help="encoding of the down columns, as `neuralink convert` (default: auto)")
    parser.add_argument("--replay-dir", type=Path, default=None, metavar="DIR",
                        help="write the replay files (and the profiles made) here and keep them; matching files "
                             "there are reused (default: a temporary directory beside the model, removed)")
    parser.add_argument("--chunk-tokens", type=positive_int, default=16,
                        help="tokens each variant replays before the next takes its turn (default: 16)")
    parser.add_argument("--png", type=Path, default=None, metavar="OUT", help="write a bar chart (PNG)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results (JSON)")
    parser.add_argument("--window", type=positive_int, default=None,
                        help="tokens per llama.cpp context window while profiling (default: that of `neuralink profile`)")
    parser.add_argument("--threads", type=positive_int, default=None, help="llama.cpp threads while profiling")
    parser.add_argument("--workers", type=positive_int, default=2, help="layers placed in parallel (default: 2)")


def io_main(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown

    # refuse bad outputs before minutes of profiling, not after
    png = check_output_path(args.png) if args.png is not None else None
    json_path = check_output_path(args.json) if args.json is not None else None
    if args.max_tokens < 1 or args.calibration_tokens < 1:
        raise BenchIoError("--max-tokens and --calibration-tokens must be positive")
    model = args.model or default_model_path()
    need_file(model, "model file")
    bars: dict[str, tqdm] = {}

    def show(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            unit = "tok" if stage in ("profile calibration", "profile text", "replay") else "layer"
            bar = bars[stage] = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, disable=None)
        bar.total = total
        bar.update(done - bar.n)

    try:
        inputs = prepare_inputs(
            model, calibration=args.calibration, calibration_stats=args.calibration_stats, text=args.text,
            trace=args.trace, placement=args.placement, placement_method=args.placement_method,
            density=args.density, criterion=args.criterion, calibration_tokens=args.calibration_tokens,
            max_tokens=args.max_tokens, bundle_parts=args.bundle_parts, bundle_down_type=args.bundle_down_type,
            window=args.window, threads=args.threads, workers=args.workers,
            save_dir=_made_dir(args.replay_dir) if args.replay_dir is not None else None,
            progress=show,
        )
        result = bench_io(
            model, inputs.trace, inputs.placement, variants=args.variants, cache_rules=dict(args.cache),
            replay_dir=args.replay_dir, cache_fraction=args.cache_fraction, cache_bytes=args.cache_bytes,
            queue_depth=args.queue_depth, collapse_gap_bytes=args.collapse_gap, max_read_bytes=args.max_read_bytes,
            io_backend=args.io_backend, bundle_parts=args.bundle_parts, bundle_down_type=args.bundle_down_type,
            max_tokens=args.max_tokens, chunk_tokens=args.chunk_tokens, progress=show,
        )
    finally:
        for bar in bars.values():
            bar.close()
    # both outputs or neither: the PNG is renamed into place only once the JSON is written
    title = f"neuralink bench io: {model.name}, {result.n_tokens} tokens"
    if png is not None:
        with atomic_output(png) as png_tmp:
            plot_results(result.results, str(png_tmp), title)
            if json_path is not None:
                write_text(json_path, json.dumps(result_json(result, inputs), indent=1) + "\n")
    elif json_path is not None:
        write_text(json_path, json.dumps(result_json(result, inputs), indent=1) + "\n")
    print(report_text(result, inputs))
    for path in inputs.saved:
        print(f"kept {path}")
    for path in (png, json_path):
        if path is not None:
            print(f"wrote {path}")
    return 0


def configure_agreement_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("original", type=Path, help="the original GGUF, run by stock llama-cpp-python")
    parser.add_argument("converted", type=Path, help="its conversion, run by neuralink.Llama")
    parser.add_argument("--tokens", type=positive_int, default=32, help="greedy tokens per prompt (default: 32)")
    parser.add_argument("--predictor", default=None,
                        help="neuralink's predictor (default: the one the conversion validated)")
    parser.add_argument("--threads", type=positive_int, default=None, help="compute threads")
    parser.add_argument("--cache-bytes", type=size_argument, default=0, metavar="SIZE",
                        help="neuralink's bundle cache (default: none; the text does not depend on it)")
    parser.add_argument("--densities", default=None, metavar="D[,D...]",
                        help="also run at these uniform target densities, thresholds placed on --calibration text "
                             "(as `neuralink perplexity --sweep` does), against the same stock pass")
    parser.add_argument("--calibration", type=Path, nargs="+", default=None, metavar="TEXT",
                        help="calibration text for --densities (the conversion's)")
    parser.add_argument("--ffn", choices=("engine", "llama", "auto"), default="engine",
                        help="who computes neuralink's FFNs (neuralink.Llama's ffn=): its engine, llama.cpp on the "
                             "converted file, or auto, llama.cpp where the whole model fits the memory there is "
                             "(default: engine, the engine's text)")
    parser.add_argument("--vec-dot", action="store_true",
                        help="run llama.cpp's matmuls on vec_dot on both sides, as the engine does (no tiled "
                             "K-quant GEMM, no repacked weights): separates the engine's arithmetic from "
                             "llama.cpp's choice of kernels (docs/hook.md)")


def agreement_main(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown

    for path in (args.original, args.converted):
        need_file(path, "model")
    if args.densities and not args.calibration:
        raise NeuralinkError("--densities needs --calibration TEXT (the text the model was converted from)")
    # agreement with another model's stock text would look like a broken conversion: a converted model's pair is
    # checked (an unconverted one runs the dense engine on the weights given)
    recorded = read_gguf_directory(args.converted).get(KEY_SOURCE_SHA256)
    if recorded is not None and file_sha256(args.original) != recorded:
        raise ModelFileError(f"{args.original}: is not the model {args.converted} was converted from "
                             f"(sha256 {recorded[:12]}… recorded there)")
    base: dict = {"cache_bytes": args.cache_bytes, "ffn": args.ffn}
    if args.predictor:
        base["predictor"] = args.predictor
    variants = {"default": base}
    if args.densities:
        sidecar = find_sidecar(args.converted)
        if sidecar is None:
            raise ModelFileError(f"{args.converted}: names no sidecar beside it")
        for found in density_thresholds(args.converted, sidecar, args.calibration, parse_densities(args.densities),
                                        threads=args.threads):
            options = {**base, "thresholds": [float(t) for t in found.thresholds]}
            if found.candidate_thresholds is not None:
                options["candidate_thresholds"] = [float(t) for t in found.candidate_thresholds]
            if found.predictor_thresholds is not None:
                options["predictor_thresholds"] = [float(t) for t in found.predictor_thresholds]
            variants[f"density {found.density:g}"] = options
    total = len(variants) * len(AGREEMENT_PROMPTS)
    with tqdm(total=total, desc="prompts", file=sys.stderr, disable=None) as bar:
        results = greedy_agreements(args.original, args.converted, variants, tokens=args.tokens,
                                    threads=args.threads, progress=lambda done, _: bar.update(done - bar.n),
                                    vec_dot=args.vec_dot)
    kernels = " (llama.cpp on vec_dot kernels)" if args.vec_dot else ""
    print(f"greedy agreement over the first {args.tokens} generated tokens: stock {args.original.name} vs "
          f"neuralink {args.converted.name}{kernels}")
    for name, rows in results.items():
        print(f"\n{name}:\n")
        print(format_agreement(rows))
    if len(results) > 1:
        print("\n| setting | mean identical | identical continuations |\n| --- | ---: | ---: |")
        for name, rows in results.items():
            mean, same = agreement_summary(rows)
            print(f"| {name} | {mean:.3f} | {same} of {len(rows)} |")
    return 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_commands(parser, BENCHMARKS, dest="benchmark", main_attribute="_bench_main")


def main(args: argparse.Namespace) -> int:
    return int(args._bench_main(args) or 0)


DENSE = Command(dense.__doc__, configure_dense_parser, dense_main)
E2E = Command(e2e.__doc__, configure_e2e_parser, e2e_main)
IO = Command(io.__doc__, configure_io_parser, io_main)
AGREEMENT = Command(agreement.__doc__, configure_agreement_parser, agreement_main)
# benchmark name -> its command
BENCHMARKS: dict[str, Command] = {"dense": DENSE, "e2e": E2E, "io": IO, "agreement": AGREEMENT}
BENCH = Command(bench.__doc__, configure_parser, main)
