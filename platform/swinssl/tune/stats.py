"""Paired statistics of a setting against its scratch baseline, over the (seed, fold) pairs of a sweep.

A pair is one seed and one CV fold: the setting's fold-k Dice with seed s against the baseline's fold-k Dice with
seed s. The folds do not depend on the seed (`cv.seed` is fixed per sweep), so both sides of a pair were trained on
the same studies and scored on the same validation studies; the pairing removes the split-to-split variation the
two sides share.

Reported (`PairedGain`), for the n pairs both sides have and their differences d_i = setting_i - baseline_i:

- `gain`: mean(d); `sd`: the sample standard deviation of d (ddof 1).
- `ci_low`/`ci_high`: the 95 % paired t interval, mean(d) -+ t_{0.975, n-1} * sd / sqrt(n) (the reported one);
  `boot_low`/`boot_high`: a seeded percentile bootstrap of mean(d) over the pairs (10 000 resamples), a check.
  The t interval is the reported one because it is the interval of the test whose p-value is reported (it excludes
  0 exactly when p < 0.05), and because with the few pairs a sweep has (2-15) the percentile bootstrap is too
  narrow: it can only reach means of resampled observed differences (with 2 pairs, three values) and ignores the
  uncertainty of the spread itself, which the t quantile carries.
- `p`: two-sided paired t-test (H0: mean difference 0), t = mean(d) / (sd / sqrt(n)) on n-1 degrees of freedom.
- `pairs_needed`: the smallest n with power >= 0.8 for a two-sided paired t-test at alpha 0.05 to detect a true
  gain `delta` (0.02: two Dice points) when the differences have the measured sd:
  power(n) = P(T > t_c) + P(T < -t_c), T noncentral t with n-1 df and noncentrality delta * sqrt(n) / sd,
  t_c = t_{0.975, n-1}; `seeds_needed` = ceil(pairs_needed / folds) (each seed adds one pair per fold).

Caveat, also in the report's text: pairs are not independent (the same fold's pairs share validation studies, CV
folds share training studies), so the t interval is, if anything, too narrow (Nadeau & Bengio 2003, "Inference for
the generalization error"); the p-values are per comparison, not corrected for comparing several settings.

Edge cases are reported, never a crash: one pair -> no interval, no p (n/a); zero spread with n >= 2 -> the
interval is the point [gain, gain] and p is the t-test's limit (0 when gain != 0, 1 when gain == 0), flagged;
a pair one side lacks (a failed trial, a missing fold, a NaN Dice) is listed in `missing`, not silently dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

Key = tuple[str, str]
"""(seed, fold) of one fine-tuned fold, both as strings (the MLflow params)."""

LEVEL = 0.95
ALPHA = 0.05
POWER = 0.8
DETECT_GAIN = 0.02
"""The gain `pairs_needed` is sized for: two Dice points."""
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MAX_PAIRS = 10**7
"""Past this many pairs `pairs_needed` gives up (None): the spread makes a 2-point gain undetectable in practice."""


@dataclass(frozen=True)
class PairedGain:
    """A setting against its baseline over the pairs both have; NaN / None where a value is undefined."""

    n_pairs: int
    n_folds: int
    gain: float
    sd: float
    ci_low: float
    ci_high: float
    p: float
    boot_low: float
    boot_high: float
    pairs_needed: int | None
    seeds_needed: int | None
    missing: list[str] = field(default_factory=list)
    """One line per unpaired (seed, fold): which side lacks it."""
    notes: list[str] = field(default_factory=list)
    """Why a value is n/a or degenerate (one pair, zero spread, no pair at all)."""

    @property
    def significant(self) -> bool | None:
        """p < 0.05 (the t interval then excludes 0); None when there is no p."""
        return None if math.isnan(self.p) else bool(self.p < ALPHA)


def natural_key(parts: tuple[str, ...]) -> tuple:
    """Sort key of string tuples: numbers as numbers (fold 10 after fold 2), before any other text."""
    return tuple((0, int(x), "") if re.fullmatch(r"-?\d+", x) else (1, 0, x) for x in parts)


def describe(key: Key) -> str:
    return f"seed {key[0]} fold {key[1]}"


def _lack(key: Key, side: str, held: dict[Key, float]) -> str | None:
    """Why `side` gives no value for `key` (None when it does)."""
    if key not in held:
        return f"{side} lacks it"
    return f"{side} has no Dice" if math.isnan(held[key]) else None


def pair_up(values: dict[Key, float], baseline: dict[Key, float]) -> tuple[list[Key], np.ndarray, list[str]]:
    """The keys both sides have a finite value for (sorted), their differences, and one line per unpaired key."""
    paired, missing = [], []
    for key in sorted(set(values) | set(baseline), key=natural_key):
        why = [w for w in (_lack(key, "setting", values), _lack(key, "baseline", baseline)) if w]
        if why:
            missing.append(f"{describe(key)}: " + " and ".join(why))
        else:
            paired.append(key)
    return paired, np.array([values[k] - baseline[k] for k in paired], dtype=float), missing


def t_interval(diffs: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Paired t interval of the mean difference; (nan, nan) below 2 pairs, the point itself at zero spread."""
    if len(diffs) < 2:
        return math.nan, math.nan
    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    if sd == 0.0:
        return mean, mean
    low, high = stats.ttest_1samp(diffs, 0.0).confidence_interval(level)
    return float(low), float(high)


