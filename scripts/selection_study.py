#!/usr/bin/env python3
"""Which neurons of a gated FFN can be skipped: selection rules compared at equal density, on stock llama.cpp.

    python scripts/selection_study.py MODEL --calibration CAL.jsonl --heldout EVAL.jsonl \
        [--densities 0.5 0.4 0.3] [--margins 0.2 0.35] [--calibration-tokens 2048] [--heldout-tokens 1024]

Each rule scores every (token, neuron) pair of every layer; per-layer
thresholds put each rule at the target density on the calibration text
(the quantile rule of `neuralink profile`); on held-out text, llama.cpp's
SwiGLU/GeGLU output h (the input of ffn_down, "ffn_swiglu-N") is zeroed in
place, through the eval callback, where the rule says skip. So every rule is
measured on the same model and text without the engine, as perplexity change
against the unmodified model:

  gate          |act(gate)|                       (CATS; decidable from the gate alone)
  wina          |act(gate)| * E|up| * |down col|  (weight-informed; from the gate alone)
  h             |act(gate) * up|                  (needs the up row)
  contribution  |act(gate) * up| * |down col|     (needs the up row)
  two-stage/m   contribution among the candidates whose wina score passes the
                threshold at density + m: the engine's rule (the up rows of the
                candidates are read, the down columns of the neurons kept)

Prints a table (density, rule, measured density kept, up rows read, perplexity change).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from neuralink.profile.activations import ActivationReader
from neuralink.profile.contribution import down_column_norms
from neuralink.profile.text import read_documents, split_windows
from neuralink.profile.thresholds import density_threshold

SAMPLES_PER_LAYER = 200_000
WANTED = ("ffn_gate", "ffn_up", "ffn_swiglu", "ffn_geglu")


def act_of(name: str):
    if name == "ffn_geglu":
        return lambda g: 0.5 * g * (1.0 + np.tanh(0.7978845608 * (g + 0.044715 * g**3)))
    return lambda g: g * (0.5 + 0.5 * np.tanh(0.5 * g))


class Study:
    def __init__(self, model: Path, threads: int, window: int) -> None:
        self.reader = ActivationReader(model, window=window, threads=threads)
        self.down_norm = down_column_norms(model)
        self.n_layer = self.reader.n_layer
        self.current: dict[str, np.ndarray] = {}

    def windows(self, paths: list[Path], max_tokens: int) -> list[np.ndarray]:
        docs = [self.reader.tokenize(d) for d in read_documents(paths)]
        return split_windows(docs, self.reader.text_tokens_per_window, max_tokens)

    def _pair(self, base: str, layer: int, rows: np.ndarray, on_h) -> None:
        if base in ("ffn_gate", "ffn_up"):
            self.current[base] = rows.copy()
        else:
            g = act_of(base)(self.current["ffn_gate"])
            on_h(layer, g, self.current["ffn_up"], rows)

    def calibrate(self, windows: list[np.ndarray]) -> None:
        rng = np.random.default_rng(0)
        up_sum = np.zeros((self.n_layer, len(self.down_norm[0])))
        count = np.zeros(self.n_layer)
        samples: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(self.n_layer)]
        per_window = math.ceil(SAMPLES_PER_LAYER / len(windows))

        def on_h(layer: int, a: np.ndarray, u: np.ndarray, h: np.ndarray) -> None:
            up_sum[layer] += np.abs(u).sum(axis=0)
            count[layer] += len(u)
            picks = rng.integers(0, a.size, per_window)
            samples[layer].append((picks % a.shape[1], np.abs(a.ravel()[picks]), np.abs(h.ravel()[picks])))

        for tokens in windows:
            self.reader.evaluate(tokens, WANTED.__contains__, lambda b, l, r: self._pair(b, l, r, on_h))
        self.up_mean = up_sum / count[:, None]
        self.scores: list[dict[str, np.ndarray]] = []
        for layer, parts in enumerate(samples):
            neuron = np.concatenate([p[0] for p in parts])
            a, h = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
            d = self.down_norm[layer][neuron]
            self.scores.append({"gate": a, "wina": a * self.up_mean[layer][neuron] * d, "h": h, "contribution": h * d})

    def threshold(self, rule: str, layer: int, density: float) -> float:
        return density_threshold(self.scores[layer][rule], density) if density < 1 else -1.0

    def nll(self, windows: list[np.ndarray], keep=None) -> tuple[float, float, float]:
        """Mean NLL of the held-out windows with h zeroed where keep(layer, a, u, h) is False; the fraction kept
        and the fraction of up rows read."""
        total, n, kept, read, pairs = 0.0, 0, 0, 0, 0

        def on_h(layer: int, a: np.ndarray, u: np.ndarray, h: np.ndarray) -> None:
            nonlocal kept, read, pairs
            if keep is None:
                return
            mask, up_read = keep(layer, a, u, h)
            h[~mask] = 0.0  # llama.cpp's own buffer: ffn_down reads it next
            kept, read, pairs = kept + int(mask.sum()), read + int(up_read.sum()), pairs + mask.size

        for tokens in windows:
            self.reader.evaluate(tokens, WANTED.__contains__, lambda b, l, r: self._pair(b, l, r, on_h))
            logits = self.reader.logits().astype(np.float64)
            peak = logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
            rows = np.arange(len(tokens) - 1)
            total += float((log_norm[rows] - logits[rows, tokens[1:]]).sum())
            n += len(tokens) - 1
        return total / n, (kept / pairs if pairs else 1.0), (read / pairs if pairs else 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--calibration", type=Path, nargs="+", required=True)
    parser.add_argument("--heldout", type=Path, nargs="+", required=True)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.4, 0.3])
    parser.add_argument("--margins", type=float, nargs="+", default=[0.2, 0.35],
                        help="two-stage candidate margins: candidates at density + margin")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--heldout-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()

    study = Study(args.model, args.threads, args.window)
    study.calibrate(study.windows(args.calibration, args.calibration_tokens))
    heldout = study.windows(args.heldout, args.heldout_tokens)
    reference, _, _ = study.nll(heldout)
    print(f"{args.model.name}: reference perplexity {math.exp(reference):.4f} on {sum(map(len, heldout))} held-out "
          f"tokens\n\n| density | rule | kept | up rows read | perplexity change |\n| ---: | --- | ---: | ---: | ---: |")
    for density in args.densities:
        rules = {}
        for rule in ("gate", "wina", "h", "contribution"):
            t = [study.threshold(rule, il, density) for il in range(study.n_layer)]
            gate_only = rule in ("gate", "wina")

            def keep(layer, a, u, h, rule=rule, t=t, gate_only=gate_only):
                score = {"gate": lambda: np.abs(a),
                         "wina": lambda: np.abs(a) * study.up_mean[layer] * study.down_norm[layer],
                         "h": lambda: np.abs(h),
                         "contribution": lambda: np.abs(h) * study.down_norm[layer]}[rule]()
                mask = score > t[layer]
                return mask, (mask if gate_only else np.ones_like(mask))

            rules[rule] = keep
        for margin in args.margins:
            tf = [study.threshold("contribution", il, density) for il in range(study.n_layer)]
            tc = [study.threshold("wina", il, min(1.0, density + margin)) for il in range(study.n_layer)]

            def keep(layer, a, u, h, tf=tf, tc=tc):
                candidates = np.abs(a) * study.up_mean[layer] * study.down_norm[layer] > tc[layer]
                return candidates & (np.abs(h) * study.down_norm[layer] > tf[layer]), candidates

            rules[f"two-stage/{margin:g}"] = keep
        for rule, keep in rules.items():
            start = time.perf_counter()
            nll, kept, read = study.nll(heldout, keep)
            print(f"| {density:g} | {rule} | {kept:.3f} | {read:.3f} | {100 * math.expm1(nll - reference):+.2f} % |",
                  flush=True)
            print(f"  ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    study.reader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
