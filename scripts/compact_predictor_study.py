#!/usr/bin/env python3
"""Can a compact copy of the gate find the contribution criterion's neurons? Recall against neurons selected.

    python scripts/compact_predictor_study.py MODEL --calibration CAL.jsonl --heldout EVAL.txt \
        [--layers 0 5 10 15] [--densities 0.3 0.4] [--ranks 64 128 256]

Per layer, on held-out tokens, the "finals" are the (token, neuron) pairs
whose |act(gate) * up| * |down column| passes the threshold that keeps the
target density on the calibration tokens (the contribution criterion).
Each predictor scores every pair from the gate alone, times the neuron's
E|up| * |down column| (the engine's candidate scale), and the table gives the
fraction of pairs it must select to find 99 % of the finals:

  gate_exact   the exact gate (the resident gate rows of the `gate` predictor)
  lowrankR     an activation-aware rank-R factor of the gate (as `--lowrank-rank` fits)
  sign1        1-bit gate rows: sign times the row's mean |w|
  q2           2-bit gate rows: sign times {0.5, 1.5} of the row's mean |w|
  gate_up1     the exact gate and 1-bit up rows (sign times the row's mean |w|):
               each pair scored by the chance that it passes the criterion given
               the estimate, the up value taken as beta * estimate plus Gaussian
               noise (beta and the noise's spread fitted per neuron on the
               calibration tokens); about a fifth of q4_K up rows' bytes in DRAM
  gate_up1x64  the same with the 64 input dimensions that carry most of the up
               values' variance on the calibration tokens kept exact (their
               columns of the up rows, 64 values per neuron, beside the signs)
  gate_up2     the same with 2-bit up rows (sign times {0.5, 1.5} of the row's
               mean |w|, as q2 above): about 58 % of q4_K up rows' bytes
  gate_ucdf    the exact gate and no copy of the up rows: each pair scored by
               the chance that the neuron's up value passes what the criterion
               needs given its gate, from the neuron's own distribution of
               |up| on the calibration tokens (its empirical CDF) in place of
               the engine's one number E|up|: the ranking a gate-only rule
               could reach when up values do not depend on the gate

  gate_prev_up the exact gate and the same neuron's up value at the token before
               (u_t taken as beta * u_{t-1} plus Gaussian noise, fitted per neuron
               on the calibration tokens), as if every up value of the last token
               were known: an upper bound of what temporal correlation can give
  gate_prev_read the same, with u_{t-1} known only where the exact gate's rule
               picked the pair at t-1 as it does today (the engine reads those up
               rows anyway); elsewhere u_t is taken as N(0, its variance): one
               float per neuron resident, nothing more read

A predictor is worth its DRAM only when its fraction is well under 1; the
exact gate's fraction is what today's candidates cost (their up rows read).
The last column gives, for candidates cut to half of the pairs, the share of
the finals' criterion mass |act(g) * up| * |down column| they still hold.
"""

from __future__ import annotations

import argparse
import math
import sys

import gguf
import numpy as np

from neuralink import _engine
from neuralink.convert.predictor import capture_ffn_inputs
from neuralink.formats.ggml_types import ggml_type_name


def dequantized(tensors: dict, name: str) -> np.ndarray:
    t = tensors[name]
    raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(int(t.shape[1]), -1)
    return _engine.dequantize(ggml_type_name(gguf.GGMLQuantizationType(t.tensor_type)), raw, int(t.shape[0]))


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def normal_tail(z: np.ndarray) -> np.ndarray:
    """P(N(0, 1) > z)."""
    return 0.5 * _erfc(z / np.sqrt(2.0)).astype(np.float64)


_erfc = np.frompyfunc(math.erfc, 1, 1)


def up_estimates(u: np.ndarray, x_cal: np.ndarray) -> dict[str, np.ndarray]:
    """Compact copies of the up rows `u` (neurons x n_embd) that the gate_up predictors estimate up values with."""
    mean_abs = np.abs(u).mean(1, keepdims=True)
    sign1 = np.sign(u) * mean_abs
    # the input dimensions carrying most of the up values' variance: E[x_j^2] * mean over neurons of w_ij^2
    carried = np.argsort((x_cal * x_cal).mean(0) * (u * u).mean(0))[::-1][:64]
    sign1_exact64 = sign1.copy()
    sign1_exact64[:, carried] = u[:, carried]
    return {"gate_up1": sign1, "gate_up1x64": sign1_exact64,
            "gate_up2": np.sign(u) * np.where(np.abs(u) > mean_abs, 1.5, 0.5) * mean_abs * 0.75}


