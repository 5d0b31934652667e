"""How well would a coarse copy of the output matrix screen the vocabulary?

Under a memory cap the output matrix (Qwen2.5-Coder-1.5B: Q6_K, 182 MiB)
stays resident because every token multiplies it whole. If a coarser copy
(q4_K, q3_K, q2_K) ranked the vocabulary well enough, only the few rows that
can win would need their exact values, and the difference would be cache for
the FFN records. This measures, on held-out text, the final normalized hidden
states llama.cpp produces (embedding mode, no pooling):

- the coarse logits' error against the exact ones, per token (its spread);
- where the exact argmax ranks among the coarse logits (1: first; worst case);
- how many rows lie within a window (in nats) plus k standard deviations of
  the coarse maximum (the candidates an exact pass would read) and whether
  that set holds the exact argmax and the exact top-8;
- the probability mass (softmax at temperature 1) left outside the set.

    python scripts/prof/output_screen.py MODEL TEXT [--tokens 384] [--types q4_K q3_K q2_K]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np


def hidden_states(model: str, text: str, tokens: int) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=tokens + 8, n_batch=tokens + 8, n_ubatch=tokens + 8, embedding=True,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, verbose=False, n_threads=2)
    ids = llm.tokenize(text.encode(), add_bos=False)[:tokens]
    return np.asarray(llm.embed(llm.detokenize(ids).decode(errors="ignore"), normalize=False), dtype=np.float32)


def output_matrix(model: str) -> tuple[str, np.ndarray, int]:
    import gguf

    reader = gguf.GGUFReader(model)
    by_name = {t.name: t for t in reader.tensors}
    t = by_name.get("output.weight") or by_name["token_embd.weight"]
    ggml_name = t.tensor_type.name.lower().replace("_k", "_K")  # gguf-py's Q6_K is ggml's q6_K
    return ggml_name, np.asarray(t.data), int(t.shape[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--types", nargs="+", default=["q4_K", "q3_K", "q2_K"])
    ap.add_argument("--sigmas", nargs="+", type=float, default=[4, 8])
    ap.add_argument("--windows", nargs="+", type=float, default=[0, 8, 12],
                    help="nats below the coarse maximum also taken (0: only its k error spreads)")
    args = ap.parse_args()
    from neuralink import _engine

    x = hidden_states(args.model, Path(args.text).read_text(encoding="utf-8", errors="ignore"), args.tokens)
    src_type, raw, n_embd = output_matrix(args.model)
    w = _engine.dequantize(src_type, raw, n_embd)
    exact = x @ w.T  # tokens x vocab
    top = np.argmax(exact, axis=1)
    ex_top8 = np.argsort(-exact, axis=1)[:, :8]
    p = np.exp(exact - exact.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    print(f"{x.shape[0]} tokens, output {src_type} {w.shape}, {raw.nbytes / 2**20:.1f} MiB")
    print("| copy | MiB | error sd (mean) | worst rank of argmax | window, k | candidates (mean, max) | argmax in | top-8 in | mass out (max) |")
    print("| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |")
    for t in args.types:
        q = _engine.quantize(t, w)
        a = x @ _engine.dequantize(t, q, n_embd).T
        sd = (a - exact).std(axis=1)
        # 1-based place of the exact argmax among the coarse logits: rows above it, plus one
        rank = (a > a[np.arange(len(top)), top][:, None]).sum(axis=1) + 1
        for wnd, k in itertools.product(args.windows, args.sigmas):
            cand = a >= (a.max(axis=1, keepdims=True) - wnd - k * sd[:, None])
            n = cand.sum(axis=1)
            hit = cand[np.arange(len(top)), top].mean()
            hit8 = np.mean([cand[i, ex_top8[i]].all() for i in range(len(top))])
            out = (p * ~cand).sum(axis=1)
            print(f"| {t} | {q.nbytes / 2**20:.1f} | {sd.mean():.3f} | {rank.max()} | {wnd:g}, {k:g} | {n.mean():.0f}, {n.max()} | "
                  f"{hit:.4f} | {hit8:.4f} | {out.max():.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
