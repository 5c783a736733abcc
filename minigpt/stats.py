"""Uncertainty for stage comparisons: bootstrap intervals over prompts, paired gains, win rates, Spearman.

Every figure the evaluation reports is a mean over held-out prompts, so its uncertainty is the
prompt-to-prompt spread: we resample prompts (percentile bootstrap). Two stages answered the *same*
prompts, so a gain is resampled in pairs — the per-prompt difficulty cancels, and the interval is
much narrower than two separate intervals would suggest.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP_SAMPLES = 2000
LEVEL = 0.95


def _resampled_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    return values[idx].mean(axis=1)


def _percentile_interval(resampled: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(resampled, tail)), float(np.percentile(resampled, 100 - tail))]


def bootstrap_ci(values, n_boot: int = BOOTSTRAP_SAMPLES, level: float = LEVEL, seed: int = 0) -> list[float]:
    """[low, high] percentile-bootstrap interval of the mean of `values` (one value per prompt)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return [float("nan"), float("nan")]
    if len(values) == 1:
        return [float(values[0])] * 2
    return _percentile_interval(_resampled_means(values, n_boot, seed), level)


def bootstrap_ratio_ci(numerators, denominators, n_boot: int = BOOTSTRAP_SAMPLES, level: float = LEVEL,
                       seed: int = 0) -> list[float]:
    """[low, high] interval of sum(numerators) / sum(denominators), resampling the prompts (one pair of
    values each): a pooled rate such as pairwise accuracy, where prompts contribute different counts."""
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if len(num) == 0 or den.sum() == 0:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    return _percentile_interval(num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1e-12), level)


def paired_gain(before, after, n_boot: int = BOOTSTRAP_SAMPLES, level: float = LEVEL, seed: int = 0):
    """(mean of after − before, its paired-bootstrap interval); both lists are per prompt, same order."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape:
        raise ValueError(f"paired_gain: {len(before)} values before but {len(after)} after (same prompts needed)")
    diff = after - before
    return float(diff.mean()) if len(diff) else float("nan"), bootstrap_ci(diff, n_boot, level, seed)


def win_outcomes(before, after, tie: float = 1e-9) -> np.ndarray:
    """Per prompt: 1 if `after` is higher, 0 if lower, 0.5 for a tie."""
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    return np.where(diff > tie, 1.0, np.where(diff < -tie, 0.0, 0.5))


def win_rate(before, after, n_boot: int = BOOTSTRAP_SAMPLES, level: float = LEVEL, seed: int = 0):
    """(share of prompts where `after` beats `before`, ties counting half; its bootstrap interval)."""
    outcomes = win_outcomes(before, after)
    return float(outcomes.mean()) if len(outcomes) else float("nan"), bootstrap_ci(outcomes, n_boot, level, seed)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        same = x == value
        if same.sum() > 1:
            ranks[same] = ranks[same].mean()
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's rank correlation; None when either side is constant or there are < 3 points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    rx, ry = _ranks(x), _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def significance(gain: float, ci: list[float]) -> str:
    """'better' / 'worse' when the interval excludes zero, otherwise 'no measurable change'."""
    if ci[0] > 0:
        return "better"
    if ci[1] < 0:
        return "worse"
    return "no measurable change"
