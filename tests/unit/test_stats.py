"""Bootstrap intervals on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunesmith.eval.stats import (
    bootstrap_ci,
    paired_delta_ci,
    paired_perplexity_delta_ci,
    perplexity_ci,
    perplexity_of,
)


def test_all_equal_values_give_a_zero_width_interval() -> None:
    assert bootstrap_ci([0.7] * 25) == pytest.approx((0.7, 0.7))


def test_bernoulli_interval_holds_p_and_has_the_normal_width() -> None:
    p, n = 0.3, 400
    values = [1.0] * int(p * n) + [0.0] * (n - int(p * n))
    lo, hi = bootstrap_ci(values, num_samples=4000)
    assert lo < p < hi
    normal_width = 2 * 1.96 * math.sqrt(p * (1 - p) / n)  # 0.0898
    assert hi - lo == pytest.approx(normal_width, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(p, abs=0.01)


def test_same_seed_same_interval_and_confidence_widens_it() -> None:
    values = np.random.default_rng(1).normal(size=50).tolist()
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    lo90, hi90 = bootstrap_ci(values, confidence=0.90)
    lo99, hi99 = bootstrap_ci(values, confidence=0.99)
    assert lo99 < lo90 and hi90 < hi99


def test_missing_values_are_left_out() -> None:
    assert bootstrap_ci([1.0, None, 1.0, float("nan")]) == pytest.approx((1.0, 1.0))
    assert all(math.isnan(x) for x in bootstrap_ci([None, None]))


def test_paired_deltas_of_identical_lists_are_zero() -> None:
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 0.5]
    assert paired_delta_ci(values, values) == pytest.approx((0.0, 0.0, 0.0))


def test_pairing_removes_the_shared_row_difficulty() -> None:
    # tuned is base + 0.1 on every row: the rows vary a lot, the difference not at all.
    base = np.random.default_rng(2).uniform(0, 10, size=40)
    delta, lo, hi = paired_delta_ci((base + 0.1).tolist(), base.tolist())
    assert (delta, lo, hi) == pytest.approx((0.1, 0.1, 0.1))
    lo_b, hi_b = bootstrap_ci(base.tolist())
    assert hi_b - lo_b > 1.0  # unpaired intervals would swamp the 0.1 difference


def test_paired_delta_on_a_known_win() -> None:
    tuned = [1.0] * 14 + [0.0] * 2
    base = [1.0] * 4 + [0.0] * 12
    delta, lo, hi = paired_delta_ci(tuned, base)
    assert delta == pytest.approx(0.625)
    assert 0.0 < lo < delta < hi <= 1.0


def test_paired_rows_must_match() -> None:
    with pytest.raises(ValueError, match="same rows"):
        paired_delta_ci([1.0, 0.0], [1.0])


def test_perplexity_is_exp_of_token_weighted_loss() -> None:
    assert perplexity_of([1.0, 3.0], [3, 1]) == pytest.approx(math.exp(1.5))
    assert perplexity_ci([2.0] * 10, [5] * 10) == pytest.approx((math.exp(2.0), math.exp(2.0)))
    delta, lo, hi = paired_perplexity_delta_ci([1.0] * 8, [2.0] * 8)
    assert delta == pytest.approx(math.e - math.e**2)
    assert lo == pytest.approx(delta) and hi == pytest.approx(delta)


def _direct_bootstrap(statistic, columns: list[np.ndarray], num_samples: int, seed: int) -> tuple[float, float]:
    """The textbook percentile bootstrap, one resample at a time, drawing the same row indices."""
    idx = np.random.default_rng(seed).integers(0, len(columns[0]), size=(num_samples, len(columns[0])))
    samples = [statistic(*(c[rows] for c in columns)) for rows in idx]
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return float(lo), float(hi)


def test_perplexity_intervals_match_a_direct_bootstrap() -> None:
    rng = np.random.default_rng(3)
    tuned, base = rng.uniform(0.5, 2.0, size=30), rng.uniform(1.5, 3.0, size=30)
    tuned_n, base_n = rng.integers(1, 40, size=30).astype(float), rng.integers(1, 40, size=30).astype(float)

    def ppl(loss: np.ndarray, n: np.ndarray) -> float:
        return math.exp((loss * n).sum() / n.sum())  # token-weighted: long answers count for more

    assert perplexity_ci(tuned, tuned_n, num_samples=200, seed=7) == pytest.approx(
        _direct_bootstrap(ppl, [tuned, tuned_n], 200, 7), rel=1e-12)
    delta, lo, hi = paired_perplexity_delta_ci(tuned, base, tuned_n, base_n, num_samples=200, seed=7)
    assert delta == pytest.approx(ppl(tuned, tuned_n) - ppl(base, base_n), rel=1e-12)
    assert (lo, hi) == pytest.approx(_direct_bootstrap(
        lambda t, tn, b, bn: ppl(t, tn) - ppl(b, bn), [tuned, tuned_n, base, base_n], 200, 7), rel=1e-12)
    assert lo < delta < hi < 0


def test_identical_perplexity_rows_give_a_delta_of_exactly_zero() -> None:
    losses, tokens = [0.3, 2.5, 1.1, 4.0, 0.9], [3, 12, 7, 1, 20]
    assert paired_perplexity_delta_ci(losses, losses, tokens, tokens) == (0.0, 0.0, 0.0)
