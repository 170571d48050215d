"""Dynamic ID-embedding tables for the online learner: admission, row-wise Adagrad, expiry, a size bound.

The nightly model has a fixed table per tower (its vocabulary). The stream brings ids that table
never saw, and ids it saw keep moving. An :class:`EmbeddingTable` overlays online rows on the
model's table:

* an id the model knows gets an online row on first use, copied from its model row;
* an id the model does not know uses the model's default row (row 0) until it has been seen
  ``min_count`` times (admission: one-off ids, bots and typos never take memory), then gets an
  online row starting from that default;
* rows are trained with row-wise Adagrad (one accumulator per row, as in large sparse systems: a
  full per-coordinate accumulator doubles memory for little gain on embeddings);
* a row not used for ``idle_ms`` of event time expires (its id falls back to the model row), and
  past ``max_rows`` the least recently used rows are evicted, so memory is bounded whatever the
  stream brings. (A user's last-N list is not the row's: it outlives it, :mod:`streaming.examples`.)

Rows live in preallocated numpy arrays (gather/scatter are vectorised) and are made durable by the
worker's checkpoint through :class:`~streaming.state.StateStore` under ``prefix``.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

import numpy as np

from streaming.state import StateStore

__all__ = ["ROW_HEADER", "EmbeddingTable", "TableSettings"]

logger = logging.getLogger(__name__)

ROW_HEADER = struct.Struct("<qqf")  # last_seen_ms, updates, accumulator


@dataclass(frozen=True)
class TableSettings:
    """``lr``: Adagrad step; ``initial_accumulator``: Adagrad's starting sum of squares."""

    min_count: int = 2
    idle_ms: int = 3 * 24 * 3600 * 1000
    max_rows: int = 1_000_000
    max_pending: int = 1_000_000
    lr: float = 0.05
    initial_accumulator: float = 0.1

    def __post_init__(self) -> None:
        if self.min_count < 1 or self.max_rows < 1 or self.max_pending < 1 or self.idle_ms <= 0 or self.lr <= 0:
            raise ValueError(f"invalid table settings: {self}")