def t_pvalue(diffs: np.ndarray) -> float:
    """Two-sided paired t-test of mean difference 0; nan below 2 pairs, the limit (0 or 1) at zero spread."""
    if len(diffs) < 2:
        return math.nan
    if float(np.std(diffs, ddof=1)) == 0.0:
        return 1.0 if float(np.mean(diffs)) == 0.0 else 0.0
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def bootstrap_interval(diffs: np.ndarray, level: float = LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap of the mean difference (pairs resampled with replacement, seeded: same input, same
    interval); (nan, nan) below 2 pairs."""
    if len(diffs) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_t_power(n: int, sd: float, delta: float = DETECT_GAIN, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with n pairs against a true mean difference `delta` (sd > 0)."""
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    shift = delta * math.sqrt(n) / sd
    return float(stats.nct.sf(crit, df, shift) + stats.nct.cdf(-crit, df, shift))


def pairs_needed(sd: float, delta: float = DETECT_GAIN, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Smallest n >= 2 with `paired_t_power(n) >= power`; None when sd is undefined or n would exceed MAX_PAIRS.
    Zero spread needs the minimum, 2 (one degree of freedom)."""
    if math.isnan(sd):
        return None
    if sd == 0.0:
        return 2
    low, high = 1, 2  # power(low) < target (or low is below the minimum), power(high) unknown
    while paired_t_power(high, sd, delta, alpha) < power:
        if high >= MAX_PAIRS:
            return None
        low, high = high, min(2 * high, MAX_PAIRS)
    while high - low > 1:  # power rises with n: bisect for the first n that reaches it
        mid = (low + high) // 2
        low, high = (low, mid) if paired_t_power(mid, sd, delta, alpha) >= power else (mid, high)
    return high


def paired_gain(values: dict[Key, float], baseline: dict[Key, float], delta: float = DETECT_GAIN) -> PairedGain:
    """Everything the report says about a setting (`values`) against its baseline; see the module docstring."""
    keys, diffs, missing = pair_up(values, baseline)
    n = len(diffs)
    folds = len({fold for _, fold in keys})
    gain = float(np.mean(diffs)) if n else math.nan
    sd = float(np.std(diffs, ddof=1)) if n > 1 else math.nan
    notes = []
    if n == 0:
        notes.append("no (seed, fold) pair with the baseline: no gain")
    elif n == 1:
        notes.append("1 pair: no interval, no p-value, no spread to size a study on")
    elif sd == 0.0:
        notes.append(f"zero spread over {n} pairs: the interval is the point, p the t-test's limit")
    if missing:
        notes.append(f"{len(missing)} unpaired (seed, fold) left out: " + "; ".join(missing))
    needed = pairs_needed(sd, delta)
    return PairedGain(n, folds, gain, sd, *t_interval(diffs), t_pvalue(diffs), *bootstrap_interval(diffs),
                      needed, math.ceil(needed / folds) if needed and folds else None, missing, notes)
