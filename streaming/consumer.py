"""Reading events from Kafka: decode, validate, and route every bad record to the dead-letter topic.

Every record a poll returns is accounted for: it is either handed to the caller as a decoded event
or written to the dead-letter topic with its original key, value and a ``reason`` header. Offsets
are committed only after the dead-letter writes are acknowledged, so a crash between the two
re-reads the records rather than losing them (a dead letter may then be written twice; an event
is never silently dropped).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from streaming.events import Event, InvalidEvent, Limits, decode, event_key
from streaming.settings import KafkaSettings
from streaming.topics import DEADLETTER, type_for_topic

__all__ = [
    "DeadLetter",
    "DeadLetterWriter",
    "EventConsumer",
    "RebalanceCallbacks",
    "Received",
    "check_record",
    "subscribe",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Received:
    """A decoded event and where it came from."""

    topic: str
    partition: int
    offset: int
    event: Event


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that failed validation, as it is written to the dead-letter topic.

    ``consumer``: the consumer group that found it. Every group that reads the topic (the workers, the archive
    sink) validates the record and dead-letters it, so a bad record appears once per group; the header tells
    the copies apart.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    consumer: str = ""

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("reason", self.reason.encode()),
            ("source.topic", self.topic.encode()),
            ("source.partition", str(self.partition).encode()),
            ("source.offset", str(self.offset).encode()),
            ("consumer", self.consumer.encode()),
        ]


class DeadLetterWriter:
    """Writes the records a consumer group refuses to the dead-letter topic, and says when Kafka has them all.

    Offsets past a bad record may become durable only once its dead letter is acknowledged: a crash in between
    then re-reads the record and dead-letters it again (twice at worst, never lost)."""

    def __init__(self, settings: KafkaSettings, group_id: str, client_id: str) -> None:
        self.group_id = group_id
        self._topic = settings.topic(DEADLETTER)
        self._producer = KafkaProducer(
            **settings.producer_config(), acks="all", linger_ms=5, retries=10**9, client_id=client_id
        )
        self._pending: list = []  # send futures not yet confirmed

    def send(self, record: ConsumerRecord, reason: str) -> None:
        letter = DeadLetter(
            record.topic, record.partition, record.offset, record.key, record.value, reason, self.group_id
        )
        logger.warning("dead letter %s[%d]@%d: %s", letter.topic, letter.partition, letter.offset, reason)
        self._pending.append(
            self._producer.send(self._topic, key=letter.key, value=letter.value, headers=letter.headers())
        )

    def confirm(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` (``None``: as long as it takes) for every dead letter sent so far. ``False`` while
        some are still in flight (Kafka is away); raises the send error of one Kafka refused for good."""
        if not self._pending:
            return True
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError:
            pass
        if not all(future.is_done for future in self._pending):
            return False
        pending, self._pending = self._pending, []
        for future in pending:
            future.get()
        return True

    @property
    def unconfirmed(self) -> int:
        return len(self._pending)

    def close(self, timeout_s: float = 2.0) -> None:
        self._producer.close(timeout=timeout_s)


def check_record(topic: str, key: bytes | None, value: bytes | None, settings: KafkaSettings, limits: Limits) -> Event:
    """Decode one record and check that it sits on the right topic under the right key."""
    event = decode(value, limits)
    expected_type = type_for_topic(topic, settings)
    if expected_type is not None and not isinstance(event, expected_type):
        raise InvalidEvent(f"record of type '{event.TYPE}' does not belong on topic {topic}")
    if key != event_key(event):
        # A wrong key puts the user's state on another worker's partition.
        shown = key.decode(errors="replace") if key is not None else None
        raise InvalidEvent(f"record key {shown!r} does not match the event's key {event_key(event).decode()!r}")
    return event


class RebalanceCallbacks(ConsumerRebalanceListener):
    """kafka-python's listener interface over two plain callables (a worker's own methods)."""

    def __init__(
        self,
        on_assigned: Callable[[set[TopicPartition]], None],
        on_revoked: Callable[[set[TopicPartition]], None],
    ) -> None:
        self._on_assigned, self._on_revoked = on_assigned, on_revoked

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._on_revoked(revoked)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._on_assigned(assigned)


def subscribe(
    consumer: KafkaConsumer,
    topics: Sequence[str],
    on_assigned: Callable[[set[TopicPartition]], None],
    on_revoked: Callable[[set[TopicPartition]], None],
) -> None:
    """Join ``consumer``'s group for ``topics`` once their partitions are known to the client.

    A member that joins before its first metadata response is assigned nothing, and kafka-python notices the
    partitions only at the next periodic metadata refresh (``metadata_max_age_ms``, 5 minutes): a sink or a
    worker that sits idle that long at start-up. Asking for each topic's partitions first closes that window."""
    for topic in topics:
        consumer.partitions_for_topic(topic)
    consumer.subscribe(list(topics), listener=RebalanceCallbacks(on_assigned, on_revoked))


@dataclass
class ConsumerStats:
    consumed: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)


class EventConsumer:
    """A consumer-group member over event topics (logical names such as ``"clicks"``).

    ``poll`` returns the decoded events; ``commit`` makes the dead letters durable and then
    commits the offsets of everything polled so far.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        group_id: str,
        topics: Sequence[str],
        *,
        auto_offset_reset: str = "earliest",
        client_id: str = "freshtower-consumer",
    ) -> None:
        self.settings = settings
        self.group_id = group_id
        self.limits = Limits(max_bytes=settings.max_record_bytes, max_future_ms=settings.max_future_ms)
        self.stats = ConsumerStats()
        self._consumer = KafkaConsumer(
            *[settings.topic(t) for t in topics],
            **settings.client_config(),
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            # Larger than the validation limit: an oversized record must reach validation (and the
            # dead-letter topic) rather than stall the fetcher.
            max_partition_fetch_bytes=max(1 << 20, 4 * settings.max_record_bytes),
        )
        self._dlq = DeadLetterWriter(settings, group_id, f"{client_id}-dlq")

    def poll(self, timeout_ms: int = 1000, max_records: int = 5000) -> list[Received]:
        batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        out: list[Received] = []
        for records in batches.values():
            for record in records:
                received = self._handle(record)
                if received is not None:
                    out.append(received)
        return out

    def _handle(self, record: ConsumerRecord) -> Received | None:
        try:
            event = check_record(record.topic, record.key, record.value, self.settings, self.limits)
        except InvalidEvent as exc:
            self._dead_letter(record, exc.reason)
            return None
        except Exception as exc:  # a bug in validation must not stop the stream; keep the record
            logger.exception("unexpected error decoding %s[%d]@%d", record.topic, record.partition, record.offset)
            self._dead_letter(record, f"internal error while decoding: {type(exc).__name__}: {exc}")
            return None
        self.stats.consumed[record.topic] += 1
        return Received(record.topic, record.partition, record.offset, event)

    def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        self._dlq.send(record, reason)
        self.stats.dead_letters[record.topic] += 1

    def commit(self) -> None:
        """Flush dead letters (raising if Kafka did not take them), then commit polled offsets."""
        self._dlq.confirm()  # raises the send error: the offsets stay uncommitted
        self._consumer.commit()

    def assignment(self) -> set[TopicPartition]:
        return self._consumer.assignment()

    def close(self) -> None:
        self._dlq.confirm()
        self._dlq.close()
        self._consumer.close()

    def __enter__(self) -> EventConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
