"""The key-value store contract shared by the publisher and serving, and its backends.

A :class:`Store` takes whole versions (:meth:`Store.apply`); :meth:`ReadOnlyStore.reader` opens a
:class:`StoreView`, a consistent view in which every row and the meta belong to one version.

How readers never see a torn version (:class:`RocksStore`):

- A publish is one RocksDB ``WriteBatch`` holding the rows, the version's change-log record and
  the meta record, so a crash anywhere before the batch is in the write-ahead log leaves the
  previous version whole; RocksDB's recovery drops a torn log tail.
- Serving processes open a *secondary* instance (:class:`RocksSecondary`) and call
  ``try_catch_up_with_primary()``, which replays the primary's log a whole batch at a time;
  except after the primary flushed (a close, a restart, a full memtable), when a catch-up reads
  a mix of two versions (rocksdict 0.3.29, measured): then the secondary is opened afresh
  (:mod:`publisher.follower`).
- Inside one process, views and state changes are ordered by a readers-writer lock: a catch-up
  (secondary) or a batch write (primary) waits until the open views close, and views opened
  after it see all of it. RocksDB snapshots are not used because with rocksdict 0.3.29 neither
  is isolated where it is needed (measured): iterators opened from a ``Snapshot`` read the
  latest data, and a secondary's snapshot sees later catch-ups. Views are meant to be short (one
  request, one catch-up pass); a thread holding a view must not call ``apply``.

Key layout (raw bytes): ``m`` meta (JSON), ``u:<user_id>`` / ``i:<item_id>`` rows
(:mod:`publisher.records`), ``c:<version:020d>`` the ids each version changed (JSON, kept for the
last ``changelog_versions`` versions so :meth:`StoreView.changes_since` reads only what changed;
older ``since`` values fall back to a scan), ``f`` the oldest change-log version kept,
``p:<name>`` progress markers of followers (fan-out).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
from rocksdict import AccessType, Options, Rdict, ReadOptions, WriteBatch, WriteOptions

from publisher.follower import Follower
from publisher.records import (
    REMOVED,
    Delta,
    ItemRow,
    Meta,
    Publish,
    UserRow,
    decode_item,
    decode_meta,
    decode_user,
    encode_item,
    encode_meta,
    encode_user,
    next_meta,
)

__all__ = ["MemoryStore", "ReadOnlyStore", "RocksSecondary", "RocksStore", "Store", "StoreView"]

logger = logging.getLogger(__name__)

_META = b"m"
_FLOOR = b"f"


class StoreView(ABC):
    """A consistent read of one version. Valid only inside its ``with store.reader()`` block."""

    @abstractmethod
    def meta(self) -> Meta | None:
        """The meta record of this view's version, ``None`` for a store that was never published to."""

    def version(self) -> int:
        meta = self.meta()
        return meta.version if meta else 0

    def watermark_ms(self) -> int:
        meta = self.meta()
        return meta.watermark_ms if meta else 0

    @abstractmethod
    def users(self, user_ids: Sequence[str]) -> list[UserRow | None]:
        """Rows of ``user_ids`` in order; ``None`` for unknown or removed users."""

    @abstractmethod
    def items(self, item_ids: Sequence[str]) -> list[ItemRow | None]:
        """Rows of ``item_ids`` in order; ``None`` for unknown or removed items."""

    @abstractmethod
    def user_ids(self) -> list[str]:
        """The ids of every live (not removed) user row, sorted."""

    @abstractmethod
    def item_ids(self) -> list[str]:
        """The ids of every live (not removed) item row, sorted."""

    def user(self, user_id: str) -> UserRow | None:
        return self.users([user_id])[0]

    def item(self, item_id: str) -> ItemRow | None:
        return self.items([item_id])[0]

    @abstractmethod
    def changes_since(self, since: int, *, users: bool = True, items: bool = True) -> Delta:
        """Rows whose version is in ``(since, version()]``, removals included (``removed=True``)."""

    def items_since(self, since: int) -> Delta:
        """Item rows changed after version ``since``: what an index must upsert or remove to catch up."""
        return self.changes_since(since, users=False)

    @abstractmethod
    def progress(self, name: str) -> int:
        """The version a follower recorded with :meth:`Store.set_progress` (0 if never)."""


