"""Decode speed of neuralink.Llama (dense engine, weights in RAM) against stock llama_cpp.Llama.

Both models are loaded in one process and measured in alternation on the
same prompts: greedy decoding of --tokens tokens after each prompt, timed
per token from the first decode step. Prints median tok/s per variant and
the ratio neuralink / stock, for each thread count.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from neuralink.runtime.llama import Llama

PROMPTS = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "The three most useful things to know about flash storage are",
    "Once upon a time, in a small village by the sea, there lived",
)


def last_logits(llm) -> np.ndarray:
    """Logits of the last evaluated token (llama-cpp-python keeps `scores` only with logits_all)."""
    pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


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
