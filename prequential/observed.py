"""What the harness has produced so far: every user's clicks, the catalogue, the profiles, click counts.

The harness is the only party that sees the whole stream, so it keeps its own record: the arms that run
in-process (a model version with frozen or current last-N lists, popularity, ALS) read it as of the start of
each step, and the strata (new users and items, head and tail items) are defined on it.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from streaming.events import Click, Event, Item, UserProfile

__all__ = ["Observed"]


class Observed:
    """Everything produced up to now, in the order it was produced (event time)."""

    def __init__(self, last_n: int) -> None:
        self.last_n = last_n
        self._times: dict[str, list[int]] = defaultdict(list)  # user -> click times, ascending
        self._items: dict[str, list[str]] = defaultdict(list)  # user -> clicked items, same order
        self.items: dict[str, Item] = {}  # newest catalogue record per item
        self.profiles: dict[str, UserProfile] = {}
        self.clicks = 0
        self.item_clicks: dict[str, int] = defaultdict(int)
        self.click_log: list[tuple[str, str, int]] = []  # (user, item, ts_ms) in time order
        self.first_click_ms: dict[str, int] = {}  # user -> time of their first click
        self.first_seen_ms: dict[str, int] = {}  # item -> created_ms of its first record, or its first click
        self.now_ms = 0

    def add(self, events: Sequence[Event]) -> None:
        for event in events:
            self.now_ms = max(self.now_ms, event.ts_ms)
            if isinstance(event, Click):
                self._times[event.user_id].append(event.ts_ms)
                self._items[event.user_id].append(event.item_id)
                self.item_clicks[event.item_id] += 1
                self.click_log.append((event.user_id, event.item_id, event.ts_ms))
                self.clicks += 1
                self.first_click_ms.setdefault(event.user_id, event.ts_ms)
                self.first_seen_ms.setdefault(event.item_id, event.ts_ms)
            elif isinstance(event, Item):
                self.items[event.item_id] = event
                self.first_seen_ms.setdefault(event.item_id, event.created_ms)
            elif isinstance(event, UserProfile):
                self.profiles[event.user_id] = event

    def history(self, user_id: str, before_ms: int | None = None) -> list[str]:
        """The user's last N clicked items before ``before_ms`` (None: all so far), oldest first."""
        items = self._items.get(user_id, [])
        end = len(items) if before_ms is None else bisect.bisect_left(self._times[user_id], before_ms)
        return items[max(0, end - self.last_n) : end]

    def clicked(self, user_id: str) -> set[str]:
        """Every item the user has clicked so far."""
        return set(self._items.get(user_id, ()))

    def catalogue_ids(self) -> list[str]:
        """Items a serving index would hold now: every described item and every clicked one, sorted."""
        return sorted({*self.items, *self.item_clicks})

    def head_items(self, share: float = 0.2) -> set[str]:
        """The most clicked ``share`` of the clicked items so far (ties by id)."""
        ranked = sorted(self.item_clicks, key=lambda i: (-self.item_clicks[i], i))
        return set(ranked[: max(1, int(round(share * len(ranked))))]) if ranked else set()

    def popularity(self, half_life_days: float | None, now_ms: int) -> dict[str, float]:
        """Every clicked item's count so far, each click weighted ``2 ** (-age / half_life)`` when that is set."""
        if half_life_days is None:
            return {item: float(n) for item, n in self.item_clicks.items()}
        items = np.array([i for _, i, _ in self.click_log], dtype=object)
        ts = np.fromiter((t for _, _, t in self.click_log), dtype=np.float64, count=len(self.click_log))
        weight = np.exp2(-((now_ms - ts) / 86_400_000.0) / half_life_days)
        ids, inverse = np.unique(items.astype(str), return_inverse=True)
        return dict(zip(ids.tolist(), np.bincount(inverse, weights=weight).tolist(), strict=True))
