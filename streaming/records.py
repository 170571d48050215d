"""Catalogue records and user profiles kept in RocksDB, read through a bounded in-memory cache.

The worker needs the item record of every clicked item and the profile of every clicking user, for the towers'
features. Holding every record it has ever seen in memory grows with the user base (a profile is a few hundred
bytes; millions of users are gigabytes). :class:`RecordStore` keeps them where they are durable anyway, in the
worker's :class:`~streaming.state.StateStore` under one key prefix, and holds at most ``capacity`` of them in a
least-recently-used cache. A lookup sees this process's own writes of the current, not yet checkpointed batch
(:meth:`StateStore.lookup`); when staged changes are dropped (:meth:`StateStore.discard`) the cache is too.

It is a read-only :class:`~collections.abc.Mapping` from id to record for the feature encoder; iterating over it
or taking its length reads every key under the prefix (for tests and tools, not for the hot path).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from streaming.events import InvalidEvent, Item, Limits, UserProfile, decode, encode
from streaming.state import StateStore

__all__ = ["RecordStore"]

logger = logging.getLogger(__name__)

R = TypeVar("R", Item, UserProfile)
# State records were validated when they arrived; re-reading them must not apply the wall-clock checks.
_NO_LIMITS = Limits(max_bytes=1 << 30, max_future_ms=1 << 62)
_ABSENT = object()


class RecordStore(Mapping[str, R], Generic[R]):
    """Records of one type under ``prefix`` in ``state``, id -> record, with an LRU cache of ``capacity``."""

    def __init__(self, state: StateStore, prefix: bytes, kind: type[R], capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._state = state
        self._prefix = prefix
        self._kind = kind
        self.capacity = capacity
        self._cache: OrderedDict[str, R | None] = OrderedDict()
        self._discards = state.discards

    def put(self, ident: str, record: R) -> None:
        """Stage ``record`` (durable with the next checkpoint) and cache it."""
        self._state.put(self._prefix + ident.encode(), encode(record))
        self._remember(ident, record)

    def _remember(self, ident: str, record: R | None) -> None:
        self._cache[ident] = record
        self._cache.move_to_end(ident)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)

    def get(self, ident: str, default: R | None = None) -> R | None:  # type: ignore[override]
        """The record of ``ident``, or ``default``; the encoder's hot path (no exception for a miss)."""
        if self._state.discards != self._discards:  # staged records the cache may hold are gone
            self._cache.clear()
            self._discards = self._state.discards
        record = self._cache.get(ident, _ABSENT)
        if record is _ABSENT:
            raw = self._state.lookup(self._prefix + ident.encode())
            record = self._decode(raw) if raw is not None else None
            self._remember(ident, record)  # misses too: unknown ids are asked for again and again
        else:
            self._cache.move_to_end(ident)
        return default if record is None else record  # type: ignore[return-value]

    def __getitem__(self, ident: str) -> R:
        record = self.get(ident)
        if record is None:
            raise KeyError(ident)
        return record

    def __contains__(self, ident: object) -> bool:
        return isinstance(ident, str) and self.get(ident) is not None

    def _decode(self, raw: bytes) -> R | None:
        try:
            event = decode(raw, _NO_LIMITS)
        except InvalidEvent:  # written by this process from a validated event; only a bug gets here
            logger.exception("unreadable %s record in the worker state; default features", self._kind.__name__)
            return None
        return event if isinstance(event, self._kind) else None

    def __iter__(self) -> Iterator[str]:
        start = len(self._prefix)
        return iter(sorted(key[start:].decode() for key in self._state.keys_with(self._prefix)))

    def __len__(self) -> int:
        return len(self._state.keys_with(self._prefix))

    @property
    def cached(self) -> int:
        """Records (and known misses) held in memory now."""
        return len(self._cache)
