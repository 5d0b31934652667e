"""load time and decode under a memory budget (pinned cache), cold files"""
import sys, time, numpy as np
import neuralink
from neuralink import _engine
model, budget = sys.argv[1], sys.argv[2]
_engine.evict_from_page_cache(model); _engine.evict_from_page_cache(model.replace(".gguf", ".sidecar"))
t0 = time.perf_counter()
llm = neuralink.Llama(model, n_ctx=512, n_batch=64, n_ubatch=64, n_threads=2, verbose=False, memory_budget=budget)
print("load", round(time.perf_counter() - t0, 1), "s; policy", llm.engine.cache_policy, "entries", llm.engine.cache_stats()["entries"])
