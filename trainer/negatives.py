"""Negatives for retrieval training and down-sampling of hot positives (seed 000, seed 001).

* Easy negatives come from the whole catalogue, drawn non-uniformly with ``P(i) ∝ clicks_i ** 0.75``: uniform draws
  would be mostly cold items, so "hot positive, cold negative" would make hot items hotter; the 0.75 power (the
  word2vec exponent, an empirical choice) punishes hot items as negatives without letting them dominate.
* Hard negatives are items that were retrieved but eliminated by pre-ranking or ranking; a common recipe mixes
  them 50/50 with easy ones (:func:`mix_negatives`). Impressed-but-not-clicked items are never retrieval negatives.
* Positives are heavy-tailed, so hot items are down-sampled with a keep probability that falls as clicks grow
  (:func:`keep_probability`, word2vec's sub-sampling formula).
"""

from __future__ import annotations

import logging
import math

import numpy as np

__all__ = ["PowerSampler", "keep_probability", "mix_negatives"]

logger = logging.getLogger(__name__)


def _check_counts(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"counts must be one-dimensional [n_items], got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("counts must be finite and non-negative")
    return counts


class PowerSampler:
    """Draws item indices with ``P(i) = (count_i + smoothing) ** power / sum_j (count_j + smoothing) ** power``.

    ``smoothing`` is added to every count *before* the power so that items without clicks (new or cold) can still be
    drawn as negatives; with ``smoothing=0`` a zero-click item is never drawn. Sampling is inverse-CDF lookup on a
    cumulative table built once per :meth:`update_counts`: ``O(n log n_items)`` per call of :meth:`sample`.
    """

    def __init__(self, counts: np.ndarray, power: float = 0.75, seed: int = 0, smoothing: float = 1.0) -> None:
        if power < 0:
            raise ValueError(f"power must be >= 0, got {power}")
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        self.power = float(power)
        self.smoothing = float(smoothing)
        self._rng = np.random.default_rng(seed)
        self.probabilities = np.zeros(0, dtype=np.float64)
        self._cumulative = np.zeros(0, dtype=np.float64)
        self.update_counts(counts)

    @property
    def num_items(self) -> int:
        return int(self.probabilities.shape[0])

    def update_counts(self, counts: np.ndarray) -> None:
        """Replace the click counts (the catalogue may have grown); rebuilds the sampling table."""
        counts = _check_counts(counts)
        weights = (counts + self.smoothing) ** self.power
        if self.power == 0.0 and self.smoothing == 0.0:
            weights = (counts > 0).astype(np.float64)  # 0 ** 0 is 1 in numpy; an unclicked item stays undrawable
        total = float(weights.sum())
        if not total > 0.0:
            raise ValueError(f"no item can be drawn: {counts.shape[0]} items, all with zero count and smoothing=0")
        self.probabilities = weights / total
        self._cumulative = np.cumsum(weights)

    def sample(self, n: int) -> np.ndarray:
        """``n`` independent draws (with replacement): int64 item indices ``[n]``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        u = self._rng.random(n) * self._cumulative[-1]
        # side="right" returns the first i with cumulative[i] > u: zero-weight items span an empty interval.
        index = np.searchsorted(self._cumulative, u, side="right")
        return np.minimum(index, self.num_items - 1).astype(np.int64)

    def log_q(self, items: np.ndarray, num_draws: int = 1) -> np.ndarray:
        """float64 ``log(num_draws * P(i))``: the log expected count of item ``i`` among ``num_draws`` draws.

        This is the sampled-softmax correction for negatives drawn by this sampler (pass it as ``extra_log_q``).
        """
        if num_draws < 1:
            raise ValueError(f"num_draws must be >= 1, got {num_draws}")
        p = self.probabilities[np.asarray(items, dtype=np.int64)]
        with np.errstate(divide="ignore"):
            return np.log(num_draws * p)


def keep_probability(counts: np.ndarray, threshold: float = 1e-3) -> np.ndarray:
    """Probability of keeping a positive of each item: ``min(1, sqrt(t / f_i) + t / f_i)``, ``f_i = c_i / sum(c)``.

    word2vec's sub-sampling (Mikolov et al. 2013, as implemented in its C code): items with a click share below
    about ``threshold`` are always kept, above it the keep probability falls roughly as ``1 / sqrt(f_i)``, so the drop
    probability grows with the click count (seed 000: down-sample hot items). Items with no clicks keep 1.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    counts = _check_counts(counts)
    total = counts.sum()
    keep = np.ones_like(counts)
    if total <= 0:
        return keep
    freq = counts / total
    hot = freq > 0
    ratio = threshold / freq[hot]
    keep[hot] = np.minimum(1.0, np.sqrt(ratio) + ratio)
    return keep


def mix_negatives(
    easy: np.ndarray, hard: np.ndarray | None, n: int, hard_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Compose ``n`` extra negatives (int64 item indices ``[n]``): hard ones first, then easy ones.

    ``n_hard = floor(n * hard_fraction + 0.5)`` (round half up) come from the ``hard`` pool when it has items, else
    ``n_hard = 0``; the other ``n - n_hard`` come from ``easy`` (e.g. :meth:`PowerSampler.sample` output). Each pool is
    sampled uniformly, without replacement when it holds enough items and with replacement otherwise. Hard items are
    placed first so a caller can give the two parts different ``log_q`` corrections.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    easy = np.asarray(easy, dtype=np.int64).reshape(-1)
    hard = np.zeros(0, dtype=np.int64) if hard is None else np.asarray(hard, dtype=np.int64).reshape(-1)
    n_hard = math.floor(n * hard_fraction + 0.5) if hard.size else 0
    n_easy = n - n_hard
    if n_easy > 0 and easy.size == 0:
        raise ValueError(f"need {n_easy} easy negatives but the easy pool is empty")
    parts = []
    for pool, k in ((hard, n_hard), (easy, n_easy)):
        if k > 0:
            parts.append(rng.choice(pool, size=k, replace=pool.size < k))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
