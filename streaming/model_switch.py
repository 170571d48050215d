"""The streaming worker's model switch: a newly promoted version replaces the online one (DESIGN.md "Updating the
model").

The online ID rows were trained through the old version's dense layers, so they are dropped; the clicks after the
new version's data cutoff are re-read from Kafka and learnt again through it (SGD only: the builder's counters, the
last-N lists and the logQ frequency estimate have counted them already and are the stream's, not the model's, so
they carry over unchanged). The unfinished mini-batch of the old version is dropped too, its clicks being in the
replay; the frequency estimate, which counts a batch when it is trained, counts that batch at the switch
(:func:`streaming.learner.count_clicks`), so every click is counted once whether or not a switch came between.
"""

from __future__ import annotations

import logging

from kafka import TopicPartition

from streaming.events import Click, Event
from streaming.examples import Example
from streaming.learner import IncrementalLearner, count_clicks
from streaming.merge import tp_key
from trainer.artifact import ModelVersion, load_version

__all__ = ["ModelSwitch"]

logger = logging.getLogger(__name__)


class ModelSwitch:
    """The switch half of :class:`streaming.worker.Worker` (a mixin: it uses the worker's state, merge and learner)."""

    def _rewind(self, tp: TopicPartition, from_ms: int) -> None:
        """Re-read the clicks of ``tp`` from event time ``from_ms`` for SGD only (a model switch's replay)."""
        until = self.merge.next[tp]
        # ListOffsets through the catalogue consumer: it has no group, so this is safe inside a rebalance callback.
        found = self._catalogue.offsets_for_times({tp: from_ms}, timeout_ms=30_000).get(tp)
        start = until if found is None else min(found.offset, until)
        if start >= until:
            return
        self._replay_until[tp_key(tp)] = max(until, self._replay_until.get(tp_key(tp), 0))
        self.merge.seek(tp, start)
        logger.info("replaying %s from offset %d to %d for the new model", tp_key(tp), start, until)

    def _replay(self, event: Event) -> None:
        """A click the state has already counted, re-learnt by a new model: SGD only, counters untouched (the
        frequency estimate's too: ``Example.replay``).

        Its history is rebuilt from the user's current last-N (the clicks before it, when it is still in the list):
        exact while the user has made fewer than N clicks since, an approximation beyond."""
        if not isinstance(event, Click):
            return
        history = self.builder.last_n.get(event.user_id, [])
        if event.item_id in history:
            history = history[: len(history) - 1 - history[::-1].index(event.item_id)]
        self._add_pending(Example(event.user_id, event.item_id, event.ts_ms, tuple(history), None, replay=True))
        if len(self.pending) >= self.settings.batch_size:
            self._train()

    def _reset_tables(self, version: ModelVersion) -> None:
        """Drop every online ID row and admission count (trained through another model's dense layers) and the
        unfinished mini-batch (counted into the frequency estimate here; its clicks are in the replay), and record
        that the clicks after ``version``'s data cutoff must be replayed: one atomic write, so after a crash the
        worker either still runs the old version or resumes the switch."""
        for prefix in (b"t:", b"p:"):
            for key, _ in self.state.scan(prefix):
                self.state.delete(key)
        meta = self.state.meta()
        unfinished = [e["item_id"] for e in meta.get("pending", []) if not e.get("replay", False)]
        step = count_clicks(self.state, self.settings.learner(version.train_config), unfinished)
        self.model_version = version.version_id
        self._replay_from_ms = version.data_cutoff_ms + 1
        meta = {
            **meta,
            "model_version": self.model_version,
            "replay_from_ms": self._replay_from_ms,
            "pending": [],
            "frequency_step": step,
        }
        self.state.checkpoint(self.state.offsets(), meta)

    def switch_model(self, version: ModelVersion) -> None:
        """Adopt a newly promoted version: fresh online rows, then replay the clicks after its data cutoff."""
        logger.info(
            "switching from model %s to %s (cutoff %d)", self.model_version, version.version_id, version.data_cutoff_ms
        )
        self.checkpoint()
        self._reset_tables(version)
        self.pending = []  # the old model's unfinished batch: those clicks are replayed below
        if self.item_path is not None:
            self.item_path.rewind()  # the owners' rows of the new version, from the start
        self.learner = IncrementalLearner(
            version.model, version.encoder, self.builder, self.settings.learner(version.train_config), self.state
        )
        self._observe_model(version)
        self.metrics.model_switches.inc()
        self.merge.resolve_positions()
        for tp in list(self.merge.queues):
            if self._names[tp.topic] == "clicks":
                self._rewind(tp, self._replay_from_ms)
        self._replay_from_ms = None
        self.checkpoint()

    def _observe_model(self, version: ModelVersion) -> None:
        self.metrics.observe_model(
            version.version_id, version.data_cutoff_ms, int(version.manifest.get("created_ms", 0))
        )

    def _poll_registry(self) -> None:
        if self.registry is None:
            return
        current = self.registry.current()
        if current and current != self.model_version and self.scaled:
            self._follow_registry_changelog(current)
        elif current and current != self.model_version:
            self.switch_model(load_version(self.registry.path(current)))
