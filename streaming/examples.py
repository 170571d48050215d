"""From events to training examples: the impression-click join, de-duplication, last-N, counters.

A click is a positive example ``(user, its last-N clicks before this one, item)``. Impressions are
joined to clicks by ``(request_id, item_id)`` within ``join_window_ms`` of event time: the join
gives the click its slate position and lets the builder drop a click delivered twice. Impressions
themselves only count exposures: an item that was shown and not clicked has already passed every
ranking stage, so it is not a retrieval negative (DESIGN.md, seed 000).

The builder also keeps what the learner and the sampler need: per-user last-N clicked items,
per-item click and exposure counts, the catalogue and the user profiles. All of it is staged in
the worker's :class:`~streaming.state.StateStore` and becomes durable with the next checkpoint; the
catalogue and the profiles are read back through a bounded cache (:class:`~streaming.records.RecordStore`)
rather than all held in memory.

A user's last-N list lives apart from the user's ID row (:mod:`streaming.tables`): the row expires after a few
days idle, the list only after ``last_n_idle_ms`` without a click (30 days by default), and past
``max_last_n_users`` lists the least recently active go first. So a user who comes back after a week trains with
the history the publisher serves for them (both read this list; a model switch keeps it too), not with an empty
one. A list's activity time is the builder's watermark at the user's last click (monotone in stream order, so
expiry pops the oldest first and a replay after a crash expires the very same lists); it is kept under
``na:<user>``. A checkpoint written before lists had their own expiry has none: its lists count as active at its
watermark.
"""

from __future__ import annotations

import itertools
import json
import logging
import struct
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from streaming.events import Click, Event, Impression, Item, UserProfile
from streaming.records import RecordStore
from streaming.state import StateStore

__all__ = ["Example", "ExampleBuilder", "ExampleSettings"]

logger = logging.getLogger(__name__)

_COUNT = struct.Struct("<q")
_JOIN = struct.Struct("<qq")  # position (-1: a click's marker), ts_ms


@dataclass(frozen=True)
class ExampleSettings:
    """``record_cache``: catalogue records, and separately user profiles, held in memory (the rest are read
    from RocksDB when a batch needs them). ``last_n_idle_ms``: a user's last-N list is dropped after that long
    (event time) without a click; ``max_last_n_users``: the most lists kept, the least recently active dropped
    first (module docstring)."""

    last_n: int = 20
    join_window_ms: int = 30 * 60 * 1000
    record_cache: int = 100_000
    last_n_idle_ms: int = 30 * 24 * 3600 * 1000
    max_last_n_users: int = 2_000_000

    def __post_init__(self) -> None:
        if self.last_n_idle_ms <= 0 or self.max_last_n_users < 1:
            raise ValueError(
                f"last_n_idle_ms must be > 0 and max_last_n_users >= 1, got {self.last_n_idle_ms} and "
                f"{self.max_last_n_users}"
            )


@dataclass(frozen=True, slots=True)
class Example:
    """One positive: ``history`` is the user's clicked items before this click, oldest first. ``replay``: a click
    the stream's statistics have counted already, learnt again by a newly switched model (SGD only)."""

    user_id: str
    item_id: str
    ts_ms: int
    history: tuple[str, ...]
    position: int | None
    replay: bool = False


@dataclass
class BuilderStats:
    clicks: int = 0
    duplicates: int = 0
    unjoined: int = 0
    impressions: int = 0
    late: int = 0


