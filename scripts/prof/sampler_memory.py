#!/usr/bin/env python3
"""A long-lived model's anonymous RSS over many sampled completions, stock llama-cpp-python or neuralink.Llama:
what a server holding one model for hours grows by per request.

    python scripts/prof/sampler_memory.py stock|nl MODEL [COMPLETIONS] [MAX_TOKENS]

Prints RssAnon every fifth completion and the growth per completion after the first (which allocates what every
completion reuses). Stock keeps each completion's sampler chain until a full garbage collection."""

import sys


def anonymous_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024


def main() -> None:
    which, model = sys.argv[1], sys.argv[2]
    completions = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 300
    if which == "stock":
        import llama_cpp
        llm = llama_cpp.Llama(model, n_ctx=512, n_threads=2, verbose=False)
    else:
        import neuralink
        llm = neuralink.Llama(model, n_ctx=512, n_threads=2, verbose=False, ffn="engine")
    seen = []
    for seed in range(completions):
        llm("Once upon a time", max_tokens=max_tokens, temperature=0.8, seed=seed)
        seen.append(anonymous_mib())
    print(which, "RssAnon MiB every 5th completion:", " ".join(f"{v:.1f}" for v in seen[::5]))
    print(which, f"{(seen[-1] - seen[0]) / max(completions - 1, 1):.3f} MiB per completion after the first")


if __name__ == "__main__":
    main()
