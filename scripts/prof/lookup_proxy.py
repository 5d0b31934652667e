"""prompt lookup's proposals against real text: how many tokens each verification would confirm

    python lookup_proxy.py MODEL.gguf TEXT [TEXT ...]      (.txt, or .jsonl with a "text" field: its first 40)

For 60 windows of a text: 200 tokens of context, then its next 32 tokens stand for what the model writes; after
each token, up to 4 proposals are looked up and confirmed while they match the text. Rows: the longest n-gram
looked up (1-3) and which earlier occurrence is continued (the first, as llama-cpp-python's
LlamaPromptLookupDecoding, or the most recent, as neuralink's). Tokens per step = what one verification yields.
A model's own greedy text repeats itself more than human text: read the rows against each other.
"""
import json, sys
import llama_cpp
from neuralink.runtime.draft import RecentPromptLookup
import numpy as np

model, texts = sys.argv[1], sys.argv[2:]
vocab = llama_cpp.Llama(model, vocab_only=True, verbose=False)


def first_lookup(t, k, nmax):
    n = len(t)
    for g in range(min(nmax, n - 1), 0, -1):
        for s in range(0, n - g):
            if t[s:s + g] == t[n - g:]:
                return t[s + g:min(n, s + g + k)]
    return []


for path in texts:
    raw = open(path).read()
    if path.endswith(".jsonl"):
        raw = "\n\n".join(json.loads(line)["text"] for line in raw.splitlines()[:40])
    toks = vocab.tokenize(raw.encode()[:400000], add_bos=False)
    for nmax in (1, 2, 3):
        recent_lookup = RecentPromptLookup(num_pred_tokens=4, max_ngram=nmax)
        for recent in (False, True):
            confirmed = proposed = steps = 0
            for start in range(0, len(toks) - 240, 997)[:60]:
                t, cont, i = list(toks[start:start + 200]), toks[start + 200:start + 232], 0
                while i < len(cont):
                    t.append(cont[i])
                    i += 1
                    d = (recent_lookup(np.array(t, dtype=np.intc)).tolist() if recent else first_lookup(t, 4, nmax))
                    k = 0
                    while k < len(d) and i + k < len(cont) and d[k] == cont[i + k]:
                        k += 1
                    confirmed, proposed = confirmed + k, proposed + len(d)
                    t.extend(cont[i:i + k])
                    i += k
                    steps += 1
            print(f"{path.split('/')[-1]:20s} n-gram <= {nmax}, {'most recent' if recent else 'first      '}: "
                  f"{confirmed}/{proposed} proposals confirmed, {(steps + confirmed) / steps:.3f} tokens per step")
