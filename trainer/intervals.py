"""Bootstrap intervals that resample test users (:mod:`trainer.rolling`).

A user is the unit: each resample draws ``n`` users with replacement from the ``n`` test users and every
statistic is recomputed on those users. The same resample indices serve every model, so a difference between
two models is paired (both sides see the same users in each resample) and its interval is the percentile
interval of the resampled differences, far narrower than two separate intervals when the models agree on which
users are easy.

Interval: the percentile bootstrap, ``numpy.quantile`` (linear interpolation) of the resampled statistic at
``(1 - level) / 2`` and ``(1 + level) / 2``; the point estimate is the statistic on the users as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_indices", "mean_interval", "paired_difference", "ratio_interval"]

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval ``[low, high]``."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def bootstrap_indices(n_users: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[resamples, n_users]`` user indices drawn with replacement (int64); reuse them for every model."""
    if n_users < 1 or resamples < 1:
        raise ValueError(f"need at least one user and one resample, got {n_users} users, {resamples} resamples")
    return np.random.default_rng(seed).integers(0, n_users, size=(resamples, n_users), dtype=np.int64)


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    low, high = np.quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def _check(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or indices.ndim != 2 or len(values) == 0:
        raise ValueError(f"expected per-user values [n] and indices [B, m], got {values.shape} and {indices.shape}")
    if indices.max() >= len(values) or indices.min() < 0:
        raise ValueError(f"resample indices must lie in [0, {len(values)})")
    return values


def mean_interval(values: np.ndarray, indices: np.ndarray, level: float = DEFAULT_LEVEL) -> Interval:
    """Mean of the per-user ``values`` ``[n]`` and its percentile interval over the resamples ``indices``."""
    values = _check(values, indices)
    return Interval(float(values.mean()), *_percentiles(values[indices].mean(axis=1), level))


def paired_difference(a: np.ndarray, b: np.ndarray, indices: np.ndarray, level: float = DEFAULT_LEVEL) -> Interval:
    """``mean(a) - mean(b)`` over the same users, resampling users (paired): the interval of ``mean(a - b)``."""
    a, b = _check(a, indices), _check(b, indices)
    if a.shape != b.shape:
        raise ValueError(f"paired values must align user by user, got {a.shape} and {b.shape}")
    return mean_interval(a - b, indices, level)


def ratio_interval(a: np.ndarray, b: np.ndarray, indices: np.ndarray, level: float = DEFAULT_LEVEL) -> Interval:
    """``mean(a) / mean(b)`` over the same users; each resample's ratio of means gives the interval.

    A resample (or the full set) with ``mean(b) == 0`` gives NaN; NaN resamples are left out of the interval.
    """
    a, b = _check(a, indices), _check(b, indices)
    if a.shape != b.shape:
        raise ValueError(f"paired values must align user by user, got {a.shape} and {b.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(a.mean() / b.mean()) if b.mean() > 0 else float("nan")
        den = b[indices].mean(axis=1)
        samples = np.where(den > 0, a[indices].mean(axis=1) / np.where(den > 0, den, 1.0), np.nan)
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return Interval(value, float("nan"), float("nan"))
    return Interval(value, *_percentiles(samples, level))
