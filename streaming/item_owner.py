"""The owner of item-ID rows: gradients in, rows out, exactly once, one owner per row.

An :class:`ItemOwner` is a member of a Kafka consumer group on ``item-grads`` (:mod:`streaming.item_rows`). For
the partitions it is assigned it holds the item rows in an :class:`~streaming.tables.EmbeddingTable`, the same
table, admission and row-wise Adagrad a single worker trains its item rows with, and it applies every gradient
record of those partitions in offset order. Each :meth:`ItemOwner.step` is one Kafka transaction (KIP-98, with
the consumer group's metadata for fencing, KIP-447):

1. poll gradient records of the owned partitions;
2. apply them to the table (admission counts, then Adagrad on the summed gradient of each record), in waves:
   every item's first record of the step in one vectorised call, then every item's second, and so on, which
   gives the rows record-by-record application would (:func:`streaming.item_rows.apply_in_waves`);
3. send every state change the table staged (rows, admission counts, removals as tombstones) to ``item-rows``,
   on the item's partition;
4. add the consumed offsets to the transaction and commit.

So the rows in ``item-rows`` and the gradient offsets committed for the group move together: a SIGKILL at any
moment leaves either the whole step or none of it, and the next owner of the partition (the same process
restarted, or another member after a rebalance) restores the table from ``item-rows`` (read committed) and
re-reads the gradients after the committed offset. Nothing is applied twice or lost. An owner that the group has
replaced but that is still running (a long pause) is fenced by the broker when it commits; it aborts, drops its
table and rejoins.

Determinism: the rows of an item depend only on the gradient records of its partition, in offset order, and on
admission (``min_count``), so two runs over the same gradient records give the same rows, whatever the polls'
sizes, restarts or rebalances, as long as the table neither evicts (``max_rows``) nor expires (``idle_ms``,
checked every ``expire_every`` steps against the newest event time owned), whose timing follows the batches.

Model switches: when a polled gradient names the registry's current version (the workers have switched to a
promoted version), the owner adopts it: its table starts again from that version's rows, and gradients of the
older version are dropped from then on. Rows carry their version, so readers never mix the two.

Restoring reads each owned partition of ``item-rows`` from its start (the topic is compacted, so this is about
one record per row and admission count) to its high watermark, so that a transaction still open there (the last
step of a killed owner) has ended first; rows of another model version are skipped. Keeping a local copy with
its changelog position, as Kafka Streams does, would make a restart cheaper; it is not done yet.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from streaming.consumer import subscribe
from streaming.item_rows import MODEL_HEADER, Gradient, apply_in_waves, decode_gradient, item_of_key, partition_of
from streaming.metrics import OwnerMetrics
from streaming.settings import KafkaSettings
from streaming.state import StateStore
from streaming.tables import EmbeddingTable, TableSettings
from trainer.artifact import ModelVersion, load_version
from trainer.registry import Registry

__all__ = ["ItemOwner", "OwnerSettings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OwnerSettings:
    """Settings of one item owner. ``table``: as the single worker's item table (its ``lr``, ``min_count``...)."""

    state_dir: Path = Path("data/item-owner")
    group_id: str = "freshtower-item-owner"
    instance_id: str = ""
    table: TableSettings = field(default_factory=TableSettings)
    poll_ms: int = 200
    expire_every: int = 100
    session_timeout_ms: int = 15_000
    # A killed owner's open transaction holds back the rows of its partitions until the broker aborts it: this long
    # (plus the broker's abort check, every 10 s by default). A restarted member with the same instance_id aborts it
    # at once.
    transaction_timeout_ms: int = 10_000
    # A loop that has not come round for this long is stuck inside a client call: the worker replaces the role
    # (streaming.owner_role), a standalone owner exits (69) for its supervisor to restart it. 0: off. Longer than a
    # restore may wait for a killed owner's transaction (3 x transaction_timeout_ms).
    stall_s: float = 120.0

    def member(self) -> str:
        return self.instance_id or f"owner-{uuid.uuid4().hex[:8]}"


