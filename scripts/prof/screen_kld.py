"""What the output screen costs in predictions: neuralink.Llama's engine with output_screen=True against the same
engine without it, token by token (KL divergence of the screened next-token distribution from the unscreened one,
both over the full vocabulary's 256 most likely tokens and the rest as one; perplexity; the same top token)

    python screen_kld.py CONVERTED.neuralink.gguf [MARGIN ...]   (TEXT=, default code-mz.txt; N= tokens;
                                                                  TYPE= the copy's type, default the engine's)

Windows of 512 every 256 tokens (neuralink.evaluate.perplexity), every position's logits (a batch's rows: the
exact ones within ~1e-6 of llama.cpp's own batch product, see tests/test_output_screen.py).
"""
import os, sys
import neuralink
from neuralink.evaluate.perplexity import paired_nll_difference, perplexity
from neuralink.runtime import output_screen
from neuralink.runtime.scoring import REFERENCE_TOP

model, margins = sys.argv[1], [float(m) for m in sys.argv[2:]] or [output_screen.OUTPUT_SCREEN_MARGIN]
output_screen.OUTPUT_SCREEN_TYPE = os.environ.get("TYPE", output_screen.OUTPUT_SCREEN_TYPE)
text = open(os.environ.get("TEXT", "code-mz.txt")).read()
n = int(os.environ.get("N", "2048"))
common = dict(n_ctx=512, stride=256, max_tokens=n, n_threads=2, llama_factory=neuralink.Llama, ffn="engine")
ref = perplexity(model, text, keep_top=REFERENCE_TOP, output_screen=False, **common)
print(f"engine, output matrix whole: {ref.perplexity:.4f} over {ref.n_scored} tokens ({ref.seconds:.0f} s)", flush=True)
for margin in margins:
    output_screen.OUTPUT_SCREEN_MARGIN = margin
    figures: list[dict] = []
    r = perplexity(model, text, reference=ref, output_screen=True,
                   inspect=lambda llm: figures.append(llm.engine.output_screen), **common)
    d, e = paired_nll_difference(r, ref)
    print(f"screened by {output_screen.OUTPUT_SCREEN_TYPE}, margin {margin:g} nats: {r.perplexity:.4f} ({100 * (r.perplexity / ref.perplexity - 1):+.3f} %, "
          f"paired {d:+.5f} ± {e:.5f}; KLD {r.divergence.mean_kld:.6f} ± {r.divergence.kld_standard_error:.6f}, "
          f"top-1 same {r.divergence.top_agreement:.4f}) ({r.seconds:.0f} s)", flush=True)
