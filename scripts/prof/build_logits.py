"""Do two builds of llama.cpp compute the same model alike? Logits through llama_cpp.Llama, saved, then compared.

    python scripts/prof/build_logits.py save MODEL OUT.npz      (run with each build's Python, e.g. /tmp/avx2-venv)
    python scripts/prof/build_logits.py compare A.npz B.npz [C.npz D.npz ...]

`save` evaluates the first N tokens (N=, default 96) of TEXT= (default code-mz.txt) twice: as one prompt batch
(n_batch 64) and one token at a time (decoding), and keeps every position's logits. `compare` prints, for each
pair, the KL divergence of B's next-token distribution from A's (full vocabulary), the largest logit difference and
how often both rank the same token first, for the batch and for decoding. Builds for other instruction sets
(NEURALINK_CPU_FLAGS, docs/cpu-build.md) differ in their arithmetic: compare them on the source model too, which
says how much two builds differ where nothing of neuralink is involved.
"""

import os
import sys

import numpy as np


def save(model: str, out: str) -> None:
    import llama_cpp

    n = int(os.environ.get("N", "96"))
    text = open(os.environ.get("TEXT", "code-mz.txt"), encoding="utf-8").read()[: 20 * n]
    llm = llama_cpp.Llama(model, n_ctx=512, n_batch=64, n_threads=2, logits_all=True, verbose=False)
    print(llama_cpp.llama_print_system_info().decode())
    tokens = llm.tokenize(text.encode())[:n]
    llm.eval(tokens)
    batch = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.reset()
    for t in tokens:
        llm.eval([t])
    decode = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    np.savez(out, batch=batch, decode=decode)
    print(f"{out}: {len(tokens)} positions")


def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KL(softmax(a) || softmax(b)) per row."""
    la = a - a.max(1, keepdims=True)
    la -= np.log(np.exp(la).sum(1, keepdims=True))
    lb = b - b.max(1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(1, keepdims=True))
    return (np.exp(la) * (la - lb)).sum(1)


def compare(paths: list[str]) -> None:
    print("| A | B | logits | KL mean (nats) | KL max | max abs diff | same top |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for a_path, b_path in zip(paths[::2], paths[1::2]):
        a, b = np.load(a_path), np.load(b_path)
        for key in ("batch", "decode"):
            x, y = a[key].astype(np.float64), b[key].astype(np.float64)
            d = kl(x, y)
            print(f"| {a_path} | {b_path} | {key} | {d.mean():.5f} | {d.max():.4f} | {np.abs(x - y).max():.3f} "
                  f"| {(x.argmax(1) == y.argmax(1)).mean():.3f} |")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "save":
        save(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 4 and sys.argv[1] == "compare" and len(sys.argv) % 2 == 0:
        compare(sys.argv[2:])
    else:
        sys.exit(__doc__)
