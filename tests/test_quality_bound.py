"""The quality search validates a level by the upper end of a confidence bound on its perplexity change, not by
the point estimate alone (neuralink.convert.quality): on ~1000 held-out tokens the estimate's error is as large
as the default budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuralink.convert.quality import BLOCK_TOKENS, CONFIDENCE_Z, Setting, perplexity_change, search

TOKENS = 1024


def test_the_bound_is_the_change_where_every_token_moves_alike_and_above_it_where_they_scatter() -> None:
    reference = np.random.default_rng(0).uniform(0.5, 3.0, TOKENS)
    assert perplexity_change(reference, reference) == (0.0, 0.0)
    shifted = perplexity_change(reference + 0.01, reference)
    assert shifted[0] == pytest.approx(math.expm1(0.01)) and shifted[1] == pytest.approx(shifted[0])
    noise = np.random.default_rng(1).normal(0.0, 0.3, TOKENS)
    change, upper = perplexity_change(reference + 0.005 + noise, reference)
    blocks = noise.reshape(-1, BLOCK_TOKENS).mean(1)
    error = blocks.std(ddof=1) / math.sqrt(blocks.size)
    assert upper == pytest.approx(math.expm1(math.log1p(change) + CONFIDENCE_Z * error))
    assert upper > change + 0.01  # the spread, not the shift, decides here


class Selection:
    """Thresholds that name their density (the fake scorer reads the level back from them)."""

    def threshold(self, il: int, density: float, candidate: bool = False) -> float:
        return density


class NoisyBelowHalf:
    """Every neuron's NLLs, and for levels sparser than 0.5 the same plus 0.3 % on average and a wide scatter:
    within a 1 % budget by the mean, not by the bound."""

    def __init__(self) -> None:
        self.tokens = np.zeros(TOKENS, dtype=np.int64)
        self.reference = np.random.default_rng(2).uniform(0.5, 3.0, TOKENS)
        self.scatter = np.random.default_rng(3).normal(0.0, 0.25, TOKENS)

    top = None

    def token_nll(self, setting: Setting, **_divergence: object) -> tuple[np.ndarray, dict[str, float]]:
        level = min(setting.finals)
        nll = self.reference + (0.003 + self.scatter - self.scatter.mean() if level < 0.5 else 0.0)
        return nll, {"up_density": min(1.0, level + 0.3), "down_density": level, "kld": 1.0 - level,
                     "same_top": level}

    def nll(self, setting: Setting) -> tuple[float, dict[str, float]]:
        nll, densities = self.token_nll(setting)
        return float(nll.mean()), densities


def test_a_level_within_the_budget_by_its_mean_alone_is_not_chosen() -> None:
    setting, record = search(NoisyBelowHalf(), Selection(), 3, budget=0.01, allocation="uniform")
    assert record["chosen"] == "level 0.5" and setting.finals == (0.5, 0.5, 0.5) and record["validated"]
    assert record["predictor"] == "gate" and record["upper_bound"] == 0.0 and record["confidence"] == 0.9
    assert (record["kld"], record["same_top"]) == (0.5, 0.5)  # the chosen level's, as measured
    sparser = [m for m in record["measured"] if float(m["label"].split()[1]) < 0.5]
    assert sparser, record["measured"]
    for m in sparser:  # what the point estimate alone would have taken
        assert m["perplexity_change"] < 0.01 < m["upper_bound"]


def test_a_divergence_budget_keeps_a_denser_level() -> None:
    """The fake's divergence is 1 - level: within 0.4 nats only levels of 0.6 and denser are, whatever perplexity
    allows."""
    setting, record = search(NoisyBelowHalf(), Selection(), 3, budget=0.01, kld_budget=0.4, allocation="uniform")
    assert record["chosen"] == "level 0.6" and setting.finals == (0.6, 0.6, 0.6) and record["validated"]
    assert record["kld_budget"] == 0.4 and record["kld"] == pytest.approx(0.4)
    assert all(m["kld"] > 0.4 for m in record["measured"] if float(m["label"].split()[1]) < 0.6)
    # a given density outside the divergence budget is measured and recorded, but not validated
    _, given = search(NoisyBelowHalf(), Selection(), 3, budget=0.01, kld_budget=0.4, fixed_density=0.5)
    assert not given["validated"] and given["predictor"] == "dense" and given["kld"] == pytest.approx(0.5)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="divergence budget"):
            search(NoisyBelowHalf(), Selection(), 3, kld_budget=bad)
