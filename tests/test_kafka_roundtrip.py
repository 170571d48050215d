"""100,000 synthetic events through the real broker and back, intact, each user on one partition."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict

import pytest
from kafka.partitioner.default import murmur2

from streaming.consumer import EventConsumer
from streaming.events import encode, event_key
from streaming.producer import EventProducer
from streaming.replay import replay
from streaming.sources.synthetic import SyntheticWorld, WorldConfig
from streaming.topics import EVENT_TOPICS, topic_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

N_EVENTS = 100_000


def java_partition(key: bytes, partitions: int) -> int:
    # The Java client's default partitioner: positive murmur2 of the key bytes, modulo partitions.
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def test_hundred_thousand_events_come_back_intact_and_user_local(kafka_settings):
    world = SyntheticWorld(WorldConfig(seed=7, n_users=3000, n_items=2000))
    events = list(world.events(limit=N_EVENTS))
    assert len(events) == N_EVENTS

    with EventProducer(kafka_settings) as producer:
        stats = replay(events, producer, progress=False)
    assert stats.sent == N_EVENTS

    received = []
    with EventConsumer(kafka_settings, f"g-{uuid.uuid4().hex[:8]}", list(EVENT_TOPICS.values())) as consumer:
        deadline = time.monotonic() + 180
        while len(received) < N_EVENTS and time.monotonic() < deadline:
            received += consumer.poll(timeout_ms=500)
        consumer.commit()
        assert sum(consumer.stats.dead_letters.values()) == 0
    assert len(received) == N_EVENTS

    # Intact: the same records, byte for byte, each on its topic.
    sent_records = sorted((topic_for(e, kafka_settings), encode(e)) for e in events)
    got_records = sorted((r.topic, encode(r.event)) for r in received)
    assert got_records == sent_records

    # Keys place each user on one partition number across impressions, clicks and profiles,
    # the one the Java client would choose, and a user's events keep their order per topic.
    partitions_of_user: dict[str, set[int]] = defaultdict(set)
    sent_order: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    got_order: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    for e in events:
        sent_order[(topic_for(e, kafka_settings), event_key(e).decode())].append(encode(e))
    for r in sorted(received, key=lambda r: (r.topic, r.partition, r.offset)):
        key = event_key(r.event)
        assert r.partition == java_partition(key, kafka_settings.partitions)
        if r.event.TYPE != "item":
            partitions_of_user[r.event.user_id].add(r.partition)
        got_order[(r.topic, key.decode())].append(encode(r.event))
    assert len(partitions_of_user) > 100
    assert all(len(p) == 1 for p in partitions_of_user.values())
    assert got_order == sent_order
