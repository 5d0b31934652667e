"""The conversion's quality search: the sparsest per-layer densities within a perplexity budget.

Runs on the converted pair before it is committed, scoring held-out
calibration text (text the profile never saw) under several threshold
settings. ``ContributionScorer`` computes the thresholded model with
llama.cpp's own batched kernels on the converted GGUF (whose rows are in the
sidecar's order, its ffn_down re-encoded as the sidecar's down columns are):
through the eval callback, the FFN activation h (the input of ffn_down) is
zeroed in place wherever the engine would not read the neuron, with the
sidecar's candidate scales and down norms and the engine's own activation
(``_engine.zero_dropped_pairs``). That is the engine's arithmetic
on the engine's decisions, at llama.cpp's prompt speed (the engine reads and
computes neuron by neuron, which is several times slower on long batches).
The search:

  1. the reference: every neuron (thresholds 0);
  2. sensitivity (allocation "sensitivity"): each layer alone at a probe
     density, the rest dense; layers are ranked by the NLL they cost;
  3. a ladder of final densities (candidates = final + CANDIDATE_MARGIN):
     each layer gets the global level shifted by its sensitivity tier (the
     most sensitive third two steps denser, the least sensitive third two
     steps sparser), and the sparsest global level whose perplexity stays
     within the budget is chosen (bisection: the ladder is monotone).

A level is within the budget when the upper end of a one-sided 90 %
confidence bound on its perplexity change is: the change is the mean of
the paired per-token NLL differences against every neuron, its standard
error taken over blocks of BLOCK_TOKENS tokens. On ~1000 held-out tokens
of Qwen2.5-Coder-1.5B that error is ~0.75 % of perplexity, as large as the
default budget: the point estimate alone (the rule until the twenty-fourth
pass) chose a level that measured +0.38 % there and +1.3 % / +2.0 % on
2048 tokens of held-out code / English.

What was chosen and everything measured goes into the sidecar's quality
record; neuralink.Llama then runs the validated setting by default.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from neuralink import _engine
from neuralink.errors import OptionError
from neuralink.formats.coactivation import SelectionStats
from neuralink.profile.contribution import candidate_density
from neuralink.runtime.scoring import (
    REFERENCE_TOP,
    Divergence,
    PredictionRecorder,
    TopTokens,
    scoring_windows,
    window_nll,
)

log = logging.getLogger(__name__)

Allocation = Literal["sensitivity", "uniform"]
ALLOCATIONS: tuple[Allocation, ...] = ("sensitivity", "uniform")
# +1 %: at +3 % Qwen2.5-Coder-1.5B's greedy text agreed with stock on 0.33 of 32 tokens (every neuron: 0.67),
# and the held-out text is the calibration's own domain (docs/benchmarks.md)
DEFAULT_BUDGET = 0.01
# nats per token from every neuron's predictions on the held-out text, which `convert` holds as well: perplexity
# misses changes that cancel. On Qwen2.5-Coder-1.5B it chose level 0.6 where the perplexity bound alone chose 0.45:
# a third of the divergence from stock (code 0.0065 against 0.021), 29 of 30 held-out facts (stock 29, 0.45: 28),
# the same MiB read per token under 800MB and 530MB caps, whose reads cover whole regions (docs/benchmarks.md)
DEFAULT_KLD_BUDGET = 0.01
DEFAULT_HELDOUT_TOKENS = 1024
# the bound a level's perplexity change must keep within the budget: one-sided 90 % (the normal quantile), the
# standard error over blocks of tokens (neighbouring tokens' NLL differences are not independent)
CONFIDENCE = 0.9
CONFIDENCE_Z = NormalDist().inv_cdf(CONFIDENCE)
BLOCK_TOKENS = 32
# final densities the search walks (1.0: every neuron)
LADDER = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0)
PROBE_DENSITY = 0.3
TIER_STEPS = 2

# (stage, done, total)
SearchProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Setting:
    """Per-layer final densities and the thresholds that give them."""

    finals: tuple[float, ...]
    thresholds: tuple[float, ...]
    candidates: tuple[float, ...]

    @property
    def runtime(self) -> list[tuple[float, float]]:
        return list(zip(self.thresholds, self.candidates))


def setting_for(selection: SelectionStats, finals: Sequence[float]) -> Setting:
    """The (activity, candidate) thresholds of each layer at its final density (1.0: every neuron)."""
    thresholds, candidates = [], []
    for il, final in enumerate(finals):
        if final >= 1.0:
            thresholds.append(0.0)
            candidates.append(0.0)
            continue
        thresholds.append(selection.threshold(il, final))
        candidates.append(selection.threshold(il, candidate_density(final), candidate=True))
    return Setting(tuple(float(f) for f in finals), tuple(thresholds), tuple(candidates))


def tier_offsets(sensitivity: Sequence[float]) -> np.ndarray:
    """Ladder steps per layer: +TIER_STEPS for the most sensitive third, -TIER_STEPS for the least, 0 between."""
    n = len(sensitivity)
    rank = np.argsort(np.argsort(np.asarray(sensitivity)))  # 0 = least sensitive
    return np.where(rank >= 2 * n // 3, TIER_STEPS, np.where(rank < n // 3, -TIER_STEPS, 0))


def layer_levels(level: int, offsets: np.ndarray) -> list[float]:
    return [LADDER[int(np.clip(level + off, 0, len(LADDER) - 1))] for off in offsets]


class ContributionScorer:
    """The converted model's NLL on a text under contribution thresholds, computed by llama.cpp (module doc).

    Tokens and windows are those of ``neuralink.evaluate.perplexity``: the
    text tokenized with the model's BOS, windows of `n_ctx` every `stride`,
    each scoring the tokens no earlier one scored, so its NLLs pair token by
    token with the engine's and with stock llama.cpp's.
    """

    def __init__(self, model: os.PathLike[str] | str, sidecar: os.PathLike[str] | str, text: str, *,
                 max_tokens: int | None = DEFAULT_HELDOUT_TOKENS, n_ctx: int = 512, stride: int | None = None,
                 threads: int | None = None) -> None:
        from neuralink.formats.sidecar import Sidecar
        from neuralink.profile.activations import ActivationReader
        from neuralink.profile.activity import GATE_FUNCTIONS, probe_ffn_activation

        with Sidecar.open(sidecar, model) as opened:
            n_layer = opened.header.n_layer
            self.tables = [(np.ascontiguousarray(opened.candidate_scale(il), dtype=np.float32),
                            np.ascontiguousarray(opened.down_norms(il), dtype=np.float32)) for il in range(n_layer)]
        self.threads = threads if threads is not None else max(1, os.cpu_count() or 1)
        self.reader = ActivationReader(model, window=n_ctx, threads=threads)
        try:
            reader = self.reader
            tokens = np.concatenate([[reader.bos_token] if reader.adds_bos else [], reader.tokenize(text)])
            self.tokens = tokens.astype(np.int64)[:max_tokens]
            self.n_ctx, self.stride = n_ctx, stride if stride is not None else n_ctx
            self.windows = scoring_windows(int(self.tokens.size), n_ctx, self.stride)
            form, _ = probe_ffn_activation(reader, self.tokens[1:], "magnitude")  # the tensor ffn_down consumes
            self.h_tensor = form.tensor
            self.gate_function = GATE_FUNCTIONS[form.tensor]  # the engine's activation of the same name
        except BaseException:
            self.reader.close()
            raise
        self.passes = 0
        self.top: TopTokens | None = None  # the last pass's most likely next tokens, when it kept them
        self.divergence: Divergence | None = None  # the last pass's, per token, when it was given a reference

    def token_nll(self, setting: Setting | None, *, count_only: bool = False, keep_top: int = 0,
                  reference: TopTokens | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """The NLL of every scored token under `setting` (float64, text order), and the densities it ran at: up
        rows read (candidates) and down columns used (finals) per (token, neuron) pair, and `changed_pairs`, the
        pairs whose non-zero h it zeroed. None: stock llama.cpp, nothing zeroed (densities 1).

        `count_only`: stock llama.cpp's NLLs (nothing zeroed), with what `setting` would have read and changed,
        each layer judged on stock's inputs; where it would have changed no pair, they are its NLLs and densities
        exactly (zeroing zeros changes no sum). `keep_top`: keep that many most likely next tokens per scored
        token in `self.top` (a reference for later passes); with a `reference` kept so, the dict also holds
        `kld`, the mean KL divergence from it (nats per token), and `same_top`, the fraction of tokens whose most
        likely next token is the reference's (per token in `self.divergence`)."""
        gates: dict[int, np.ndarray] = {}
        counts = np.zeros(4)  # candidates, finals, changed, pairs

        def consume(name: str, layer: int, rows: np.ndarray) -> None:
            if name == "ffn_gate":
                gates[layer] = np.array(rows)  # a copy: llama.cpp may reuse the buffer once h is computed
                return
            scale, down_norm = self.tables[layer]
            # the engine's own criterion and activation, in C++; rows is llama.cpp's buffer: ffn_down reads it next
            candidates, finals, changed = _engine.zero_dropped_pairs(
                self.gate_function, gates.pop(layer), rows, scale, down_norm, float(setting.candidates[layer]),
                float(setting.thresholds[layer]), self.threads, apply=not count_only)
            counts[:] += (candidates, finals, changed, rows.size)

        recorder = PredictionRecorder(keep_top, reference)
        wanted = {"ffn_gate", self.h_tensor}.__contains__ if setting is not None else (lambda name: False)
        nlls = self._score(self.reader, wanted, consume, recorder)
        self.passes += 1
        if keep_top:
            self.top = recorder.top
        self.divergence = recorder.divergence
        moved = {"kld": self.divergence.mean_kld, "same_top": self.divergence.top_agreement} \
            if self.divergence is not None else {}
        if setting is None:
            return nlls, {"up_density": 1.0, "down_density": 1.0, "changed_pairs": 0, **moved}
        return nlls, {"up_density": counts[0] / counts[3], "down_density": counts[1] / counts[3],
                      "changed_pairs": int(counts[2]), **moved}

    def _score(self, reader: Any, wanted: Callable[[str], bool], consume: Callable[[str, int, np.ndarray], None],
               recorder: PredictionRecorder) -> np.ndarray:
        """Every window of the held-out tokens through `reader`: the NLL of every scored token, text order."""
        nlls: list[np.ndarray] = []
        for w in self.windows:
            reader.evaluate(self.tokens[w.begin:w.end], wanted, consume, bos=False)
            # row r of the window's logits predicts token begin + r + 1
            logits = reader.logits(copy=False)[w.first_scored - 1 - w.begin:w.end - 1 - w.begin]
            targets = self.tokens[w.first_scored:w.end]
            nlls.append(window_nll(logits, targets, self.threads))
            recorder.add(logits, targets, nlls[-1])
        return np.concatenate(nlls)

    def source_predictions(self, source: os.PathLike[str] | str) -> tuple[np.ndarray, TopTokens]:
        """The source model's NLLs and most likely next tokens on the same held-out tokens and windows (the
        conversion keeps its vocabulary, so the tokens are the same)."""
        from neuralink.profile.activations import ActivationReader

        recorder = PredictionRecorder(REFERENCE_TOP, None)
        with ActivationReader(source, window=self.n_ctx, threads=self.threads) as reader:
            nlls = self._score(reader, lambda name: False, lambda name, layer, rows: None, recorder)
        assert recorder.top is not None
        return nlls, recorder.top

    def nll(self, setting: Setting) -> tuple[float, dict[str, float]]:
        """Mean NLL under `setting`, and the densities it ran at (`token_nll`)."""
        nlls, densities = self.token_nll(setting)
        return float(nlls.mean()), densities

    def close(self) -> None:
        self.reader.close()


