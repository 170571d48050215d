"""Expiring ID rows that no longer earn their place: a bound on how the nightly tables grow.

Every night extends yesterday's vocabularies with today's ids and never renumbers them, so without expiry the
user-ID table, the item-ID table and the user tower's last-N table (numbered by item id) only grow: a user seen
once a year ago still has a row in every version, in every worker's start-up copy and in every artifact. With a
time to live (``FullSettings.id_ttl_days``), an id with no activity for that long loses its row when a new version
is made: the vocabulary is compacted (:meth:`FeatureEncoder.retain_ids`), the tables and Adam's moments are
gathered to match (:meth:`TwoTowerModel.take_id_rows`, :meth:`TrainingState.take_rows`), and the id maps to the
learnt default row 0 again. Should it come back, it starts over as a new id does: from row 0, trained online by
the streaming learner and in the next nightly run. Ids that stay active keep their values bit for bit.

Activity, per id:

* a user: a click (the only thing that trains a user-ID row);
* an item: a click, an impression, or its catalogue record (created or updated). An item whose row expired
  stays in the catalogue and in the index: its vector comes from its features and the default ID row, like an
  item that was never clicked (:func:`trainer.artifact.compute_item_vectors`).

The newest activity time of every id a version numbers is stored with it (:class:`IdActivity`, ``id_activity.npz``
in :mod:`trainer.artifact`). A parent saved without one counts every id it has as active at its data cutoff.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from trainer.dataset import Dataset
from trainer.features import FeatureEncoder

__all__ = ["IdActivity"]

TOWERS = ("user", "item")


@dataclass(frozen=True)
class IdActivity:
    """Newest activity time (ms) of every id, per tower: int64 arrays aligned with the ID vocabularies (entry
    ``k`` is the id at index ``k``; entry 0, the unknown id, is unused and 0)."""

    user: np.ndarray
    item: np.ndarray

    def __post_init__(self) -> None:
        for tower in TOWERS:
            value = getattr(self, tower)
            if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu":
                raise ValueError(f"{tower} activity must be a 1-D integer array, got {value!r}")

    def of(self, tower: str) -> np.ndarray:
        if tower not in TOWERS:
            raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
        return getattr(self, tower)

    def fits(self, encoder: FeatureEncoder) -> bool:
        """Whether the arrays are as long as ``encoder``'s ID vocabularies."""
        return len(self.user) == len(encoder.user_vocab) and len(self.item) == len(encoder.item_vocab)

    @classmethod
    def uniform(cls, encoder: FeatureEncoder, at_ms: int) -> IdActivity:
        """Every id of ``encoder`` active at ``at_ms`` (what a parent saved without activity is taken to hold)."""
        user = np.full(len(encoder.user_vocab), int(at_ms), dtype=np.int64)
        item = np.full(len(encoder.item_vocab), int(at_ms), dtype=np.int64)
        user[0] = item[0] = 0
        return cls(user, item)

    def extended(self, encoder: FeatureEncoder) -> IdActivity:
        """Arrays grown to an extended ``encoder`` (:meth:`FeatureEncoder.extend`); new ids start at 0, i.e. never
        active, until :meth:`observed` sees them."""
        out = {}
        for tower, vocab in (("user", encoder.user_vocab), ("item", encoder.item_vocab)):
            old = self.of(tower)
            if len(old) > len(vocab):
                raise ValueError(f"{tower} activity has {len(old)} entries, the vocabulary only {len(vocab)}")
            out[tower] = np.concatenate([old, np.zeros(len(vocab) - len(old), dtype=np.int64)]).astype(np.int64)
        return IdActivity(**out)

    def observed(self, encoder: FeatureEncoder, dataset: Dataset) -> IdActivity:
        """The activity after ``dataset`` (numbered with ``encoder``, which must hold its ids): clicks move
        users and items to their click time, catalogue records move items to ``max(created_ms, ts_ms)``, and an
        impression (counted per item, without a time) moves the item to the newest click."""
        if not self.fits(encoder):
            raise ValueError("activity does not fit the encoder's vocabularies; extend it first")
        user, item = self.user.copy(), self.item.copy()
        clicks = dataset.clicks
        if len(clicks):
            ts = clicks.ts_ms.astype(np.int64)
            np.maximum.at(user, encoder.user_vocab.lookup(clicks.user.tolist()), ts)
            np.maximum.at(item, encoder.item_vocab.lookup(clicks.item.tolist()), ts)
        records = list(dataset.items.values())
        if records:
            when = np.fromiter((max(r.created_ms, r.ts_ms) for r in records), dtype=np.int64, count=len(records))
            np.maximum.at(item, encoder.item_vocab.lookup(r.item_id for r in records), when)
        if dataset.exposures and len(clicks):
            np.maximum.at(item, encoder.item_vocab.lookup(list(dataset.exposures)), int(clicks.ts_ms.max()))
        user[0] = item[0] = 0  # unknown ids are not an id
        return IdActivity(user, item)

    def live(self, since_ms: int) -> dict[str, np.ndarray]:
        """Per tower, the bool mask of ids active at or after ``since_ms`` (index 0, the default row, always)."""
        out = {}
        for tower in TOWERS:
            mask = self.of(tower) >= int(since_ms)
            mask[0] = True
            out[tower] = mask
        return out

    def taken(self, rows: Mapping[str, np.ndarray]) -> IdActivity:
        """The arrays gathered as the vocabularies were compacted (``rows`` from :meth:`FeatureEncoder.retain_ids`)."""
        return IdActivity(**{t: self.of(t)[rows[t]] if t in rows else self.of(t) for t in TOWERS})

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"user": self.user, "item": self.item}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> IdActivity:
        try:
            return cls(np.asarray(arrays["user"]), np.asarray(arrays["item"]))
        except KeyError as exc:
            raise ValueError(f"id activity lacks the {exc.args[0]!r} array") from None
