"""neuralink.Llama(MODEL, n_ctx=N_CTX) without a budget (run it in a cgroup: in_cgroup.sh): who computes its FFNs
(ffn='auto': llama.cpp where the whole model fits), whether the engine runs as under a budget (n_batch 64), its
cache against the whole store, and 48 greedy tokens after a warm-up; or its refusal. STOCK=1: llama_cpp.Llama."""
import os, sys, time
from neuralink.errors import MemoryBudgetError
if os.environ.get("STOCK"):
    import llama_cpp
    llm = llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=2, verbose=False)
    print("stock llama.cpp")
else:
    import neuralink
    try:
        llm = neuralink.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), verbose=False)
    except MemoryBudgetError as e:
        print("refused:", str(e).split("\n")[0][-260:]); sys.exit()
    p = llm.memory_plan
    print("ffn", llm.ffn, "n_batch", llm.n_batch, *(["cache %.0f of %.0f MiB, minimum %.0f" % (
        p.cache / 2**20, p.whole_store_cache / 2**20, p.minimum / 2**20)] if p else []))
llm("def fibonacci(n):", max_tokens=8, temperature=0)  # warm
t = time.time(); out = llm("def quicksort(items):", max_tokens=48, temperature=0)
n = out["usage"]["completion_tokens"]
print("%d tokens %.2f tok/s" % (n, n / (time.time() - t)))
