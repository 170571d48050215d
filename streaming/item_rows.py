"""The item path of a scaled-out worker group: gradient records, row records and the rows' mirror.

With several workers, an item-ID row has one owner (:mod:`streaming.item_owner`). Workers do not move item rows
themselves; per mini-batch they send, per item, the summed gradient of its row and how often the batch used it
(:class:`Gradient`, topic ``item-grads``, keyed by item id). The owner of that partition applies them with the
row-wise Adagrad of :class:`~streaming.tables.EmbeddingTable` and writes the row it produced to the compacted
topic ``item-rows``, in the same Kafka transaction that commits the gradients it read. Every worker and the
publisher follow ``item-rows`` (:class:`RowsMirror`) with ``isolation_level=read_committed``.

Both topics have the same partition count and an item lives on partition ``murmur2(id) % P`` of each
(:func:`partition_of`, Kafka's default partitioner), so the owner of gradient partition p holds, in ``item-rows``
partition p, every row and admission count of the items hashed to p: that partition of ``item-rows`` is the
owner's changelog, and a new owner restores from it.

``item-rows`` records are the owner's :class:`~streaming.state.StateStore` writes as they are: key ``t:item:<id>``
(a row: header and vector, :data:`streaming.tables.ROW_HEADER`) or ``p:item:<id>`` (an id not admitted yet: its
count and last-seen time); a tombstone removes the key. The model version the row belongs to travels in a record
header, so a row of another model version is never mixed into a table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from kafka.partitioner.default import murmur2

from streaming.tables import ROW_HEADER, EmbeddingTable

__all__ = [
    "ROW_PREFIX",
    "Gradient",
    "RowsMirror",
    "apply_gradient",
    "apply_in_waves",
    "decode_gradient",
    "encode_gradient",
    "item_of_key",
    "partition_of",
]

ROW_PREFIX = b"t:item:"
PENDING_PREFIX = b"p:item:"
MODEL_HEADER = "model"  # record header: the model version a gradient was computed under / a row belongs to

_GRAD = struct.Struct("<Bqii")  # format, ts_ms, uses, dim; then dim float64
_FORMAT = 1


def partition_of(item_id: str, partitions: int) -> int:
    """The partition of ``item_id`` in a topic of ``partitions`` (Kafka's default partitioner on the UTF-8 id)."""
    return (murmur2(item_id.encode()) & 0x7FFFFFFF) % partitions


def item_of_key(key: bytes) -> str | None:
    """The item id of an owner's state key (``t:item:<id>`` or ``p:item:<id>``), else None."""
    for prefix in (ROW_PREFIX, PENDING_PREFIX):
        if key.startswith(prefix):
            return key[len(prefix) :].decode()
    return None


@dataclass(frozen=True)
class Gradient:
    """One worker's mini-batch contribution to one item row.

    ``uses``: clicks of the batch on the item (admission counts them); ``ts_ms``: the latest of their event times;
    ``grad``: ``[d]`` the summed gradient of the loss with respect to the row, or None when the batch only
    observed the item (a step that was skipped). The sum travels in float64, as the single worker sums before
    its Adagrad step, so the owner's step is the single worker's bit for bit."""

    item_id: str
    ts_ms: int
    uses: int
    grad: np.ndarray | None


def encode_gradient(g: Gradient) -> bytes:
    vector = b"" if g.grad is None else np.ascontiguousarray(g.grad, dtype="<f8").tobytes()
    dim = -1 if g.grad is None else int(g.grad.shape[0])
    return _GRAD.pack(_FORMAT, g.ts_ms, g.uses, dim) + vector


def decode_gradient(item_id: str, value: bytes) -> Gradient:
    """Raises ValueError on a record this version cannot read."""
    if len(value) < _GRAD.size:
        raise ValueError(f"gradient record of {len(value)} bytes is shorter than its header")
    fmt, ts_ms, uses, dim = _GRAD.unpack_from(value)
    if fmt != _FORMAT:
        raise ValueError(f"gradient record format {fmt}; this version reads {_FORMAT}")
    if dim < 0:
        return Gradient(item_id, ts_ms, uses, None)
    if len(value) != _GRAD.size + 8 * dim:
        raise ValueError(f"gradient record of dim {dim} has {len(value) - _GRAD.size} vector bytes")
    grad = np.frombuffer(value, dtype="<f8", offset=_GRAD.size).astype(np.float64)
    if not np.isfinite(grad).all():
        raise ValueError("gradient record holds a value that is not finite")
    return Gradient(item_id, ts_ms, uses, grad)


def apply_gradient(table: EmbeddingTable, gradient: Gradient) -> None:
    """The owner's step for one record: count the uses (admission), then row-wise Adagrad on the summed gradient
    when the row exists. Raises ValueError on a gradient of another dim than the table's."""
    if gradient.grad is not None and gradient.grad.shape[0] != table.dim:
        raise ValueError(f"gradient of {gradient.item_id!r} has dim {gradient.grad.shape[0]}, rows {table.dim}")
    if gradient.uses:
        table.observe([gradient.item_id] * gradient.uses, gradient.ts_ms)
    if gradient.grad is not None:
        _, slots = table.gather([gradient.item_id])
        table.apply_gradients(slots, gradient.grad[None, :])


def apply_in_waves(table: EmbeddingTable, gradients: list[Gradient]) -> None:
    """:func:`apply_gradient` for each of ``gradients`` in order, vectorised: wave k holds each item's k-th record,
    and a wave's uses are counted record by record, then its Adagrad steps made in one call. An item's records keep
    their order and different items' rows do not interact, so the rows are those of the record-by-record order
    (the table neither evicting nor expiring in between). Dims must have been checked."""
    seen: dict[str, int] = {}
    waves: list[list[Gradient]] = []
    for g in gradients:
        k = seen.get(g.item_id, 0)
        seen[g.item_id] = k + 1
        if k == len(waves):
            waves.append([])
        waves[k].append(g)
    for wave in waves:
        for g in wave:
            if g.uses:
                table.observe([g.item_id] * g.uses, g.ts_ms)
        stepped = [g for g in wave if g.grad is not None]
        if stepped:
            _, slots = table.gather([g.item_id for g in stepped])
            table.apply_gradients(slots, np.stack([g.grad for g in stepped]))


class RowsMirror:
    """The item rows as ``item-rows`` says they are: id -> (model version, vector, updates).

    ``apply`` takes records in offset order (per partition); a tombstone removes the row. Rows of a model version
    other than ``model_version`` are kept aside and not returned (after a promotion, the owners republish)."""

    def __init__(self, model_version: str) -> None:
        self.model_version = model_version
        self._rows: dict[str, tuple[str, np.ndarray, int]] = {}

    def apply(self, key: bytes, value: bytes | None, model_version: str) -> str | None:
        """Apply one record; returns the item id whose row changed (None for an admission count)."""
        if not key.startswith(ROW_PREFIX):
            return None
        item_id = key[len(ROW_PREFIX) :].decode()
        if value is None:
            self._rows.pop(item_id, None)
            return item_id
        _, updates, _ = ROW_HEADER.unpack_from(value)
        vector = np.frombuffer(value, dtype=np.float32, offset=ROW_HEADER.size).copy()
        self._rows[item_id] = (model_version, vector, updates)
        return item_id

    def row(self, item_id: str) -> np.ndarray | None:
        entry = self._rows.get(item_id)
        if entry is None or entry[0] != self.model_version:
            return None
        return entry[1]

    def updates(self, item_id: str) -> int:
        entry = self._rows.get(item_id)
        return 0 if entry is None or entry[0] != self.model_version else entry[2]

    def __len__(self) -> int:
        return sum(1 for version, _, _ in self._rows.values() if version == self.model_version)

    def ids(self) -> list[str]:
        return sorted(i for i, (version, _, _) in self._rows.items() if version == self.model_version)
