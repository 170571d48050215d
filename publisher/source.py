"""Where the publisher pulls changed rows from: the :class:`ChangeSource` protocol and in-memory sources.

The streaming learner implements :class:`ChangeSource` on its own state; the publisher stores the
returned cursor in the same batch as the data, so after a crash it asks again from the last
published cursor and never skips or double-publishes a change. New catalogue items arrive here
already carrying their item-tower vector (computed from their features by the source), so they
are retrievable from the next publish on.

:class:`MemorySource` holds rows in memory (tests, benchmarks); :class:`RandomWalk` drives one
with synthetic users whose vectors wander, for ``python -m publisher simulate``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["ChangeSource", "Changes", "MemorySource", "RandomWalk", "RowSource"]


@dataclass(frozen=True)
class Changes:
    """Rows changed after a cursor. ``users: {id: (vector [d], last_n)}``, ``items: {id: vector [d]}``.

    ``cursor`` is opaque to the publisher: it is stored with the publish and handed back next time.
    ``watermark_ms`` is the newest event time reflected in the source's state up to ``cursor``.
    """

    cursor: str
    watermark_ms: int
    users: Mapping[str, tuple[np.ndarray, tuple[str, ...]]]
    items: Mapping[str, np.ndarray]
    model_version: str
    removed_users: frozenset[str] = frozenset()
    removed_items: frozenset[str] = frozenset()

    def has_rows(self) -> bool:
        return bool(self.users or self.items or self.removed_users or self.removed_items)


@runtime_checkable
class ChangeSource(Protocol):
    """Anything the publisher can pull changes from."""

    def changes_since(self, cursor: str) -> Changes:
        """Every row changed after ``cursor`` ("" = from the beginning), with its latest value."""
        ...


@runtime_checkable
class RowSource(Protocol):
    """A source that can give the row of any id under a model: what a model switch needs (:mod:`publisher.publish`).

    After the model changes, every published row belongs to the old model, including rows of ids the source no
    longer tracks (a user the learner forgot). The publisher asks for those here and writes them in the same
    version as the switch, so readers never see rows of two models at once. A source without this capability
    gets such rows removed instead.
    """

    def rows_for(
        self, model_version: str, users: Sequence[str], items: Sequence[str]
    ) -> tuple[Mapping[str, tuple[np.ndarray, tuple[str, ...]]], Mapping[str, np.ndarray]]:
        """Rows of ``users`` and ``items`` as the source would publish them under ``model_version``; raises if that
        is no longer the source's model."""
        ...


