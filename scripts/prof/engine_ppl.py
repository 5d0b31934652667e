"""perplexity of neuralink.Llama (every neuron, then its default predictor) against stock, paired token by token

    python engine_ppl.py ORIGINAL.gguf CONVERTED.neuralink.gguf [...]   (TEXT=, default code-mz.txt; N= tokens)

Windows of 512 every 256 tokens (neuralink.runtime.scoring). Unlike `neuralink perplexity --sweep`, whose sparse
rows score llama.cpp on the converted GGUF, every neuralink row here runs the engine: the sidecar's own down
columns, or the converted GGUF's down rows where the engine holds the whole store and they pay (DOWN_ROWS=0: never).
"""
import os, sys, time
import numpy as np, llama_cpp, neuralink
from neuralink.runtime.scoring import TextScorer

original, models = sys.argv[1], sys.argv[2:]
text = open(os.environ.get("TEXT", "code-mz.txt")).read()
n = int(os.environ.get("N", "2048"))
stock = llama_cpp.Llama(original, n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2)
tokens = np.array(stock.tokenize(text.encode(), add_bos=False)[:n])
t0 = time.time()
ref = TextScorer(stock, tokens, 512, 256).score()
stock.close()
print(f"stock {np.exp(ref.mean()):.4f} ({time.time() - t0:.0f} s)", flush=True)
for model in models:
    for predictor in ("dense", None):
        kw = {"ffn": "engine"} if predictor is None else {"predictor": predictor}
        if os.environ.get("DOWN_ROWS") == "0":
            kw["down_rows"] = False
        llm = neuralink.Llama(model, n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2, **kw)
        t0 = time.time()
        nll = TextScorer(llm, tokens, 512, 256).score()
        rows = len(llm.engine.down_rows_layers_in_use)
        llm.close()
        d = nll - ref
        print(f"{model} {predictor or 'default'} (down rows in {rows} layers): {np.exp(nll.mean()):.4f} "
              f"({100 * (np.exp(nll.mean() - ref.mean()) - 1):+.3f} %, paired {d.mean():+.4f} ± "
              f"{d.std() / np.sqrt(d.size):.4f}) ({time.time() - t0:.0f} s)", flush=True)
