"""Malformed records go to the dead-letter topic with their reason; good records around them flow on."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer

from streaming.consumer import EventConsumer
from streaming.events import Click, encode

pytestmark = pytest.mark.kafka

NOW = int(time.time() * 1000)


def click_json(**changes) -> bytes:
    body = {"v": 1, "type": "click", "user_id": "u1", "item_id": "i1", "request_id": "r1", "ts_ms": NOW - 1000}
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


# (key, value, expected reason fragment); each is sent between two good clicks.
BAD = [
    (b"u1", b'{"v": 1, "type": "click", "user_id": ', "not valid UTF-8 JSON"),
    (b"u1", click_json(item_id=42), "click.item_id: expected a non-empty string"),
    (b"u1", click_json(position="first", request_id=...), "unknown field(s) ['position']"),
    (b"u1", click_json(request_id=...), "missing field 'request_id'"),
    (b"u1", click_json(ts_ms=-1), "negative timestamp -1"),
    (b"u1", click_json(ts_ms=NOW + 30 * 86_400_000), "h in the future"),
    (b"u1", click_json(request_id="x" * 40_000), "bytes, limit is 16384"),
    (b"u1", click_json(v=7), "unknown schema version 7"),
    (b"u2", click_json(), "record key 'u2' does not match the event's key 'u1'"),
    (
        b"i1",
        b'{"v":1,"type":"item","item_id":"i1","category":"c","tags":[],"stats":{},"created_ms":1,"ts_ms":1}',
        "record of type 'item' does not belong on topic",
    ),
    (b"u1", None, "empty record: value is null"),
]


def test_each_bad_record_reaches_the_dead_letter_topic_with_its_reason(kafka_settings):
    clicks_topic = kafka_settings.topic("clicks")
    good = [Click("u1", f"i{n}", f"r{n}", NOW - 10_000 + n) for n in range(len(BAD) + 1)]
    producer = KafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers, acks="all")
    sent_offsets = []
    for n, g in enumerate(good):
        producer.send(clicks_topic, key=b"u1", value=encode(g), partition=0).get(timeout=30)
        if n < len(BAD):
            key, value, _ = BAD[n]
            meta = producer.send(clicks_topic, key=key, value=value, partition=0).get(timeout=30)
            sent_offsets.append(meta.offset)
    producer.close()

    group = f"g-{uuid.uuid4().hex[:8]}"
    received = []
    with EventConsumer(kafka_settings, group, ["clicks"]) as consumer:
        deadline = time.monotonic() + 60
        while len(received) < len(good) and time.monotonic() < deadline:
            received += consumer.poll(timeout_ms=500)
        consumer.commit()
        assert consumer.stats.dead_letters[clicks_topic] == len(BAD)
        assert consumer.stats.consumed[clicks_topic] == len(good)
    assert [r.event for r in received] == good

    dlq = KafkaConsumer(
        kafka_settings.topic("deadletter"),
        bootstrap_servers=kafka_settings.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    # Dead letters keep their original key, so they spread over the topic's partitions.
    letters = sorted(dlq, key=lambda m: int(dict(m.headers)["source.offset"]))
    dlq.close()
    assert len(letters) == len(BAD)
    for letter, (key, value, reason), offset in zip(letters, BAD, sent_offsets, strict=True):
        headers = {k: v.decode() for k, v in letter.headers}
        assert reason in headers["reason"], headers["reason"]
        assert (letter.key, letter.value) == (key, value)  # the original bytes, untouched
        assert headers["source.topic"] == clicks_topic
        assert int(headers["source.offset"]) == offset
        assert headers["consumer"] == group  # which group found it: each group that reads the topic reports it

    # Offsets were committed after the dead letters were acknowledged: the group has nothing left.
    with EventConsumer(kafka_settings, group, ["clicks"]) as again:
        leftovers = []
        for _ in range(4):
            leftovers += again.poll(timeout_ms=500)
        assert leftovers == []
        assert sum(again.stats.dead_letters.values()) == 0
