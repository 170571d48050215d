"""The event-time merge (streaming.merge) on the real broker: input written by transactional producers, and
back-pressure across a rebalance."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streaming.merge import PartitionMerge, Queued, tp_key


@pytest.mark.kafka
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


@pytest.mark.kafka
def test_a_partition_paused_before_a_rebalance_is_fetched_again_once_tracked_again(kafka_settings):
    """kafka-python keeps the paused flag of a partition assigned to the consumer again; the merge's record of the
    pause goes with forget(), so track() must resume it or back-pressure never would."""
    clicks, users = (TopicPartition(kafka_settings.topic(n), 0) for n in ("clicks", "users"))
    consumer = KafkaConsumer(group_id=None, **kafka_settings.client_config())
    consumer.assign([clicks, users])
    merge = PartitionMerge({clicks.topic: "clicks", users.topic: "users"})
    merge.track(clicks, consumer, 0)
    merge.track(users, consumer, 0)
    merge.extend(clicks, [Queued(k, 1000 + k, None) for k in range(10)])
    merge.backpressure(max_buffered=4)  # 10 buffered > 4 / 2 partitions: clicks runs ahead
    assert consumer.paused() == {clicks}
    merge.forget({clicks, users})  # every partition revoked (eager rebalance) ...
    consumer.assign([clicks, users])  # ... and assigned again: the client keeps the flag
    assert consumer.paused() == {clicks}
    merge.track(clicks, consumer, 3)
    merge.track(users, consumer, 0)
    assert consumer.paused() == set()
    consumer.close()
