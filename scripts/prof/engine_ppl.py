"""perplexity and divergence of neuralink.Llama (llama.cpp on the converted file, the engine with every neuron, the
engine's default predictor) against stock, token by token

    python engine_ppl.py ORIGINAL.gguf CONVERTED.neuralink.gguf [...]   (TEXT=, default code-mz.txt; N= tokens)

Windows of 512 every 256 tokens (neuralink.evaluate.perplexity). Unlike `neuralink perplexity --sweep`, whose sparse
rows score llama.cpp on the converted GGUF, the engine rows here run the engine: the sidecar's own down columns, or
the converted GGUF's down rows where the engine holds the whole store and they pay (DOWN_ROWS=0: never). KLD is the KL
divergence from stock's next-token distribution (its 256 most likely tokens and the rest as one), nats per token.
"""
import os, sys
import llama_cpp, neuralink
from neuralink.evaluate.perplexity import paired_nll_difference, perplexity
from neuralink.runtime.scoring import REFERENCE_TOP

original, models = sys.argv[1], sys.argv[2:]
text = open(os.environ.get("TEXT", "code-mz.txt")).read()
n = int(os.environ.get("N", "2048"))
common = dict(n_ctx=512, stride=256, max_tokens=n, n_threads=2)
ref = perplexity(original, text, llama_factory=llama_cpp.Llama, keep_top=REFERENCE_TOP, **common)
print(f"stock {ref.perplexity:.4f} over {ref.n_scored} tokens ({ref.seconds:.0f} s)", flush=True)
for model in models:
    for label, kw in (("llama.cpp (ffn=llama)", {"ffn": "llama"}), ("engine dense", {"predictor": "dense"}),
                      ("engine default", {"ffn": "engine"})):
        if "predictor" in kw or kw.get("ffn") == "engine":
            kw = {**kw, **({"down_rows": False} if os.environ.get("DOWN_ROWS") == "0" else {})}
        rows: list[int] = []
        r = perplexity(model, text, llama_factory=neuralink.Llama, reference=ref,
                       inspect=lambda llm: rows.append(0 if llm.ffn == "llama" else len(llm.engine.down_rows_layers_in_use)),
                       **common, **kw)
        d, e = paired_nll_difference(r, ref)
        print(f"{model} {label} (down rows in {rows[0]} layers): {r.perplexity:.4f} "
              f"({100 * (r.perplexity / ref.perplexity - 1):+.3f} %, paired {d:+.4f} ± {e:.4f}; "
              f"KLD {r.divergence.mean_kld:.5f} ± {r.divergence.kld_standard_error:.5f}, "
              f"top-1 same {r.divergence.top_agreement:.4f}) ({r.seconds:.0f} s)", flush=True)
