"""Per-event hits, HitRate@K by arm and stratum, and paired differences with bootstrap intervals by user.

Every scored click is one row: its user, item, time, step, strata and, for each arm, the rank of the clicked
item in that arm's list (-1 when it is not in the list). ``HitRate@K`` is the share of rows with
``0 <= rank < K``. Differences between two arms are paired: the same rows under both.

Intervals resample **users**, not events (a user's clicks are not independent; one heavy user would
otherwise narrow the interval): each replicate draws as many users as there are, with replacement, and takes
the event-weighted mean over the drawn users' rows, i.e. ``sum of the drawn users' hit sums / sum of their
event counts`` (:func:`trainer.intervals.ratio_interval` of the per-user sums and counts). The 95% interval
is the 2.5th and 97.5th percentile of the replicates (numpy's linear interpolation). ``draws`` can be given
explicitly, which is how the tests check it by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainer.intervals import bootstrap_indices, ratio_interval

__all__ = ["Scored", "Interval", "hit_rate", "paired_difference", "rate_interval", "STRATA"]

# name -> (column, value): the rows a stratum keeps.
STRATA: dict[str, tuple[str, bool]] = {
    "all": ("", True),
    "new user": ("new_user", True),
    "known user": ("new_user", False),
    "new item": ("new_item", True),
    "known item": ("new_item", False),
    "head item": ("head_item", True),
    "tail item": ("head_item", False),
}


@dataclass
class Scored:
    """The scored clicks as columns (numpy arrays of equal length) and each arm's ranks."""

    user: np.ndarray  # str
    item: np.ndarray  # str
    ts_ms: np.ndarray  # int64
    step: np.ndarray  # int64
    new_user: np.ndarray  # bool: no click before the serving nightly version's data cutoff
    new_item: np.ndarray  # bool: first seen after that cutoff
    head_item: np.ndarray  # bool: among the most clicked 20% of items before the step
    ranks: dict[str, np.ndarray]  # arm -> int64 rank, -1 = not in its list

    def __len__(self) -> int:
        return len(self.user)

    def mask(self, stratum: str) -> np.ndarray:
        column, value = STRATA[stratum]
        if not column:
            return np.ones(len(self), dtype=bool)
        return getattr(self, column) == value

    def hits(self, arm: str, k: int) -> np.ndarray:
        ranks = self.ranks[arm]
        return (ranks >= 0) & (ranks < k)

    def subset(self, keep: np.ndarray) -> Scored:
        return Scored(
            **{
                name: getattr(self, name)[keep]
                for name in ("user", "item", "ts_ms", "step", "new_user", "new_item", "head_item")
            },
            ranks={arm: r[keep] for arm, r in self.ranks.items()},
        )

    @classmethod
    def from_rows(cls, rows: Sequence[dict], arms: Sequence[str]) -> Scored:
        def col(name: str, dtype: object) -> np.ndarray:
            return np.array([r[name] for r in rows], dtype=dtype)

        return cls(
            user=col("user", object),
            item=col("item", object),
            ts_ms=col("ts_ms", np.int64),
            step=col("step", np.int64),
            new_user=col("new_user", bool),
            new_item=col("new_item", bool),
            head_item=col("head_item", bool),
            ranks={a: np.array([r["ranks"][a] for r in rows], dtype=np.int64) for a in arms},
        )


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    n: int  # events
    users: int

    def __str__(self) -> str:
        return f"{self.value:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def hit_rate(scored: Scored, arm: str, k: int) -> float:
    return float(scored.hits(arm, k).mean()) if len(scored) else float("nan")


def _by_user(users: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user (sorted by id): the sum of ``values`` and the number of events."""
    _, inverse = np.unique(users.astype(str), return_inverse=True)
    sums = np.bincount(inverse, weights=values.astype(np.float64))
    counts = np.bincount(inverse).astype(np.float64)
    return sums, counts


def _event_weighted(
    users: np.ndarray, values: np.ndarray, replicates: int, seed: int, draws: np.ndarray | None
) -> Interval:
    """The mean of ``values`` over events and its interval resampling users: per resample, the drawn users'
    sum over their event count, i.e. the ratio of the per-user means of sums and counts."""
    if not len(values):
        return Interval(float("nan"), float("nan"), float("nan"), 0, 0)
    sums, counts = _by_user(users, values)
    if draws is None:
        draws = bootstrap_indices(len(sums), replicates, seed)
    ratio = ratio_interval(sums, counts, draws)
    return Interval(ratio.value, ratio.low, ratio.high, len(values), len(sums))


def paired_difference(
    scored: Scored,
    arm: str,
    baseline: str,
    k: int,
    *,
    replicates: int = 1000,
    seed: int = 0,
    draws: np.ndarray | None = None,
) -> Interval:
    """HitRate@k of ``arm`` minus that of ``baseline`` on the same events, with a 95% bootstrap interval by user."""
    diff = scored.hits(arm, k).astype(np.float64) - scored.hits(baseline, k).astype(np.float64)
    return _event_weighted(scored.user, diff, replicates, seed, draws)


def rate_interval(
    scored: Scored, arm: str, k: int, *, replicates: int = 1000, seed: int = 0, draws: np.ndarray | None = None
) -> Interval:
    """HitRate@k of ``arm`` with a 95% bootstrap interval by user."""
    return _event_weighted(scored.user, scored.hits(arm, k).astype(np.float64), replicates, seed, draws)
