#!/usr/bin/env python3
"""Warm decode tok/s of stock llama-cpp-python and neuralink.Llama with each one's default thread count and with
every thread count up to the CPUs, interleaved, in one process each.

    python scripts/prof/threads.py ORIGINAL CONVERTED [TOKENS]
"""

from __future__ import annotations

import os
import subprocess
import sys

PROMPT = 'def quicksort(items):\n    """Sort a list."""\n'

CHILD = """
import sys, time, llama_cpp, neuralink
kind, path, threads, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cls = llama_cpp.Llama if kind == "stock" else neuralink.Llama
extra = {} if threads == "default" else {"n_threads": int(threads)}
llm = cls(path, n_ctx=512, verbose=False, **extra)
llm(PROMPT, max_tokens=4, temperature=0)  # warm: the store preloaded, the mapping's pages touched
llm.reset()
n = 0
for _ in llm(PROMPT, max_tokens=tokens, temperature=0, stream=True):
    if n == 0:
        start = time.perf_counter()
    n += 1
print(llm.n_threads, (n - 1) / (time.perf_counter() - start))
"""


def main() -> None:
    original, converted = sys.argv[1], sys.argv[2]
    tokens = sys.argv[3] if len(sys.argv) > 3 else "48"
    child = f"PROMPT = {PROMPT!r}\n" + CHILD
    print("| threads asked | stock: threads, tok/s | neuralink: threads, tok/s | neuralink / stock |")
    print("| --- | ---: | ---: | ---: |")
    for threads in ["default", *map(str, range(1, (os.cpu_count() or 1) + 1))]:
        got = {}
        for kind, path in (("stock", original), ("neuralink", converted)):
            out = subprocess.run([sys.executable, "-c", child, kind, path, threads, tokens], capture_output=True,
                                 text=True, check=True).stdout.split()
            got[kind] = (int(out[0]), float(out[1]))
        print(f"| {threads} | {got['stock'][0]}, {got['stock'][1]:.2f} | {got['neuralink'][0]}, "
              f"{got['neuralink'][1]:.2f} | {got['neuralink'][1] / got['stock'][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