class ReadOnlyStore(ABC):
    """Something consistent views can be taken of."""

    @abstractmethod
    def reader(self) -> AbstractContextManager[StoreView]:
        """Open a consistent view: ``with store.reader() as view: ...``."""

    def close(self) -> None:  # noqa: B027 - backends without resources need nothing
        """Release files and handles."""

    def __enter__(self) -> ReadOnlyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Store(ReadOnlyStore):
    """A store one publisher writes whole versions to."""

    @abstractmethod
    def apply(self, publish: Publish) -> Meta:
        """Write ``publish`` atomically; return its meta. Raises :class:`~publisher.records.PublishError`."""

    @abstractmethod
    def set_progress(self, name: str, version: int) -> None:
        """Record that follower ``name`` (e.g. the fan-out) has everything up to ``version``."""


class _RWLock:
    """Many readers or one writer; a waiting writer stops new readers (a publish is never starved)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------- memory


class _MemoryView(StoreView):
    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._open = True

    @property
    def _s(self) -> MemoryStore:
        if not self._open:
            raise RuntimeError("store view used after its `with store.reader()` block ended")
        return self._store

    def meta(self) -> Meta | None:
        return self._s._meta

    def users(self, user_ids: Sequence[str]) -> list[UserRow | None]:
        rows = [self._s._users.get(u) for u in user_ids]
        return [r if r is not None and not r.removed else None for r in rows]

    def items(self, item_ids: Sequence[str]) -> list[ItemRow | None]:
        rows = [self._s._items.get(i) for i in item_ids]
        return [r if r is not None and not r.removed else None for r in rows]

    def user_ids(self) -> list[str]:
        return sorted(k for k, r in self._s._users.items() if not r.removed)

    def item_ids(self) -> list[str]:
        return sorted(k for k, r in self._s._items.items() if not r.removed)

    def changes_since(self, since: int, *, users: bool = True, items: bool = True) -> Delta:
        return Delta(
            since=since,
            version=self.version(),
            users={k: r for k, r in self._s._users.items() if r.version > since} if users else {},
            items={k: r for k, r in self._s._items.items() if r.version > since} if items else {},
        )

    def progress(self, name: str) -> int:
        return self._s._progress.get(name, 0)


class MemoryStore(Store):
    """Dicts in one process, for unit tests: the same contract as :class:`RocksStore`, nothing on disk."""

    def __init__(self) -> None:
        self._lock = _RWLock()
        self._write_mutex = threading.Lock()
        self._meta: Meta | None = None
        self._users: dict[str, UserRow] = {}
        self._items: dict[str, ItemRow] = {}
        self._progress: dict[str, int] = {}

    @contextmanager
    def reader(self) -> Iterator[StoreView]:
        with self._lock.shared():
            view = _MemoryView(self)
            try:
                yield view
            finally:
                view._open = False

    def apply(self, publish: Publish) -> Meta:
        with self._write_mutex:
            meta = next_meta(self._meta, publish, _now_ms())
            v = meta.version
            # Rows are built outside the exclusive section, like the RocksDB batch.
            f32 = np.float32
            users = {k: UserRow(v, _frozen(vec, f32), tuple(last)) for k, (vec, last) in publish.users.items()}
            users |= {k: UserRow(v, np.zeros(0, f32), (), removed=True) for k in publish.removed_users}
            items = {k: ItemRow(v, _frozen(vec, f32)) for k, vec in publish.items.items()}
            items |= {k: ItemRow(v, np.zeros(0, f32), removed=True) for k in publish.removed_items}
            with self._lock.exclusive():
                self._users.update(users)
                self._items.update(items)
                self._meta = meta
        return meta

    def set_progress(self, name: str, version: int) -> None:
        with self._lock.exclusive():
            self._progress[name] = int(version)


def _frozen(vector: np.ndarray, dtype: type) -> np.ndarray:
    v = np.array(vector, dtype=dtype, copy=True)
    v.flags.writeable = False
    return v


# --------------------------------------------------------------------------------------------- RocksDB


def _user_key(user_id: str) -> bytes:
    return b"u:" + user_id.encode()


def _item_key(item_id: str) -> bytes:
    return b"i:" + item_id.encode()


def _log_key(version: int) -> bytes:
    return b"c:%020d" % version


def _progress_key(name: str) -> bytes:
    return b"p:" + name.encode()


def _range(db: Rdict, lower: bytes, upper: bytes) -> Iterator[tuple[bytes, bytes]]:
    opts = ReadOptions()
    opts.set_iterate_upper_bound(upper)
    yield from db.items(from_key=lower, read_opt=opts)


class _RocksView(StoreView):
    def __init__(self, db: Rdict) -> None:
        self._db = db
        raw = db.get(_META)
        self._meta = decode_meta(raw) if raw is not None else None
        self._open = True

    def _check(self) -> Rdict:
        if not self._open:
            raise RuntimeError("store view used after its `with store.reader()` block ended")
        return self._db

    def meta(self) -> Meta | None:
        self._check()
        return self._meta

    def users(self, user_ids: Sequence[str]) -> list[UserRow | None]:
        raws = self._check().get([_user_key(u) for u in user_ids]) if user_ids else []
        rows = [decode_user(r) if r is not None else None for r in raws]
        return [r if r is not None and not r.removed else None for r in rows]

    def items(self, item_ids: Sequence[str]) -> list[ItemRow | None]:
        raws = self._check().get([_item_key(i) for i in item_ids]) if item_ids else []
        rows = [decode_item(r) if r is not None else None for r in raws]
        return [r if r is not None and not r.removed else None for r in rows]

    def _live_ids(self, lower: bytes, upper: bytes) -> list[str]:
        # Every row starts <format><flags>: the flags say whether it is a tombstone, without decoding the rest.
        return [key[2:].decode() for key, raw in _range(self._check(), lower, upper) if not raw[1] & REMOVED]

    def user_ids(self) -> list[str]:
        return self._live_ids(b"u:", b"u;")

    def item_ids(self) -> list[str]:
        return self._live_ids(b"i:", b"i;")

    def changes_since(self, since: int, *, users: bool = True, items: bool = True) -> Delta:
        db = self._check()
        version = self.version()
        out = Delta(since=since, version=version, users={}, items={})
        if since >= version:
            return out
        floor_raw = db.get(_FLOOR)
        floor = int(floor_raw) if floor_raw is not None else 1
        if since + 1 >= floor:
            # The change log holds every version in (since, version]: read only what changed.
            user_ids: set[str] = set()
            item_ids: set[str] = set()
            for _, raw in _range(db, _log_key(since + 1), _log_key(version + 1)):
                changed = json.loads(raw)
                user_ids.update(changed["u"])
                item_ids.update(changed["i"])
            if users and user_ids:
                ids = sorted(user_ids)
                for uid, raw in zip(ids, db.get([_user_key(u) for u in ids]), strict=True):
                    out.users[uid] = decode_user(raw)
            if items and item_ids:
                ids = sorted(item_ids)
                for iid, raw in zip(ids, db.get([_item_key(i) for i in ids]), strict=True):
                    out.items[iid] = decode_item(raw)
        else:
            logger.debug("changes since version %d predate the change log (from %d): scanning", since, floor)
            if users:
                for key, raw in _range(db, b"u:", b"u;"):
                    row = decode_user(raw)
                    if row.version > since:
                        out.users[key[2:].decode()] = row
            if items:
                for key, raw in _range(db, b"i:", b"i;"):
                    row = decode_item(raw)
                    if row.version > since:
                        out.items[key[2:].decode()] = row
        return out

    def progress(self, name: str) -> int:
        raw = self._check().get(_progress_key(name))
        return int(raw) if raw is not None else 0

    def close(self) -> None:
        self._open = False


class _RocksReadable(ReadOnlyStore):
    _db: Rdict
    _lock: _RWLock

    @contextmanager
    def _view(self) -> Iterator[StoreView]:
        with self._lock.shared():
            view = _RocksView(self._db)
            try:
                yield view
            finally:
                view.close()

    def close(self) -> None:
        with self._lock.exclusive():
            self._db.close()


class RocksStore(_RocksReadable, Store):
    """The primary, read-write RocksDB store at ``path`` (one writer process; a second open fails on LOCK).

    ``sync=True`` fsyncs the log on every publish, so a published version survives a power loss,
    not only a process crash.
    """

    def __init__(self, path: str | Path, *, sync: bool = True, changelog_versions: int = 1000) -> None:
        if changelog_versions < 1:
            raise ValueError(f"changelog_versions must be >= 1, got {changelog_versions}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self._db = Rdict(str(self.path), opts)
        self._write_opts = WriteOptions()
        self._write_opts.sync = sync
        self._changelog_versions = changelog_versions
        self._lock = _RWLock()
        self._write_mutex = threading.Lock()

    def reader(self) -> AbstractContextManager[StoreView]:
        return self._view()

    def apply(self, publish: Publish) -> Meta:
        with self._write_mutex:
            # Only this writer changes the store, so reading the current meta needs no view.
            raw = self._db.get(_META)
            meta = next_meta(decode_meta(raw) if raw is not None else None, publish, _now_ms())
            v = meta.version
            batch = WriteBatch(raw_mode=True)
            for uid, (vector, last_n) in publish.users.items():
                batch.put(_user_key(uid), encode_user(v, vector, tuple(last_n)))
            for uid in publish.removed_users:
                batch.put(_user_key(uid), encode_user(v, None))
            for iid, vector in publish.items.items():
                batch.put(_item_key(iid), encode_item(v, vector))
            for iid in publish.removed_items:
                batch.put(_item_key(iid), encode_item(v, None))
            changed = {"u": [*publish.users, *publish.removed_users], "i": [*publish.items, *publish.removed_items]}
            batch.put(_log_key(v), json.dumps(changed, separators=(",", ":")).encode())
            floor_raw = self._db.get(_FLOOR)
            old_floor = int(floor_raw) if floor_raw is not None else 1
            new_floor = max(old_floor, v - self._changelog_versions + 1)
            for old in range(old_floor, new_floor):
                batch.delete(_log_key(old))
            batch.put(_FLOOR, b"%d" % new_floor)
            batch.put(_META, encode_meta(meta))  # in the same batch: rows and meta become visible together
            logger.debug("writing version %d: %d rows, %d bytes", v, publish.rows(), batch.size_in_bytes())
            with self._lock.exclusive():
                self._db.write(batch, self._write_opts)
            logger.info("wrote version %d (%d users, %d items)", v, meta.users, meta.items)
        return meta

    def set_progress(self, name: str, version: int) -> None:
        with self._write_mutex, self._lock.exclusive():
            self._db.put(_progress_key(name), b"%d" % int(version), self._write_opts)

    def close(self) -> None:
        with self._write_mutex:  # never in the middle of a write
            super().close()


class RocksSecondary(_RocksReadable):
    """A read-only follower of the primary at ``path`` for another process (serving, benchmarks).

    Each :meth:`reader` first replays what the primary wrote since the last one
    (``try_catch_up_with_primary``, whole batches) unless ``catch_up=False``; after the primary
    flushed, closed or restarted, it opens the secondary afresh instead (:mod:`publisher.follower`).
    ``secondary_path`` holds the follower's own small files; a temporary directory (removed on
    close) by default.
    """

    def __init__(self, path: str | Path, secondary_path: str | Path | None = None) -> None:
        self.path = Path(path)
        if not (self.path / "CURRENT").exists():
            raise FileNotFoundError(f"no RocksDB store at {self.path}: the publisher creates it on start")
        self._tmp = None if secondary_path is not None else tempfile.mkdtemp(prefix="freshtower-secondary-")
        self._secondary_path = str(secondary_path or self._tmp)
        self._db: Rdict | None = None
        self._lock = _RWLock()
        self._follower = Follower(self.path)
        try:
            self._follower.sync(self._catch_up, self._reopen, _nothing)
        except BaseException:
            self.close()
            raise

    @contextmanager
    def reader(self, catch_up: bool = True) -> Iterator[StoreView]:
        if catch_up:
            with self._lock.exclusive():
                self._follower.sync(self._catch_up, self._reopen, _nothing)
        if self._db is None:
            raise RuntimeError(f"the follower of {self.path} is closed, or its last reopen failed; expected it open")
        with self._view() as view:
            yield view

    def _catch_up(self) -> None:
        try:
            self._db.try_catch_up_with_primary()
        except Exception as exc:  # rocksdict raises plain Exception
            # Replay stops at whole batches, so what is readable is still one version: serve
            # it, slightly stale, rather than fail the request; the next view tries again.
            logger.warning("catching up with the primary at %s failed: %s", self.path, exc)

    def _reopen(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        opts = Options(raw_mode=True)
        opts.set_max_open_files(-1)  # RocksDB's advice for secondaries: keep every file open so none vanish mid-read
        access = AccessType.secondary(self._secondary_path)
        self._db = Rdict(str(self.path), opts, access_type=access)

    def close(self) -> None:
        with self._lock.exclusive():
            if self._db is not None:
                self._db.close()
                self._db = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _nothing() -> None:
    """What a secondary reads during a sync: nothing; views read after it, and only a catch-up changes it."""
