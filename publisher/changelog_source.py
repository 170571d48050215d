"""The state of a scaled-out worker group as one worker-shaped RocksDB: what a single publisher publishes from.

With several workers no process holds every user's state. Each worker writes its user-keyed state changes, in
Kafka transactions, to its partitions of the compacted ``user-state`` topic; item owners write item rows to
``item-rows`` (:mod:`streaming.item_rows`); the catalogue is ``items``. :class:`ChangelogMirror` follows all three
(every partition, no consumer group, ``read_committed``) into a local RocksDB laid out as a worker's
:class:`~streaming.state.StateStore`, so :class:`~publisher.worker_source.WorkerSource` publishes from it unchanged
(:class:`ChangelogSource`) and serving can read profiles and click counts from it (``--worker-state``).

A :meth:`~ChangelogMirror.step` reads up to the last stable offsets of the moment it starts (below them every
transaction is decided), no further, and writes ONE checkpoint: the changed keys, the change log
``x:<seq>:u:<id>`` / ``x:<seq>:i:<id>`` that WorkerSource reads, the read positions and ``m:meta``. RocksDB applies
the batch whole or not at all, so after a SIGKILL the next life reads on from the last step's positions: nothing
lost, nothing applied twice. Kafka has no snapshot across partitions: a transaction whose markers had reached only
some partitions when a step started is seen in part, its rest with the next step.

Keys are the records' own (a tombstone deletes). Model rows (``t:user:``, ``p:user:``, ``t:item:``, ``p:item:``) are
kept only when the ``model`` header names the mirrored version; the stream's keys (``n:``, ``na:``, ``prof:``,
``j:``, ``k:``, ``c@``, ``e@``, ``s@``) whatever it says, since a worker carries them over a model switch
(:mod:`streaming.model_switch`); any other key is skipped (a worker's ``m:`` or ``x:`` would overwrite the
mirror's). ``c:<item>`` / ``e:<item>`` are written as the sums over partitions of ``c@<p>:<item>`` / ``e@<p>:<item>``,
the totals a single worker keeps; ``cat:<item>`` holds an ``items`` record validated and stored as a worker does.

The mirrored version is the registry's current one, read at every step (or one fixed by the caller). When it
changes, every ``t:`` and ``p:`` key is dropped and ``user-state`` and ``item-rows`` are read again from their start
for the new version's rows, up to the positions already read (``replay_until``), as a worker re-reads ``item-rows``
at its switch. A worker that has not switched yet has its users published with the new model's own rows, as it
would publish them right after its own switch. The watermark is the newest event time mirrored (``na:`` activity
times, kept rows' ``last_seen_ms``, catalogue ``ts_ms``) and never goes back.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from publisher.source import Changes
from publisher.worker_source import WorkerSource
from streaming.consumer import check_record
from streaming.events import InvalidEvent, Item, Limits, encode
from streaming.item_rows import MODEL_HEADER
from streaming.merge import tp_key
from streaming.settings import KafkaSettings
from streaming.state import StateStore
from streaming.tables import ROW_HEADER
from streaming.topics import USER_STATE_TOPIC, ensure_topics
from trainer.registry import Registry

__all__ = ["ChangelogMirror", "ChangelogSource", "MirrorStep"]

logger = logging.getLogger(__name__)

_COUNT = struct.Struct("<q")
_ROWS, _ITEMS = "item-rows", "items"
_MODEL_KEYS = {USER_STATE_TOPIC: (b"t:user:", b"p:user:"), _ROWS: (b"t:item:", b"p:item:")}
_STREAM_KEYS = (b"n:", b"na:", b"prof:", b"j:", b"k:", b"c@", b"e@", b"s@")
_LOGGED = {b"t:user:": b"u:", b"n:": b"u:", b"t:item:": b"i:", b"cat:": b"i:"}  # key prefix -> change-log kind


@dataclass(frozen=True)
class MirrorStep:
    """What one :meth:`ChangelogMirror.step` did. ``checkpoint``: the one it wrote (the last one when nothing
    changed); ``skipped``: records of another model version, of an unknown key family, or invalid catalogue
    records; ``caught_up``: every partition reached the step's target."""

    checkpoint: int
    applied: int
    skipped: int
    users: int
    items: int
    caught_up: bool


