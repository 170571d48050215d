"""The temporal split of ``python -m trainer eval``: train on the clicks before a cut, test on the clicks after it.

Moved out of :mod:`trainer.evaluate` (which re-exports :class:`TemporalSplit` and :func:`temporal_split`); the
protocol is described there.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.dataset import Dataset
from trainer.metrics import head_items

__all__ = ["HEAD_FRACTION", "TemporalSplit", "quantile_cut", "temporal_split"]

logger = logging.getLogger(__name__)

HEAD_FRACTION = 0.2


@dataclass(frozen=True)
class TemporalSplit:
    """Train on the past, test on the next period.

    ``users`` are the warm test users (sorted) and ``relevant[i]`` the test items of ``users[i]``; ``head`` the
    head items of the training catalogue (:func:`trainer.metrics.head_items`); ``info`` describes the split for
    the JSON report.
    """

    train: Dataset
    users: list[str]
    relevant: list[set[str]]
    cut_ms: int
    head: frozenset[str]
    info: dict[str, Any]


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="seconds")


def temporal_split(
    dataset: Dataset,
    cut_ms: int,
    end_ms: int | None = None,
    rule: str = "",
    head_fraction: float = HEAD_FRACTION,
    source: dict[str, Any] | None = None,
) -> TemporalSplit:
    """Train = clicks with ``ts < cut_ms``; test = clicks with ``cut_ms <= ts < end_ms`` (``None``: to the end).

    Test pairs the user clicked in training are dropped, duplicates count once, users without a training click
    are skipped (counted in ``info``). ``rule`` (how the cut was chosen) and ``source`` (how the data was made)
    are copied into ``info`` for the report.
    """
    train = dataset.between(None, cut_ms)
    test = dataset.between(cut_ms, end_ms).clicks
    if len(train.clicks) == 0 or len(test) == 0:
        raise ValueError(
            f"cut at {_iso(cut_ms)} leaves {len(train.clicks)} training and {len(test)} test clicks; expected both > 0"
        )
    seen = set(zip(train.clicks.user.tolist(), train.clicks.item.tolist(), strict=True))
    warm = set(train.clicks.user.tolist())
    trained_items = set(train.clicks.item.tolist())
    per_user: dict[str, set[str]] = {}
    cold: dict[str, set[str]] = {}
    dropped = 0
    for user, item in set(zip(test.user.tolist(), test.item.tolist(), strict=True)):
        if (user, item) in seen:
            dropped += 1
        elif user in warm:
            per_user.setdefault(user, set()).add(item)
        else:
            cold.setdefault(user, set()).add(item)
    users = sorted(per_user)
    relevant = [per_user[u] for u in users]
    n_pairs = sum(len(r) for r in relevant)
    catalogue = set(train.items) | trained_items
    head = frozenset(head_items(train.click_counts(), catalogue, head_fraction))
    info = {
        "rule": rule,
        "cut_ms": int(cut_ms),
        "cut": _iso(cut_ms),
        "end_ms": None if end_ms is None else int(end_ms),
        "train_clicks": len(train.clicks),
        "train_users": len(warm),
        "train_items_clicked": len(trained_items),
        "catalogue_items": len(catalogue),
        "head_fraction": head_fraction,
        "head_items": len(head),
        "test_clicks": len(test),
        "test_pairs_seen_in_train_dropped": dropped,
        "test_users": len(users),
        "test_pairs": n_pairs,
        "test_pairs_new_item": sum(1 for r in relevant for i in r if i not in trained_items),
        "cold_test_users_skipped": len(cold),
        "cold_test_pairs_skipped": sum(len(r) for r in cold.values()),
        "test_pairs_head_item": sum(1 for r in relevant for i in r if i in head),
        "source": dict(source or {}),
    }
    logger.info(
        "split %s: %d train clicks, %d test users, %d test pairs (%d cold users skipped)",
        rule or _iso(cut_ms),
        len(train.clicks),
        len(users),
        n_pairs,
        len(cold),
    )
    return TemporalSplit(train, users, relevant, int(cut_ms), head, info)


def quantile_cut(dataset: Dataset, test_fraction: float) -> int:
    """The cut that holds out the latest ``test_fraction`` of the clicks: the time of the first click at or after
    the ``1 - test_fraction`` quantile, so everything from it on is test and clicks sharing a time are never split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must lie in (0, 1), got {test_fraction}")
    ts = dataset.clicks.ts_ms
    if len(ts) == 0:
        raise ValueError("no clicks to cut")
    q = 1.0 - test_fraction
    return int(ts[min(int(np.floor(q * len(ts))), len(ts) - 1)])
