"""Perplexity of a converted model at several densities, for each predictor (`neuralink perplexity --sweep`).

`perplexity_sweep` places each density's thresholds on calibration text
(`neuralink.evaluate.sweep_thresholds`), then scores held-out text with
stock llama.cpp (the reference), the engine reading every bundle (predictor
dense), and each applicable predictor at each density, and reports per
predictor the sparsest (lowest) density whose perplexity stays within a
budget of the reference's.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from neuralink.convert.quality import ContributionScorer, Setting
from neuralink.errors import ModelFileError, SweepError
from neuralink.evaluate.perplexity import PerplexityResult, perplexity
from neuralink.evaluate.sweep_thresholds import (
    DEFAULT_CALIBRATION_TOKENS,
    DEFAULT_DENSITIES,
    DensityThresholds,
    check_densities,
    density_thresholds,
)
from neuralink.formats.sidecar import Sidecar
from neuralink.runtime.llama import Llama
from neuralink.runtime.scoring import REFERENCE_TOP, Divergence
from neuralink.runtime.sidecar_lookup import find_sidecar

__all__ = ["DEFAULT_CALIBRATION_TOKENS", "DEFAULT_DENSITIES", "DensityThresholds", "SweepResult", "SweepRow",
           "density_thresholds", "format_sweep", "parse_budget", "parse_densities", "perplexity_sweep", "plot_sweep"]

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 0.05
SWEEP_PREDICTORS = ("gate", "lowrank", "oracle")

# called with (windows done, windows to do, what is being scored)
SweepProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class SweepRow:
    """One scored setting."""

    label: str                  # "stock llama.cpp", "engine dense", or the predictor
    predictor: str | None       # None for stock llama.cpp
    density: float | None       # target density; None where no threshold applies
    result: PerplexityResult
    active_fraction: float      # (token, neuron) pairs computed / all pairs, over every layer evaluation
    predicted_fraction: float   # pairs the predictor selected / all pairs (> active for lowrank: read for nothing)


@dataclass(frozen=True)
class SweepResult:
    """Every setting's perplexity, and the reference they are judged against."""

    model: str
    budget: float               # relative perplexity increase allowed over the reference
    rows: tuple[SweepRow, ...]  # rows[0] is the reference (stock llama.cpp)
    notes: tuple[str, ...] = ()

    @property
    def reference(self) -> SweepRow:
        return self.rows[0]

    def change(self, row: SweepRow) -> float:
        """Relative perplexity change of `row` against the reference."""
        return row.result.perplexity / self.reference.result.perplexity - 1.0

    def within_budget(self, row: SweepRow) -> bool:
        return self.change(row) <= self.budget

    def sparsest_within_budget(self, predictor: str) -> SweepRow | None:
        """The row of `predictor` with the lowest target density whose perplexity is within the budget."""
        rows = [r for r in self.rows if r.predictor == predictor and r.density is not None and self.within_budget(r)]
        return min(rows, key=lambda r: r.density) if rows else None

    @property
    def predictors(self) -> list[str]:
        return list(dict.fromkeys(r.predictor for r in self.rows if r.density is not None))


def _fraction(stats: np.ndarray, key: str, n_ff: int) -> float:
    pairs = float(stats["n_tokens"].astype(np.float64).sum()) * n_ff
    return float(stats[key].astype(np.float64).sum() / pairs) if pairs else math.nan


def applicable_predictors(model_path: str | os.PathLike[str], sidecar_path: str | os.PathLike[str]) -> list[str]:
    """The predictors whose density a sweep can vary on this sidecar, and why others are left out."""
    with Sidecar.open(sidecar_path, model_path) as sidecar:
        header = sidecar.header
    predictors = []
    if header.gated:
        predictors.append("gate")  # on gated models oracle computes the same exact gate: the same active set
    if header.predictor_rank and header.criterion != "contribution":
        # under contribution its thresholds follow the conversion's chosen setting, not a swept density
        predictors.append("lowrank")
    if not header.gated:
        predictors.append("oracle")
    return predictors