class ThresholdScorer:
    """One loaded neuralink.Llama on the converted pair, scoring held-out text under threshold settings."""

    def __init__(self, model: os.PathLike[str] | str, sidecar: os.PathLike[str] | str, text: str, *,
                 max_tokens: int = DEFAULT_HELDOUT_TOKENS, n_ctx: int = 512, threads: int | None = None,
                 predictor: str = "gate") -> None:
        # llama_cpp loads libllama on import: only conversions with a quality search pay for it
        from neuralink.runtime.llama import Llama
        from neuralink.runtime.scoring import TextScorer

        self.llm = Llama(os.fspath(model), sidecar=os.fspath(sidecar), predictor=predictor, n_ctx=n_ctx,
                         n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        try:
            tokens = np.asarray(self.llm.tokenize(text.encode("utf-8"), add_bos=True)[:max_tokens], dtype=np.int64)
            self.scorer = TextScorer(self.llm, tokens, n_ctx)
        except BaseException:
            self.llm.close()
            raise
        self.passes = 0

    def token_nll(self, setting: Setting | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """The NLL of every scored token under `setting` (None: the sidecar's), and the densities it ran at (up
        rows and down columns read per (token, neuron) pair)."""
        if setting is not None:
            self.llm.engine.set_thresholds(list(setting.thresholds), list(setting.candidates), None)
        self.llm.ffn_stats(reset=True)  # Llama.eval collects the engine's counters: start from none
        nlls = np.asarray(self.scorer.score(), dtype=np.float64)
        stats = self.llm.ffn_stats(reset=True)
        self.passes += 1
        pairs = float(np.sum(stats["n_tokens"].astype(np.float64))) * engine_n_ff(self.llm)
        return nlls, {"up_density": float(stats["predicted_pairs"].sum() / pairs),
                      "down_density": float(stats["computed_pairs"].sum() / pairs)}

    def nll(self, setting: Setting | None = None) -> tuple[float, dict[str, float]]:
        """Mean NLL under `setting` (`token_nll`), and the densities it ran at."""
        nlls, densities = self.token_nll(setting)
        return float(nlls.mean()), densities

    def close(self) -> None:
        self.llm.close()


def perplexity_change(nll: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """The perplexity change of per-token NLLs `nll` against `reference` (the same tokens), and the upper end of
    its one-sided 90 % confidence bound (module doc)."""
    diff = np.asarray(nll, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    mean = float(diff.mean())
    blocks = diff[:diff.size // BLOCK_TOKENS * BLOCK_TOKENS].reshape(-1, BLOCK_TOKENS).mean(1)
    # too few blocks to estimate the spread: no bound beyond the point estimate's (tiny test texts)
    error = float(blocks.std(ddof=1) / math.sqrt(blocks.size)) if blocks.size >= 2 else 0.0
    return math.expm1(mean), math.expm1(mean + CONFIDENCE_Z * error)


def bound_text(record: dict[str, Any]) -> str:
    """", at most +x.xx % at 90 %" for a quality record with a confidence bound (older sidecars have none: "")."""
    return f", at most {100 * record['upper_bound']:+.2f} % at 90 %" if "upper_bound" in record else ""


def divergence_text(record: dict[str, Any]) -> str:
    """", KL divergence 0.0xxx nats a token from every neuron's predictions, the same top token at 0.9xx of
    them" for a quality record that measured it (older sidecars did not: "")."""
    if "kld" not in record:
        return ""
    budgeted = f" (budget {record['kld_budget']:g})" if "kld_budget" in record else ""
    return (f", KL divergence {record['kld']:.4f} nats a token from every neuron's predictions{budgeted}, the same "
            f"top token at {record['same_top']:.3f} of them")


def engine_n_ff(llm: Any) -> int:
    arch = llm.metadata["general.architecture"]
    return int(llm.metadata[f"{arch}.feed_forward_length"])


def search(scorer: ContributionScorer, selection: SelectionStats, n_layer: int, *, budget: float = DEFAULT_BUDGET,
           kld_budget: float | None = None, allocation: Allocation = "sensitivity",
           fixed_density: float | None = None, progress: SearchProgress | None = None) -> tuple[Setting, dict[str, Any]]:
    """The chosen setting and the quality record (module doc). `kld_budget`: a level must also keep its mean KL
    divergence from every neuron's predictions at most this (nats per token). `fixed_density`: no search, one
    uniform final density (measured all the same, so the record says what it costs)."""
    if allocation not in ALLOCATIONS:
        raise OptionError(f"allocation must be one of {ALLOCATIONS}, not {allocation!r}")
    if not budget > 0:
        raise OptionError(f"the perplexity budget must be positive, got {budget}")
    if kld_budget is not None and not (kld_budget > 0 and math.isfinite(kld_budget)):
        raise OptionError(f"the divergence budget must be a positive number of nats, got {kld_budget}")
    report = progress or (lambda stage, done, total: None)
    dense = setting_for(selection, [1.0] * n_layer)
    reference_nlls, _ = scorer.token_nll(dense, keep_top=REFERENCE_TOP)
    reference_top = scorer.top
    reference = float(reference_nlls.mean())
    record: dict[str, Any] = {"budget": budget, "reference_nll": reference, "allocation": allocation,
                              "heldout_tokens": int(scorer.tokens.size), "confidence": CONFIDENCE, "measured": []}
    if kld_budget is not None:
        record["kld_budget"] = kld_budget

    def measure(setting: Setting, label: str) -> bool:
        """Whether the level is within the budgets (its perplexity bound, and its divergence where one is
        budgeted), recorded with what was measured."""
        nlls, densities = scorer.token_nll(setting, reference=reference_top)
        ratio, upper = perplexity_change(nlls, reference_nlls)
        record["measured"].append({"label": label, "perplexity_change": ratio, "upper_bound": upper,
                                   "up_density": densities["up_density"], "down_density": densities["down_density"],
                                   "kld": densities["kld"], "same_top": densities["same_top"]})
        log.info("quality search: %s: perplexity %+.2f %% (at most %+.2f %% at 90 %%; KL divergence %.4f, same top "
                 "token %.3f; up rows %.3f, down columns %.3f)", label, 100 * ratio, 100 * upper, densities["kld"],
                 densities["same_top"], densities["up_density"], densities["down_density"])
        return within_budgets(record, upper, densities["kld"])

    if fixed_density is not None:
        setting = setting_for(selection, [fixed_density] * n_layer)
        label = f"uniform {fixed_density} (given)"
        measure(setting, label)
        return setting, _chosen(record, setting, label)

    offsets = np.zeros(n_layer, dtype=int)
    if allocation == "sensitivity":
        sensitivity = []
        for il in range(n_layer):
            finals = [1.0] * n_layer
            finals[il] = PROBE_DENSITY
            nll, _ = scorer.nll(setting_for(selection, finals))
            sensitivity.append(nll - reference)
            report("sensitivity", il + 1, n_layer)
        record["sensitivity"] = sensitivity
        offsets = tier_offsets(sensitivity)

    # bisection over the global level: the sparsest one within the budget
    low, high = 0, len(LADDER) - 1  # high (every neuron) is within any budget
    steps = math.ceil(math.log2(len(LADDER))) + 1
    done = 0
    while low < high:
        mid = (low + high) // 2
        setting = setting_for(selection, layer_levels(mid, offsets))
        within = measure(setting, f"level {LADDER[mid]}")
        done += 1
        report("densities", done, steps)
        if within:
            high = mid
        else:
            low = mid + 1
    setting = setting_for(selection, layer_levels(high, offsets))
    return setting, _chosen(record, setting, f"level {LADDER[high]}")


def measure_against_source(scorer: ContributionScorer, source: os.PathLike[str] | str, record: dict[str, Any],
                           chosen: Setting) -> dict[str, Any]:
    """How far the conversion moved from the source model on the held-out tokens: with every neuron (what the
    re-encoding of the down weights alone costs) and at the default setting the record validated (every neuron
    again where that is the default). The search's budgets are held against every neuron of the conversion, so
    they do not see the first; this says it."""
    source_nlls, source_top = scorer.source_predictions(source)
    # every neuron: llama.cpp on the converted GGUF with nothing zeroed (None: not even looked at)
    settings: dict[str, Setting | None] = {"every_neuron": None}
    if record.get("predictor") == "gate":
        settings["default"] = chosen
    moved: dict[str, Any] = {}
    for key, setting in settings.items():
        nlls, measured = scorer.token_nll(setting, reference=source_top)
        ratio, upper = perplexity_change(nlls, source_nlls)
        moved[key] = {"perplexity_change": ratio, "upper_bound": upper, "kld": measured["kld"],
                      "same_top": measured["same_top"]}
    moved.setdefault("default", moved["every_neuron"])
    return moved


def source_text(measured: dict[str, Any]) -> str:
    """"perplexity +x.xx %, KL divergence 0.0xxx nats a token, the same top token at 0.9xx" of one setting
    against the source model."""
    return (f"perplexity {100 * measured['perplexity_change']:+.2f} %, KL divergence {measured['kld']:.4f} nats a "
            f"token, the same top token at {measured['same_top']:.3f}")


def against_source_text(record: dict[str, Any]) -> str:
    """The quality record's `against_source` as a sentence ("" for a record without it: other criteria, older
    sidecars)."""
    if "against_source" not in record:
        return ""
    moved = record["against_source"]
    return (f"against the source model on the same tokens: every neuron {source_text(moved['every_neuron'])}; "
            f"the default {source_text(moved['default'])}")


def reencoding_warning(record: dict[str, Any]) -> str:
    """A warning where re-encoding the down weights alone moved the predictions from the source model's further
    than the divergence budget the search held against the converted model ("" otherwise)."""
    moved = record.get("against_source", {}).get("every_neuron")
    if moved is None or "kld_budget" not in record or moved["kld"] <= record["kld_budget"]:
        return ""
    return (f"warning: with every neuron the converted model's predictions are {moved['kld']:.4f} nats a token from "
            f"the source model's, beyond --kld-budget {record['kld_budget']:g}, which the search holds against the "
            "converted model itself: that is the down weights' re-encoding; a finer --bundle-down-type (q6_K, "
            "q8_0) keeps them closer")


def measure_predictor(model: os.PathLike[str] | str, sidecar: os.PathLike[str] | str, text: str, predictor: str,
                      *, budget: float = DEFAULT_BUDGET, threads: int | None = None) -> dict[str, Any]:
    """The quality record of running `predictor` at the sidecar's own thresholds (criteria without a density
    search: relu with the low-rank predictor, gate_magnitude): its perplexity against every neuron."""
    record: dict[str, Any] = {"budget": budget, "confidence": CONFIDENCE, "measured": []}
    nlls = {}
    for name in ("dense", predictor):
        scorer = ThresholdScorer(model, sidecar, text, threads=threads, predictor=name)
        try:
            nlls[name], densities = scorer.token_nll()
            record["heldout_tokens"] = int(scorer.scorer.tokens.size)
        finally:
            scorer.close()
        record["measured"].append({"label": name, **densities})
    ratio, upper = perplexity_change(nlls[predictor], nlls["dense"])
    within = upper <= budget
    record["measured"][-1].update(perplexity_change=ratio, upper_bound=upper)
    record.update(validated=within, predictor=predictor if within else "dense", chosen=predictor,
                  within_budget=within, perplexity_change=ratio, upper_bound=upper,
                  reference_nll=float(nlls["dense"].mean()),
                  up_density=record["measured"][-1]["up_density"], down_density=record["measured"][-1]["down_density"])
    log.info("quality check: predictor %s: perplexity %+.2f %% (at most %+.2f %% at 90 %%; budget %.1f %%)",
             predictor, 100 * ratio, 100 * upper, 100 * budget)
    return record


def within_budgets(record: dict[str, Any], upper: float, kld: float) -> bool:
    """A measured level's perplexity bound within the record's budget, and its divergence within the divergence
    budget where the record has one."""
    return upper <= record["budget"] and ("kld_budget" not in record or kld <= record["kld_budget"])


def _chosen(record: dict[str, Any], setting: Setting, label: str) -> dict[str, Any]:
    measured = next((m for m in reversed(record["measured"]) if m["label"] == label), None)
    dense = all(f >= 1.0 for f in setting.finals)
    ratio, upper = (measured["perplexity_change"], measured["upper_bound"]) if measured else (0.0, 0.0)
    # validated: within the budgets; a given density outside them is recorded but not run by default
    within = within_budgets(record, upper, measured["kld"] if measured else 0.0)
    record.update(
        validated=within,
        predictor="gate" if within and not dense else "dense",
        chosen=label,
        within_budget=within,
        perplexity_change=ratio,
        upper_bound=upper,
        layer_densities=list(setting.finals),
        up_density=measured["up_density"] if measured else 1.0,
        down_density=measured["down_density"] if measured else 1.0,
        # how far its next-token predictions moved from every neuron's (nats per token; 0 and 1 for every neuron)
        kld=measured["kld"] if measured else 0.0,
        same_top=measured["same_top"] if measured else 1.0,
    )
    return record
