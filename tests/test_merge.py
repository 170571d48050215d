"""The event-time merge's back-pressure across a rebalance (no broker: a stand-in consumer)."""

from __future__ import annotations

from kafka import TopicPartition

from streaming.merge import PartitionMerge, Queued


class _Consumer:
    """What the merge calls on a consumer; the paused flags outlive a rebalance, as kafka-python 3.0 keeps them for a
    partition assigned again."""

    def __init__(self) -> None:
        self.paused: set[TopicPartition] = set()

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)

    def resume(self, tp: TopicPartition) -> None:
        self.paused.discard(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass


def test_a_partition_paused_before_a_rebalance_is_fetched_again_once_tracked_again() -> None:
    clicks, users = TopicPartition("p.clicks", 0), TopicPartition("p.users", 0)
    merge = PartitionMerge({"p.clicks": "clicks", "p.users": "users"})
    consumer = _Consumer()
    merge.track(clicks, consumer, 0)
    merge.track(users, consumer, 0)
    merge.extend(clicks, [Queued(k, 1000 + k, None) for k in range(10)])
    merge.backpressure(max_buffered=4)  # 10 buffered > 4 / 2 partitions: clicks runs ahead
    assert consumer.paused == {clicks}
    merge.forget({clicks, users})  # every partition revoked (eager rebalance) ...
    merge.track(clicks, consumer, 3)  # ... and assigned again
    merge.track(users, consumer, 0)
    assert consumer.paused == set()
