"""Benchmarks that print tables: neuralink against stock llama.cpp, side by side in one run.

Speed on shared machines is noisy, so every benchmark interleaves the
variants it compares and reports ratios next to absolute numbers.
"""

from __future__ import annotations

import argparse
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# benchmark name -> module with configure_parser(parser) and main(args)
BENCHMARKS: dict[str, str] = {
    "dense": "neuralink.evaluate.bench.dense",
    "e2e": "neuralink.evaluate.bench.e2e",
    "io": "neuralink.evaluate.bench.io",
}


def last_logits(llm) -> np.ndarray:
    """Logits of the last evaluated token (llama-cpp-python keeps `scores` only with logits_all)."""
    import llama_cpp
    import numpy as np

    pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure_parser(p)
        p.set_defaults(_bench_main=module.main)


def main(args: argparse.Namespace) -> int:
    return int(args._bench_main(args) or 0)
