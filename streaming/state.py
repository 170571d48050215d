"""The learner's durable state: one RocksDB database per worker, written one atomic batch per checkpoint.

Everything the worker knows that is not in Kafka lives here under a one-letter key prefix: embedding
rows and their optimizer state, last-N lists, counters, the join window, the catalogue, and the
Kafka offsets the state covers. A checkpoint writes the changed keys, the offsets and the metadata in
one ``WriteBatch``: RocksDB applies a batch entirely or not at all, so after a SIGKILL the database
holds exactly the state as of the last checkpoint together with the offsets to resume from: the
events after them are read again and nothing is applied twice.

Values are plain bytes (JSON or packed numbers); nothing is pickled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rocksdict import AccessType, Options, Rdict, WriteBatch, WriteOptions

__all__ = ["StateStore"]

logger = logging.getLogger(__name__)

_OFFSETS = b"m:offsets"
_META = b"m:meta"


class StateStore:
    """Buffered puts and deletes, made durable together with offsets by :meth:`checkpoint`.

    ``secondary``: open another process's database read-only as a RocksDB secondary instance
    (``catch_up`` then follows the primary's writes); such a store cannot checkpoint.
    """

    def __init__(self, path: str | Path, *, sync: bool = True, secondary: str | Path | None = None) -> None:
        self.path = Path(path)
        options = Options(raw_mode=True)
        if secondary is None:
            self.path.mkdir(parents=True, exist_ok=True)
            options.create_if_missing(True)
            self._db = Rdict(str(self.path), options)
        else:
            self._db = Rdict(str(self.path), options, access_type=AccessType.secondary(str(secondary)))
        self._secondary = secondary is not None
        self._write_options = WriteOptions()
        self._write_options.sync = sync
        self._pending: dict[bytes, bytes | None] = {}
        self._discards = 0

    # ------------------------------------------------------------------ reads (durable state only)
    def get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    # ------------------------------------------------------------------ reads (own writes included)
    def lookup(self, key: bytes) -> bytes | None:
        """The value as this process sees it: its staged change since the last checkpoint, else the durable one."""
        if key in self._pending:
            return self._pending[key]
        return self._db.get(key)

    def keys_with(self, prefix: bytes) -> set[bytes]:
        """Every key starting with ``prefix`` as this process sees it (staged puts in, staged deletes out)."""
        keys = {key for key, _ in self.scan(prefix)}
        for key, value in self._pending.items():
            if key.startswith(prefix):
                if value is None:
                    keys.discard(key)
                else:
                    keys.add(key)
        return keys

    @property
    def discards(self) -> int:
        """How many times staged changes were dropped (:meth:`discard`); caches of staged values compare it."""
        return self._discards

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Every durable ``(key, value)`` whose key starts with ``prefix``, in key order."""
        for key, value in self._db.items(from_key=prefix):
            if not key.startswith(prefix):
                return
            yield key, value

    def offsets(self) -> dict[str, int]:
        """``{"topic:partition": next offset to read}`` as of the last checkpoint."""
        raw = self._db.get(_OFFSETS)
        return json.loads(raw) if raw else {}

    def meta(self) -> dict[str, Any]:
        raw = self._db.get(_META)
        return json.loads(raw) if raw else {}

    def catch_up(self) -> None:
        """Secondary instances: apply the primary's newest writes."""
        self._db.try_catch_up_with_primary()

    # ------------------------------------------------------------------ writes
    def put(self, key: bytes, value: bytes) -> None:
        self._pending[key] = value

    def delete(self, key: bytes) -> None:
        self._pending[key] = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def staged(self) -> dict[bytes, bytes | None]:
        """The changes the next checkpoint writes (None: a delete), e.g. to send them to a changelog first."""
        return dict(self._pending)

    def checkpoint(self, offsets: dict[str, int], meta: dict[str, Any]) -> int:
        """Write the buffered changes, the offsets and the metadata atomically; returns the keys written."""
        if self._secondary:
            raise RuntimeError(f"{self.path} is open as a secondary instance; it cannot be written")
        batch = WriteBatch(raw_mode=True)
        for key, value in self._pending.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.put(_OFFSETS, json.dumps(offsets, sort_keys=True).encode())
        batch.put(_META, json.dumps(meta, sort_keys=True).encode())
        self._db.write(batch, self._write_options)
        written = len(self._pending)
        self._pending.clear()
        return written

    def discard(self) -> None:
        """Drop the buffered changes (they are rebuilt by re-reading events after the last checkpoint)."""
        self._pending.clear()
        self._discards += 1

    def close(self) -> None:
        self._pending.clear()
        self._db.close()
