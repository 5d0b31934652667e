"""One benchmark run in a fresh process: join a memory cgroup, load, decode, report JSON on stdout.

Run by ``neuralink bench e2e``; not a user command. The process joins its
cgroup before importing anything heavy, evicts the model files from the page
cache (cold storage), then loads the variant and decodes greedily after each
prompt, timing every decode step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# what `bench e2e --variants` runs besides stock: neuralink.Llama with its defaults, or with one setting forced
NEURALINK_VARIANTS = ("neuralink", "neuralink-engine", "neuralink-adaptive", "neuralink-pinned", "neuralink-stream",
                      "neuralink-columns", "neuralink-generate", "neuralink-nodraft", "neuralink-draft",
                      "neuralink-noscreen")
# what users get (ffn='auto': llama.cpp's own FFN where the whole model fits the memory there is); every other
# variant forces the engine
AUTO_FFN_VARIANTS = ("neuralink", "neuralink-generate", "neuralink-nodraft")
VARIANT_CACHE_POLICY = {"neuralink-pinned": "pinned", "neuralink-stream": "stream"}
# decoding through generate(): as users' completions do (drafts where neuralink.Llama decides), none, or always
GENERATE_VARIANTS = ("neuralink-generate", "neuralink-nodraft", "neuralink-draft")


def cache_hit_rate(stats: Any) -> float:
    """Cache hits over cache lookups of ffn_stats() rows: every predicted neuron's record, and in the split layout
    every final neuron's down record too (a layer whose down wave read or hit anything)."""
    import numpy as np  # deferred: the worker joins its cgroup before importing anything large

    split = (stats["down_reads"] + stats["down_cache_hits"]) > 0
    lookups = stats["predicted"].sum() + np.where(split, stats["final_neurons"], 0).sum()
    return float(stats["cache_hits"].sum()) / max(float(lookups), 1.0)


def _decode_steps(llm, prompt: str, n_tokens: int) -> tuple[list[float], int, float, str]:
    # loaded only now: the process joined its memory cgroup before anything large was imported
    import numpy as np

    from neuralink.evaluate.bench.dense import last_logits

    llm.reset()
    tokens = llm.tokenize(prompt.encode())
    start = time.perf_counter()
    llm.eval(tokens)
    prompt_s = time.perf_counter() - start
    token = int(np.argmax(last_logits(llm)))
    steps, generated = [], [token]
    for _ in range(n_tokens):
        start = time.perf_counter()
        llm.eval([token])
        steps.append(time.perf_counter() - start)
        token = int(np.argmax(last_logits(llm)))
        generated.append(token)
    # the text up to the end-of-text token, if the model wrote one (decoding went on: a fixed count is timed)
    end = generated.index(llm.token_eos()) if llm.token_eos() in generated else len(generated)
    text = llm.detokenize(generated[:end], prev_tokens=tokens).decode("utf-8", errors="replace")
    return steps, len(tokens), prompt_s, text


def _generate_steps(llm, prompt: str, n_tokens: int) -> tuple[list[float], int, float, str, Any]:
    """Greedy decoding through llama-cpp-python's generate() (its sampler, and the Llama's draft_model's proposals
    verified in one batch when it has one): the time between consecutive tokens (a verified proposal arrives at
    once), and the FFN counters of the decoding alone."""
    tokens = llm.tokenize(prompt.encode())
    llm.reset()
    start = time.perf_counter()
    generator = llm.generate(tokens, temp=0.0, reset=True)
    generated = [next(generator)]
    prompt_s = time.perf_counter() - start
    llm.ffn_stats(reset=True)
    steps = []
    for _ in range(n_tokens):
        start = time.perf_counter()
        generated.append(next(generator))
        steps.append(time.perf_counter() - start)
    generator.close()
    end = generated.index(llm.token_eos()) if llm.token_eos() in generated else len(generated)
    text = llm.detokenize(generated[:end], prev_tokens=tokens).decode("utf-8", errors="replace")
    return steps, len(tokens), prompt_s, text, llm.ffn_stats(reset=True)


