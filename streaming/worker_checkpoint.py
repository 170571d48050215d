"""The streaming worker's checkpoint: state, offsets and the unfinished mini-batch in one atomic RocksDB write.

A mixin of :class:`streaming.worker.Worker` (it uses the worker's state, merge, learner, builder and consumer).
With ``item_rows = "owner"`` the checkpoint also holds the transaction record of the item gradients gathered since
the last one, and sends it after the write (:mod:`streaming.item_path`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from streaming.merge import tp_key

__all__ = ["Checkpoints"]

logger = logging.getLogger(__name__)


class Checkpoints:
    """The checkpoint half of :class:`streaming.worker.Worker`."""

    def _offsets(self) -> dict[str, int]:
        return {**self._stored_offsets, **self.merge.offsets()}

    def checkpoint(self) -> None:
        """Make state, offsets and the unfinished mini-batch durable in one atomic write.

        Dead letters sent so far are confirmed first: the offsets written below move past their records,
        so a dead letter Kafka has not acknowledged would be lost in a crash. While Kafka is away the
        checkpoint is postponed; a dead letter Kafka refused for good raises (the records are read and
        dead-lettered again after the restart). With ``user_state = "changelog"``: :mod:`streaming.worker_changelog`."""
        if self.scaled:
            self._checkpoint_changelog()
            return
        if not self._dlq.confirm(timeout_s=5):  # raises the send error of a refused dead letter
            logger.warning("%d dead letters not acknowledged yet: checkpoint postponed", self._dlq.unconfirmed)
            return
        self.merge.resolve_positions()
        self.learner.flush()
        self.checkpoints += 1
        self._log_changes()
        meta = {
            **self._meta(),
            "pending": [asdict(e) for e in self.pending],
            "replay_until": self._replay_until,
            "history_until": self._history_until,
            "replay_from_ms": self._replay_from_ms,
        }
        offsets = self._offsets()
        txn = None
        if self.item_path is not None:
            assigned = {tp_key(tp) for tp in self._group.assignment()}
            txn = self.item_path.prepare(self.checkpoints, {k: v for k, v in offsets.items() if k in assigned})
            meta["item_txn"] = txn
            meta["rows_positions"] = self.item_path.positions()
        self._write(offsets, meta)
        if txn is not None:
            self.item_path.commit(txn, self._group)  # also commits the group's offsets (never a plain commit then)
        else:
            self._commit_group(offsets)

    def _meta(self) -> dict:
        """What every checkpoint's metadata holds, whichever way it commits."""
        return {
            "checkpoints": self.checkpoints,
            "watermark_ms": self.builder.watermark_ms,
            "model_version": self.model_version,
            "builder": asdict(self.builder.stats),
            "progress_s": self._progress_s,
            **self.learner.meta(),
        }

    def _write(self, offsets: dict[str, int], meta: dict) -> None:
        """The local RocksDB write of a checkpoint (state, offsets, metadata in one batch) and its gauges."""
        self.state.checkpoint(offsets, meta)
        self._stored_offsets = offsets
        self._last_checkpoint = time.monotonic()
        self.metrics.checkpoint.set(time.time())
        self._update_gauges()

    def _log_changes(self) -> None:
        """Record which users and items changed in this checkpoint, for the publisher to pick up."""
        seq = b"x:%016x:" % self.checkpoints
        users = self.learner.users.changed | self.builder.changed_users
        for ident in users:
            self.state.put(seq + b"u:" + ident.encode(), b"")
        for ident in self.learner.items.changed | self.builder.changed_items:
            self.state.put(seq + b"i:" + ident.encode(), b"")
        self.learner.users.changed.clear()
        self.learner.items.changed.clear()
        self.builder.changed_users.clear()
        self.builder.changed_items.clear()
        old = self.checkpoints - self.settings.change_log_checkpoints
        if old > 0:
            for key, _ in self.state.scan(b"x:%016x:" % old):
                self.state.delete(key)

    def _commit_group(self, offsets: dict[str, int]) -> None:
        commit = {
            tp: OffsetAndMetadata(offsets[tp_key(tp)], "", -1)
            for tp in self._group.assignment()
            if tp_key(tp) in offsets
        }
        if commit:
            try:
                self._group.commit_async(commit)
            except KafkaError as exc:
                logger.info("group offset commit skipped: %s", exc)

    def _update_gauges(self) -> None:
        self.metrics.watermark.set(self.builder.watermark_ms / 1000)
        self.metrics.rows.labels("user").set(len(self.learner.users))
        self.metrics.rows.labels("item").set(len(self.learner.items))
        self.metrics.buffered.set(self.merge.buffered)
        self.metrics.progress.set(self._progress_s)
        for tp, lag in self.merge.lag().items():
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
