"""A worker's side of the item path (:mod:`streaming.item_rows`): its item gradients out, the owners' rows in.

With ``item_rows = "owner"`` the worker does not step its item rows. Its learner leaves each batch's item
gradients in an outbox, and :class:`ItemPath` sends them to ``item-grads`` exactly once, as a redo log would:

1. at a checkpoint, the gradients gathered since the last one and the input offsets of the checkpoint form one
   *transaction record* (:meth:`ItemPath.prepare`). It is written into the worker's RocksDB checkpoint with the
   state it belongs to, so the local checkpoint stays the source of truth;
2. then one Kafka transaction sends the gradients and commits the same offsets for the worker's consumer group
   (:meth:`ItemPath.commit`). A transaction that fails is kept and sent again with the next checkpoint's;
3. after a crash, :meth:`ItemPath.recover` looks at the record of the last checkpoint. ``init_transactions``
   has aborted whatever the previous life left open. If the group's committed offsets are not the record's,
   its transaction never committed, and it is sent again. The gradients of batches trained after that
   checkpoint were never sent; the worker trains those batches again from its checkpoint.

So every trained batch's gradients reach the owners once. In this mode the group's offsets are committed only
through these transactions, because a plain commit could make an aborted transaction look committed.

The item table mirrors ``item-rows`` (:meth:`ItemPath.follow`): rows of the worker's model version are put into
it as the owners commit them, and a tombstone drops one. The read positions are part of the checkpoint. Mirrored
rows go through the worker's checkpoint and change log like its own rows did, so the publisher publishes the
owners' rows unchanged.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from streaming.item_rows import MODEL_HEADER, ROW_PREFIX, Gradient, encode_gradient
from streaming.merge import tp_key
from streaming.settings import KafkaSettings
from streaming.tables import EmbeddingTable

__all__ = ["ItemPath"]

logger = logging.getLogger(__name__)


def _tp(key: str) -> TopicPartition:
    topic, _, partition = key.rpartition(":")
    return TopicPartition(topic, int(partition))


class ItemPath:
    """Gradients out through transactions, rows in through a read-committed mirror (module docstring)."""

    def __init__(
        self, kafka: KafkaSettings, transactional_id: str, rows_positions: dict[str, int], *, timeout_ms: int = 10_000
    ) -> None:
        self.grads_topic = kafka.topic("item-grads")
        self.rows_topic = kafka.topic("item-rows")
        self.producer = KafkaProducer(
            **kafka.producer_config(),
            client_id="freshtower-worker-grads",
            transactional_id=transactional_id,
            enable_idempotence=True,
            transaction_timeout_ms=timeout_ms,
        )
        self.producer.init_transactions()  # aborts what an earlier life of this worker left open
        self._rows = KafkaConsumer(
            group_id=None,
            client_id="freshtower-worker-rows",
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **kafka.client_config(),
        )
        partitions = sorted(self._rows.partitions_for_topic(self.rows_topic) or ())
        if not partitions:
            raise RuntimeError(f"topic {self.rows_topic} does not exist: create the item-path topics first")
        tps = [TopicPartition(self.rows_topic, p) for p in partitions]
        self._rows.assign(tps)
        for tp in tps:
            if tp_key(tp) in rows_positions:
                self._rows.seek(tp, rows_positions[tp_key(tp)])
            else:
                self._rows.seek_to_beginning(tp)
        self.outbox: list[tuple[str, Gradient]] = []  # (model version, gradient) since the last prepare
        self._unsent: list[list[str]] = []  # records of transactions that failed, sent with the next one
        self.sent = 0  # gradient records committed since this process started
        self.changelog_positions: dict[int, int] = {}  # of the last commit's changelog records
        self.mirrored = 0  # rows taken from item-rows since this process started

    # ------------------------------------------------------------------ gradients out
    def take(self, model_version: str, gradients: list[Gradient]) -> None:
        self.outbox.extend((model_version, g) for g in gradients)

    def prepare(self, seq: int, offsets: dict[str, int]) -> dict[str, Any]:
        """The transaction record of checkpoint ``seq`` (JSON): every gradient not committed yet, and ``offsets``
        (the group's partitions), committed with ``txn:<seq>`` as their metadata so that recovery can tell this
        transaction from an earlier one that left the same offsets (a partial batch trained without new events)."""
        records = self._unsent + [
            [version, g.item_id, base64.b64encode(encode_gradient(g)).decode()] for version, g in self.outbox
        ]
        self.outbox = []
        self._unsent = records
        return {"seq": seq, "records": records, "offsets": offsets}

    def commit(
        self,
        txn: dict[str, Any],
        group: KafkaConsumer,
        *,
        group_id: str | None = None,
        changelog: tuple[str, str, list[tuple[int, bytes, bytes | None]]] | None = None,
    ) -> bool:
        """Send ``txn`` as one Kafka transaction; False (kept for the next one) when Kafka refused it. The offsets
        go with the group's metadata (a member the group has replaced is fenced), or with the bare ``group_id``
        before the consumer has joined (at recovery: a static member's id with no generation is refused).

        ``changelog``: ``(topic, model version, [(partition, key, value)])``, state records sent in the same
        transaction (:mod:`streaming.changelog`); after a commit, :attr:`changelog_positions` holds the offset
        after the last record sent to each partition."""
        tag = f"txn:{txn['seq']}"
        offsets = {_tp(k): OffsetAndMetadata(v, tag, -1) for k, v in txn["offsets"].items()}
        futures = []
        try:
            self.producer.begin_transaction()
            for version, item_id, value in txn["records"]:
                self.producer.send(
                    self.grads_topic,
                    key=item_id.encode(),
                    value=base64.b64decode(value),
                    headers=[(MODEL_HEADER, version.encode())],
                )
            if changelog is not None:
                topic, version, records = changelog
                headers = [(MODEL_HEADER, version.encode())]
                for partition, key, value in records:
                    futures.append(
                        self.producer.send(topic, key=key, value=value, partition=partition, headers=headers)
                    )
            if offsets:
                self.producer.send_offsets_to_transaction(offsets, group_id or group.group_metadata())
            self.producer.commit_transaction()
            self.changelog_positions = {}
            for future in futures:
                sent = future.get(timeout=0)  # resolved: the commit flushed every send
                self.changelog_positions[sent.partition] = max(
                    self.changelog_positions.get(sent.partition, 0), sent.offset + 1
                )
        except Exception as exc:  # noqa: BLE001 (any refusal: abort, keep the records, try with the next checkpoint)
            logger.warning("item gradients not committed (%s); sent again with the next checkpoint", exc)
            try:
                self.producer.abort_transaction()
            except Exception:  # noqa: BLE001 (a fatal producer state: the process must restart, recover redoes it)
                logger.exception("aborting the gradient transaction failed")
                raise
            return False
        self.sent += len(txn["records"])
        self._unsent = []
        return True

    def recover(self, txn: dict[str, Any] | None, group: KafkaConsumer) -> bool:
        """At start: send the last checkpoint's transaction again unless the group's offsets show it committed.
        Returns whether it was sent again. ``group`` must read committed, so that its offset fetch waits for a
        transaction that committed but whose offsets are still being written (require_stable)."""
        if group.config["isolation_level"] != "read_committed":
            raise ValueError("recovery needs a read_committed group consumer (KIP-447 require_stable)")
        if not txn or not txn.get("records"):
            return False
        offsets, tag = txn["offsets"], f"txn:{txn['seq']}"
        committed = [group.committed(_tp(k), metadata=True) for k in offsets]
        if offsets and all(c is not None and c.metadata == tag for c in committed):
            return False
        logger.info(
            "checkpoint %d's %d item gradients were not committed: sending them again", txn["seq"], len(txn["records"])
        )
        self._unsent = list(txn["records"])
        if not self.commit({**txn, "records": self._unsent}, group, group_id=group.config["group_id"]):
            raise RuntimeError("could not send the last checkpoint's item gradients again")
        return True

    # ------------------------------------------------------------------ rows in
    def follow(self, table: EmbeddingTable, model_version: str) -> int:
        """Apply the owners' newly committed rows of ``model_version`` to ``table``; returns the rows applied."""
        applied = 0
        for records in self._rows.poll(timeout_ms=0).values():
            for record in records:
                if not record.key.startswith(ROW_PREFIX):
                    continue
                if dict(record.headers or ()).get(MODEL_HEADER, b"").decode() != model_version:
                    continue
                ident = record.key[len(ROW_PREFIX) :].decode()
                if record.value is None:
                    table.drop_row(ident)
                else:
                    table.put_row(ident, record.value)
                applied += 1
        self.mirrored += applied
        return applied

    def drop_unsent(self) -> None:
        """Forget the gradients of a transaction that failed (the worker trains their batches again)."""
        self._unsent = []
        self.outbox = []

    def seek_rows(self, positions: dict[str, int]) -> None:
        """Read ``item-rows`` again from ``positions`` (those of the checkpoint the item table was reloaded from)."""
        for tp in self._rows.assignment():
            if tp_key(tp) in positions:
                self._rows.seek(tp, positions[tp_key(tp)])
            else:
                self._rows.seek_to_beginning(tp)

    def rewind(self) -> None:
        """Read ``item-rows`` again from its start (after a model switch: rows of the new version that owners
        committed before this worker switched were skipped)."""
        self._rows.seek_to_beginning(*self._rows.assignment())

    def positions(self) -> dict[str, int]:
        return {tp_key(tp): self._rows.position(tp) for tp in self._rows.assignment()}

    def close(self) -> None:
        for closer in (lambda: self.producer.close(timeout=2), lambda: self._rows.close(timeout_ms=2000)):
            try:
                closer()
            except Exception:  # noqa: BLE001
                logger.debug("close failed", exc_info=True)
