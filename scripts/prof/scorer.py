"""one contribution setting scored by the quality search's scorer, profiled. usage: scorer.py CONVERTED.gguf HELDOUT.txt"""
import cProfile, pstats, time, sys
import numpy as np
from neuralink.convert.quality import ContributionScorer, Setting
m = sys.argv[1]
text = open(sys.argv[2]).read()
t0 = time.perf_counter()
sc = ContributionScorer(m, m.replace(".gguf", ".sidecar"), text, max_tokens=1024, n_ctx=512, stride=512, threads=2)
print("init", time.perf_counter() - t0, "windows", len(sc.windows))
n = len(sc.tables)
st = Setting(tuple([0.4]*n), tuple([0.05]*n), tuple([0.02]*n))
t0 = time.perf_counter()
pr = cProfile.Profile(); pr.enable()
nll, d = sc.nll(st)
pr.disable()
print("setting", time.perf_counter() - t0, nll, d)
pstats.Stats(pr).sort_stats("tottime").print_stats(12)
