"""The streaming worker's state as a :class:`~publisher.source.ChangeSource`: what the publisher serves from.

The worker keeps everything in one RocksDB database written one ``WriteBatch`` per checkpoint
(:mod:`streaming.state`). :class:`WorkerSource` opens it as a RocksDB *secondary* instance, so it
runs in the publisher's process beside a live worker without taking its lock. Each
:meth:`WorkerSource.changes_since` catches up once and then only reads: a secondary changes only
when it is told to catch up, and catching up replays whole write batches, so every read of one
call sees one whole checkpoint (never half of one, never two). One exception, measured with
rocksdict 0.3.29: a catch-up after the worker *closed* its database reads a mix (log entries the
secondary replayed before stay in its memtable and hide the newer values the close flushed to a
table file). So when the worker's write-ahead log files differ from the last read's (a close, a
restart, a memtable flush), the secondary is opened afresh instead, and a read during which they
changed is done again, also when it failed (:class:`publisher.follower.Follower`, shared with the
store's follower): a secondary opened while the worker closes may read its state as of the last
flush, or an empty one ("no checkpoint yet") if it never flushed. And a checkpoint count lower than
the last whole read's, of the same database (same RocksDB identity), is taken for a torn read and
read again from a fresh secondary; when every fresh secondary of one call reads it so, the call
fails and the next one takes the state as it is (a state restored from a copy does go back).

What one call reads (key layout of :mod:`streaming.worker`, :mod:`streaming.tables`, :mod:`streaming.examples`):

- ``m:meta``: the checkpoint sequence number ``checkpoints``, ``watermark_ms``, ``model_version``;
- ``x:<seq as 16 hex digits>:u:<id>`` / ``...:i:<id>``: users and items changed in checkpoint ``seq``;
- ``t:user:<id>`` / ``t:item:<id>``: online ID rows, a 20-byte ``<qqf`` header then ``float32[id_dim]``;
  an id without one uses the model's row (vocabulary index, 0 = the default row), as
  :meth:`streaming.tables.EmbeddingTable.row` does;
- ``n:<user_id>``: the user's last-N clicked items (JSON, oldest first); ``cat:<item_id>``: the catalogue record.

Users are published as their effective ID embedding and last-N; items as their serving vector, the
current model's item tower on the catalogue features and the effective item-ID row. So an item
that arrived in the catalogue a minute ago is retrievable from the next publish, before it has a
single click (DESIGN.md "Updating the model").

The cursor is ``"<checkpoint>:<model version>:<state id>"`` (:class:`WorkerCursor`). The model
version and the database's RocksDB identity are in it because either changing makes every
published row stale, not only the logged ones: a new model changes every item vector, and a
rebuilt state directory restarts the checkpoint count. Then, and when the change log no longer
reaches back to the cursor (the worker keeps ``change_log_checkpoints`` checkpoints of it), the
call republishes every row the state holds and logs why.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from publisher.follower import Follower, Torn
from publisher.source import Changes
from streaming.events import InvalidEvent, Item, Limits, decode
from streaming.state import StateStore
from trainer.artifact import ModelVersion, load_version
from trainer.features import Vocab
from trainer.registry import Registry

__all__ = ["WorkerCursor", "WorkerSource"]

logger = logging.getLogger(__name__)

# The online row layout of streaming.tables: last_seen_ms, updates, Adagrad accumulator, then float32[id_dim].
_ROW_HEADER = struct.Struct("<qqf")
# Catalogue records in the state were validated when they arrived; re-reading them must not apply wall-clock checks.
_NO_LIMITS = Limits(max_bytes=1 << 30, max_future_ms=1 << 62)
_LOG_SEQ = len(b"x:") + 16 + 1  # where "u:<id>" / "i:<id>" starts in a change-log key


@dataclass(frozen=True)
class WorkerCursor:
    """What a published version covers: worker checkpoint ``checkpoint`` of state ``state_id`` under ``model_version``."""

    checkpoint: int
    model_version: str
    state_id: str

    def __str__(self) -> str:
        return f"{self.checkpoint}:{self.model_version}:{self.state_id}"

    @classmethod
    def parse(cls, cursor: str) -> WorkerCursor | None:
        """The cursor written by :class:`WorkerSource`, or ``None`` for "" and anything else."""
        parts = cursor.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        return cls(int(parts[0]), parts[1], parts[2])


def _batches(ids: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


class WorkerSource:
    """A :class:`~publisher.source.ChangeSource` over the worker state at ``state_dir`` (read as a secondary).

    ``models_dir``: the model registry; the version named by the worker's checkpoint is loaded (and
    reloaded when the worker moves to another). ``secondary_dir``: the secondary instance's own files
    (a temporary directory, removed on :meth:`close`, by default). ``change_log_checkpoints`` must be
    the worker's setting of that name: it tells when the log no longer reaches back to a cursor.
    ``batch_size``: items per item-tower forward pass.
    """

    def __init__(
        self,
        state_dir: str | Path,
        models_dir: str | Path,
        secondary_dir: str | Path | None = None,
        *,
        change_log_checkpoints: int = 10_000,
        batch_size: int = 4096,
    ) -> None:
        if change_log_checkpoints < 1 or batch_size < 1:
            raise ValueError(
                f"expected change_log_checkpoints >= 1 and batch_size >= 1, "
                f"got {change_log_checkpoints} and {batch_size}"
            )
        self.state_dir = Path(state_dir)
        self.models_dir = Path(models_dir)
        self.change_log_checkpoints = change_log_checkpoints
        self.batch_size = batch_size
        self._tmp: str | None = None
        if secondary_dir is None:
            secondary_dir = self._tmp = tempfile.mkdtemp(prefix="freshtower-worker-secondary-")
        self._secondary_dir = Path(secondary_dir)
        self._lock = threading.Lock()
        self._state: StateStore | None = None
        self._state_id = ""
        self._version: ModelVersion | None = None
        # (cursor, seq): the change log was read over (cursor's checkpoint, seq] and held nothing. Log
        # entries never change once written, so the next call from the same cursor (the publisher writes
        # no version for an empty pull) starts after seq: an idle worker that keeps checkpointing does
        # not push the cursor out of the log.
        self._empty_through: tuple[str, int] | None = None
        # Catches up, or opens the secondary afresh when catching up may read a mix (module docstring).
        self._follower = Follower(self.state_dir)
        # (state id, checkpoint) of the last whole read: the same database reads no lower checkpoint after it.
        self._whole: tuple[str, int] | None = None

    # ------------------------------------------------------------------ ChangeSource
    def changes_since(self, cursor: str) -> Changes:
        """Users and items changed after ``cursor`` ("" = everything), as of the worker's newest checkpoint."""
        with self._lock:
            self._check_exists()
            try:
                changes, empty_through = self._follower.sync(
                    lambda: self._synced(reopen=False),
                    lambda: self._synced(reopen=True),
                    lambda: self._pull(self._state, cursor),
                )
            except RuntimeError as exc:
                if isinstance(exc.__cause__, Torn):
                    self._whole = None  # every fresh secondary read it so: the state did go back; take it next time
                raise
            cursor_now = WorkerCursor.parse(changes.cursor)
            self._whole = (cursor_now.state_id, cursor_now.checkpoint)
            if empty_through is not None:
                self._empty_through = (cursor, empty_through)
            return changes

    def _pull(self, state: StateStore, cursor: str) -> tuple[Changes, int | None]:
        """Every read of one call, from one caught-up state; and the checkpoint through which the change log
        held nothing after ``cursor`` (``None`` if it held something or was not read)."""
        meta = state.meta()
        seq = int(meta.get("checkpoints", 0))
        if self._whole is not None and self._whole[0] == self._state_id and seq < self._whole[1]:
            raise Torn(f"checkpoint {seq} of the worker state at {self.state_dir} after checkpoint {self._whole[1]}")
        if seq < 1:
            raise RuntimeError(f"worker state at {self.state_dir} has no checkpoint yet; expected checkpoints >= 1")
        model_version = str(meta.get("model_version") or "")
        version = self._model(model_version)
        now = WorkerCursor(seq, model_version, self._state_id)
        start, reason = self._start(cursor, now)
        if reason:
            log = logger.warning if reason.startswith("the change log") else logger.info
            log("republishing every row of the worker state at checkpoint %d: %s", seq, reason)
            users, items = self._all_ids(state)
        else:
            users, items = self._logged_ids(state, start, seq)
        changes = Changes(
            cursor=str(now),
            watermark_ms=int(meta.get("watermark_ms", 0)),
            users=self._users(state, version, sorted(users)),
            items=self._items(state, version, sorted(items)),
            model_version=model_version,
        )
        logger.debug(
            "checkpoint %d: %d users, %d items changed since %r", seq, len(users), len(items), cursor or "start"
        )
        return changes, seq if not reason and not users and not items else None

    def rows_for(
        self, model_version: str, users: Sequence[str], items: Sequence[str]
    ) -> tuple[dict[str, tuple[np.ndarray, tuple[str, ...]]], dict[str, np.ndarray]]:
        """Rows of any ids under ``model_version`` (:class:`~publisher.source.RowSource`): an id the worker holds
        no online row for gets the model's own row (0 when the model does not know it either) and, for a user,
        the last-N the state holds (none when it forgot the user); an item its item-tower vector on the
        catalogue record the state holds (default features without one). Read from the state exactly as the last
        :meth:`changes_since` read it (no catch-up in between), so both belong to one checkpoint."""
        with self._lock:
            state = self._state
            if state is None:
                raise RuntimeError("rows_for reads the state of the last changes_since call; there was none")
            now = str(state.meta().get("model_version") or "")
            if now != model_version:
                raise RuntimeError(f"the worker moved from model {model_version!r} to {now!r}; publish again")
            version = self._model(model_version)
            return self._users(state, version, list(users)), self._items(state, version, list(items))

    def close(self) -> None:
        with self._lock:
            if self._state is not None:
                self._state.close()
                self._state = None
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> WorkerSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ state
    def _open(self) -> StateStore:
        self._check_exists()
        self._secondary_dir.mkdir(parents=True, exist_ok=True)
        state = StateStore(self.state_dir, secondary=self._secondary_dir)
        identity = self.state_dir / "IDENTITY"  # RocksDB writes a unique id here when it creates a database
        self._state_id = identity.read_text().strip() if identity.exists() else ""
        return state

    def _check_exists(self) -> None:
        if not (self.state_dir / "CURRENT").exists():
            raise FileNotFoundError(f"no worker state at {self.state_dir}: expected the worker's RocksDB directory")

    def _synced(self, reopen: bool) -> StateStore:
        """The secondary, caught up with the worker's newest whole checkpoint; opened afresh when ``reopen``."""
        if self._state is not None and not reopen:
            try:
                self._state.catch_up()
                return self._state
            except Exception as exc:  # rocksdict raises plain Exception
                # E.g. a file compacted away mid catch-up, or a state directory rebuilt under us.
                logger.warning("catching up with the worker state at %s failed (%s); reopening", self.state_dir, exc)
        if self._state is not None:
            self._state.close()
            self._state = None
        self._state = self._open()  # opening replays the primary's log: as current as a catch-up
        return self._state

    def _start(self, cursor: str, now: WorkerCursor) -> tuple[int, str]:
        """Where to start reading the change log, or ``(0, why every row must be republished)``."""
        if not cursor:
            return 0, "first publish"
        prev = WorkerCursor.parse(cursor)
        if prev is None:
            return 0, f"cursor {cursor!r} is not a worker cursor"
        if prev.state_id != now.state_id or prev.checkpoint > now.checkpoint:
            return 0, f"the worker state was rebuilt (cursor {cursor!r}, state now at {now})"
        if prev.model_version != now.model_version:
            return 0, f"model version changed from {prev.model_version!r} to {now.model_version!r}"
        start = prev.checkpoint
        if self._empty_through is not None and self._empty_through[0] == cursor:
            start = max(start, self._empty_through[1])
        # Checkpoint N deletes the log of checkpoint N - K (streaming.worker): (start, N] is whole iff start >= N - K.
        oldest_kept = now.checkpoint - self.change_log_checkpoints + 1
        if start + 1 < oldest_kept:
            return 0, (
                f"the change log keeps checkpoints from {oldest_kept}, the cursor needs them from {start + 1} "
                f"(the publisher fell more than {self.change_log_checkpoints} checkpoints behind)"
            )
        return start, ""

    def _logged_ids(self, state: StateStore, after: int, seq: int) -> tuple[set[str], set[str]]:
        users: set[str] = set()
        items: set[str] = set()
        for s in range(after + 1, seq + 1):
            for key, _ in state.scan(b"x:%016x:" % s):
                kind, ident = key[_LOG_SEQ : _LOG_SEQ + 2], key[_LOG_SEQ + 2 :].decode()
                (users if kind == b"u:" else items).add(ident)
        return users, items

    @staticmethod
    def _all_ids(state: StateStore) -> tuple[set[str], set[str]]:
        def ids(prefix: bytes) -> Iterable[str]:
            return (key[len(prefix) :].decode() for key, _ in state.scan(prefix))

        return {*ids(b"t:user:"), *ids(b"n:")}, {*ids(b"t:item:"), *ids(b"cat:")}

    # ------------------------------------------------------------------ model
    def _model(self, version_id: str) -> ModelVersion:
        if self._version is not None and self._version.version_id == version_id:
            return self._version
        if not version_id:
            raise RuntimeError(f"the worker checkpoint at {self.state_dir} names no model version")
        path = Registry(self.models_dir).path(version_id)
        self._version = load_version(path)
        logger.info("loaded model version %s from %s for the worker's rows", version_id, path)
        return self._version

    # ------------------------------------------------------------------ rows
    @staticmethod
    def _effective_rows(
        state: StateStore, prefix: bytes, ids: list[str], weight: np.ndarray, vocab: Vocab
    ) -> np.ndarray:
        """``[len(ids), id_dim]`` rows: the online row when there is one, else the model's (row 0 if unknown)."""
        dim = weight.shape[1]
        out = np.empty((len(ids), dim), dtype=np.float32)
        for k, ident in enumerate(ids):
            key = prefix + ident.encode()
            raw = state.get(key)
            if raw is None:
                out[k] = weight[vocab.index(ident)]
            elif len(raw) == _ROW_HEADER.size + 4 * dim:
                out[k] = np.frombuffer(raw, dtype="<f4", offset=_ROW_HEADER.size)
            else:
                raise ValueError(
                    f"online row {key!r} has {len(raw)} bytes, expected {_ROW_HEADER.size} + 4 * {dim} "
                    f"(the model's id_dim is {dim})"
                )
        return out

    def _users(
        self, state: StateStore, version: ModelVersion, ids: list[str]
    ) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        weight = version.model.user_tower.id_table.weight.detach().numpy()  # [V_user, id_dim]
        rows = self._effective_rows(state, b"t:user:", ids, weight, version.encoder.user_vocab)
        out = {}
        for ident, row in zip(ids, rows, strict=True):
            raw = state.get(b"n:" + ident.encode())
            out[ident] = (row, tuple(json.loads(raw)) if raw else ())
        return out

    def _items(self, state: StateStore, version: ModelVersion, ids: list[str]) -> dict[str, np.ndarray]:
        model, encoder = version.model, version.encoder
        weight = model.item_tower.id_table.weight.detach().numpy()  # [V_item, id_dim]
        out: dict[str, np.ndarray] = {}
        model.eval()
        for chunk in _batches(ids, self.batch_size):
            catalogue = {ident: item for ident in chunk if (item := self._catalogue(state, ident)) is not None}
            rows = self._effective_rows(state, b"t:item:", chunk, weight, encoder.item_vocab)
            with torch.no_grad():
                # The serving vector: unit b = item_tower(features, effective ID row), [B, dim].
                vectors = model.item_tower(encoder.encode_items(chunk, catalogue), id_rows=torch.from_numpy(rows))
            out.update(zip(chunk, vectors.numpy().astype(np.float32, copy=False), strict=True))
        return out

    @staticmethod
    def _catalogue(state: StateStore, item_id: str) -> Item | None:
        raw = state.get(b"cat:" + item_id.encode())
        if raw is None:
            return None  # clicked but never described: default features, as in training
        try:
            event = decode(raw, _NO_LIMITS)
        except InvalidEvent as exc:
            logger.warning(
                "unreadable catalogue record of item %r in the worker state (%s); default features", item_id, exc
            )
            return None
        return event if isinstance(event, Item) else None
