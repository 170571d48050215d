"""User state that moves with its partition: the worker's changelog topic, as Kafka Streams keeps one.

With ``user_state = "changelog"`` several workers share the event partitions. Every key of a user's state names
the user (``t:user:<u>``, ``p:user:<u>``, ``n:<u>``, ``na:<u>``, ``prof:<u>``, ``j:<u>\\t...``, ``k:<u>\\t...``),
and the user-keyed topics are partitioned by user id with Kafka's default partitioner, so a key belongs to the
event partition ``murmur2(user) % P``. Counters that are not one user's are kept per partition by the builder
(``c@<p>:<item>``, ``e@<p>:<item>``, ``s@<p>``), and so is event time (``w@<p>``): :class:`streaming.examples.ExampleBuilder`
``scoped``.

Each checkpoint sends the keys it changed to that partition of the compacted ``user-state`` topic, in the same
Kafka transaction as the item gradients and the group's input offsets (:meth:`streaming.item_path.ItemPath.commit`).
The worker's RocksDB is then a cache of the partitions it holds, written after the transaction committed, with
the changelog position of each partition. When partitions are assigned, :meth:`Changelog.restore` brings each
from its cached position (0 for a partition the worker did not hold) to the changelog's high watermark, and
:meth:`Changelog.drop` removes from the cache the partitions the worker no longer holds. The worker resumes
each partition from the group's committed offset, which was committed with the changelog records of the same
events: nothing is applied twice or lost, whoever held the partition before and however it stopped.

What stays local (not in the changelog): the catalogue (every worker reads all of ``items``), the item rows (a
mirror of ``item-rows``) and the logQ frequency estimate (each worker estimates it from its own share of the
stream).
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, TopicPartition

from streaming.item_rows import MODEL_HEADER, partition_of
from streaming.settings import KafkaSettings
from streaming.state import StateStore
from streaming.topics import USER_STATE_TOPIC

__all__ = ["USER_STATE", "Changelog", "partition_of_key"]

logger = logging.getLogger(__name__)

USER_STATE = USER_STATE_TOPIC
_USER_PREFIXES = (b"t:user:", b"p:user:", b"n:", b"na:", b"prof:")
_WINDOW_PREFIXES = (b"j:", b"k:")  # the join windows: "<user>\t<request>\t<item>"
_SCOPED_PREFIXES = (b"c@", b"e@", b"s@", b"w@")  # per partition: counters "<p>:<item>", "<p>"; watermark "<p>"


def partition_of_key(key: bytes, partitions: int) -> int | None:
    """The event partition a state key belongs to, or None for a key that is not partitioned (kept locally)."""
    for prefix in _USER_PREFIXES:
        if key.startswith(prefix):
            return partition_of(key[len(prefix) :].decode(), partitions)
    for prefix in _WINDOW_PREFIXES:
        if key.startswith(prefix):
            return partition_of(key[len(prefix) :].split(b"\t", 1)[0].decode(), partitions)
    for prefix in _SCOPED_PREFIXES:
        if key.startswith(prefix):
            return int(key[len(prefix) :].split(b":", 1)[0])
    return None


class Changelog:
    """The ``user-state`` topic of ``kafka``: records to send, restore into a :class:`StateStore`, drop from it."""

    def __init__(self, kafka: KafkaSettings, partitions: int, *, transaction_timeout_ms: int = 10_000) -> None:
        self.topic = kafka.topic(USER_STATE)
        self.partitions = partitions
        self._timeout_s = 3 * transaction_timeout_ms / 1000
        self._reader = KafkaConsumer(
            group_id=None,
            client_id="freshtower-worker-restore",
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **kafka.client_config(),
        )
        self._hw = KafkaConsumer(group_id=None, client_id="freshtower-worker-restore-hw", **kafka.client_config())
        found = len(self._reader.partitions_for_topic(self.topic) or ())
        if found != partitions:
            # Partition p of user-state is the changelog of event partition p: the counts must match.
            raise RuntimeError(
                f"{self.topic} has {found} partitions and the event topics {partitions}: create the scale-out "
                "topics with the event topics' partition count"
            )
        self.restored = 0  # records restored since this process started

    def records(self, staged: dict[bytes, bytes | None], held: set[int]) -> list[tuple[int, bytes, bytes | None]]:
        """``(partition, key, value)`` of every partitioned key in ``staged`` (None: a delete). A key of a partition
        the worker does not hold is a bug upstream (the worker checks each event's partition): it raises."""
        out = []
        for key, value in staged.items():
            partition = partition_of_key(key, self.partitions)
            if partition is None:
                continue
            if partition not in held:
                raise RuntimeError(f"state key {key!r} of partition {partition}, which this worker does not hold")
            out.append((partition, key, value))
        return out

    def restore(self, state: StateStore, positions: dict[int, int], model_version: str) -> dict[int, int]:
        """Stage into ``state`` what the changelog holds for each partition of ``positions`` after its position, up
        to the high watermark (a transaction a killed worker left open has ended by then); returns the new
        positions. Records of another model version are a bug (switches are not supported in this mode): raises."""
        tps = [TopicPartition(self.topic, p) for p in sorted(positions)]
        if not tps:
            return {}
        self._reader.assign(tps)
        for tp in tps:
            self._reader.seek(tp, positions[tp.partition])
        end = self._hw.end_offsets(tps)
        deadline = time.monotonic() + self._timeout_s
        records = 0
        while any(self._reader.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                behind = {tp.partition: (self._reader.position(tp), end[tp]) for tp in tps}
                raise RuntimeError(f"{self.topic}: a transaction did not end in time; at/end {behind}")
            for batch in self._reader.poll(timeout_ms=500).values():
                for record in batch:
                    version = dict(record.headers or ()).get(MODEL_HEADER, b"").decode()
                    if version != model_version:
                        raise RuntimeError(
                            f"{self.topic}[{record.partition}]@{record.offset} holds state of model {version}, this "
                            f"worker runs {model_version}: model switches are not supported with user_state=changelog"
                        )
                    if record.value is None:
                        state.delete(record.key)
                    else:
                        state.put(record.key, record.value)
                    records += 1
        self._reader.assign([])
        self.restored += records
        logger.info("restored %d state records of partitions %s", records, sorted(positions))
        return {tp.partition: end[tp] for tp in tps}

    def drop(self, state: StateStore, partitions: set[int]) -> int:
        """Stage the deletion of every cached key of ``partitions`` (no longer held); returns how many."""
        if not partitions:
            return 0
        dropped = 0
        for prefix in (*_USER_PREFIXES, *_WINDOW_PREFIXES, *_SCOPED_PREFIXES):
            for key, _ in state.scan(prefix):
                if partition_of_key(key, self.partitions) in partitions:
                    state.delete(key)
                    dropped += 1
        return dropped

    def close(self) -> None:
        for consumer in (self._reader, self._hw):
            try:
                consumer.close(timeout_ms=2000)
            except Exception:  # noqa: BLE001
                logger.debug("close failed", exc_info=True)
