"""The streaming worker: Kafka -> event-time merge -> examples -> incremental SGD -> atomic checkpoints.

Why kafka-python rather than faust agents: the worker must store its Kafka offsets *inside* the
same RocksDB write batch as the state they produced, and seek to them on restart. Faust commits
offsets itself and keeps table state in changelog topics; making both agree after a SIGKILL would
mean fighting the framework. Here the consumer is a plain group member with auto-commit off; the
checkpoint is the source of truth and the group offsets are only published for lag monitoring.

Determinism is what makes recovery exact. Events are applied in a merge of all assigned
partitions ordered by ``(event time, topic, partition, offset)``; an event is released only when
every other assigned partition either has a buffered event at or after it or has been read to its
end. Mini-batches are cut every ``batch_size`` clicks of that sequence. So the sequence of updates
depends only on what is in Kafka, and after a SIGKILL the worker reloads the last checkpoint, seeks
to its offsets and re-applies exactly the updates that were lost. (A partial batch is trained
early only once everything in Kafka has been read and its oldest click has waited ``max_batch_delay_s``,
which in a live stream depends on timing. The merge itself is :mod:`streaming.merge`.)
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from streaming.consumer import DeadLetterWriter, check_record, subscribe
from streaming.events import Click, Event, InvalidEvent, Limits
from streaming.examples import Example, ExampleBuilder
from streaming.item_path import ItemPath
from streaming.learner import IncrementalLearner
from streaming.lifecycle import RetryBudget
from streaming.merge import TOPIC_RANK, PartitionMerge, Queued, tp_key
from streaming.metrics import WorkerMetrics
from streaming.model_switch import ModelSwitch
from streaming.settings import KafkaSettings
from streaming.state import StateStore
from streaming.worker_changelog import ChangelogState
from streaming.worker_checkpoint import Checkpoints
from streaming.worker_settings import WorkerSettings
from trainer.artifact import ModelVersion
from trainer.registry import Registry

__all__ = ["Worker", "WorkerSettings"]  # WorkerSettings lives in streaming.worker_settings

logger = logging.getLogger(__name__)

_USER_TOPICS = ("users", "impressions", "clicks")


class Worker(ModelSwitch, Checkpoints, ChangelogState):
    """One member of the worker group. ``run`` until ``stop`` is set (or the stream stays idle)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: WorkerSettings,
        version: ModelVersion,
        *,
        registry: Registry | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.kafka = kafka
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.registry = registry
        self.state = StateStore(settings.state_dir, sync=settings.sync)
        meta = self.state.meta()
        self.scaled = settings.user_state == "changelog"  # several workers share the partitions (streaming.changelog)
        self._version = version
        self.builder = ExampleBuilder(settings.examples(), self.state, scoped=self.scaled)
        # Clicks partitions being replayed after a model switch: apply SGD only, up to these offsets.
        self._replay_until: dict[str, int] = dict(meta.get("replay_until", {}))
        # Clicks partitions a new worker reads from before its model's cutoff: last-N lists only, up to these offsets.
        self._history_until: dict[str, int] = dict(meta.get("history_until", {}))
        # Set while the clicks after a new model's cutoff still have to be re-read (cleared once rewound).
        self._replay_from_ms: int | None = meta.get("replay_from_ms")
        self.model_version = meta.get("model_version") or version.version_id
        if self.scaled and self.model_version != version.version_id:
            raise RuntimeError(
                f"the state in {settings.state_dir} belongs to model {self.model_version}, the registry's current one "
                f"is {version.version_id}: model switches are not supported with user_state=changelog"
            )
        if self.model_version != version.version_id:
            # The state was trained against another version (this one was promoted while the worker was down).
            self._reset_tables(version)
        self.learner = IncrementalLearner(
            version.model, version.encoder, self.builder, settings.learner(version.train_config), self.state
        )
        self._observe_model(version)
        self._start_ms = version.data_cutoff_ms + 1 if settings.start_at_cutoff else None
        self.pending: list[Example] = [  # none after a switch at start-up: _reset_tables dropped them
            Example(**{**e, "history": tuple(e["history"])}) for e in self.state.meta().get("pending", [])
        ]
        self._closed = False
        self.checkpoints = int(meta.get("checkpoints", 0))
        self._stored_offsets = self.state.offsets()
        self._limits = Limits(max_bytes=kafka.max_record_bytes, max_future_ms=kafka.max_future_ms)
        self._names = {kafka.topic(name): name for name in TOPIC_RANK}
        self.merge = PartitionMerge(self._names)
        self._last_checkpoint = time.monotonic()
        self._last_applied = time.monotonic()
        self._pending_since = time.monotonic()  # when the oldest click of the unfinished batch was applied
        self._last_model_check = time.monotonic()
        self._status = (time.monotonic(), 0)  # (when, events applied) of the last status line
        self.applied = 0
        # Wall-clock time of the last progress (events applied, or nothing left to apply). Kept in the checkpoint,
        # so a worker that restarts and stalls again keeps reporting how long it has been stuck.
        self._progress_s = float(meta.get("progress_s", time.time()))
        self._poll_budget = RetryBudget(
            "poll of the event topics", settings.retry_s, on_failure=self.metrics.count_kafka_error
        )
        common = {
            **kafka.client_config(),
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_partition_fetch_bytes": max(1 << 20, 4 * kafka.max_record_bytes),
            "fetch_max_bytes": 8 << 20,
            "reconnect_backoff_max_ms": 2000,
            # Full fetches: with incremental fetch sessions (KIP-227) the broker leaves a partition with nothing new out
            # of the response, and a partition assigned again after a rebalance then never learns its high watermark
            # (kafka-python 3.0 resets it): an empty partition (a quiet users topic) would block the merge for good.
            "enable_incremental_fetch_sessions": False,
        }
        self._group = KafkaConsumer(
            group_id=settings.group_id,
            group_instance_id=settings.member_id(),
            session_timeout_ms=settings.session_timeout_ms,
            client_id="freshtower-worker",
            # With item owners the group's offsets are committed in transactions: read committed, its offset
            # fetches wait for a transaction still being completed (KIP-447 require_stable), as recovery needs.
            isolation_level="read_committed" if settings.item_rows == "owner" else "read_uncommitted",
            **common,
        )
        subscribe(self._group, [kafka.topic(t) for t in _USER_TOPICS], self._on_assigned, self._on_revoked)
        # The catalogue is global: every worker reads every partition of the items topic, outside the group.
        self._catalogue = KafkaConsumer(group_id=None, client_id="freshtower-worker-items", **common)
        self._dlq = DeadLetterWriter(kafka, settings.group_id, "freshtower-worker-dlq")
        self.item_path: ItemPath | None = None
        if settings.item_rows == "owner":  # item rows owned by the item owners (streaming.item_path)
            self.item_path = ItemPath(
                kafka, f"{settings.group_id}-{settings.member_id()}", meta.get("rows_positions", {})
            )
            if not self.scaled:  # with a changelog the local state is written after the transaction: nothing to redo
                self.item_path.recover(meta.get("item_txn"), self._group)
        if self.scaled:
            self._init_changelog(meta)
        self._assigned_items = False
        self._update_gauges()

    # ------------------------------------------------------------------ partitions
    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.scaled:
            # Restoring takes a while, and this runs on the group member's network thread (no heartbeats meanwhile):
            # the run loop moves the state before it applies anything (streaming.worker_changelog).
            self._to_move = set(assigned)
            return
        for tp in assigned:
            self._track(tp, self._group)
        if any(self._names[tp.topic] == "clicks" for tp in assigned):
            self._replay_from_ms = None  # rewound; the next checkpoint records the replay bounds instead
        logger.info("assigned %s", sorted(tp_key(tp) for tp in assigned))

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked and not self._closed:
            self.checkpoint()
        self.merge.forget(revoked)

    def _track(self, tp: TopicPartition, consumer: KafkaConsumer) -> None:
        stored = self._stored_offsets.get(tp_key(tp))
        self.merge.track(tp, consumer, stored)
        if self._replay_from_ms is not None and stored is not None and self._names[tp.topic] == "clicks":
            self._rewind(tp, self._replay_from_ms)
        elif stored is None and self._start_ms is not None and self._names[tp.topic] not in ("items", "users"):
            # A new worker starts where its model's training data ends: the model has learnt what came before.
            # Catalogue and profiles are state (compacted topics): read whole. The clicks of the last
            # last_n_idle_ms before the cutoff are read too, for the users' last-N lists only.
            # The end first: read after an empty lookup, it could already hold records written since, at or after
            # the cutoff, which starting there would skip.
            end = self._catalogue.end_offsets([tp])[tp]
            found = self._catalogue.offsets_for_times({tp: self._start_ms}, timeout_ms=30_000).get(tp)
            start = found.offset if found is not None else end
            if self._names[tp.topic] == "clicks":
                since = max(0, self._start_ms - self.settings.last_n_idle_ms)
                early = self._catalogue.offsets_for_times({tp: since}, timeout_ms=30_000).get(tp)
                if early is not None and early.offset < start:
                    self._history_until[tp_key(tp)] = start
                    logger.info("%s: last-N lists from offset %d, learning from %d", tp_key(tp), early.offset, start)
                    start = early.offset
            self.merge.seek(tp, start)

    def _assign_catalogue(self) -> None:
        topic = self.kafka.topic("items")
        partitions = self._catalogue.partitions_for_topic(topic)
        if not partitions:
            return
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self._catalogue.assign(tps)
        for tp in tps:
            self._track(tp, self._catalogue)
        self._assigned_items = True

    # ------------------------------------------------------------------ fetch
    def _fetch(self, timeout_ms: int) -> int:
        n = 0
        # The catalogue is polled without waiting: it is quiet most of the time, and a wait on it each cycle idled
        # the worker for a third of its time while the behaviour partitions had records ready.
        for consumer, wait_ms in ((self._catalogue, 0), (self._group, timeout_ms)):
            try:
                # No max_records: a poll that stops mid-partition leaves records in the client's
                # in-line slot, and while that slot is taken the client never restores the records it
                # parked for a resumed partition (kafka-python 3.0), which stalls a paused partition
                # for good. fetch_max_bytes bounds what one poll brings instead.
                batches = consumer.poll(timeout_ms=wait_ms, max_records=1 << 30)
            except KafkaError as exc:  # retried within the budget; a batch it cannot read raises KafkaStalled
                self._poll_budget.failed(exc)
                time.sleep(0.5)
                continue
            self._poll_budget.ok()
            for tp, records in batches.items():
                if tp in self.merge.queues:  # else revoked while the fetch was in flight
                    self.merge.extend(tp, [self._decode(record) for record in records])
                    n += len(records)
        return n

    def _decode(self, record) -> Queued:
        try:
            event = check_record(record.topic, record.key, record.value, self.kafka, self._limits)
        except InvalidEvent as exc:
            reason = exc.reason
        except Exception as exc:  # a bug in validation must not stop the stream; keep the record
            logger.exception("unexpected error decoding %s[%d]@%d", record.topic, record.partition, record.offset)
            reason = f"internal error while decoding: {type(exc).__name__}: {exc}"
        else:
            reason = self._misplaced(event, record.partition) if self.scaled else None
            if reason is None:
                return Queued(record.offset, event.ts_ms, event)
        self._dlq.send(record, reason)
        self.metrics.dead_letters.labels(record.topic).inc()
        return Queued(record.offset, -1, None)

    # ------------------------------------------------------------------ apply
    def _release(self, budget_s: float = 0.1) -> int:
        """Apply what the merge releases for up to ``budget_s``; returns the events applied (dead letters aside)."""
        applied = 0
        for tp, item in self.merge.release(budget_s):
            key = tp_key(tp)
            replay_until = self._replay_until.get(key)
            if replay_until is not None and item.offset + 1 >= replay_until:
                del self._replay_until[key]
            history_until = self._history_until.get(key)
            if history_until is not None and item.offset + 1 >= history_until:
                del self._history_until[key]
            if item.event is None:
                continue
            self.builder.partition = tp.partition  # (scoped: the partition its state and counters belong to)
            if history_until is not None and item.offset < history_until:
                if isinstance(item.event, Click):
                    self.builder.remember(item.event)
            elif replay_until is not None and item.offset < replay_until:
                self._replay(item.event)
            else:
                self._apply(tp, item.event)
            applied += 1
        return applied

    def _apply(self, tp: TopicPartition, event: Event) -> None:
        self.metrics.events.labels(tp.topic).inc()
        duplicates = self.builder.stats.duplicates
        example = self.builder.add(event)
        if self.builder.stats.duplicates != duplicates:
            self.metrics.duplicates.inc()
        if example is not None:
            self._add_pending(example)
            if len(self.pending) >= self.settings.batch_size:
                self._train()

    def _add_pending(self, example: Example) -> None:
        if not self.pending:
            self._pending_since = time.monotonic()
        self.pending.append(example)

    def _train(self) -> None:
        batch, self.pending = self.pending, []
        if not self.settings.learn:
            return
        with self.metrics.sgd_seconds.time():
            loss = self.learner.learn_batch(batch)
        if self.item_path is not None:
            self.item_path.take(self.model_version, self.learner.outbox)
            self.learner.outbox.clear()
        if math.isfinite(loss):
            self.metrics.examples.inc(len(batch))
        else:
            self.metrics.skipped_steps.inc()
        if self.learner.batches % self.settings.expire_every_batches == 0:
            self.learner.expire(self.builder.expiry_ms)
            self.builder.expire()

    # ------------------------------------------------------------------ loop
    def _log_status(self, every_s: float = 5.0) -> None:
        """One progress line every ``every_s``: what a person watching the worker wants to know."""
        now = time.monotonic()
        since, before = self._status
        if now - since < every_s:
            return
        self._status = (now, self.applied)
        lag = sum(self.merge.lag().values())
        logger.info(
            "applied %d events (%.0f/s), %d examples, %d/%d user/item rows, watermark %s, lag %d, model %s",
            self.applied, (self.applied - before) / (now - since), self.learner.examples, len(self.learner.users),
            len(self.learner.items), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.builder.watermark_ms / 1000)),
            lag, self.model_version,
        )  # fmt: skip

    def idle(self) -> bool:
        return self.merge.idle()

    def run(
        self,
        stop: threading.Event,
        *,
        exit_when_idle_s: float | None = None,
        beat: Callable[[], None] | None = None,
    ) -> None:
        """Fetch, merge, apply, checkpoint until ``stop`` is set; SIGTERM-safe (checkpoints on the way out).

        ``beat`` is called every cycle (a :class:`~streaming.lifecycle.ProcessGuard`'s watchdog). Kafka errors that
        outlast ``retry_s`` or cannot be retried raise :class:`~streaming.lifecycle.KafkaStalled`."""
        try:
            while not stop.is_set():
                if beat is not None:
                    beat()
                if not self._assigned_items:
                    self._assign_catalogue()
                # Records ready to apply: take what has arrived without waiting. Waiting on a partition: briefly.
                fetched = self._fetch(timeout_ms=0 if self.merge.ready() else 50 if self.merge.buffered else 200)
                if self.scaled and self._to_move is not None:
                    self._move_state(self._to_move)
                if not self._group.assignment():
                    continue  # do not apply the catalogue ahead of user partitions that are not assigned yet
                if self.item_path is not None:
                    self.item_path.follow(self.learner.items, self.model_version)
                released = self._release()
                if released:
                    self._last_applied = time.monotonic()
                    self.applied += released
                    self._progress_s = time.time()
                elif fetched == 0 and self.idle():
                    self._progress_s = time.time()  # nothing to do is not a stall
                self._log_status()
                self.merge.backpressure(self.settings.max_buffered_events)
                now = time.monotonic()
                quiet = now - self._last_applied
                waited = now - self._pending_since
                if self.pending and fetched == 0 and waited >= self.settings.max_batch_delay_s and self.idle():
                    # Everything there is has been read: do not hold clicks back from the model for longer. (While
                    # there is a backlog, batches fill from it, so replays stay independent of timing.)
                    self._train()
                if now - self._last_checkpoint >= self.settings.checkpoint_interval_s:
                    self.checkpoint()
                if now - self._last_model_check >= self.settings.model_poll_s:
                    self._last_model_check = now
                    self._poll_registry()
                if exit_when_idle_s is not None and not self.pending and quiet >= exit_when_idle_s and self.idle():
                    break
                self._update_gauges()
            self.checkpoint()
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        closers = (
            lambda: self._group.close(timeout_ms=2000),  # bounded: a broker that is away cannot hold up a stop
            lambda: self._catalogue.close(timeout_ms=2000),
            self._dlq.close,
            lambda: self.item_path is not None and self.item_path.close(),
            self.state.close,
        )
        for closer in closers:
            try:
                closer()
            except Exception:  # closing after a broker outage may fail; the checkpoint already made it
                logger.debug("close failed", exc_info=True)

    def summary(self) -> dict:
        return {
            "checkpoints": self.checkpoints,
            "watermark_ms": self.builder.watermark_ms,
            "examples": self.learner.examples,
            "batches": self.learner.batches,
            "user_rows": len(self.learner.users),
            "item_rows": len(self.learner.items),
            "offsets": json.loads(json.dumps(self._offsets())),
        }