def _time_to_first_token(llm, text: str, n_tokens: int) -> tuple[float, int]:
    """Seconds from a fresh context to the first greedy token of a prompt of n_tokens tokens of `text`
    (repeated when short), and the prompt's length."""
    import numpy as np

    from neuralink.evaluate.bench.dense import last_logits

    tokens = llm.tokenize(text.encode())
    tokens = (tokens * (n_tokens // max(len(tokens), 1) + 1))[:n_tokens]
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    int(np.argmax(last_logits(llm)))
    return time.perf_counter() - start, len(tokens)


def _draft(args: argparse.Namespace) -> dict[str, Any]:
    """prompt_lookup= of the variant: none (the default: drafts where neuralink.Llama decides, which only
    generate() uses), 0, or --draft-tokens at any cache policy and stall share."""
    if args.variant == "neuralink-draft":
        return {"prompt_lookup": args.draft_tokens}
    return {"prompt_lookup": 0} if args.variant == "neuralink-nodraft" else {}


def run(args: argparse.Namespace) -> dict:
    # imported after main() joined the cgroup, so that the engine's and llama.cpp's memory is charged to it
    from neuralink import _engine

    for path in filter(None, (args.model, args.sidecar)):
        _engine.evict_from_page_cache(path)
    context = dict(n_ctx=args.n_ctx, n_batch=args.n_batch, n_ubatch=args.n_batch, n_threads=args.threads,
                   n_threads_batch=args.threads, verbose=False)
    start = time.perf_counter()
    if args.variant == "stock":
        import llama_cpp  # after joining the cgroup, as above

        llm = llama_cpp.Llama(args.model, **context)
    else:
        import neuralink  # after joining the cgroup, as above

        overrides = json.loads(Path(args.thresholds).read_text()) if args.thresholds else {}
        llm = neuralink.Llama(args.model, sidecar=args.sidecar, memory_budget=args.budget, predictor=args.predictor,
                              cache_policy=VARIANT_CACHE_POLICY.get(args.variant, args.cache_policy),
                              adaptive_collapse=args.variant == "neuralink-adaptive",
                              down_rows=args.variant != "neuralink-columns", **overrides, **context,
                              output_screen=False if args.variant == "neuralink-noscreen" else "auto",
                              **_draft(args), ffn="auto" if args.variant in AUTO_FFN_VARIANTS else "engine")
    load_s = time.perf_counter() - start
    prompts = json.loads(Path(args.prompts).read_text())
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    steps: list[float] = []
    prompt_s = 0.0
    prompt_tokens = 0
    texts = []
    if args.variant != "stock":
        llm.ffn_stats(reset=True)
    generated_rows = []  # the decoding's FFN counters, prompt by prompt, when generate() decodes
    for prompt in prompts:
        if args.variant in GENERATE_VARIANTS:
            s, n, p, text, rows = _generate_steps(llm, prompt, args.tokens)
            generated_rows.append(rows)
        else:
            s, n, p, text = _decode_steps(llm, prompt, args.tokens)
        steps += s
        prompt_s += p
        prompt_tokens += n
        texts.append(text)
    ttft = _time_to_first_token(llm, Path(args.ttft_prompt).read_text(), args.ttft_tokens) if args.ttft_tokens else None
    result = {
        "variant": args.variant,
        "load_s": load_s,
        "decode_tokens": len(steps),
        "tok_s": len(steps) / sum(steps),
        "median_token_s": statistics.median(steps),
        "prompt_tok_s": prompt_tokens / prompt_s if prompt_s else 0.0,
        "major_faults_per_token": (resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults_before)
        / (len(steps) + prompt_tokens),
        "texts": texts,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # VmHWM: Linux reports KiB
    }
    if ttft is not None:
        result["ttft_s"], result["ttft_tokens"] = ttft
    if args.variant != "stock" and llm.ffn == "llama":
        result.update(reads_per_token=0.0, bytes_per_token=0.0, active_bytes_per_token=0.0, io_s_per_token=0.0,
                      stall_s_per_token=0.0, cache_hit_rate=0.0, density=1.0, memory_plan=None, collapse_gap_bytes=0,
                      cache_policy="llama.cpp", down_trial={})  # llama.cpp's own FFN: the model fits in memory
    elif args.variant != "stock":
        import numpy as np

        stats = llm.ffn_stats()
        decode = np.concatenate(generated_rows) if generated_rows else stats[stats["n_tokens"] == 1]
        n = max(len(steps), 1)
        result.update(
            reads_per_token=float(decode["reads"].sum()) / n,
            bytes_per_token=float(decode["bytes_read"].sum()) / n,
            active_bytes_per_token=float(decode["active_bytes"].sum()) / n,
            io_s_per_token=float(decode["io_ns"].sum()) * 1e-9 / n,
            stall_s_per_token=float(decode["stall_ns"].sum()) * 1e-9 / n,
            cache_hit_rate=cache_hit_rate(decode),
            density=float(decode["predicted"].sum()) / max(float(len(decode)) * llm.engine.n_layer, 1.0),
            memory_plan=llm.memory_plan.to_dict() if llm.memory_plan else None,
            collapse_gap_bytes=llm.engine.collapse_gap_bytes,  # at the end (adaptive: the fit's)
            cache_policy=llm.engine.cache_policy,  # what auto chose
            down_trial=dict(llm.engine.down_trial),  # rows against columns, where the store is held whole
            # the output screen's rows multiplied exactly, a row of logits (read through the page cache)
            exact_output_rows=(screen["exact_rows"] / max(screen["tokens"], 1)
                               if (screen := llm.engine.output_screen) else None),
        )
    llm.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m neuralink.evaluate.bench.worker")
    parser.add_argument("--cgroup", default=None)
    parser.add_argument("--variant", choices=["stock", *NEURALINK_VARIANTS], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--sidecar", default=None)
    parser.add_argument("--budget", default=None)
    parser.add_argument("--predictor", default=None)
    parser.add_argument("--cache-policy", default="auto")
    parser.add_argument("--thresholds", default=None, help="JSON file: thresholds= and predictor_thresholds= of Llama")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--n-batch", type=int, default=64)
    parser.add_argument("--ttft-prompt", default=None, help="text of the time-to-first-token prompt")
    parser.add_argument("--ttft-tokens", type=int, default=0)
    parser.add_argument("--draft-tokens", type=int, default=4, help="neuralink-draft: proposals per verification")
    args = parser.parse_args()
    if args.cgroup:
        (Path(args.cgroup) / "cgroup.procs").write_text("0\n")  # join before anything large is loaded
    try:
        result = run(args)
    except Exception as e:  # reported to the parent, which prints a table row for it
        result = {"variant": args.variant, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