class ExampleBuilder:
    """``scoped``: the worker shares its partitions with others (``user_state = "changelog"``). Counters that are not
    one user's (per-item clicks and exposures, :class:`BuilderStats`) are then kept per event partition, under
    ``c@<p>:<item>``, ``e@<p>:<item>`` and ``s@<p>``, so that each moves with its partition; the caller names the
    partition of each event in :attr:`partition` before :meth:`add`. ``clicks``, ``exposures`` and ``stats`` are
    the totals over the partitions held."""

    def __init__(self, settings: ExampleSettings, state: StateStore, *, scoped: bool = False) -> None:
        self.settings = settings
        self.stats = BuilderStats()
        self._state = state
        self.scoped = scoped
        self.partition = 0  # scoped: the event partition of the event being added
        self.partition_stats: dict[int, BuilderStats] = {}
        self.watermarks: dict[int, int] = {}  # scoped: event time per partition (w@<p>)
        self._partition_counts: dict[bytes, dict[int, dict[str, int]]] = {b"c": {}, b"e": {}}
        self.watermark_ms = 0
        self.last_n: dict[str, list[str]] = {}
        # user -> watermark at the user's last click, least recently active first (expiry pops from the front)
        self._active: dict[str, int] = {}
        self.clicks: dict[str, int] = {}
        self.exposures: dict[str, int] = {}
        self.catalogue: RecordStore[Item] = RecordStore(state, b"cat:", Item, settings.record_cache)
        self.profiles: RecordStore[UserProfile] = RecordStore(state, b"prof:", UserProfile, settings.record_cache)
        self._impressions: dict[str, tuple[int, int]] = {}  # "request\titem" -> (position, ts)
        self._clicked: dict[str, tuple[int, int]] = {}
        self.changed_users: set[str] = set()  # last-N changed since the caller last cleared it
        self.changed_items: set[str] = set()  # catalogue record changed since the caller last cleared it
        self._load()

    # ------------------------------------------------------------------ events
    def add(self, event: Event) -> Example | None:
        """Apply one event in stream order; a click returns its example (``None`` for a duplicate)."""
        if self.scoped:
            self._advance(event)
        elif event.ts_ms > self.watermark_ms:
            self.watermark_ms = event.ts_ms
        elif event.ts_ms < self.watermark_ms - self.settings.join_window_ms:
            self._tally("late")
        if isinstance(event, Click):
            return self._click(event)
        if isinstance(event, Impression):
            self._impression(event)
        elif isinstance(event, Item):
            self.catalogue.put(event.item_id, event)
            self.changed_items.add(event.item_id)
        elif isinstance(event, UserProfile):
            self.profiles.put(event.user_id, event)
        return None

    def _advance(self, event: Event) -> None:
        """Scoped: event time per partition. Partitions held by different workers do not move together in event time
        (one may be replayed from a backlog while another is live), so lateness, activity times and expiry follow
        each partition's own watermark, as one worker's merge of all partitions keeps them together."""
        if isinstance(event, Item):  # every worker reads the whole catalogue: not a partition's event
            self.watermark_ms = max(self.watermark_ms, event.ts_ms)
            return
        mark = self.watermarks.get(self.partition, 0)
        if event.ts_ms > mark:
            self.watermarks[self.partition] = event.ts_ms
            self._state.put(b"w@%d" % self.partition, _COUNT.pack(event.ts_ms))
            self.watermark_ms = max(self.watermark_ms, event.ts_ms)
        elif event.ts_ms < mark - self.settings.join_window_ms:
            self._tally("late")

    @property
    def expiry_ms(self) -> int:
        """The event time expiry compares with: the watermark, or (scoped) the least advanced partition's."""
        if self.scoped and self.watermarks:
            return min(self.watermarks.values())
        return self.watermark_ms

    def _activity_ms(self) -> int:
        return self.watermarks.get(self.partition, 0) if self.scoped else self.watermark_ms

    def remember(self, event: Click) -> None:
        """A click from before the model's cutoff, read by a new worker only to fill the user's last-N list: the
        model has learnt it, so it makes no example and counts nowhere (no join state, no click counter)."""
        if self.scoped:
            self._advance(event)
        else:
            self.watermark_ms = max(self.watermark_ms, event.ts_ms)
        self._extend(event.user_id, event.item_id)

    def _extend(self, user_id: str, item_id: str) -> list[str]:
        """Append ``item_id`` to the user's last-N list (and its activity); returns the list as it was."""
        before = self.last_n.get(user_id, [])
        # Interned: lists are kept for weeks, and a hot item's id is in many of them.
        history = [*before, sys.intern(item_id)][-self.settings.last_n :]
        self.last_n[user_id] = history
        self._state.put(b"n:" + user_id.encode(), json.dumps(history).encode())
        self._active.pop(user_id, None)
        self._active[user_id] = self._activity_ms()
        self._state.put(b"na:" + user_id.encode(), _COUNT.pack(self._active[user_id]))
        self.changed_users.add(user_id)
        return before

    def _tally(self, name: str) -> None:
        setattr(self.stats, name, getattr(self.stats, name) + 1)
        if self.scoped:
            scoped = self.partition_stats.setdefault(self.partition, BuilderStats())
            setattr(scoped, name, getattr(scoped, name) + 1)

    def _impression(self, event: Impression) -> None:
        # The user first: every key of a user's state names the user, so it can follow the user's partition.
        key = f"{event.user_id}\t{event.request_id}\t{event.item_id}"
        if key in self._impressions:
            return  # the same slate entry delivered twice: count the exposure once
        self._impressions[key] = (event.position, event.ts_ms)
        self._state.put(b"j:" + key.encode(), _JOIN.pack(event.position, event.ts_ms))
        self._tally("impressions")
        self._bump(self.exposures, b"e", event.item_id)

    def _click(self, event: Click) -> Example | None:
        key = f"{event.user_id}\t{event.request_id}\t{event.item_id}"
        if key in self._clicked:
            self._tally("duplicates")
            return None
        self._clicked[key] = (-1, event.ts_ms)
        self._state.put(b"k:" + key.encode(), _JOIN.pack(-1, event.ts_ms))
        joined = self._impressions.get(key)
        if joined is None:
            self._tally("unjoined")
        self._tally("clicks")
        history = self._extend(event.user_id, event.item_id)
        example = Example(event.user_id, event.item_id, event.ts_ms, tuple(history), joined[0] if joined else None)
        self._bump(self.clicks, b"c", event.item_id)
        return example

    def _bump(self, counts: dict[str, int], kind: bytes, item_id: str) -> None:
        counts[item_id] = counts.get(item_id, 0) + 1
        if not self.scoped:
            self._state.put(kind + b":" + item_id.encode(), _COUNT.pack(counts[item_id]))
            return
        scoped = self._partition_counts[kind].setdefault(self.partition, {})
        scoped[item_id] = scoped.get(item_id, 0) + 1
        self._state.put(b"%s@%d:%s" % (kind, self.partition, item_id.encode()), _COUNT.pack(scoped[item_id]))

    def flush(self) -> None:
        """Stage the per-partition counters (scoped) for the next checkpoint."""
        for partition, stats in self.partition_stats.items():
            self._state.put(b"s@%d" % partition, json.dumps(asdict(stats), sort_keys=True).encode())

    def expire(self) -> None:
        """Forget join and de-duplication entries older than the window (behind the watermark), and the last-N lists
        idle for ``last_n_idle_ms`` or beyond the ``max_last_n_users`` most recently active."""
        self._expire_lists()
        cutoff = self.expiry_ms - self.settings.join_window_ms
        for window, prefix in ((self._impressions, b"j:"), (self._clicked, b"k:")):
            while window:
                key = next(iter(window))
                if window[key][1] >= cutoff:
                    break
                del window[key]
                self._state.delete(prefix + key.encode())

    def _expire_lists(self) -> None:
        cutoff = self.expiry_ms - self.settings.last_n_idle_ms
        dropped = 0
        while self._active:
            user, at = next(iter(self._active.items()))
            if at >= cutoff:
                break
            self._drop_list(user)
            dropped += 1
        excess = len(self._active) - self.settings.max_last_n_users
        if excess > 0:
            # The oldest first; among lists active at the same time, by user id (the order a reload sorts them in).
            last = next(itertools.islice(self._active.values(), excess - 1, None))
            front = list(itertools.takewhile(lambda e: e[1] <= last, self._active.items()))
            older = [u for u, t in front if t < last]
            ties = sorted(u for u, t in front if t == last)
            for user in older + ties[: excess - len(older)]:
                self._drop_list(user)
            dropped += excess
        if dropped:
            logger.debug("dropped the last-N lists of %d users", dropped)

    def _drop_list(self, user_id: str) -> None:
        del self._active[user_id]
        self.last_n.pop(user_id, None)
        self._state.delete(b"n:" + user_id.encode())
        self._state.delete(b"na:" + user_id.encode())
        self.changed_users.add(user_id)

    # ------------------------------------------------------------------ durability
    def _load(self) -> None:
        meta = self._state.meta()
        self.watermark_ms = int(meta.get("watermark_ms", 0))
        self.stats = BuilderStats(**meta.get("builder", {}))
        for key, value in self._state.scan(b"n:"):
            self.last_n[key[2:].decode()] = [sys.intern(i) for i in json.loads(value)]
        active = {key[3:].decode(): _COUNT.unpack(value)[0] for key, value in self._state.scan(b"na:")}
        # A list from a checkpoint that kept no activity times counts as active at its watermark.
        order = sorted((active.get(u, self.watermark_ms), u) for u in self.last_n)
        self._active = {u: t for t, u in order}
        if self.scoped:
            self._load_scoped()
        for counts, prefix in ((self.clicks, b"c:"), (self.exposures, b"e:")):
            for key, value in self._state.scan(prefix):
                counts[key[2:].decode()] = _COUNT.unpack(value)[0]
        windows = []
        for window, prefix in ((self._impressions, b"j:"), (self._clicked, b"k:")):
            entries = [(key[2:].decode(), _JOIN.unpack(value)) for key, value in self._state.scan(prefix)]
            entries.sort(key=lambda e: (e[1][1], e[0]))  # back into event-time order for expiry
            window.update(entries)
            windows.append(len(entries))
        logger.info(
            "examples state: %d users with history, %d items counted, join window %s",
            len(self.last_n),
            len(self.clicks),
            windows,
        )

    def _load_scoped(self) -> None:
        """Totals over the partitions held, from their per-partition counters."""
        self.stats = BuilderStats()
        self.watermarks = {int(key[2:]): _COUNT.unpack(value)[0] for key, value in self._state.scan(b"w@")}
        for key, value in self._state.scan(b"s@"):
            stats = self.partition_stats[int(key[2:])] = BuilderStats(**json.loads(value))
            for name, count in asdict(stats).items():
                setattr(self.stats, name, getattr(self.stats, name) + count)
        for kind, totals in ((b"c", self.clicks), (b"e", self.exposures)):
            for key, value in self._state.scan(kind + b"@"):
                partition, _, item = key[2:].decode().partition(":")
                count = _COUNT.unpack(value)[0]
                self._partition_counts[kind].setdefault(int(partition), {})[item] = count
                totals[item] = totals.get(item, 0) + count

    def counts(self) -> Mapping[str, int]:
        return self.clicks