class EmbeddingTable:
    """Online rows over a base table. ``base``: ``[V, d]`` float32 model rows; ``index``: id -> base row (0 = unknown)."""

    def __init__(
        self, name: str, base: np.ndarray, index: dict[str, int], settings: TableSettings, state: StateStore
    ) -> None:
        self.name = name
        self.settings = settings
        self._base = np.ascontiguousarray(base, dtype=np.float32)
        self._index = index
        self._state = state
        self._prefix = f"t:{name}:".encode()
        self._pending_prefix = f"p:{name}:".encode()
        dim = self._base.shape[1]
        capacity = min(settings.max_rows, 1024)
        self._vectors = np.zeros((capacity, dim), dtype=np.float32)
        self._accum = np.zeros(capacity, dtype=np.float32)
        self._last_seen = np.zeros(capacity, dtype=np.int64)
        self._updates = np.zeros(capacity, dtype=np.int64)
        self._slot: dict[str, int] = {}
        self._ident: list[str | None] = [None] * capacity  # slot -> id
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._pending: dict[str, list[int]] = {}  # id -> [count, last_seen_ms]
        self._dirty: set[str] = set()
        self._dirty_pending: set[str] = set()
        self._deleted: set[str] = set()
        self.changed: set[str] = set()  # rows written or removed since the caller last cleared it
        self.peak_rows = 0  # the most online rows held at once since this process started
        self._load()

    @property
    def dim(self) -> int:
        return self._base.shape[1]

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, ident: str) -> bool:
        return ident in self._slot

    def ids(self) -> list[str]:
        """The ids with an online row, sorted."""
        return sorted(self._slot)

    @property
    def pending_ids(self) -> int:
        return len(self._pending)

    def row(self, ident: str) -> np.ndarray:
        """The vector the model uses for ``ident`` now: online row, else model row, else the default row."""
        slot = self._slot.get(ident)
        if slot is not None:
            return self._vectors[slot].copy()
        return self._base[self._index.get(ident, 0)].copy()

    # ------------------------------------------------------------------ learning
    def observe(self, ids: list[str], ts_ms: int) -> None:
        """Count one use of each id (admission) and refresh its last-seen time."""
        for ident in ids:
            slot = self._slot.get(ident)
            if slot is not None:
                self._last_seen[slot] = max(self._last_seen[slot], ts_ms)
                continue
            if ident in self._index:
                self._admit(ident, self._base[self._index[ident]], ts_ms)
                continue
            entry = self._pending.setdefault(ident, [0, ts_ms])
            entry[0] += 1
            entry[1] = max(entry[1], ts_ms)
            self._dirty_pending.add(ident)
            if entry[0] >= self.settings.min_count:
                del self._pending[ident]
                self._admit(ident, self._base[0], ts_ms)
        if len(self._pending) > self.settings.max_pending:
            self._trim_pending()

    def gather(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``([n, d] vectors, [n] slots)``; slot -1 marks ids without an online row (not trainable)."""
        slots = np.fromiter((self._slot.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        base_rows = np.fromiter((self._index.get(i, 0) for i in ids), dtype=np.int64, count=len(ids))
        vectors = self._base[base_rows]
        online = slots >= 0
        vectors[online] = self._vectors[slots[online]]
        return vectors, slots

    def apply_gradients(self, slots: np.ndarray, grads: np.ndarray) -> None:
        """Row-wise Adagrad on online rows. ``slots``: ``[n]`` (-1 ignored, repeats summed); ``grads``: ``[n, d]``."""
        keep = slots >= 0
        slots, grads = slots[keep], grads[keep]
        if len(slots) == 0:
            return
        unique, inverse = np.unique(slots, return_inverse=True)
        summed = np.zeros((len(unique), self.dim), dtype=np.float64)
        np.add.at(summed, inverse, grads)
        # Row-wise Adagrad (Duchi et al. 2011, one accumulator per row): G += mean(g^2); w -= lr * g / sqrt(G).
        self._accum[unique] += np.mean(summed**2, axis=1).astype(np.float32)
        step = self.settings.lr / np.sqrt(self._accum[unique].astype(np.float64))
        self._vectors[unique] -= (step[:, None] * summed).astype(np.float32)
        self._updates[unique] += 1
        ids = [self._ident[s] for s in unique.tolist()]
        self._dirty.update(ids)
        self.changed.update(ids)

    def put_row(self, ident: str, header_and_vector: bytes) -> None:
        """Take a row as another process made it (``ROW_HEADER`` + float32 vector, the record :meth:`flush`
        writes): the mirror of the item owners' rows (:mod:`streaming.item_rows`) in a worker that does not train
        item rows itself."""
        last_seen, updates, accum = ROW_HEADER.unpack_from(header_and_vector)
        vector = np.frombuffer(header_and_vector, dtype=np.float32, offset=ROW_HEADER.size)
        if vector.shape[0] != self.dim:
            raise ValueError(f"row of {ident!r} has dim {vector.shape[0]}, table {self.name} {self.dim}")
        slot = self._slot.get(ident)
        if slot is None:
            slot = self._allocate(ident)
            self.peak_rows = max(self.peak_rows, len(self._slot))
        self._vectors[slot] = vector
        self._accum[slot], self._last_seen[slot], self._updates[slot] = accum, last_seen, updates
        self._deleted.discard(ident)
        self._dirty.add(ident)
        self.changed.add(ident)

    def drop_row(self, ident: str) -> None:
        """Remove a mirrored row (the owner expired or evicted it); unknown ids are ignored."""
        if ident in self._slot:
            self._remove(ident)

    def expire(self, now_ms: int) -> int:
        """Drop rows idle for longer than ``idle_ms`` of event time, and pending ids likewise; returns rows dropped."""
        cutoff = now_ms - self.settings.idle_ms
        stale = [ident for ident, slot in self._slot.items() if self._last_seen[slot] < cutoff]
        for ident in stale:
            self._remove(ident)
        for ident in [i for i, (_, seen) in self._pending.items() if seen < cutoff]:
            del self._pending[ident]
            self._dirty_pending.add(ident)
        return len(stale)

    # ------------------------------------------------------------------ durability
    def flush(self) -> None:
        """Stage the changed rows and admission counts in the state store (written at the next checkpoint)."""
        for ident in self._dirty:
            slot = self._slot[ident]
            header = ROW_HEADER.pack(int(self._last_seen[slot]), int(self._updates[slot]), float(self._accum[slot]))
            self._state.put(self._prefix + ident.encode(), header + self._vectors[slot].tobytes())
        for ident in self._deleted:
            self._state.delete(self._prefix + ident.encode())
        for ident in self._dirty_pending:
            entry = self._pending.get(ident)
            key = self._pending_prefix + ident.encode()
            if entry is None:
                self._state.delete(key)
            else:
                self._state.put(key, struct.pack("<qq", *entry))
        self._dirty.clear()
        self._deleted.clear()
        self._dirty_pending.clear()

    def _load(self) -> None:
        size = ROW_HEADER.size
        for key, value in self._state.scan(self._prefix):
            last_seen, updates, accum = ROW_HEADER.unpack_from(value)
            slot = self._allocate(key[len(self._prefix) :].decode())
            self._vectors[slot] = np.frombuffer(value, dtype=np.float32, offset=size)
            self._accum[slot], self._last_seen[slot], self._updates[slot] = accum, last_seen, updates
        for key, value in self._state.scan(self._pending_prefix):
            self._pending[key[len(self._pending_prefix) :].decode()] = list(struct.unpack("<qq", value))
        logger.info("table %s: %d online rows, %d pending ids loaded", self.name, len(self._slot), len(self._pending))

    # ------------------------------------------------------------------ slots
    def _admit(self, ident: str, initial: np.ndarray, ts_ms: int) -> None:
        if len(self._slot) >= self.settings.max_rows:
            self._evict_oldest(max(1, self.settings.max_rows // 100))
        slot = self._allocate(ident)
        self.peak_rows = max(self.peak_rows, len(self._slot))
        self._vectors[slot] = initial
        self._accum[slot] = self.settings.initial_accumulator
        self._last_seen[slot] = ts_ms
        self._updates[slot] = 0
        self._deleted.discard(ident)
        self._dirty.add(ident)
        self.changed.add(ident)

    def _allocate(self, ident: str) -> int:
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._slot[ident] = slot
        self._ident[slot] = ident
        return slot

    def _grow(self) -> None:
        old = len(self._accum)
        new = min(max(2 * old, 1024), max(self.settings.max_rows, old + 1))
        self._vectors = np.concatenate([self._vectors, np.zeros((new - old, self.dim), dtype=np.float32)])
        self._accum = np.concatenate([self._accum, np.zeros(new - old, dtype=np.float32)])
        self._last_seen = np.concatenate([self._last_seen, np.zeros(new - old, dtype=np.int64)])
        self._updates = np.concatenate([self._updates, np.zeros(new - old, dtype=np.int64)])
        self._ident.extend([None] * (new - old))
        self._free.extend(range(new - 1, old - 1, -1))

    def _remove(self, ident: str) -> None:
        slot = self._slot.pop(ident)
        self._ident[slot] = None
        self._free.append(slot)
        self._dirty.discard(ident)
        self._deleted.add(ident)
        self.changed.add(ident)

    def _evict_oldest(self, count: int) -> None:
        """Evict the ``count`` least recently seen rows (1% of the bound at a time, so eviction is amortised).

        Ties are broken by id, not by slot: slots are renumbered when the table is reloaded after a
        crash, and the replay must evict the very same rows.
        """
        slots = np.fromiter(self._slot.values(), dtype=np.int64, count=len(self._slot))
        seen = self._last_seen[slots]
        count = min(count, len(slots))
        threshold = np.partition(seen, count - 1)[count - 1]
        older = slots[seen < threshold]
        ties = sorted(self._ident[s] for s in slots[seen == threshold].tolist())
        victims = [self._ident[s] for s in older.tolist()] + ties[: count - len(older)]
        for ident in victims:
            self._remove(ident)

    def _trim_pending(self) -> None:
        excess = len(self._pending) - self.settings.max_pending
        for ident in sorted(self._pending, key=lambda i: (self._pending[i][1], i))[:excess]:
            del self._pending[ident]
            self._dirty_pending.add(ident)