@dataclass
class OwnerStats:
    steps: int = 0
    gradients: int = 0
    rows_sent: int = 0
    dropped: int = 0  # gradient records of another model version, or unreadable
    restores: int = 0
    restored_records: int = 0
    switches: int = 0


class ItemOwner:
    """One member of the item-owner group over ``kafka``'s ``item-grads`` (module docstring)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: OwnerSettings,
        version: ModelVersion,
        metrics: OwnerMetrics | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.kafka = kafka
        self.settings = settings
        self.metrics = metrics or OwnerMetrics()
        self.registry = registry
        self._adopt(version)
        self.grads_topic = kafka.topic("item-grads")
        self.rows_topic = kafka.topic("item-rows")
        self.stats = OwnerStats()
        self.beat_at = time.monotonic()  # the loop's last round (streaming.owner_role's watchdog)
        self._beat: Callable[[], None] | None = None
        self.member = settings.member()
        self.owned: set[int] = set()
        self._generation = 0
        self._store: StateStore | None = None
        self.table: EmbeddingTable | None = None
        self._newest_ms = 0
        self._moved = False
        self._closed = False
        common = {**kafka.client_config(), "isolation_level": "read_committed", "auto_offset_reset": "earliest"}
        self._rows = KafkaConsumer(group_id=None, client_id="freshtower-item-owner-restore", **common)
        self._hw = KafkaConsumer(group_id=None, client_id="freshtower-item-owner-hw", **kafka.client_config())
        self.partitions = len(self._rows.partitions_for_topic(self.rows_topic) or ())
        if not self.partitions:
            raise RuntimeError(f"topic {self.rows_topic} does not exist: create the item-path topics first")
        grads = len(self._rows.partitions_for_topic(self.grads_topic) or ())
        if grads != self.partitions:
            # Partition p of item-rows is the changelog of partition p of item-grads: the counts must match.
            raise RuntimeError(f"{self.grads_topic} has {grads} partitions and {self.rows_topic} {self.partitions}")
        self.producer = KafkaProducer(
            **kafka.producer_config(),
            client_id="freshtower-item-owner",
            transactional_id=f"{settings.group_id}-{self.member}",
            enable_idempotence=True,
            transaction_timeout_ms=settings.transaction_timeout_ms,
        )
        self.producer.init_transactions()  # fences an earlier life of this member and aborts what it left open
        self.consumer = KafkaConsumer(
            group_id=settings.group_id,
            client_id="freshtower-item-owner",
            enable_auto_commit=False,
            session_timeout_ms=settings.session_timeout_ms,
            **common,
        )
        subscribe(self.consumer, [self.grads_topic], self._on_assigned, self._on_revoked)
        self.beat_at = time.monotonic()

    def _adopt(self, version: ModelVersion) -> None:
        self.model_version = version.version_id
        self._base = version.model.item_tower.id_table.weight.detach().numpy().copy()
        self._index = {token: k for k, token in enumerate(version.encoder.item_vocab.tokens, start=1)}

    def _follow_switch(self, batches: dict) -> None:
        """Adopt the registry's current version when a polled gradient names it (the workers switched): the table
        starts again from that version's rows, and the older version's gradients are dropped, as the workers dropped
        the rows they were trained on (:mod:`streaming.model_switch`)."""
        if self.registry is None:
            return
        named = {
            dict(r.headers or ()).get(MODEL_HEADER, b"").decode() for records in batches.values() for r in records
        } - {self.model_version}
        if not named:
            return
        current = self.registry.current()
        if current is None or current not in named:
            return
        logger.info("switching item rows from model %s to %s", self.model_version, current)
        self._adopt(load_version(self.registry.path(current)))
        self.stats.switches += 1
        self._restore()

    # ------------------------------------------------------------------ partitions
    # Called inside poll(), on the client's network loop: only note the change; the next step restores before it
    # applies anything (every earlier step's transaction has been committed or aborted by then).
    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.owned |= {tp.partition for tp in assigned}
        self._moved = True

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.owned -= {tp.partition for tp in revoked}
        self._moved = True

    def _restore(self) -> None:
        """A fresh table holding exactly what ``item-rows`` has committed for the owned partitions."""
        start = time.perf_counter()
        if self._store is not None:
            self._store.close()
        self._generation += 1
        shutil.rmtree(self.settings.state_dir, ignore_errors=True)
        self._store = StateStore(self.settings.state_dir / f"g{self._generation}", sync=False)
        tps = [TopicPartition(self.rows_topic, p) for p in sorted(self.owned)]
        records = 0
        if tps:
            self._rows.assign(tps)
            self._rows.seek_to_beginning(*tps)
            # Read to the high watermark, not to the last stable offset: the previous owner's last transaction may
            # be committed with its markers not written yet, or (owner killed) still open until the transaction
            # timeout aborts it. Either way the rows are only complete once it has ended.
            end = self._hw.end_offsets(tps)
            deadline = time.monotonic() + 3 * self.settings.transaction_timeout_ms / 1000
            while any(self._rows.position(tp) < end[tp] for tp in tps):
                self._tick()
                if time.monotonic() > deadline:
                    behind = {tp.partition: (self._rows.position(tp), end[tp]) for tp in tps}
                    raise RuntimeError(f"{self.rows_topic}: a transaction did not end in time; at/end {behind}")
                for batch in self._rows.poll(timeout_ms=500).values():
                    for record in batch:
                        if dict(record.headers or ()).get(MODEL_HEADER, b"").decode() != self.model_version:
                            continue
                        if record.value is None:
                            self._store.delete(record.key)
                        else:
                            self._store.put(record.key, record.value)
                        records += 1
        self._store.checkpoint({}, {"generation": self._generation})
        self.table = EmbeddingTable("item", self._base, self._index, self.settings.table, self._store)
        self.stats.restores += 1
        self.stats.restored_records += records
        self.metrics.restore_seconds.set(time.perf_counter() - start)
        self.metrics.partitions.set(len(self.owned))
        self.metrics.rows.set(len(self.table))
        self.metrics.lag.clear()
        logger.info("owning item partitions %s: %d rows restored", sorted(self.owned), len(self.table))

    # ------------------------------------------------------------------ one step
    def step(self, timeout_ms: int | None = None) -> int:
        """Poll, apply and commit one transaction; returns the gradient records applied (0: nothing polled)."""
        batches = self.consumer.poll(timeout_ms=self.settings.poll_ms if timeout_ms is None else timeout_ms)
        if self._moved:
            self._moved = False
            self._restore()
        if batches:
            self._follow_switch(batches)
        if not batches:
            self.metrics.progress.set(time.time())
            return 0
        assert self.table is not None and self._store is not None
        applied = 0
        start = time.perf_counter()
        self.producer.begin_transaction()
        try:
            gradients = [
                g for tp in sorted(batches, key=lambda t: t.partition) for r in batches[tp] if (g := self._read(r))
            ]
            apply_in_waves(self.table, gradients)
            applied = len(gradients)
            self.stats.steps += 1
            if self.stats.steps % self.settings.expire_every == 0 and self._newest_ms:
                self.table.expire(self._newest_ms)
            self.table.flush()
            staged = self._store.staged()
            header = [(MODEL_HEADER, self.model_version.encode())]
            for key, value in staged.items():
                item = item_of_key(key)
                assert item is not None, key
                self.producer.send(
                    self.rows_topic, key=key, value=value, partition=partition_of(item, self.partitions), headers=header
                )
            offsets = {tp: OffsetAndMetadata(records[-1].offset + 1, "", -1) for tp, records in batches.items()}
            self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            self.producer.commit_transaction()
        except CommitFailedError as exc:
            # The group has moved on without this member (a pause past its session): the broker fenced the step.
            # Nothing of it is visible; the next poll rejoins, and the partitions' owners restore from item-rows.
            logger.warning("step not committed (%s): rejoining the group", exc)
            self._abort()
            return 0
        except BaseException:
            self._abort()
            raise
        self._store.checkpoint({}, {"generation": self._generation})
        self.stats.gradients += applied
        self.stats.rows_sent += len(staged)
        self.metrics.steps.inc()
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        self.metrics.gradients.labels("applied").inc(applied)
        self.metrics.rows.set(len(self.table))
        self.metrics.progress.set(time.time())
        for tp, records in batches.items():
            end = self.consumer.highwater(tp)
            if end is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(0, end - records[-1].offset - 1))
        return applied

    def _read(self, record) -> Gradient | None:
        """The gradient of ``record``, or None (counted as dropped) for another model version, an unreadable record
        or one of another dim than the rows."""
        assert self.table is not None
        version = dict(record.headers or ()).get(MODEL_HEADER, b"").decode()
        try:
            if version != self.model_version:
                raise ValueError(f"model version {version!r}, owner at {self.model_version!r}")
            gradient = decode_gradient(record.key.decode(), record.value)
            if gradient.grad is not None and gradient.grad.shape[0] != self.table.dim:
                raise ValueError(f"dim {gradient.grad.shape[0]}, rows {self.table.dim}")
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            self.stats.dropped += 1
            self.metrics.gradients.labels("dropped").inc()
            logger.warning("gradient %s[%d]@%d dropped: %s", record.topic, record.partition, record.offset, exc)
            return None
        self._newest_ms = max(self._newest_ms, gradient.ts_ms)
        return gradient

    def _abort(self) -> None:
        """Undo a step that did not commit: the table is rebuilt from what ``item-rows`` holds, and the consumer goes
        back to the committed offsets of the owned partitions."""
        try:
            self.producer.abort_transaction()
        except KafkaError as exc:  # fenced, or the producer is in a fatal state: the process must restart
            logger.warning("aborting the transaction failed: %s", exc)
        if self._store is not None:
            self._store.discard()
        if self._closed:
            return
        try:
            self._restore()
            for tp in self.consumer.assignment():
                committed = self.consumer.committed(tp)
                if committed is None:
                    self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, committed)
        except KafkaError as exc:
            logger.warning("could not rewind after an aborted step: %s", exc)

    # ------------------------------------------------------------------ loop
    def run(
        self,
        stop: threading.Event,
        *,
        exit_when_idle_s: float | None = None,
        beat: Callable[[], None] | None = None,
    ) -> None:
        """Step until ``stop`` is set (SIGTERM-safe: a step is a transaction, committed or aborted before exit).
        ``beat`` is called every round, as :attr:`beat_at` is set (a watchdog's)."""
        last = time.monotonic()
        self._beat = beat
        try:
            while not stop.is_set():
                self._tick()
                restores = self.stats.restores
                if self.step() or self.stats.restores != restores:  # idle counts from the last gradient or move
                    last = time.monotonic()
                elif exit_when_idle_s is not None and self.owned and time.monotonic() - last >= exit_when_idle_s:
                    break
        finally:
            self.close()

    def _tick(self) -> None:
        self.beat_at = time.monotonic()
        if self._beat is not None:
            self._beat()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for closer in (
            lambda: self.consumer.close(timeout_ms=2000),
            lambda: self.producer.close(timeout=2),
            lambda: self._rows.close(timeout_ms=2000),
            lambda: self._hw.close(timeout_ms=2000),
        ):
            try:
                closer()
            except Exception:
                logger.debug("close failed", exc_info=True)
        if self._store is not None:
            self._store.close()

    def rows(self) -> dict[str, np.ndarray]:
        """The online rows of the owned partitions now (for tests and diagnostics)."""
        assert self.table is not None
        return {ident: self.table.row(ident) for ident in self.table.ids()}
