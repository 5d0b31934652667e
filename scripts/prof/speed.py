"""decode speed, stock vs neuralink (uncapped, whole store cached), warm"""
import sys, time, numpy as np, os
which, model = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 48
threads = int(os.environ.get("T", "2"))
if which == "stock":
    import llama_cpp
    llm = llama_cpp.Llama(model, n_ctx=512, n_threads=threads, verbose=False)
else:
    import neuralink
    kw = {"ffn": os.environ.get("FFN", "engine")}  # FFN=auto: what users get (llama.cpp's where the model fits)
    if os.environ.get("PRED"): kw["predictor"] = os.environ["PRED"]
    if os.environ.get("DOWN_ROWS") in ("0", "all"): kw["down_rows"] = False  # no trial: the columns, or (all) forced rows
    llm = neuralink.Llama(model, n_ctx=512, n_threads=threads, verbose=False, **kw)
    if os.environ.get("DOWN_ROWS") == "all":  # every layer by the GGUF's rows, whatever the cost model says
        llm.engine.use_down_rows(list(range(llm.engine.n_layer)))
prompt = "def binary_search(items, target):\n    \"\"\"Return the index of target in the sorted list items.\"\"\"\n"
toks = llm.tokenize(prompt.encode())
for rep in range(int(os.environ.get("REPS", "2"))):
    llm.reset(); llm.eval(toks)
    tok = int(np.argmax(llm.scores[llm.n_tokens-1]))
    t0 = time.perf_counter()
    for i in range(n):
        llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens-1]))
    dt = time.perf_counter() - t0
    print(which, "rep", rep, f"{n/dt:.2f} tok/s", flush=True)
if which != "stock":
    print("down rows in layers", llm.engine.down_rows_layers_in_use)
    print(llm.ffn_summary())
