"""prompt processing speed: a 256-token prompt, stock or neuralink, whole store in DRAM"""
import sys, time, os
which, model = sys.argv[1], sys.argv[2]
reps = int(os.environ.get("REPS", "3"))
kw = dict(ffn=os.environ.get("FFN", "engine"), n_ctx=512, n_batch=int(os.environ.get("NB","64")), n_ubatch=int(os.environ.get("NB","64")), n_threads=2, verbose=False)
if which == "stock":
    import llama_cpp
    llm = llama_cpp.Llama(model, **kw)
else:
    import neuralink
    llm = neuralink.Llama(model, **kw)
text = open(os.environ.get("TEXT", "code-mz.txt")).read()[20000:40000]
toks = llm.tokenize(text.encode())[:int(os.environ.get("NT","256"))]
for rep in range(reps):
    llm.reset()
    t0 = time.perf_counter(); llm.eval(toks); dt = time.perf_counter() - t0
    print(which, "rep", rep, f"{len(toks)/dt:.1f} prompt tok/s, {dt:.2f} s", flush=True)
