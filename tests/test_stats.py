"""The sweep report's paired statistics (swinssl.tune.stats) against recomputations written here from the formulas:
the t interval from mean / sd / n and the t quantile, the p-value from the t cdf, the power of the paired t-test by
simulation and against published sample sizes; and the edge cases (1 pair, zero spread, unpaired folds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from swinssl.tune.stats import (
    BOOTSTRAP_RESAMPLES,
    DETECT_GAIN,
    bootstrap_interval,
    paired_gain,
    paired_t_power,
    pairs_needed,
)


def _pairs(seeds: int, folds: int, rng: np.random.Generator, shift: float, noise: float) -> tuple[dict, dict]:
    """Baseline Dice per (seed, fold) and a setting's = baseline + shift + noise (the same split pairs them)."""
    base = {(str(s), str(k)): float(rng.uniform(0.3, 0.7)) for s in range(seeds) for k in range(folds)}
    return {key: v + shift + float(rng.normal(0, noise)) for key, v in base.items()}, base


def _by_hand(diffs: list[float]) -> tuple[float, float, float, float, float]:
    """mean, sd (ddof 1), 95 % t interval, two-sided p: the textbook formulas, nothing of the module."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    t = mean / (sd / math.sqrt(n))
    return mean, sd, mean - half, mean + half, 2 * (1 - stats.t.cdf(abs(t), n - 1))


@pytest.mark.parametrize("seeds,folds,shift", [(1, 2, 0.01), (3, 5, 0.02), (2, 3, -0.05), (5, 5, 0.0)])
def test_interval_and_p_match_the_formulas(seeds, folds, shift):
    values, base = _pairs(seeds, folds, np.random.default_rng(seeds * 10 + folds), shift, 0.03)
    g = paired_gain(values, base)
    diffs = [values[k] - base[k] for k in base]
    mean, sd, low, high, p = _by_hand(diffs)
    assert g.n_pairs == seeds * folds and g.n_folds == folds and not g.missing
    assert g.gain == pytest.approx(mean, abs=1e-12) and g.sd == pytest.approx(sd, abs=1e-12)
    assert (g.ci_low, g.ci_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert g.p == pytest.approx(p, rel=1e-9, abs=1e-12)
    assert g.significant == (p < 0.05) == (low > 0 or high < 0)  # the interval excludes 0 exactly when p < 0.05
    assert g.seeds_needed == math.ceil(g.pairs_needed / folds)


def test_a_real_gain_is_found_and_a_null_one_is_not():
    values, base = _pairs(3, 5, np.random.default_rng(1), 0.05, 0.01)
    assert paired_gain(values, base).significant is True and paired_gain(values, base).ci_low > 0
    null = {k: v + 1e-4 * (-1) ** i for i, (k, v) in enumerate(base.items())}  # +-1e-4 alternating: mean ~0
    assert paired_gain(null, base).significant is False


@pytest.mark.parametrize("effect,published", [(1.0, 10), (0.5, 34), (0.4, 52)])
def test_pairs_needed_matches_published_sample_sizes(effect, published):
    """Two-sided paired t, alpha 0.05, power 0.8 (G*Power / Cohen 1988 tables): d=1 -> 10, 0.5 -> 34, 0.4 -> 52."""
    assert pairs_needed(DETECT_GAIN / effect) == published
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)  # the normal approximation is the lower bound it refines
    assert (z / effect) ** 2 <= published <= (z / effect) ** 2 + 3


def test_power_by_simulation():
    """The power formula against the rejection rate of simulated paired t-tests (true gain 0.02, sd 0.03)."""
    sd = 0.03
    n = pairs_needed(sd)
    rng = np.random.default_rng(0)
    for size in (n - 1, n):
        diffs = rng.normal(DETECT_GAIN, sd, size=(20_000, size))
        t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(size))
        rate = float(np.mean(np.abs(t) > stats.t.ppf(0.975, size - 1)))
        assert rate == pytest.approx(paired_t_power(size, sd), abs=0.012)
    assert paired_t_power(n, sd) >= 0.8 > paired_t_power(n - 1, sd)


def test_same_inputs_same_numbers():
    values, base = _pairs(3, 4, np.random.default_rng(7), 0.02, 0.02)
    first = paired_gain(values, base)
    shuffled = dict(reversed(list(values.items())))  # insertion order does not matter: pairs are sorted
    assert paired_gain(shuffled, dict(reversed(list(base.items())))) == first
    diffs = np.array([values[k] - base[k] for k in sorted(base)])
    assert (first.boot_low, first.boot_high) == bootstrap_interval(diffs)
    assert bootstrap_interval(diffs, seed=1) != bootstrap_interval(diffs)  # it is the seed that fixes it


def test_bootstrap_is_a_percentile_interval_of_resampled_means():
    diffs = np.random.default_rng(3).normal(0.02, 0.03, 400)
    low, high = bootstrap_interval(diffs)
    se = diffs.std(ddof=1) / math.sqrt(len(diffs))  # large n: the percentile interval ~ mean -+ 1.96 se
    assert low == pytest.approx(diffs.mean() - 1.96 * se, abs=0.15 * se)
    assert high == pytest.approx(diffs.mean() + 1.96 * se, abs=0.15 * se)
    assert BOOTSTRAP_RESAMPLES >= 10_000


def test_one_pair_is_reported_not_a_crash():
    g = paired_gain({("0", "0"): 0.5}, {("0", "0"): 0.375})
    assert g.gain == 0.125 and g.n_pairs == 1
    assert all(math.isnan(v) for v in (g.sd, g.ci_low, g.ci_high, g.p, g.boot_low, g.boot_high))
    assert g.significant is None and g.seeds_needed is None and "1 pair" in g.notes[0]


def test_zero_spread():
    base = {("0", "0"): 0.25, ("0", "1"): 0.5, ("1", "0"): 0.5}
    g = paired_gain({k: v + 0.25 for k, v in base.items()}, base)  # exact in binary: every difference is 0.25
    assert (g.gain, g.sd, g.ci_low, g.ci_high, g.p) == (0.25, 0.0, 0.25, 0.25, 0.0)
    assert g.significant is True and g.pairs_needed == 2 and "zero spread" in g.notes[0]
    same = paired_gain(dict(base), base)
    assert (same.gain, same.p, same.significant) == (0.0, 1.0, False)


def test_unpaired_folds_are_stated():
    values, base = _pairs(2, 3, np.random.default_rng(5), 0.02, 0.02)
    del values[("1", "2")]  # the setting lacks a fold of the baseline (e.g. a trial that failed mid-CV)
    values[("0", "1")] = math.nan  # a fold run without Dice
    base.pop(("1", "0"))  # and the baseline lacks one
    g = paired_gain(values, base)
    assert g.missing == ["seed 0 fold 1: setting has no Dice", "seed 1 fold 0: baseline lacks it",
                         "seed 1 fold 2: setting lacks it"]
    assert any("3 unpaired" in note for note in g.notes)
    kept = [("0", "0"), ("0", "2"), ("1", "1")]
    mean, _, low, high, p = _by_hand([values[k] - base[k] for k in kept])
    assert g.n_pairs == 3 and g.gain == pytest.approx(mean, abs=1e-12)
    assert (g.ci_low, g.ci_high, g.p) == (pytest.approx(low), pytest.approx(high), pytest.approx(p))
    nothing = paired_gain({("0", "0"): 0.5}, {("1", "0"): 0.5})
    assert nothing.n_pairs == 0 and math.isnan(nothing.gain) and "no (seed, fold) pair" in nothing.notes[0]
