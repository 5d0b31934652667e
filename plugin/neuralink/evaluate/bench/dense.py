"""Decode speed of neuralink.Llama (dense engine, weights in RAM) against stock llama_cpp.Llama.

Both models are loaded in one process and measured in alternation on the
same prompts: greedy decoding of --tokens tokens after each prompt, timed
per token from the first decode step. Prints median tok/s per variant and
the ratio neuralink / stock, for each thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neuralink.evaluate.bench import last_logits
from neuralink.runtime.default_model import default_model_path

PROMPTS = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "The three most useful things to know about flash storage are",
    "Once upon a time, in a small village by the sea, there lived",
)


@dataclass
class DenseRow:
    threads: int
    stock_tok_s: float
    neuralink_tok_s: float

    @property
    def ratio(self) -> float:
        return self.neuralink_tok_s / self.stock_tok_s


def decode_tokens_per_second(llm, prompt: str, n_tokens: int) -> float:
    """Greedy-decode n_tokens after `prompt`; tokens per second of the decode steps alone."""
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode()))
    token = int(np.argmax(last_logits(llm)))
    start = time.perf_counter()
    for _ in range(n_tokens):
        llm.eval([token])
        token = int(np.argmax(last_logits(llm)))
    return n_tokens / (time.perf_counter() - start)


def run_dense_benchmark(model: Path, n_tokens: int, runs: int, thread_counts: list[int]) -> list[DenseRow]:
    """Median decode tok/s of stock and neuralink for each thread count, measured in alternation."""
    import llama_cpp

    from neuralink.runtime.llama import Llama

    rows = []
    for threads in thread_counts:
        kwargs = dict(n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
        variants = {"stock": llama_cpp.Llama(str(model), **kwargs), "neuralink": Llama(str(model), **kwargs)}
        speeds: dict[str, list[float]] = {name: [] for name in variants}
        try:
            for name, llm in variants.items():  # warm-up: page in weights, size buffers
                decode_tokens_per_second(llm, PROMPTS[0], 8)
            for _ in range(runs):
                for prompt in PROMPTS:
                    for name, llm in variants.items():
                        speeds[name].append(decode_tokens_per_second(llm, prompt, n_tokens))
        finally:
            for llm in variants.values():
                llm.close()
        rows.append(DenseRow(threads, statistics.median(speeds["stock"]), statistics.median(speeds["neuralink"])))
    return rows


def format_table(rows: list[DenseRow]) -> str:
    lines = ["| threads | stock tok/s | neuralink tok/s | neuralink / stock |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.threads} | {r.stock_tok_s:.1f} | {r.neuralink_tok_s:.1f} | {r.ratio:.2f} |" for r in rows]
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="GGUF model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens decoded after each prompt (default: 128)")
    parser.add_argument("--runs", type=int, default=3, help="rounds over the prompts (default: 3)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")


def main(args: argparse.Namespace) -> int:
    model = args.model or default_model_path()
    rows = run_dense_benchmark(model, args.tokens, args.runs, args.threads)
    print(f"model: {model}\n{len(PROMPTS)} prompts x {args.runs} runs, {args.tokens} decoded tokens each, median\n")
    print(format_table(rows))
    return 0
