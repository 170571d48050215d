"""Writing events to Kafka: the right topic, the right key, the event time as the record time."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kafka import KafkaProducer

from streaming.events import Event, encode, event_key
from streaming.settings import KafkaSettings
from streaming.topics import topic_for

__all__ = ["EventProducer"]

logger = logging.getLogger(__name__)


class EventProducer:
    """Sends events keyed by ``user_id`` (catalogue records by ``item_id``), with ``acks=all``.

    The default partitioner hashes the key with murmur2, as the Java client does, so a user's
    impressions, clicks and profile land on the same partition number of their topics.
    """

    def __init__(self, settings: KafkaSettings, *, linger_ms: int = 20, batch_size: int = 256 * 1024) -> None:
        self.settings = settings
        self._producer = KafkaProducer(
            **settings.producer_config(),
            acks="all",
            linger_ms=linger_ms,
            batch_size=batch_size,
            retries=2**31 - 1,
            max_in_flight_requests_per_connection=1,  # retries must not reorder a user's events
            client_id="freshtower-producer",
        )

    def send(self, event: Event) -> None:
        self._producer.send(
            topic_for(event, self.settings), value=encode(event), key=event_key(event), timestamp_ms=event.ts_ms
        )

    def send_all(self, events: Iterable[Event]) -> int:
        n = 0
        for event in events:
            self.send(event)
            n += 1
        return n

    def flush(self, timeout_s: float | None = None) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
        self.close()
