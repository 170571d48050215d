"""The worker's event-time merge of its partitions: what makes its sequence of updates depend only on Kafka.

Each assigned partition has a queue of fetched, decoded records. Records are released in the order
``(event time, topic rank, partition, offset)``; one is released only when every other partition either has a
buffered record at or after it or has been read to its end (:meth:`PartitionMerge.blocked`), so the order never
depends on which fetch came back first. Catalogue and profile records rank before the behaviour that may refer to
them at the same event time. The merge also keeps, per partition, the next offset to apply (what a checkpoint
stores) and pauses partitions that run ahead of the others (back-pressure).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from streaming.events import Event

__all__ = ["TOPIC_RANK", "PartitionMerge", "Queued", "tp_key"]

# Ties in event time: catalogue and profiles before the behaviour that may refer to them.
TOPIC_RANK = {"items": 0, "users": 1, "impressions": 2, "clicks": 3}


@dataclass(frozen=True, slots=True)
class Queued:
    offset: int
    ts_ms: int
    event: Event | None  # None: a dead letter (already sent); only its offset matters


def tp_key(tp: TopicPartition) -> str:
    """``"topic:partition"``: how offsets are keyed in a checkpoint."""
    return f"{tp.topic}:{tp.partition}"


class PartitionMerge:
    """Queues of decoded records per partition, released in event-time order. ``names`` maps full topic names to
    the event topics' short names (``"clicks"``, ...), which give the tie-breaking rank."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.queues: dict[TopicPartition, deque[Queued]] = {}
        self.next: dict[TopicPartition, int] = {}  # next offset to apply per partition; -1 until known
        self.consumers: dict[TopicPartition, KafkaConsumer] = {}
        self.buffered = 0
        self._heads: list[tuple[int, int, int, int, TopicPartition]] = []
        self._paused: set[TopicPartition] = set()

    # ------------------------------------------------------------------ partitions
    def track(self, tp: TopicPartition, consumer: KafkaConsumer, start: int | None) -> None:
        """Follow ``tp`` read by ``consumer`` from offset ``start`` (``None``: wherever the consumer stands).

        The partition is resumed: kafka-python keeps the paused flag of a partition assigned again after a rebalance,
        while :meth:`forget` dropped the merge's record of that pause, so back-pressure would never resume it and the
        merge would wait on it for good (a worker stalled after a rebalance during a backlog)."""
        consumer.resume(tp)
        self.queues[tp] = deque()
        self.consumers[tp] = consumer
        self.next[tp] = -1
        if start is not None:
            self.seek(tp, start)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Drop what is buffered for ``tp`` and read it again from ``offset``."""
        self._clear(tp)
        self.consumers[tp].seek(tp, offset)
        self.next[tp] = offset

    def seek_to_end(self, tp: TopicPartition) -> None:
        self._clear(tp)
        self.consumers[tp].seek_to_end(tp)
        self.next[tp] = -1  # resolved from the consumer's position (:meth:`resolve_positions`)

    def forget(self, tps: set[TopicPartition]) -> None:
        """Stop following ``tps`` (revoked): their buffered records are dropped, to be read again by their owner."""
        for tp in tps:
            self.buffered -= len(self.queues.pop(tp, ()))
            self.next.pop(tp, None)
            self.consumers.pop(tp, None)
            self._paused.discard(tp)
        self._heads = [h for h in self._heads if h[4] not in tps]
        heapq.heapify(self._heads)

    def _clear(self, tp: TopicPartition) -> None:
        queue = self.queues[tp]
        self.buffered -= len(queue)
        queue.clear()
        self._heads = [h for h in self._heads if h[4] != tp]
        heapq.heapify(self._heads)

    # ------------------------------------------------------------------ records in
    def extend(self, tp: TopicPartition, records: list[Queued]) -> None:
        queue = self.queues.get(tp)
        if queue is None or not records:
            return  # revoked while the fetch was in flight
        was_empty = not queue
        queue.extend(records)
        self.buffered += len(records)
        if was_empty:
            self._push_head(tp)

    def _push_head(self, tp: TopicPartition) -> None:
        head = self.queues[tp][0]
        heapq.heappush(self._heads, (head.ts_ms, TOPIC_RANK[self.names[tp.topic]], tp.partition, head.offset, tp))

    # ------------------------------------------------------------------ records out
    def caught_up(self, tp: TopicPartition) -> bool:
        consumer = self.consumers[tp]
        highwater = consumer.highwater(tp)
        if highwater is None:
            return False
        try:
            return consumer.position(tp, timeout_ms=0) >= highwater
        except KafkaError:
            return False

    def blocked(self) -> bool:
        """True while some partition may still hold an earlier record than every buffered one."""
        return any(not self.queues[tp] and not self.caught_up(tp) for tp in self.queues)

    def ready(self) -> bool:
        """True when buffered records can be released now (nothing to wait for before applying them)."""
        return bool(self._heads) and not self.blocked()

    def idle(self) -> bool:
        return self.buffered == 0 and all(self.caught_up(tp) for tp in self.queues)

    def release(self, budget_s: float = 0.1) -> Iterator[tuple[TopicPartition, Queued]]:
        """Yield releasable records in merge order for up to ``budget_s`` (then at least to a multiple of 256), so
        that checkpoints and fetches keep their pace. ``next`` already points past a record when it is yielded."""
        released = 0
        deadline = time.monotonic() + budget_s
        # Positions and high-water marks change only inside poll(), so the full check runs once here; after that
        # only a partition that has just run dry can block the merge.
        blocked = not self._heads or self.blocked()
        while not blocked and self._heads and (released % 256 or time.monotonic() < deadline):
            _, _, _, _, tp = heapq.heappop(self._heads)
            queue = self.queues[tp]
            item = queue.popleft()
            self.buffered -= 1
            if queue:
                self._push_head(tp)
            else:
                blocked = not self.caught_up(tp)
            self.next[tp] = item.offset + 1
            released += 1
            yield tp, item

    # ------------------------------------------------------------------ positions
    def resolve_positions(self) -> None:
        """A partition never read from has no offset of its own yet: its consumer's position is where it starts.

        A partition whose every fetched record has been released moves on to its consumer's position too, which is
        past what the consumer skipped without returning it: the commit markers of transactional producers and the
        records of aborted transactions (read committed). Otherwise its offset would stay on the last marker, one
        short of the end for good: a lag of 1 that never goes away, and a group that never looks caught up."""
        for tp, nxt in self.next.items():
            if nxt >= 0:
                if not self.queues[tp]:
                    try:
                        position = self.consumers[tp].position(tp, timeout_ms=0)
                    except KafkaError:
                        position = None
                    if position is not None and position > nxt:
                        self.next[tp] = position
                continue
            if self.queues[tp]:
                self.next[tp] = self.queues[tp][0].offset
                continue
            try:
                position = self.consumers[tp].position(tp, timeout_ms=0)
            except KafkaError:
                position = None
            if position is not None:  # None until the consumer has resolved it (e.g. after seek_to_end)
                self.next[tp] = position

    def offsets(self) -> dict[str, int]:
        """``{"topic:partition": next offset}`` of every partition whose position is known."""
        return {tp_key(tp): nxt for tp, nxt in self.next.items() if nxt >= 0}

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind each partition's end (partitions whose end or position is not known yet are left out)."""
        out = {}
        for tp, consumer in self.consumers.items():
            highwater = consumer.highwater(tp)
            if highwater is not None and self.next.get(tp, -1) >= 0:
                out[tp] = max(0, highwater - self.next[tp])
        return out

    def backpressure(self, max_buffered: int) -> None:
        """Stop fetching partitions that already hold a lot while the merge waits on others."""
        limit = max(1, max_buffered // max(1, len(self.queues)))
        for tp, queue in self.queues.items():
            if len(queue) > limit and tp not in self._paused:
                self.consumers[tp].pause(tp)
                self._paused.add(tp)
            elif len(queue) <= limit // 2 and tp in self._paused:
                self.consumers[tp].resume(tp)
                self._paused.discard(tp)
