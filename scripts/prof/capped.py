"""decode under a memory budget (no cgroup)"""
import sys, time, os
import neuralink
model = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 24
kw = {}
if os.environ.get("PRED"): kw["predictor"] = os.environ["PRED"]
if os.environ.get("BUDGET"): kw["memory_budget"] = os.environ["BUDGET"]
llm = neuralink.Llama(model, n_ctx=512, n_batch=int(os.environ.get("NB", "16")), n_threads=2, verbose=False, **kw)
prompt = "def binary_search(items, target):\n    \"\"\"Return the index of target in the sorted list items.\"\"\"\n"
for rep in range(int(os.environ.get("REPS", "1"))):
    t0 = time.perf_counter()
    out = llm(prompt, max_tokens=n, temperature=0.0)
    dt = time.perf_counter() - t0
    print(f"{out['usage']['completion_tokens']} tokens in {dt:.2f}s", repr(out["choices"][0]["text"][:60]), flush=True)
print(llm.ffn_summary())
print(llm.memory_plan)
import numpy as np
e = llm.engine
llm.ffn_stats(reset=True)
toks = llm.tokenize(b"def quicksort(xs):\n")
llm.reset(); llm.eval(toks)
llm.ffn_stats(reset=True)
t0 = time.perf_counter(); m = 16
import llama_cpp
for i in range(m):
    llm.eval([toks[-1] if i == 0 else 220])
dt = time.perf_counter() - t0
s = llm.ffn_stats(reset=True)
print(f"decode {m}: {dt/m*1000:.0f} ms/token; per token: layer {s['layer_ns'].sum()/m/1e6:.0f} ms, stall {s['stall_ns'].sum()/m/1e6:.0f} ms, io {s['io_ns'].sum()/m/1e6:.0f} ms, MiB {s['bytes_read'].sum()/m/2**20:.0f}, reads {s['reads'].sum()/m:.0f}")
print(llm.memory_plan.to_dict())
