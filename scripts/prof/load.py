"""cold load + first decodes, with and without preload"""
import sys, time, numpy as np, os, logging
logging.basicConfig(level=logging.INFO)
model = sys.argv[1]; preload = sys.argv[2] == "1"
import neuralink
from neuralink import _engine
_engine.evict_from_page_cache(model); _engine.evict_from_page_cache(model.replace(".gguf", ".sidecar"))
t0 = time.perf_counter()
llm = neuralink.Llama(model, n_ctx=512, n_threads=2, verbose=False, preload=preload, ffn="engine")
print("load", time.perf_counter() - t0, "holds", llm.engine.cache_holds_store)
toks = llm.tokenize(b"def binary_search(items, target):\n")
t0 = time.perf_counter(); llm.eval(toks); print("prompt", time.perf_counter() - t0)
tok = int(np.argmax(llm.scores[llm.n_tokens-1]))
steps = []
for i in range(32):
    t = time.perf_counter(); llm.eval([tok]); steps.append(time.perf_counter() - t); tok = int(np.argmax(llm.scores[llm.n_tokens-1]))
print("decode tok/s", len(steps) / sum(steps), "first5", [round(s, 3) for s in steps[:5]])
