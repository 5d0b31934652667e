"""Greedy agreement with stock llama.cpp (`neuralink bench agreement`): does sparse inference say the same thing?

Perplexity averages over every token and can hide a model that derails once
and never recovers. Here stock llama-cpp-python on the original GGUF and
neuralink.Llama on the converted one (its default predictor: what the
conversion validated, unless another is asked for) continue the same prompts
greedily; per prompt, the fraction of the first N generated tokens that are
identical, position by position (1.0: the same text), and where they first
differ.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp

from neuralink.runtime.llama import Llama
from neuralink.runtime.llama_params import without_weight_repacking

# ten code prompts and ten English ones
PROMPTS = (
    "def fibonacci(n):\n",
    "import os\n\ndef list_python_files(directory):\n",
    "class Stack:\n    def __init__(self):\n",
    "# Read a CSV file and return the rows as dictionaries\nimport csv\n\n",
    "def binary_search(items, target):\n    \"\"\"Return the index of target in the sorted list items.\"\"\"\n",
    "def is_prime(n: int) -> bool:\n",
    "from dataclasses import dataclass\n\n@dataclass\nclass Point:\n",
    "def merge_sort(values):\n",
    "# Count the words in a text file\ndef count_words(path):\n",
    "async def fetch_all(urls):\n",
    "The capital of France is",
    "The three most useful things to know about flash storage are",
    "Once upon a time, in a small village by the sea,",
    "The main causes of the First World War were",
    "To learn a new programming language quickly,",
    "Here is a simple recipe for bread:",
    "The difference between a list and a tuple in Python is",
    "Photosynthesis is the process by which",
    "A good night's sleep matters because",
    "The history of the printing press begins",
)


@dataclass(frozen=True)
class Agreement:
    prompt: str
    stock: list[int]
    neuralink: list[int]

    @property
    def first_difference(self) -> int | None:
        """Index of the first generated token that differs (or is missing from one side), None when all agree."""
        first = next((i for i, (a, b) in enumerate(zip(self.stock, self.neuralink)) if a != b), None)
        if first is None and len(self.stock) != len(self.neuralink):
            return min(len(self.stock), len(self.neuralink))
        return first

    @property
    def identical_fraction(self) -> float:
        """Fraction of positions whose tokens are identical."""
        n = max(len(self.stock), len(self.neuralink), 1)
        return sum(a == b for a, b in zip(self.stock, self.neuralink)) / n


def greedy_tokens(llm: llama_cpp.Llama, prompt: str, n: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(llm.tokenize(prompt.encode()), temp=0.0, reset=True):
        if token == llm.token_eos() or len(out) == n:
            break
        out.append(token)
    return out


@contextlib.contextmanager
def llama_cpp_on_vec_dot() -> Iterator[None]:
    """Models loaded within the block run every matmul on ggml's vec_dot kernels, as neuralink's engine does.

    llama.cpp picks other kernels where it can: a tiled GEMM for batches of
    8 or more rows of K-quant weights (off with GGML_CPU_TILED_MM=0, read
    once per process, so this must come before the process's first
    matmul), and weights repacked at load into interleaved rows with their own
    GEMV/GEMM (Q4_0, Q4_K, IQ4_NL on AVX2; off with the model parameter
    use_extra_bufts=false, which llama-cpp-python does not expose: the
    default parameters are wrapped here). Both sum in another order than
    vec_dot, so only with both off can stock and the engine agree to the bit.
    """
    os.environ["GGML_CPU_TILED_MM"] = "0"
    with without_weight_repacking():
        yield


def greedy_agreement(original: str | os.PathLike[str], converted: str | os.PathLike[str], *,
                     prompts: Sequence[str] = PROMPTS, tokens: int = 32, n_ctx: int = 512,
                     threads: int | None = None, progress: Callable[[int, int], None] | None = None,
                     vec_dot: bool = False, **neuralink_args: Any) -> list[Agreement]:
    """Greedy continuations of `prompts` by stock llama.cpp on `original` and neuralink.Llama on `converted`;
    with `vec_dot`, llama.cpp's matmuls on both sides run on vec_dot (``llama_cpp_on_vec_dot``)."""
    return greedy_agreements(original, converted, {"": neuralink_args}, prompts=prompts, tokens=tokens, n_ctx=n_ctx,
                             threads=threads, progress=progress, vec_dot=vec_dot)[""]


def greedy_agreements(original: str | os.PathLike[str], converted: str | os.PathLike[str],
                      variants: Mapping[str, Mapping[str, Any]], *, prompts: Sequence[str] = PROMPTS,
                      tokens: int = 32, n_ctx: int = 512, threads: int | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      vec_dot: bool = False) -> dict[str, list[Agreement]]:
    """As greedy_agreement, for several neuralink.Llama settings (name -> keyword arguments) against one stock
    pass; progress counts prompts over all of them."""
    with llama_cpp_on_vec_dot() if vec_dot else contextlib.nullcontext():
        settings = dict(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        stock = llama_cpp.Llama(os.fspath(original), **settings)
        try:
            reference = [greedy_tokens(stock, p, tokens) for p in prompts]
        finally:
            stock.close()
        results: dict[str, list[Agreement]] = {}
        for k, (name, args) in enumerate(variants.items()):
            # the engine's text, even where the model fits in memory (where ffn='auto' would run llama.cpp's FFN)
            sparse = Llama(os.fspath(converted), **settings, **{"ffn": "engine", **args})
            try:
                results[name] = []
                for i, (prompt, want) in enumerate(zip(prompts, reference)):
                    results[name].append(Agreement(prompt, want, greedy_tokens(sparse, prompt, tokens)))
                    if progress is not None:
                        progress(k * len(prompts) + i + 1, len(variants) * len(prompts))
            finally:
                sparse.close()
        return results


def format_agreement(results: Sequence[Agreement]) -> str:
    lines = ["| prompt | identical | first difference |", "| --- | ---: | ---: |"]
    for r in results:
        first = r.first_difference
        lines.append(f"| {r.prompt.splitlines()[0][:48]!r} | {r.identical_fraction:.2f} | "
                     f"{'-' if first is None else first} |")
    mean, same = agreement_summary(results)
    lines.append(f"| **all {len(results)}** | **{mean:.3f}** | {same} identical |")
    return "\n".join(lines)


def agreement_summary(results: Sequence[Agreement]) -> tuple[float, int]:
    """The mean identical fraction, and how many continuations were identical throughout."""
    mean = sum(r.identical_fraction for r in results) / max(len(results), 1)
    return mean, sum(r.first_difference is None for r in results)


__all__ = ["PROMPTS", "Agreement", "agreement_summary", "format_agreement", "greedy_agreement", "greedy_agreements",
           "llama_cpp_on_vec_dot"]