def gate_up_score(a_held: np.ndarray, x_cal: np.ndarray, x_held: np.ndarray, u: np.ndarray, w: np.ndarray,
                  down_norm: np.ndarray, threshold: float) -> np.ndarray:
    """The chance that |a * up| * |d| passes `threshold`, from the exact act(gate) `a_held` and the estimate w of u."""
    est_cal, est_held, up_cal = x_cal @ w.T, x_held @ w.T, x_cal @ u.T
    beta = (est_cal * up_cal).sum(0) / np.maximum((est_cal * est_cal).sum(0), 1e-30)
    spread = np.maximum(np.sqrt(((up_cal - beta * est_cal) ** 2).mean(0)), 1e-30)
    need = threshold / np.maximum(np.abs(a_held) * down_norm, 1e-30)  # |up| must pass this
    return normal_pass_score(need, beta * est_held, spread)


def normal_pass_score(need: np.ndarray, mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """P(|N(mean, spread^2)| > need), elementwise."""
    return normal_tail((need - mean) / spread) + normal_tail((need + mean) / spread)


def previous_up_scores(a_held: np.ndarray, up_cal: np.ndarray, up_held: np.ndarray, down_norm: np.ndarray,
                       threshold: float, known_held: np.ndarray | None) -> np.ndarray:
    """P(|a * up| * |d| passes `threshold`) from the neuron's up value at the token before (held-out token 0 has
    none: scored with the unconditional spread); `known_held`: where u_{t-1} is known (None: everywhere)."""
    prev, cur = up_cal[:-1], up_cal[1:]
    beta = (prev * cur).sum(0) / np.maximum((prev * prev).sum(0), 1e-30)
    spread = np.maximum(np.sqrt(((cur - beta * prev) ** 2).mean(0)), 1e-30)
    overall = np.maximum(np.sqrt((up_cal ** 2).mean(0)), 1e-30)
    need = threshold / np.maximum(np.abs(a_held) * down_norm, 1e-30)
    before = np.vstack([np.zeros_like(up_held[:1]), up_held[:-1]])
    known = np.ones_like(up_held, dtype=bool) if known_held is None else known_held.copy()
    known[0] = False
    mean = np.where(known, beta * before, 0.0)
    return normal_pass_score(need, mean, np.where(known, spread, overall))


def gate_ucdf_score(a_held: np.ndarray, up_cal: np.ndarray, down_norm: np.ndarray, threshold: float) -> np.ndarray:
    """P(|up| > what the criterion needs given act(gate) `a_held`), from each neuron's calibration |up| values."""
    need = threshold / np.maximum(np.abs(a_held) * down_norm, 1e-30)
    score = np.empty_like(need)
    for i in range(need.shape[1]):
        ranked = np.sort(np.abs(up_cal[:, i]))
        score[:, i] = 1.0 - np.searchsorted(ranked, need[:, i]) / len(ranked)
    # ties (every calibration value above or below what is needed) broken by the engine's score, E|up| / need
    tiebreak = np.abs(up_cal).mean(0) / need
    return score + 1e-6 * tiebreak / tiebreak.max()


def fraction_for_recall(score: np.ndarray, truth: np.ndarray, recall: float = 0.99) -> float:
    """Fraction of all pairs selected by the lowest threshold that still finds `recall` of the true pairs."""
    return float((score >= np.quantile(score[truth], 1.0 - recall)).mean())


def mass_at_half(score: np.ndarray, truth: np.ndarray, criterion: np.ndarray) -> float:
    """Share of the true pairs' criterion mass among the half of all pairs that `score` ranks highest."""
    chosen = truth & (score >= np.quantile(score, 0.5))
    return float(criterion[chosen].sum() / criterion[truth].sum())


def layer_rows(il: int, x_cal: np.ndarray, x_held: np.ndarray, tensors: dict, densities: list[float],
               ranks: list[int]) -> list[tuple[str, float, float, float]]:
    g = dequantized(tensors, f"blk.{il}.ffn_gate.weight").astype(np.float64)
    u = dequantized(tensors, f"blk.{il}.ffn_up.weight").astype(np.float64)
    down_norm = np.linalg.norm(dequantized(tensors, f"blk.{il}.ffn_down.weight"), axis=0)
    xc, xh = x_cal.astype(np.float64), x_held.astype(np.float64)
    scale = np.abs(xc @ u.T).mean(0) * down_norm  # the candidate scale E|up| * |down column|
    criterion_cal = np.abs(silu(xc @ g.T) * (xc @ u.T)) * down_norm
    criterion_held = np.abs(silu(xh @ g.T) * (xh @ u.T)) * down_norm
    second = xc.T @ xc / len(xc)
    eigval, eigvec = np.linalg.eigh(second + 1e-6 * np.trace(second) / len(second) * np.eye(len(second)))
    left, s, vt = np.linalg.svd(g @ ((eigvec * np.sqrt(eigval)) @ eigvec.T), full_matrices=False)
    inv_root = (eigvec / np.sqrt(eigval)) @ eigvec.T
    mean_abs = np.abs(g).mean(1, keepdims=True)
    approximations = {"gate_exact": g}
    for r in ranks:
        approximations[f"lowrank{r}"] = (left[:, :r] * s[:r]) @ (vt[:r] @ inv_root)
    approximations["sign1"] = np.sign(g) * mean_abs
    approximations["q2"] = np.sign(g) * np.where(np.abs(g) > mean_abs, 1.5, 0.5) * mean_abs * 0.75
    rows = []
    for density in densities:
        truth = criterion_held > np.quantile(criterion_cal, 1.0 - density)
        for name, w in approximations.items():
            score = np.abs(silu(xh @ w.T)) * scale
            rows.append((name, density, fraction_for_recall(score, truth), mass_at_half(score, truth, criterion_held)))
        threshold = float(np.quantile(criterion_cal, 1.0 - density))
        for name, w in up_estimates(u, xc).items():
            score = gate_up_score(silu(xh @ g.T), xc, xh, u, w, down_norm, threshold)
            rows.append((name, density, fraction_for_recall(score, truth), mass_at_half(score, truth, criterion_held)))
        act_held = silu(xh @ g.T)
        score = gate_ucdf_score(act_held, xc @ u.T, down_norm, threshold)
        rows.append(("gate_ucdf", density, fraction_for_recall(score, truth), mass_at_half(score, truth, criterion_held)))
        # today's candidates (the exact gate's score at 99 % recall) tell which up values the engine read at t-1
        today = np.abs(act_held) * scale
        read = today >= np.quantile(today[truth], 0.01)
        read_before = np.vstack([np.zeros_like(read[:1]), read[:-1]])
        for name, known in (("gate_prev_up", None), ("gate_prev_read", read_before)):
            score = previous_up_scores(act_held, xc @ u.T, xh @ u.T, down_norm, threshold, known)
            rows.append((name, density, fraction_for_recall(score, truth), mass_at_half(score, truth, criterion_held)))
        rows.append(("(finals)", density, float(truth.mean()), 1.0))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calibration", required=True, help="text the thresholds and factors are fitted on")
    parser.add_argument("--heldout", required=True, help="text the recall is measured on")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5, 10, 15])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.4])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--calibration-tokens", type=int, default=1536)
    parser.add_argument("--heldout-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    x_cal = capture_ffn_inputs(args.model, [args.calibration], max_tokens=args.calibration_tokens, threads=args.threads)
    x_held = capture_ffn_inputs(args.model, [args.heldout], max_tokens=args.heldout_tokens, threads=args.threads)
    tensors = {t.name: t for t in gguf.GGUFReader(args.model).tensors}
    print("| layer | density | predictor | fraction selected for 99 % recall | finals' mass in the top half |\n"
          "| ---: | ---: | --- | ---: | ---: |")
    for il in args.layers:
        for name, density, fraction, mass in layer_rows(il, x_cal[il], x_held[il], tensors, args.densities, args.ranks):
            print(f"| {il} | {density:g} | {name} | {fraction:.3f} | {mass:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
