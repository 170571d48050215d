"""Fan-out: every published version also goes to a compacted Kafka topic that replicas materialise.

The topic ``<topic_prefix>embeddings`` has one partition (a version's records and its marker must
stay in order) and ``cleanup.policy=compact``. A version is written inside one Kafka transaction:
its rows keyed ``u:<user_id>`` / ``i:<item_id>`` (values are the store's row bytes,
:mod:`publisher.records`, removals included as rows flagged removed), then an end-of-version marker
keyed ``m`` carrying the meta, the ``since`` version and the row count. Replicas read with
``isolation_level=read_committed``, so a publisher that dies mid-version leaves nothing they can
see; its next transaction fences the old one.

A :class:`Replica` buffers rows until their version's marker and then applies them to its own
local :class:`~publisher.store.Store` as one publish, storing the offset after the marker as its
cursor in the same batch, so a restarted replica resumes exactly there. Compaction keeps the
newest record per key, so a replica started later reads the latest row of every key followed by
the latest marker and lands on that version in one step (its rows stamped with that version).
The row count in the marker is for monitoring: after compaction fewer rows may precede it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from publisher.records import Delta, Meta, Publish, decode_item, decode_user, encode_item, encode_user
from publisher.store import Store
from streaming.lifecycle import RetryBudget
from streaming.settings import KafkaSettings
from streaming.topics import connect_admin, wait_for_metadata

__all__ = ["Fanout", "Replica", "ensure_fanout_topic"]

logger = logging.getLogger(__name__)

MARKER = b"m"


def ensure_fanout_topic(settings: KafkaSettings, topic: str, *, timeout_s: float = 30.0) -> None:
    """Create the compacted single-partition fan-out topic if it is missing, and wait for its leader."""
    deadline = time.monotonic() + timeout_s
    admin = connect_admin(settings, "freshtower-fanout-admin", deadline)
    try:
        if topic not in set(admin.list_topics()):
            configs = {"cleanup.policy": "compact"}
            try:
                admin.create_topics([NewTopic(topic, 1, settings.replication_factor, topic_configs=configs)])
                logger.info("created fan-out topic %s", topic)
            except TopicAlreadyExistsError:
                pass
        wait_for_metadata(admin, [topic], deadline)
    finally:
        admin.close()


class Fanout:
    """Writes versions to the fan-out topic, one Kafka transaction per :meth:`send`.

    ``transactional_id`` must be stable across restarts of the same publisher (the default is
    derived from the topic): a restarted publisher fences and aborts its predecessor's open transaction.
    """

    def __init__(self, kafka: KafkaSettings, *, topic: str = "embeddings", transactional_id: str | None = None) -> None:
        self.topic = kafka.topic(topic)
        self._kafka = kafka
        self._transactional_id = transactional_id or f"{self.topic}.publisher"
        ensure_fanout_topic(kafka, self.topic)
        self._producer: KafkaProducer | None = None

    def _connect(self) -> KafkaProducer:
        if self._producer is None:
            producer = KafkaProducer(
                **self._kafka.producer_config(),
                transactional_id=self._transactional_id,
                acks="all",
                linger_ms=20,
                batch_size=512 * 1024,
                client_id="freshtower-fanout",
            )
            producer.init_transactions()
            self._producer = producer
        return self._producer

    def send(self, delta: Delta, meta: Meta) -> int:
        """Write ``delta``'s rows and an end-of-version marker for ``meta`` atomically; returns the row count."""
        producer = self._connect()
        producer.begin_transaction()
        try:
            for uid, row in delta.users.items():
                value = encode_user(row.version, None if row.removed else row.vector, row.last_n)
                producer.send(self.topic, key=b"u:" + uid.encode(), value=value, partition=0)
            for iid, item in delta.items.items():
                value = encode_item(item.version, None if item.removed else item.vector)
                producer.send(self.topic, key=b"i:" + iid.encode(), value=value, partition=0)
            rows = len(delta.users) + len(delta.items)
            marker = {"meta": asdict(meta), "since": delta.since, "rows": rows}
            producer.send(self.topic, key=MARKER, value=json.dumps(marker).encode(), partition=0)
            producer.commit_transaction()
        except Exception:
            # The producer may be unusable (fenced, broker gone): drop it, the next send starts afresh
            # and its init_transactions aborts whatever this one left open.
            self.close()
            raise
        logger.info("fanned out version %d: %d rows since version %d", meta.version, rows, delta.since)
        return rows

    def close(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except KafkaError:
                logger.warning("fan-out producer did not close cleanly", exc_info=True)
            self._producer = None


class Replica:
    """Materialises the fan-out topic into a local ``store``, one complete version at a time."""

    def __init__(self, kafka: KafkaSettings, store: Store, *, topic: str = "embeddings") -> None:
        self.store = store
        self.topic = kafka.topic(topic)
        ensure_fanout_topic(kafka, self.topic)
        self._tp = TopicPartition(self.topic, 0)
        self._consumer = KafkaConsumer(
            **kafka.client_config(),
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            client_id="freshtower-replica",
        )
        self._consumer.assign([self._tp])
        with store.reader() as view:
            meta = view.meta()
        if meta is not None and meta.cursor.isdigit():
            self._consumer.seek(self._tp, int(meta.cursor))
        else:
            self._consumer.seek_to_beginning(self._tp)
        self._users: dict[str, bytes] = {}
        self._items: dict[str, bytes] = {}

    def poll(self, timeout_s: float = 1.0) -> list[Meta]:
        """Read what arrived; apply every version whose marker came. Returns the metas applied."""
        applied: list[Meta] = []
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=10_000)
        for record in batches.get(self._tp, []):
            key = record.key or b""
            if key == MARKER:
                meta = self._complete(json.loads(record.value), record.offset)
                if meta is not None:
                    applied.append(meta)
            elif key.startswith(b"u:"):
                self._users[key[2:].decode()] = record.value
            elif key.startswith(b"i:"):
                self._items[key[2:].decode()] = record.value
            else:
                logger.warning("fan-out record at offset %d has an unknown key %r; skipped", record.offset, key)
        return applied

    def _complete(self, marker: dict, offset: int) -> Meta | None:
        primary = Meta(**marker["meta"])
        users, items = self._users, self._items
        self._users, self._items = {}, {}
        with self.store.reader() as view:
            local = view.version()
        if primary.version <= local:
            return None  # a version re-sent after a publisher crash: already applied
        user_rows = {k: decode_user(v) for k, v in users.items()}
        item_rows = {k: decode_item(v) for k, v in items.items()}
        publish = Publish(
            version=primary.version,
            watermark_ms=primary.watermark_ms,
            model_version=primary.model_version,
            cursor=str(offset + 1),
            users={k: (r.vector, r.last_n) for k, r in user_rows.items() if not r.removed},
            items={k: r.vector for k, r in item_rows.items() if not r.removed},
            removed_users=frozenset(k for k, r in user_rows.items() if r.removed),
            removed_items=frozenset(k for k, r in item_rows.items() if r.removed),
        )
        meta = self.store.apply(publish)
        logger.info("replica applied version %d (%d rows)", meta.version, publish.rows())
        return meta

    def lag(self) -> int:
        """Records (and transaction markers) between the replica's position and the topic's end."""
        end = self._consumer.end_offsets([self._tp])[self._tp]
        return max(0, end - self._consumer.position(self._tp))

    def catch_up(self, timeout_s: float = 60.0, *, min_version: int = 0) -> Meta | None:
        """Read to the end of the topic as it is now (and on until ``min_version`` is applied); return the local meta.

        A committed transaction's markers reach the partition a moment after the commit returns,
        so a caller that knows which version it expects passes ``min_version``.
        """
        end = self._consumer.end_offsets([self._tp])[self._tp]
        deadline = time.monotonic() + timeout_s
        while True:
            with self.store.reader() as view:
                meta = view.meta()
            if self._consumer.position(self._tp) >= end and (meta.version if meta else 0) >= min_version:
                return meta
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"replica of {self.topic} at offset {self._consumer.position(self._tp)} and version "
                    f"{meta.version if meta else 0}; wanted offset {end} and version {min_version} within {timeout_s} s"
                )
            self.poll(timeout_s=0.2)

    def run(self, stop: threading.Event, *, retry_s: float = 120.0) -> None:
        """Apply versions as they arrive until ``stop`` is set. Kafka errors are retried for ``retry_s``; one that
        retrying cannot mend (a batch the client cannot read) raises :class:`~streaming.lifecycle.KafkaStalled`."""
        budget = RetryBudget(f"poll of {self.topic}", retry_s)
        while not stop.is_set():
            try:
                self.poll(timeout_s=0.5)
            except KafkaError as exc:
                budget.failed(exc)
                stop.wait(0.5)
                continue
            budget.ok()

    def close(self) -> None:
        self._consumer.close(timeout_ms=2000)