class MemorySource:
    """A thread-safe :class:`ChangeSource` over rows put into it.

    Cursors are ``"<instance>:<sequence>"``; a cursor from another instance (a store written
    before a restart) gets every row this instance holds, since all of it is new to that store.
    """

    def __init__(self, model_version: str = "m0") -> None:
        self._lock = threading.Lock()
        self._instance = uuid.uuid4().hex[:12]
        self._seq = 0
        self._watermark_ms = 0
        self._model_version = model_version
        # id -> (sequence of the last change, vector or None when removed, last_n)
        self._users: dict[str, tuple[int, np.ndarray | None, tuple[str, ...]]] = {}
        self._items: dict[str, tuple[int, np.ndarray | None]] = {}

    def _tick(self, event_ms: int | None) -> int:
        self._seq += 1
        ts = int(time.time() * 1000) if event_ms is None else int(event_ms)
        self._watermark_ms = max(self._watermark_ms, ts)
        return self._seq

    def put_user(
        self, user_id: str, vector: np.ndarray, last_n: Sequence[str] = (), event_ms: int | None = None
    ) -> int:
        """Set a user's row as of an event at ``event_ms`` (default now); returns the change's sequence."""
        v = np.array(vector, dtype=np.float32)
        with self._lock:
            seq = self._tick(event_ms)
            self._users[user_id] = (seq, v, tuple(last_n))
            return seq

    def put_item(self, item_id: str, vector: np.ndarray, event_ms: int | None = None) -> int:
        v = np.array(vector, dtype=np.float32)
        with self._lock:
            seq = self._tick(event_ms)
            self._items[item_id] = (seq, v)
            return seq

    def remove_user(self, user_id: str, event_ms: int | None = None) -> int:
        with self._lock:
            seq = self._tick(event_ms)
            self._users[user_id] = (seq, None, ())
            return seq

    def remove_item(self, item_id: str, event_ms: int | None = None) -> int:
        with self._lock:
            seq = self._tick(event_ms)
            self._items[item_id] = (seq, None)
            return seq

    def set_model_version(self, model_version: str) -> None:
        with self._lock:
            self._model_version = model_version

    @property
    def sequence(self) -> int:
        """The sequence of the newest change."""
        with self._lock:
            return self._seq

    def cursor_sequence(self, cursor: str) -> int:
        """The sequence a cursor of this instance stands for (-1 for another instance's cursor)."""
        instance, _, seq = cursor.partition(":")
        return int(seq) if instance == self._instance else -1

    def changes_since(self, cursor: str) -> Changes:
        after = max(self.cursor_sequence(cursor), 0) if cursor else 0
        with self._lock:
            users = {k: (v, last) for k, (s, v, last) in self._users.items() if s > after and v is not None}
            gone_users = frozenset(k for k, (s, v, _) in self._users.items() if s > after and v is None)
            items = {k: v for k, (s, v) in self._items.items() if s > after and v is not None}
            gone_items = frozenset(k for k, (s, v) in self._items.items() if s > after and v is None)
            return Changes(
                cursor=f"{self._instance}:{self._seq}",
                watermark_ms=self._watermark_ms,
                users=users,
                items=items,
                model_version=self._model_version,
                removed_users=gone_users,
                removed_items=gone_items,
            )


class RandomWalk:
    """Synthetic learner output: users whose unit vectors take small random steps, a growing catalogue.

    Each :meth:`step` moves ``users_per_step`` random users (event time = now), each step a
    Gaussian perturbation of size ``step_size`` then re-normalised, and updates their last-N with
    a random item; new items (vector straight from a random "item tower") appear at ``new_item_rate``
    per step on average.
    """

    def __init__(
        self,
        source: MemorySource,
        *,
        users: int = 1000,
        items: int = 1000,
        dim: int = 32,
        last_n: int = 10,
        step_size: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.dim = dim
        self.last_n = last_n
        self.step_size = step_size
        self._rng = np.random.default_rng(seed)
        self._users = self._unit(self._rng.standard_normal((users, dim)))
        self._history: list[list[str]] = [[] for _ in range(users)]
        self._n_items = 0
        for u in range(users):
            source.put_user(f"u{u}", self._users[u])
        self.add_items(items)

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    def add_items(self, n: int) -> None:
        vectors = self._unit(self._rng.standard_normal((n, self.dim)))
        for v in vectors:
            self.source.put_item(f"i{self._n_items}", v)
            self._n_items += 1

    def step(self, users_per_step: int, new_item_rate: float = 0.0) -> None:
        chosen = self._rng.integers(0, len(self._users), size=users_per_step)
        moved = self._unit(self._users[chosen] + self.step_size * self._rng.standard_normal((len(chosen), self.dim)))
        for u, v in zip(chosen.tolist(), moved, strict=True):
            self._users[u] = v
            history = self._history[u]
            history.append(f"i{int(self._rng.integers(0, self._n_items))}")
            del history[: -self.last_n]
            self.source.put_user(f"u{u}", v, history)
        new_items = int(self._rng.poisson(new_item_rate)) if new_item_rate > 0 else 0
        if new_items:
            self.add_items(new_items)

    def run(
        self, stop: threading.Event, updates_per_s: float, new_items_per_s: float = 0.0, tick_s: float = 0.05
    ) -> None:
        """Step every ``tick_s`` until ``stop`` is set, at about ``updates_per_s`` user updates per second."""
        carry = 0.0
        while not stop.wait(tick_s):
            carry += updates_per_s * tick_s
            n, carry = int(carry), carry - int(carry)
            if n or new_items_per_s:
                self.step(n, new_items_per_s * tick_s)
