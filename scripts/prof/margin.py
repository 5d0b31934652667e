"""candidate margin study: final density f, candidates f + margin, uniform per layer, the quality search's scorer.

usage: margin.py CONVERTED.gguf PLACEMENT.npz HELDOUT.txt [TOKENS]   (the placement the conversion used)
"""
import sys, time, json
import numpy as np
from neuralink.convert.quality import ContributionScorer, Setting
from neuralink.formats.coactivation import SelectionStats
m = sys.argv[1]
z = np.load(sys.argv[2])
sel = SelectionStats.from_arrays(z)
n = sel.score_quantiles.shape[0]
text = open(sys.argv[3]).read()
sc = ContributionScorer(m, m.replace(".gguf", ".sidecar"), text, max_tokens=int(sys.argv[4]) if len(sys.argv) > 4 else 2048, n_ctx=512, stride=512, threads=2)
ref, _ = sc.nll(Setting((1.0,)*n, (0.0,)*n, (0.0,)*n))
print(f"reference nll {ref:.5f}", flush=True)
for f in (0.35, 0.4, 0.3):
    for margin in (0.35, 0.25, 0.15, 0.1, 0.05):
        c = min(1.0, f + margin)
        st = Setting((f,)*n, tuple(sel.threshold(il, f) for il in range(n)), tuple(sel.threshold(il, c, candidate=True) for il in range(n)))
        t0 = time.perf_counter()
        nll, d = sc.nll(st)
        print(json.dumps(dict(final=f, margin=margin, dppl=round(100*(np.exp(nll-ref)-1), 3), up=round(d["up_density"], 4), down=round(d["down_density"], 4), s=round(time.perf_counter()-t0, 1))), flush=True)
