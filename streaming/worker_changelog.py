"""The worker's half of ``user_state = "changelog"``: its user state moves with its partitions (:mod:`streaming.changelog`).

A mixin of :class:`streaming.worker.Worker`. In this mode the commit point of a checkpoint is one Kafka
transaction, no longer the local RocksDB write:

1. the unfinished mini-batch is trained first, so no example waits in one worker while its partition moves;
2. the transaction holds the changed user-state keys (to ``user-state``, on each key's partition), the item
   gradients of the checkpoint's batches (to ``item-grads``) and the group's input offsets (with the group's
   metadata, so a member the group has replaced is fenced);
3. after it commits, the local RocksDB is written as a cache: the same keys, the changelog position of each
   partition held, the catalogue's offsets and the item-row mirror's positions.

A transaction Kafka refuses is abandoned: the staged changes and gradients are dropped, the in-memory state is
reloaded from the cache, and every partition is read again from the last committed offsets. A crash at any
moment is the same: whoever holds a partition next restores it from the changelog and resumes from the group's
committed offset, which moved in the same transaction as the changelog records of its events.

Model switches are not supported in this mode yet: a worker whose state belongs to another version than the
registry's current one refuses to start, and a promotion while it runs is logged, not followed.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, TopicPartition

from streaming.changelog import Changelog
from streaming.events import Event, Item
from streaming.examples import ExampleBuilder
from streaming.item_rows import partition_of
from streaming.learner import IncrementalLearner
from streaming.merge import tp_key

__all__ = ["ChangelogState"]

logger = logging.getLogger(__name__)


class ChangelogState:
    """The changelog half of :class:`streaming.worker.Worker` (uses its state, merge, builder, learner, group)."""

    def _init_changelog(self, meta: dict) -> None:
        clicks = self.kafka.topic("clicks")
        self.event_partitions = len(self._catalogue.partitions_for_topic(clicks) or ())
        self.changelog = Changelog(self.kafka, self.event_partitions)
        # The partitions whose state the local RocksDB holds, and the changelog offset it holds them up to.
        self._positions: dict[int, int] = {int(p): o for p, o in meta.get("changelog_positions", {}).items()}
        self._switch_warned = False
        self._to_move: set[TopicPartition] | None = None  # assigned, state not moved yet (Worker._on_assigned)
        # The group's committed offsets, read outside the group member: a rebalance callback runs on the member's
        # own network thread, which cannot block on a request. Read committed: an offset fetch waits for a
        # transaction still being completed (KIP-447 require_stable).
        self._committed_reader = KafkaConsumer(
            group_id=self.settings.group_id,
            client_id="freshtower-worker-offsets",
            isolation_level="read_committed",
            enable_auto_commit=False,
            **self.kafka.client_config(),
        )

    @property
    def held(self) -> set[int]:
        """The event partitions whose user state this worker holds."""
        return set(self._positions)

    # ------------------------------------------------------------------ partitions move
    def _move_state(self, assigned: set[TopicPartition]) -> None:
        """After an assignment, before anything is applied: drop the partitions no longer held from the cache,
        restore the assigned ones from the changelog (from their cached position; 0 for a partition new to this
        worker), reload, and read each assigned partition from the group's committed offset. (Records a poll
        fetched before this are dropped by the merge, which does not follow the partitions yet; the seek reads
        them again.)"""
        self._to_move = None
        assigned = {tp for tp in assigned if tp in self._group.assignment()}  # a later rebalance may have taken some
        # Partitions the merge still follows but the group took away without a revoke (a member it had dropped, a
        # zombie) would block it for good: no longer fetched, never caught up.
        self.merge.forget({tp for tp in self.merge.queues if self._names[tp.topic] != "items"} - assigned)
        partitions = {tp.partition for tp in assigned}
        start = time.perf_counter()
        # Nothing is staged or unsent after a committed checkpoint (a revoke commits one). Anything else never
        # committed (a member the group dropped without a revoke): its events are read again from the committed
        # offsets, so its changes and gradients go, and the item rows are mirrored again from the cache's positions.
        self.state.discard()
        self.item_path.drop_unsent()
        self.item_path.seek_rows(self.state.meta().get("rows_positions", {}))
        dropped = self.changelog.drop(self.state, self.held - partitions)
        self._positions = self.changelog.restore(
            self.state, {p: self._positions.get(p, 0) for p in partitions}, self.model_version
        )
        # The group's offsets are the ones that go with the changelog: resume every partition from them.
        self._stored_offsets = {
            k: v for k, v in self._stored_offsets.items() if k.rpartition(":")[0] == self.kafka.topic("items")
        }
        for tp in assigned:
            committed = self._committed_reader.committed(tp)
            if committed is not None:
                self._stored_offsets[tp_key(tp)] = committed
        meta = {**self.state.meta(), "changelog_positions": {str(p): o for p, o in self._positions.items()}}
        self.state.checkpoint(self._stored_offsets, meta)
        self._reload()
        for tp in assigned:
            self._track(tp, self._group)
            if tp_key(tp) not in self._stored_offsets and self.merge.next[tp] < 0:
                self.merge.seek(tp, 0)  # no committed offset and no cutoff to start from: from the start
        self.metrics.restore_seconds.set(time.perf_counter() - start)
        logger.info(
            "holding the user state of partitions %s (%d keys of other partitions dropped) in %.2f s",
            sorted(partitions), dropped, time.perf_counter() - start,
        )  # fmt: skip

    def _reload(self) -> None:
        """The builder and the learner again from the local RocksDB (after it changed under them)."""
        version = self._version
        self.builder = ExampleBuilder(self.settings.examples(), self.state, scoped=True)
        self.learner = IncrementalLearner(
            version.model, version.encoder, self.builder, self.settings.learner(version.train_config), self.state
        )
        self.pending = []

    def _misplaced(self, event: Event, partition: int) -> str | None:
        """Why ``event`` cannot be applied from ``partition`` (its user's state belongs to another partition, which
        another worker may hold: the user-keyed topics must be keyed by user id), or None."""
        if isinstance(event, Item):
            return None
        expected = partition_of(event.user_id, self.event_partitions)
        if expected == partition:
            return None
        return (
            f"user {event.user_id!r} on partition {partition}, but Kafka's default partitioner puts it on {expected}: "
            "with user_state=changelog, user-keyed topics must be keyed by user id"
        )

    # ------------------------------------------------------------------ checkpoint
    def _checkpoint_changelog(self) -> None:
        if not self._dlq.confirm(timeout_s=5):  # raises the send error of a refused dead letter
            logger.warning("%d dead letters not acknowledged yet: checkpoint postponed", self._dlq.unconfirmed)
            return
        self.merge.resolve_positions()
        if self.pending:
            self._train()  # no example stays behind in a partition's previous holder
        self.learner.flush()
        self.builder.flush()
        self.checkpoints += 1
        self._log_changes()
        offsets = self._offsets()
        assigned = {tp_key(tp) for tp in self._group.assignment()}
        txn = self.item_path.prepare(self.checkpoints, {k: v for k, v in offsets.items() if k in assigned})
        records = self.changelog.records(self.state.staged(), self.held)
        if not self.item_path.commit(txn, self._group, changelog=(self.changelog.topic, self.model_version, records)):
            self._abandon()
            return
        self._positions.update(self.item_path.changelog_positions)
        meta = {
            **self._meta(),
            "pending": [],
            "changelog_positions": {str(p): o for p, o in self._positions.items()},
            "rows_positions": self.item_path.positions(),
        }
        self._write(offsets, meta)

    def _abandon(self) -> None:
        """The transaction did not commit: forget what it held and read its events again."""
        logger.warning("checkpoint %d not committed: its events are read again", self.checkpoints)
        self.state.discard()
        self.item_path.drop_unsent()
        self._reload()
        meta = self.state.meta()
        self.checkpoints = int(meta.get("checkpoints", 0))
        self.item_path.seek_rows(meta.get("rows_positions", {}))
        for tp, consumer in list(self.merge.consumers.items()):
            if tp_key(tp) in self._stored_offsets or (self._start_ms is not None and self._names[tp.topic] != "items"):
                self._track(tp, consumer)  # back to the committed offset (or the model's cutoff, as at the start)
            else:
                self.merge.seek(tp, 0)  # from its start, as a new consumer of it reads

    def _close_changelog(self) -> None:
        self.changelog.close()
        self._committed_reader.close(timeout_ms=2000)

    def _follow_registry_changelog(self, current: str) -> None:
        if not self._switch_warned:
            self._switch_warned = True
            logger.error(
                "model %s was promoted, but model switches are not supported with user_state=changelog: staying on "
                "%s (stop every worker, clear the scale-out topics and restart them to switch)", current,
                self.model_version,
            )  # fmt: skip
