"""The event-time merge on input written by transactional producers (streaming.merge), on the real broker."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streaming.merge import PartitionMerge, Queued, tp_key

pytestmark = pytest.mark.kafka


def test_a_drained_partition_moves_past_commit_markers_and_aborted_records(kafka_settings):
    topic = kafka_settings.topic("clicks")
    tp = TopicPartition(topic, 0)
    producer = KafkaProducer(
        **kafka_settings.producer_config(), transactional_id=f"t-{uuid.uuid4().hex[:6]}", enable_idempotence=True
    )
    producer.init_transactions()
    for commit, values in ((True, [b"a", b"b"]), (False, [b"x"]), (True, [b"c"])):
        producer.begin_transaction()
        for value in values:
            producer.send(topic, value=value, partition=0)
        producer.flush()  # in the log before the abort too
        (producer.commit_transaction if commit else producer.abort_transaction)()
    producer.close()
    # The log: a@0 b@1 marker@2 x@3 (aborted) marker@4 c@5 marker@6; its end is 7.
    consumer = KafkaConsumer(group_id=None, isolation_level="read_committed", **kafka_settings.client_config())
    consumer.assign([tp])
    merge = PartitionMerge({topic: "clicks"})
    merge.track(tp, consumer, 0)
    got, deadline = [], time.monotonic() + 30
    while len(got) < 3 and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            merge.extend(tp, [Queued(r.offset, 1000 + r.offset, r.value) for r in records])
        got += [(item.offset, item.event) for _, item in merge.release()]
    assert got == [(0, b"a"), (1, b"b"), (5, b"c")]
    assert merge.offsets() == {tp_key(tp): 6}  # one past c: on the last marker
    merge.resolve_positions()
    assert merge.offsets() == {tp_key(tp): 7}  # drained: the consumer's position, past the marker
    assert merge.lag() == {tp: 0}
    consumer.close()