class ChangelogMirror:
    """Follows ``user-state``, ``item-rows`` and ``items`` into the worker-shaped RocksDB at ``state_dir``.

    The mirrored model version is ``Registry(models_dir).current()`` or, without a registry, ``model_version``.
    ``change_log_steps``: steps of change log kept (WorkerSource's ``change_log_checkpoints`` must equal it).
    ``step_timeout_s``: how long a step reads before it checkpoints what it has (the first steps of a long topic).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        state_dir: str | Path,
        *,
        models_dir: str | Path | None = None,
        model_version: str | None = None,
        change_log_steps: int = 10_000,
        step_timeout_s: float = 30.0,
        sync: bool = True,
    ) -> None:
        if (models_dir is None) == (model_version is None):
            raise ValueError("expected exactly one of models_dir (follow the registry) and model_version (fixed)")
        if change_log_steps < 1:
            raise ValueError(f"expected change_log_steps >= 1, got {change_log_steps}")
        self.kafka = kafka
        self.state_dir = Path(state_dir)
        self.change_log_steps = change_log_steps
        self.step_timeout_s = step_timeout_s
        self._registry = Registry(models_dir) if models_dir is not None else None
        self._fixed = model_version
        self._limits = Limits(max_bytes=kafka.max_record_bytes, max_future_ms=kafka.max_future_ms)
        self._names = {kafka.topic(n): n for n in (USER_STATE_TOPIC, _ROWS, _ITEMS)}
        ensure_topics(kafka, names=tuple(self._names.values()))
        self._consumer = KafkaConsumer(
            group_id=None,
            client_id="freshtower-publisher-mirror",
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **kafka.client_config(),
        )
        self._tps = [
            TopicPartition(topic, p)
            for topic in self._names
            for p in sorted(self._consumer.partitions_for_topic(topic))
        ]
        self._user_partitions = sum(1 for tp in self._tps if self._names[tp.topic] == USER_STATE_TOPIC)
        self._consumer.assign(self._tps)
        self._start = self._consumer.beginning_offsets(self._tps)
        self.state = StateStore(self.state_dir, sync=sync)
        self._load()
        # What the step in progress changed: change-log kind -> ids, per-partition counters, record counts.
        self._changed: dict[bytes, set[bytes]] = {b"u:": set(), b"i:": set()}
        self._counts: set[bytes] = set()
        self._applied = self._skipped = 0

    def _load(self) -> None:
        """Take up the last checkpoint: its positions (the consumer seeks to them), model version, watermark."""
        stored, meta = self.state.offsets(), self.state.meta()
        self._seq = int(meta.get("checkpoints", 0))
        self._version: str | None = meta.get("model_version")
        self._watermark_ms = int(meta.get("watermark_ms", 0))
        self._replay: dict[str, int] = dict(meta.get("replay_until", {}))
        self._positions = {tp: max(stored.get(tp_key(tp), 0), self._start[tp]) for tp in self._tps}
        for tp in self._tps:
            self._consumer.seek(tp, self._positions[tp])

    # ------------------------------------------------------------------ one step
    def step(self) -> MirrorStep:
        """Read what is committed below the last stable offsets as of now, then write one checkpoint (none when
        nothing changed). Raises RuntimeError while the registry has no promoted version. A step that raises
        leaves nothing behind: the next one starts again from the last checkpoint."""
        version = self._fixed if self._registry is None else self._registry.current()
        if version is None:
            raise RuntimeError(f"no promoted model version in {self._registry.root}: nothing to mirror yet")
        self._changed = {b"u:": set(), b"i:": set()}
        self._counts = set()
        self._applied = self._skipped = 0
        try:
            caught_up = self._read(version)
        except BaseException:
            self.state.discard()
            self._load()
            raise
        users, items = len(self._changed[b"u:"]), len(self._changed[b"i:"])
        logger.debug("mirror step %d: %d records applied, %d skipped", self._seq, self._applied, self._skipped)
        return MirrorStep(self._seq, self._applied, self._skipped, users, items, caught_up)

    def _read(self, version: str) -> bool:
        """The body of :meth:`step`; whether every partition reached its target."""
        before = dict(self._positions)
        if version != self._version:
            self._switch(version)
        targets = self._consumer.end_offsets(self._tps)  # read_committed: the last stable offsets
        deadline = time.monotonic() + self.step_timeout_s
        while time.monotonic() < deadline and any(self._consumer.position(tp) < targets[tp] for tp in self._tps):
            for tp, records in self._consumer.poll(timeout_ms=200, max_records=1 << 30).items():
                for record in records:
                    if self._positions[tp] <= record.offset < targets[tp]:
                        self._apply(tp, record)
                        self._positions[tp] = record.offset + 1
        caught_up = True
        for tp in self._tps:
            position = self._consumer.position(tp)  # past aborted records and transaction markers too
            if position > targets[tp]:
                self._consumer.seek(tp, targets[tp])  # records past the target wait for the next step
            self._positions[tp] = max(self._positions[tp], min(position, targets[tp]))
            caught_up &= self._positions[tp] >= targets[tp]
        positions = self.positions()
        self._replay = {k: v for k, v in self._replay.items() if positions.get(k, v) < v}  # replays done
        self._sum_counts()
        if self.state.pending or self._positions != before:
            self._checkpoint()
        return caught_up

    def positions(self) -> dict[str, int]:
        """``{"topic:partition": next offset to read}`` as of the last step."""
        return {tp_key(tp): offset for tp, offset in self._positions.items()}

    def close(self) -> None:
        try:
            self._consumer.close(timeout_ms=2000)
        finally:
            self.state.close()

    # ------------------------------------------------------------------ records
    def _apply(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        name, key, value = self._names[tp.topic], record.key or b"", record.value
        if name == _ITEMS:
            self._catalogue(tp, key, value)
            return
        if key.startswith(_MODEL_KEYS[name]):
            header = dict(record.headers or ()).get(MODEL_HEADER)
            if header is None or header.decode(errors="replace") != self._version:
                self._skipped += 1
                return
            if value is not None and key.startswith(b"t:") and len(value) >= ROW_HEADER.size:
                self._watermark_ms = max(self._watermark_ms, ROW_HEADER.unpack_from(value)[0])
        elif name == USER_STATE_TOPIC and key.startswith(_STREAM_KEYS):
            if record.offset < self._replay.get(tp_key(tp), 0):
                return  # a model switch's replay: the stream's keys are current already
            if key.startswith((b"c@", b"e@")):
                self._counts.add(key)
            elif key.startswith(b"na:") and value is not None and len(value) == _COUNT.size:
                self._watermark_ms = max(self._watermark_ms, _COUNT.unpack(value)[0])
        else:
            self._skipped += 1
            return
        self._put(key, value)

    def _catalogue(self, tp: TopicPartition, key: bytes, value: bytes | None) -> None:
        if value is None:
            self._put(b"cat:" + key, None)
            return
        try:
            item = check_record(tp.topic, key, value, self.kafka, self._limits)
        except InvalidEvent as exc:
            logger.warning("skipping an invalid catalogue record at %s: %s", tp_key(tp), exc)
            self._skipped += 1
            return
        assert isinstance(item, Item)  # check_record checked the topic's type
        self._watermark_ms = max(self._watermark_ms, item.ts_ms)
        self._put(b"cat:" + key, encode(item))

    def _put(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.state.delete(key)
        else:
            self.state.put(key, value)
        self._applied += 1
        for prefix, kind in _LOGGED.items():
            if key.startswith(prefix):
                self._changed[kind].add(key[len(prefix) :])

    def _sum_counts(self) -> None:
        """``c:<item>`` / ``e:<item>``: the sum of the item's per-partition counters (deleted when it has none)."""
        for key in self._counts:
            family, item = key[:1], key.partition(b":")[2]
            values = (self.state.lookup(b"%s@%d:%s" % (family, p, item)) for p in range(self._user_partitions))
            counts = [_COUNT.unpack(v)[0] for v in values if v is not None and len(v) == _COUNT.size]
            if counts:
                self.state.put(family + b":" + item, _COUNT.pack(sum(counts)))
            else:
                self.state.delete(family + b":" + item)

    # ------------------------------------------------------------------ model switch, checkpoint
    def _switch(self, version: str) -> None:
        """Drop every model row, and read the model rows' topics again from their start for the new version's."""
        logger.info("mirroring model version %s (was %s)", version, self._version)
        for prefix in (b"t:", b"p:"):
            for key, _ in self.state.scan(prefix):
                self._put(key, None)
        if self._version is not None:
            for tp in self._tps:
                if self._names[tp.topic] in _MODEL_KEYS and self._positions[tp] > self._start[tp]:
                    self._replay[tp_key(tp)] = max(self._replay.get(tp_key(tp), 0), self._positions[tp])
                    self._positions[tp] = self._start[tp]
                    self._consumer.seek(tp, self._start[tp])
        self._version = version

    def _checkpoint(self) -> None:
        self._seq += 1
        log = b"x:%016x:" % self._seq
        for kind, ids in self._changed.items():
            for ident in ids:
                self.state.put(log + kind + ident, b"")
        old = self._seq - self.change_log_steps
        if old > 0:
            for key, _ in self.state.scan(b"x:%016x:" % old):
                self.state.delete(key)
        meta = {
            "checkpoints": self._seq,
            "model_version": self._version,
            "watermark_ms": self._watermark_ms,
            "replay_until": self._replay,
        }
        self.state.checkpoint(self.positions(), meta)


class ChangelogSource:
    """A :class:`~publisher.source.ChangeSource` and :class:`~publisher.source.RowSource`: each pull is one mirror
    step, then :class:`~publisher.worker_source.WorkerSource` over the mirror's state (models from ``models_dir``)."""

    def __init__(self, mirror: ChangelogMirror, models_dir: str | Path) -> None:
        self.mirror = mirror
        self.rows = WorkerSource(mirror.state_dir, models_dir, change_log_checkpoints=mirror.change_log_steps)

    def changes_since(self, cursor: str) -> Changes:
        step = self.mirror.step()
        logger.debug("mirror step: %s", step)
        return self.rows.changes_since(cursor)

    def rows_for(
        self, model_version: str, users: Sequence[str], items: Sequence[str]
    ) -> tuple[Mapping[str, tuple[np.ndarray, tuple[str, ...]]], Mapping[str, np.ndarray]]:
        return self.rows.rows_for(model_version, users, items)

    def close(self) -> None:
        try:
            self.rows.close()
        finally:
            self.mirror.close()

    def __enter__(self) -> ChangelogSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
