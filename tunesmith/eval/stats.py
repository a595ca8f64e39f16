"""Confidence intervals for evaluation scores: percentile bootstrap over rows.

Evaluation sets are small (tens to hundreds of rows), so a difference of a few points can be
noise. Every number in the report carries an interval from resampling its rows; deltas between
two models resample rows jointly, because both models answered the same prompts and their
scores are correlated (an easy row is easy for both).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

# Bootstrap means are drawn in blocks of this many resamples, so memory stays
# num_rows x block instead of num_rows x num_samples on large evaluation sets.
_BLOCK = 256


def _as_array(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)


def _resampled_stats(
    columns: list[np.ndarray], statistic: Callable[..., np.ndarray], num_samples: int, seed: int
) -> np.ndarray:
    """`statistic` on `num_samples` resamples of the rows (the same row indices for every column)."""
    num_rows = len(columns[0])
    rng = np.random.default_rng(seed)
    out = np.empty(num_samples, dtype=np.float64)
    for start in range(0, num_samples, _BLOCK):
        size = min(_BLOCK, num_samples - start)
        idx = rng.integers(0, num_rows, size=(size, num_rows))  # (size, num_rows)
        out[start : start + size] = statistic(*(c[idx] for c in columns))
    return out


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return float(lo), float(hi)


def _check(num_samples: int, confidence: float) -> None:
    assert num_samples >= 1, num_samples
    assert 0.0 < confidence < 1.0, confidence


def bootstrap_ci(
    values: Sequence[float | None], *, num_samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (None/NaN rows left out); (nan, nan) when empty."""
    _check(num_samples, confidence)
    x = _as_array(values)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan
    return _interval(_resampled_stats([x], lambda s: s.mean(axis=1), num_samples, seed), confidence)


def paired_delta_ci(
    tuned: Sequence[float | None],
    base: Sequence[float | None],
    *,
    num_samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of tuned - base over rows scored for both, and its bootstrap interval: (delta, lo, hi)."""
    _check(num_samples, confidence)
    if len(tuned) != len(base):
        raise ValueError(f"paired scores need the same rows: {len(tuned)} tuned vs {len(base)} base")
    diff = _as_array(tuned) - _as_array(base)
    diff = diff[~np.isnan(diff)]
    if len(diff) == 0:
        return math.nan, math.nan, math.nan
    lo, hi = _interval(_resampled_stats([diff], lambda s: s.mean(axis=1), num_samples, seed), confidence)
    return float(diff.mean()), lo, hi


def perplexity_of(losses: Sequence[float], num_tokens: Sequence[float] | None = None) -> float:
    """exp of the token-weighted mean loss (each row weighted by its token count, or equally)."""
    loss = np.asarray(losses, dtype=np.float64)
    weight = np.ones_like(loss) if num_tokens is None else np.asarray(num_tokens, dtype=np.float64)
    return float(np.exp((loss * weight).sum() / weight.sum()))


def perplexity_ci(
    losses: Sequence[float],
    num_tokens: Sequence[float] | None = None,
    *,
    num_samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of the perplexity from per-row mean losses (token-weighted when counts are given)."""
    _check(num_samples, confidence)
    loss = np.asarray(losses, dtype=np.float64)
    if len(loss) == 0:
        return math.nan, math.nan
    weight = np.ones_like(loss) if num_tokens is None else np.asarray(num_tokens, dtype=np.float64)

    def stat(lw: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.exp(lw.sum(axis=1) / w.sum(axis=1))

    return _interval(_resampled_stats([loss * weight, weight], stat, num_samples, seed), confidence)


def paired_perplexity_delta_ci(
    tuned_losses: Sequence[float],
    base_losses: Sequence[float],
    tuned_tokens: Sequence[float] | None = None,
    base_tokens: Sequence[float] | None = None,
    *,
    num_samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Perplexity of tuned minus that of base on the same rows, with a paired bootstrap interval."""
    _check(num_samples, confidence)
    if len(tuned_losses) != len(base_losses):
        raise ValueError(f"paired losses need the same rows: {len(tuned_losses)} vs {len(base_losses)}")
    if len(tuned_losses) == 0:
        return math.nan, math.nan, math.nan
    t = np.asarray(tuned_losses, dtype=np.float64)
    b = np.asarray(base_losses, dtype=np.float64)
    tw = np.ones_like(t) if tuned_tokens is None else np.asarray(tuned_tokens, dtype=np.float64)
    bw = np.ones_like(b) if base_tokens is None else np.asarray(base_tokens, dtype=np.float64)

    def stat(tl: np.ndarray, tn: np.ndarray, bl: np.ndarray, bn: np.ndarray) -> np.ndarray:
        return np.exp(tl.sum(axis=1) / tn.sum(axis=1)) - np.exp(bl.sum(axis=1) / bn.sum(axis=1))

    samples = _resampled_stats([t * tw, tw, b * bw, bw], stat, num_samples, seed)
    lo, hi = _interval(samples, confidence)
    delta = perplexity_of(t, tw) - perplexity_of(b, bw)
    return delta, lo, hi
