"""The trainer's view of a stretch of events: the catalogue, the user profiles and the clicks.

Impressions are kept only as per-item exposure counts: they are CTR statistics and ranking-model
data, never retrieval negatives (seed 000: items that were shown but not clicked already passed
every ranking stage, so they are not what retrieval must learn to reject).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from streaming.events import Click, Event, Impression, Item, UserProfile

__all__ = ["Clicks", "Dataset"]


@dataclass(frozen=True)
class Clicks:
    """Clicks in event-time order. ``user`` and ``item`` hold string ids; ``ts_ms`` int64 times."""

    user: np.ndarray
    item: np.ndarray
    ts_ms: np.ndarray

    def __post_init__(self) -> None:
        if not (len(self.user) == len(self.item) == len(self.ts_ms)):
            raise ValueError(
                f"clicks columns differ in length: user {len(self.user)}, item {len(self.item)}, ts_ms {len(self.ts_ms)}"
            )

    def __len__(self) -> int:
        return len(self.ts_ms)

    def select(self, mask: np.ndarray) -> Clicks:
        return Clicks(self.user[mask], self.item[mask], self.ts_ms[mask])

    @staticmethod
    def from_lists(user: list[str], item: list[str], ts_ms: list[int]) -> Clicks:
        order = np.argsort(np.asarray(ts_ms, dtype=np.int64), kind="stable")
        return Clicks(
            np.asarray(user, dtype=str)[order] if user else np.empty(0, dtype=str),
            np.asarray(item, dtype=str)[order] if item else np.empty(0, dtype=str),
            np.asarray(ts_ms, dtype=np.int64)[order],
        )


@dataclass(frozen=True)
class Dataset:
    """Catalogue + profiles (latest record per id) + clicks + per-item exposure counts."""

    items: dict[str, Item]
    users: dict[str, UserProfile]
    clicks: Clicks
    exposures: Counter[str] = field(default_factory=Counter)

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> Dataset:
        items: dict[str, Item] = {}
        users: dict[str, UserProfile] = {}
        exposures: Counter[str] = Counter()
        cu: list[str] = []
        ci: list[str] = []
        ct: list[int] = []
        for event in events:
            if isinstance(event, Click):
                cu.append(event.user_id)
                ci.append(event.item_id)
                ct.append(event.ts_ms)
            elif isinstance(event, Impression):
                exposures[event.item_id] += 1
            elif isinstance(event, Item):
                if event.item_id not in items or items[event.item_id].ts_ms <= event.ts_ms:
                    items[event.item_id] = event
            elif isinstance(event, UserProfile):
                if event.user_id not in users or users[event.user_id].ts_ms <= event.ts_ms:
                    users[event.user_id] = event
        return cls(items, users, Clicks.from_lists(cu, ci, ct), exposures)

    def between(self, start_ms: int | None = None, end_ms: int | None = None) -> Dataset:
        """Clicks with ``start_ms <= ts < end_ms``; the catalogue keeps items created before ``end_ms``."""
        ts = self.clicks.ts_ms
        mask = np.ones(len(ts), dtype=bool)
        if start_ms is not None:
            mask &= ts >= start_ms
        if end_ms is not None:
            mask &= ts < end_ms
        items = self.items if end_ms is None else {k: v for k, v in self.items.items() if v.created_ms < end_ms}
        return Dataset(items, self.users, self.clicks.select(mask), self.exposures)

    def click_counts(self) -> Counter[str]:
        return Counter(self.clicks.item.tolist())
