"""Negative sampling: the 0.75-power sampler, hot-item down-sampling and the easy/hard mix."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from trainer.negatives import PowerSampler, keep_probability, mix_negatives


def test_power_probabilities_by_hand() -> None:
    # counts 1, 16, 81 -> 1 ** 0.75 = 1, 16 ** 0.75 = 8, 81 ** 0.75 = 27; total 36.
    sampler = PowerSampler(np.array([1, 16, 81]), power=0.75, smoothing=0.0)
    np.testing.assert_allclose(sampler.probabilities, [1 / 36, 8 / 36, 27 / 36])
    # Smoothing is added before the power: counts 0, 0, 3 with smoothing 1 -> 1, 1, 4 ** 0.75 = 2 ** 1.5 = 2.8284;
    # total 4.8284 -> [0.2071, 0.2071, 0.5858].
    smoothed = PowerSampler(np.array([0, 0, 3]), smoothing=1.0)
    np.testing.assert_allclose(smoothed.probabilities, np.array([1, 1, 2**1.5]) / (2 + 2**1.5))


def test_empirical_distribution_matches_counts_to_the_075() -> None:
    counts = np.array([0, 1, 3, 10, 40, 200, 1000, 5000])
    sampler = PowerSampler(counts, power=0.75, seed=42, smoothing=0.0)
    draws = sampler.sample(200_000)
    assert draws.dtype == np.int64 and draws.shape == (200_000,)
    observed = np.bincount(draws, minlength=counts.size)
    expected = counts**0.75 / (counts**0.75).sum()
    assert observed[0] == 0  # a zero-click item gets no mass without smoothing
    # Largest p is 5000 ** 0.75 / 850.4 = 0.70: its frequency has standard deviation sqrt(0.7 * 0.3 / 2e5) = 0.001.
    assert np.abs(observed / draws.size - expected).max() < 0.005
    chi2 = stats.chisquare(observed[1:], expected[1:] * draws.size)
    assert chi2.pvalue > 1e-3
    # Compared with click-proportional sampling, the hottest item is drawn less often (0.70 vs 5000 / 6254 = 0.80).
    assert observed[-1] / draws.size < counts[-1] / counts.sum() - 0.1


def test_zero_count_items_get_mass_only_through_smoothing() -> None:
    counts = np.array([0, 0, 8, 8])
    plain = PowerSampler(counts, smoothing=0.0, seed=1)
    assert plain.probabilities[:2].tolist() == [0.0, 0.0]
    assert set(np.unique(plain.sample(10_000)).tolist()) == {2, 3}
    smoothed = PowerSampler(counts, smoothing=1.0, seed=1)
    # 1 ** 0.75 = 1 vs 9 ** 0.75 = 5.196: each cold item has 1 / 12.39 = 0.081.
    np.testing.assert_allclose(smoothed.probabilities[:2], 1 / (2 + 2 * 9**0.75))
    share = np.isin(smoothed.sample(50_000), [0, 1]).mean()
    assert share == pytest.approx(2 / (2 + 2 * 9**0.75), abs=0.01)


def test_sampling_is_deterministic_and_update_counts_grows_the_catalogue() -> None:
    a = PowerSampler(np.array([5, 1, 1]), seed=3)
    b = PowerSampler(np.array([5, 1, 1]), seed=3)
    np.testing.assert_array_equal(a.sample(100), b.sample(100))
    a.update_counts(np.array([0, 0, 0, 10]))  # a new item that is now the only clicked one
    assert a.probabilities.shape == (4,)
    a2 = PowerSampler(np.array([0, 0, 0, 10]), smoothing=0.0, seed=0)
    assert np.all(a2.sample(1000) == 3)
    with pytest.raises(ValueError, match="no item can be drawn"):
        PowerSampler(np.zeros(3), smoothing=0.0)
    with pytest.raises(ValueError, match="non-negative"):
        PowerSampler(np.array([1, -1]))


def test_log_q_is_log_expected_count() -> None:
    sampler = PowerSampler(np.array([1, 16, 81]), smoothing=0.0)
    # 10 draws: expected counts 10/36, 80/36, 270/36.
    np.testing.assert_allclose(sampler.log_q(np.array([0, 2]), num_draws=10), np.log([10 / 36, 270 / 36]))


def test_keep_probability_by_hand() -> None:
    # threshold 0.01, counts 90, 9, 1, 0 (sum 100): f = 0.9, 0.09, 0.01, 0.
    # keep = sqrt(t/f) + t/f: 0.9 -> sqrt(1/90) + 1/90 = 0.10541 + 0.01111 = 0.11652;
    # 0.09 -> sqrt(1/9) + 1/9 = 1/3 + 1/9 = 4/9; 0.01 -> 1 + 1 = 2, clipped to 1; an unclicked item keeps 1.
    keep = keep_probability(np.array([90, 9, 1, 0]), threshold=0.01)
    np.testing.assert_allclose(keep, [math.sqrt(1 / 90) + 1 / 90, 4 / 9, 1.0, 1.0])
    assert keep_probability(np.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def test_keep_probability_decreases_with_count() -> None:
    counts = np.array([0, 1, 10, 100, 1_000, 10_000, 100_000])
    keep = keep_probability(counts, threshold=1e-3)
    assert np.all(np.diff(keep) <= 0)
    below_one = keep < 1
    assert below_one[-3:].all()  # the three hottest items are down-sampled ...
    assert np.all(np.diff(keep[below_one]) < 0)  # ... and strictly more so the hotter they are
    # Applying it to a Zipf click stream lowers the share of the hottest item.
    rng = np.random.default_rng(0)
    clicks = rng.zipf(1.5, size=50_000) % 1000
    item_counts = np.bincount(clicks, minlength=1000)
    kept = clicks[rng.random(clicks.size) < keep_probability(item_counts, threshold=1e-3)[clicks]]
    top = np.argmax(item_counts)
    assert (kept == top).mean() < 0.5 * (clicks == top).mean()


def test_mix_proportions() -> None:
    rng = np.random.default_rng(0)
    easy = np.arange(0, 100)
    hard = np.arange(1000, 1050)
    mixed = mix_negatives(easy, hard, 10, 0.5, rng)
    assert mixed.dtype == np.int64 and mixed.shape == (10,)
    assert np.all(mixed[:5] >= 1000) and np.all(mixed[5:] < 100)  # hard first, then easy
    assert len(set(mixed[:5].tolist())) == 5  # a large enough pool is drawn without replacement
    # Round half up: 5 * 0.5 = 2.5 -> 3 hard; 8 * 0.3 = 2.4 -> 2 hard.
    assert (mix_negatives(easy, hard, 5, 0.5, rng) >= 1000).sum() == 3
    assert (mix_negatives(easy, hard, 8, 0.3, rng) >= 1000).sum() == 2
    # No hard pool (or an empty one): everything from easy.
    assert np.all(mix_negatives(easy, None, 6, 0.5, rng) < 100)
    assert np.all(mix_negatives(easy, np.array([], dtype=np.int64), 6, 0.5, rng) < 100)
    # A hard pool smaller than needed is drawn with replacement.
    small = mix_negatives(easy, np.array([7000, 7001]), 10, 1.0, rng)
    assert set(small.tolist()) <= {7000, 7001} and small.size == 10
    assert mix_negatives(easy, hard, 0, 0.5, rng).shape == (0,)
    with pytest.raises(ValueError, match="easy pool is empty"):
        mix_negatives(np.array([], dtype=np.int64), hard, 4, 0.5, rng)
