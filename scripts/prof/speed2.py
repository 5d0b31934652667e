"""warm uncapped decode with the gate predictor at one sidecar's thresholds, for two sidecars of one placement"""
import sys, time, os, numpy as np, neuralink
ref, models = sys.argv[1], sys.argv[2:]
r = neuralink.Llama(ref, n_ctx=512, n_threads=2, verbose=False, ffn="engine")
th, cth = list(r.engine.thresholds), list(r.engine.candidate_thresholds)
r.close()
prompt = "def binary_search(items, target):\n    \"\"\"Return the index of target in the sorted list items.\"\"\"\n"
for rnd in range(2):
    for m in models:
        llm = neuralink.Llama(m, n_ctx=512, n_threads=2, verbose=False, predictor="gate", thresholds=th, candidate_thresholds=cth)
        toks = llm.tokenize(prompt.encode())
        llm.reset(); t0 = time.perf_counter(); llm.eval(toks); pt = time.perf_counter() - t0
        tok = int(np.argmax(llm.scores[llm.n_tokens-1]))
        t0 = time.perf_counter()
        for i in range(48):
            llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens-1]))
        print(m, f"decode {48/(time.perf_counter()-t0):.2f} tok/s, prompt {len(toks)/pt:.1f} tok/s", flush=True)
        llm.close()