def perplexity_sweep(
    model_path: str | os.PathLike[str],
    text: str,
    calibration: Sequence[str | os.PathLike[str]],
    *,
    sidecar: str | os.PathLike[str] | None = None,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    predictors: Sequence[str] | None = None,
    budget: float = DEFAULT_BUDGET,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    n_ctx: int = 512,
    stride: int | None = None,
    max_tokens: int | None = 4096,
    n_threads: int | None = None,
    thresholds: Sequence[DensityThresholds] | None = None,
    progress: SweepProgress | None = None,
) -> SweepResult:
    """Perplexity of `text` under stock llama.cpp, the engine dense, and each predictor at each density.

    `model_path` is a converted GGUF; `sidecar` defaults to the one it names.
    `predictors` defaults to every applicable one (gate on gated models,
    lowrank when the sidecar has one, oracle on non-gated models).
    `thresholds` skips the calibration (one entry per density, e.g. from
    `density_thresholds`). Raises SweepError for bad settings.
    """
    check_densities(densities)
    if budget < 0 or not math.isfinite(budget):
        raise SweepError(f"the perplexity budget must be a non-negative fraction, got {budget}")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelFileError(f"{model_path}: no such model file")
    sidecar_path = Path(sidecar) if sidecar is not None else find_sidecar(model_path)
    if sidecar_path is None:
        raise SweepError(f"{model_path}: names no sidecar beside it; a sweep needs a model converted by "
                         "`neuralink convert` (or pass the sidecar)")
    with Sidecar.open(sidecar_path, model_path) as opened:
        n_ff = opened.header.n_ff
        contribution = opened.header.criterion == "contribution"
    applicable = applicable_predictors(model_path, sidecar_path)
    chosen = list(predictors) if predictors is not None else applicable
    unknown = [p for p in chosen if p not in SWEEP_PREDICTORS]
    if unknown:
        raise SweepError(f"unknown predictors {unknown} (expected some of {', '.join(SWEEP_PREDICTORS)})")
    notes = []
    for p in chosen:
        if p not in applicable and p != "oracle":  # oracle runs anywhere; on gated models it repeats gate
            why = (" (its thresholds follow the conversion's chosen setting under the contribution criterion: "
                   "`neuralink predictor` measures its recall there, the conversion's quality record its perplexity)"
                   if p == "lowrank" and contribution else "")
            raise SweepError(f"{sidecar_path}: predictor '{p}' does not apply to this sidecar{why} "
                             f"(applicable: {', '.join(applicable) or 'none'})")
    if "oracle" not in chosen and "gate" in chosen:
        notes.append("oracle is not run on gated models: it finds the same active set as gate")
    if thresholds is None:
        thresholds = density_thresholds(model_path, sidecar_path, calibration, densities,
                                        max_tokens=calibration_tokens, threads=n_threads)
    if [t.density for t in thresholds] != [float(d) for d in densities]:
        raise SweepError("thresholds must be given for exactly the swept densities, in order")
    if "lowrank" in chosen and thresholds[0].predictor_thresholds is None:
        raise SweepError(f"{sidecar_path}: has no low-rank predictor")

    settings: list[tuple[str, str | None, DensityThresholds | None]] = [("stock llama.cpp", None, None),
                                                                         ("engine dense", "dense", None)]
    settings += [(p, p, t) for p in chosen for t in thresholds]
    scoring = dict(n_ctx=n_ctx, stride=stride, max_tokens=max_tokens, n_threads=n_threads)
    # contribution settings: llama.cpp with h zeroed where the engine would skip (the conversion's quality search),
    # on the same tokens and windows as perplexity(); one load serves them all
    fast = ContributionScorer(model_path, sidecar_path, text, max_tokens=max_tokens, n_ctx=n_ctx,
                              stride=stride if stride is not None else max(1, n_ctx // 2), threads=n_threads) \
        if contribution else None
    try:
        rows = _score_settings(settings, model_path, sidecar_path, text, scoring, n_ff, fast, progress)
    finally:
        if fast is not None:
            fast.close()
    return SweepResult(str(model_path), budget, tuple(rows), tuple(notes))


def _score_settings(settings: list[tuple[str, str | None, DensityThresholds | None]], model_path: Path,
                    sidecar_path: Path, text: str, scoring: dict[str, Any], n_ff: int,
                    fast: ContributionScorer | None, progress: SweepProgress | None) -> list[SweepRow]:
    done = 0
    rows: list[SweepRow] = []
    # a contribution setting whose thresholds are all 0 (density 1) drops a pair only where |act(gate)| or |h| is
    # 0, so it changes h at most where act(gate) is 0 and h is not: the stock pass counts those pairs and, when
    # there are none, stands for that setting too (one llama.cpp pass fewer)
    zero = next((s for _, p, s in settings if fast is not None and p == "gate" and s is not None
                 and s.candidate_thresholds is not None and not s.thresholds.any()
                 and not s.candidate_thresholds.any()), None)
    shared: tuple[PerplexityResult, dict[str, float]] | None = None
    reference_top = None
    for label, predictor, setting in settings:
        name = label if setting is None else f"{label} @ {setting.density:g}"
        stats: list[np.ndarray] = []

        def report(windows_done: int, windows: int, name: str = name) -> None:
            if progress is not None:
                # every run scores the same windows: the first one tells how many
                total = windows * len(settings)
                progress(min(done + windows_done, total), total, name)

        if fast is not None and (setting is not None or predictor is None):
            # stock llama.cpp too: the same load, windows and tokens, nothing zeroed
            start = time.perf_counter()
            if setting is not None and setting is zero and shared is not None:
                stock, densities = shared
                # stock's own numbers: its predictions, so no divergence from them
                result = replace(stock, top=None, divergence=Divergence(np.zeros(stock.n_scored),
                                                                        np.ones(stock.n_scored, dtype=bool)))
                log.info("%s: zeroes no non-zero activation of this text: stock's pass, counted", name)
            else:
                counted = zero if setting is None else setting
                chosen = None if counted is None else Setting(tuple([counted.density] * len(counted.thresholds)),
                                                              tuple(counted.thresholds.tolist()),
                                                              tuple(counted.candidate_thresholds.tolist()))
                # stock's pass keeps its most likely next tokens: every later row's divergence is from them
                nlls, densities = fast.token_nll(chosen, count_only=setting is None,
                                                 keep_top=REFERENCE_TOP if setting is None else 0,
                                                 reference=None if setting is None else reference_top)
                moved = fast.divergence if setting is not None else None
                result = PerplexityResult(str(model_path), fast.n_ctx, fast.stride, len(fast.windows), nlls,
                                          time.perf_counter() - start, tokens=fast.tokens,
                                          top=fast.top if setting is None else None, divergence=moved)
                if setting is None:
                    reference_top = fast.top
                    if chosen is not None and densities["changed_pairs"] == 0:
                        shared = (result, densities)
                    densities = {"up_density": 1.0, "down_density": 1.0}
            report(len(fast.windows), len(fast.windows))
            done += result.n_windows
            rows.append(SweepRow(label, predictor, None if setting is None else setting.density, result,
                                 densities["down_density"], densities["up_density"]))
            log.info("%s: perplexity %.4f, down columns %.4f, up rows %.4f", name, result.perplexity,
                     densities["down_density"], densities["up_density"])
            continue
        kwargs: dict[str, Any] = {}
        if predictor is None:
            factory: Any = llama_cpp.Llama
        else:
            factory = Llama
            kwargs = dict(sidecar=str(sidecar_path), predictor=predictor, cache_policy="none")
            if setting is not None:
                kwargs["thresholds"] = setting.thresholds.tolist()
                if setting.candidate_thresholds is not None:
                    kwargs["candidate_thresholds"] = setting.candidate_thresholds.tolist()
                if predictor == "lowrank":
                    assert setting.predictor_thresholds is not None
                    kwargs["predictor_thresholds"] = setting.predictor_thresholds.tolist()
        result = perplexity(model_path, text, llama_factory=factory, progress=report,
                            inspect=(lambda llm: stats.append(llm.ffn_stats())) if predictor else None,
                            keep_top=REFERENCE_TOP if not rows else 0, reference=rows[0].result if rows else None,
                            **scoring, **kwargs)
        done += result.n_windows
        if predictor is None:
            active = predicted = 1.0
        else:
            active, predicted = _fraction(stats[0], "computed_pairs", n_ff), _fraction(stats[0], "predicted_pairs", n_ff)
        rows.append(SweepRow(label, predictor, None if setting is None else setting.density, result, active, predicted))
        log.info("%s: perplexity %.4f, active fraction %.4f", name, result.perplexity, active)
    return rows


def plot_sweep(sweep: SweepResult, path: str | os.PathLike[str]) -> None:
    """A PNG: perplexity against measured active fraction, one curve per predictor, with the budget line."""
    # deferred: matplotlib loads only when a picture is drawn; Agg, without touching pyplot's global backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ref = sweep.reference.result.perplexity
    for i, predictor in enumerate(sweep.predictors):
        rows = sorted((r for r in sweep.rows if r.predictor == predictor and r.density is not None),
                      key=lambda r: r.active_fraction)
        line, = ax.plot([r.active_fraction for r in rows], [r.result.perplexity for r in rows], marker="o",
                        label=predictor)
        for r in rows:  # each curve's target densities, on alternate sides so that curves do not overwrite
            ax.annotate(f"{r.density:g}", (r.active_fraction, r.result.perplexity), textcoords="offset points",
                        xytext=(5, 5 if i % 2 == 0 else -11), fontsize=7, color=line.get_color())
    ax.axhline(ref, color="black", linewidth=1, label="stock llama.cpp")
    ax.axhline(ref * (1 + sweep.budget), color="black", linestyle="--", linewidth=1,
               label=f"budget +{100 * sweep.budget:g} %")
    ax.set_yscale("log")  # sparse settings can be orders of magnitude worse
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("measured active fraction (token, neuron pairs)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{Path(sweep.model).name}: perplexity against density", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(os.fspath(path), dpi=120)


def format_sweep(sweep: SweepResult) -> str:
    """The sweep as a markdown table and, per predictor, the sparsest density within the budget."""
    ref = sweep.reference.result
    pct = 100 * sweep.budget
    lines = [
        f"| setting | target density | active fraction | predicted fraction | PPL | Δ% vs stock | within +{pct:g} % "
        "| KLD vs stock | top-1 same |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: |",
    ]
    for row in sweep.rows:
        density = "" if row.density is None else f"{row.density:g}"
        change = "" if row is sweep.reference else f"{100 * sweep.change(row):+.2f}%"
        within = "" if row is sweep.reference else ("yes" if sweep.within_budget(row) else "no")
        moved = row.result.divergence
        kld, top = ("", "") if moved is None else (f"{moved.mean_kld:.4f}", f"{moved.top_agreement:.3f}")
        lines.append(f"| {row.label} | {density} | {row.active_fraction:.3f} | {row.predicted_fraction:.3f} | "
                     f"{row.result.perplexity:.4f} | {change} | {within} | {kld} | {top} |")
    lines.append("")
    lines.append(f"sparsest density (lowest target) whose perplexity is within +{pct:g} % of stock llama.cpp's "
                 f"({ref.perplexity:.4f} -> at most {ref.perplexity * (1 + sweep.budget):.4f}):")
    for predictor in sweep.predictors:
        best = sweep.sparsest_within_budget(predictor)
        if best is None:
            lines.append(f"  {predictor:<8} none of the densities tried")
        else:
            lines.append(f"  {predictor:<8} {best.density:g} (measured active fraction {best.active_fraction:.3f}, "
                         f"PPL {best.result.perplexity:.4f}, {100 * sweep.change(best):+.2f}%)")
    lines.append(f"(text: {ref.n_scored} tokens scored in {ref.n_windows} windows of {ref.n_ctx}, stride {ref.stride};"
                 " active fraction: (token, neuron) pairs computed over all pairs, every layer; KLD vs stock: KL "
                 "divergence from stock's next-token distribution, nats per token, perplexity.md)")
    lines += [f"note: {n}" for n in sweep.notes]
    return "\n".join(lines)


def parse_budget(value: str) -> float:
    """'5', '5%' or '+5 %' -> 0.05."""
    try:
        budget = float(value.replace("%", "").replace("+", "").strip()) / 100.0
    except ValueError:
        raise SweepError(f"--budget must be a percentage such as 5 or 5%, got {value!r}") from None
    if budget < 0 or not math.isfinite(budget):
        raise SweepError(f"--budget must be a non-negative percentage, got {value!r}")
    return budget


def parse_densities(value: str) -> list[float]:
    """'1,0.5,0.2' -> [1.0, 0.5, 0.2]."""
    try:
        densities = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SweepError(f"--densities must be comma-separated numbers, got {value!r}") from None
    check_densities(densities)
    return densities
