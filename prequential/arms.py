"""The arms every scored click is ranked under, all from what the system held before the click's step.

Each arm answers ``top(users, k) -> {user: [item, ...]}``: its ``k`` best items for each user, best first,
never an item the user clicked before the step (the same filter for every arm; MovieLens has no repeat
ratings, so this only frees slots). The arms:

- ``nightly_only``: the promoted version's own ID rows, each user's last-N as of the version's data cutoff,
  the version's item vectors: what a deployment without the worker serves.
- ``nightly_fresh``: the same version with every user's last-N current (freshness through features alone).
- ``full_incremental``: what the retrieval service answers over HTTP from the published store (the real
  serving code path; :mod:`prequential.system`).
- ``popularity``, ``popularity_recent`` (clicks so far, the recent ones weighted by a half-life) and ``als``
  (``implicit``, refitted at each nightly run on every click so far; users it has no factors for get
  popularity).

The two in-process model arms rank exactly as serving does (:func:`serving.user_vector.user_vectors`, a
flat faiss index over the item-tower vectors of the version, the user's last-N left out before the click
filter), so with the worker's learning switched off ``full_incremental`` and ``nightly_fresh`` answer the
same lists: the harness test checks that.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from prequential.observed import Observed
from publisher.index import FlatIndex
from serving.user_vector import user_vectors
from trainer.artifact import ModelVersion
from trainer.dataset import Clicks, Dataset
from trainer.peers import ALS

__all__ = ["Arm", "ModelArm", "PopularityArm", "ALSArm", "filtered"]

logger = logging.getLogger(__name__)


class Arm(Protocol):
    name: str

    def top(self, users: Sequence[str], k: int, observed: Observed) -> dict[str, list[str]]: ...


def filtered(ranked: Sequence[str], clicked: set[str], k: int) -> list[str]:
    """The first ``k`` of ``ranked`` that are not in ``clicked``."""
    out = [i for i in ranked if i not in clicked]
    return out[:k]


class ModelArm:
    """A model version served without the worker: its own ID rows; last-N frozen at its cutoff or current."""

    def __init__(self, name: str, *, fresh_history: bool, max_k: int = 500) -> None:
        self.name = name
        self.fresh_history = fresh_history
        self.max_k = max_k
        self.version: ModelVersion | None = None
        self._index: FlatIndex | None = None
        self._indexed: tuple[str, int] = ("", -1)  # (version id, catalogue size) the index was built for

    def use(self, version: ModelVersion) -> None:
        self.version = version

    def _index_for(self, observed: Observed) -> FlatIndex:
        version = self.version
        assert version is not None
        ids = observed.catalogue_ids()
        if self._index is None or self._indexed != (version.version_id, len(ids)):
            self._index = FlatIndex(version.model.config.dim)
            self._index.upsert(ids, item_vectors(version, ids, observed))
            self._indexed = (version.version_id, len(ids))
        return self._index

    def top(self, users: Sequence[str], k: int, observed: Observed) -> dict[str, list[str]]:
        version = self.version
        if version is None:
            raise RuntimeError(f"{self.name}: no model version yet")
        index = self._index_for(observed)
        before = None if self.fresh_history else version.data_cutoff_ms + 1
        histories = [observed.history(u, before) for u in users]
        profiles = [observed.profiles.get(u) for u in users]
        queries = user_vectors(version, list(users), [None] * len(users), histories, profiles)
        out = {}
        for user, history, query in zip(users, histories, queries, strict=True):
            clicked = observed.clicked(user)
            # As serving answers a request for min(max_k, k + clicked) items: the last-N left out first.
            want = min(self.max_k, k + len(clicked))
            exclude = set(history)
            ids, _ = index.search(query[None, :], min(want + len(exclude), max(len(index), 1)))
            answer = [i for i in ids[0] if i not in exclude][:want]
            out[user] = filtered(answer, clicked, k)
        return out


@torch.no_grad()
def item_vectors(version: ModelVersion, ids: list[str], observed: Observed, batch: int = 4096) -> np.ndarray:
    """The version's serving vectors of ``ids`` with their current catalogue records, as the publisher computes
    them for ids without online rows (the model's row, row 0 for an id it does not know), in its chunks."""
    model, encoder = version.model, version.encoder
    weight = model.item_tower.id_table.weight.detach().numpy()
    model.eval()
    out = []
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        rows = np.stack([weight[encoder.item_vocab.index(i)] for i in chunk]).astype(np.float32)
        catalogue = {i: observed.items[i] for i in chunk if i in observed.items}
        vectors = model.item_tower(encoder.encode_items(chunk, catalogue), id_rows=torch.from_numpy(rows))
        out.append(vectors.numpy().astype(np.float32, copy=False))
    return np.concatenate(out) if out else np.empty((0, model.config.dim), dtype=np.float32)


class PopularityArm:
    """The most clicked items so far; with ``half_life_days``, each click weighted by its age."""

    def __init__(self, name: str, half_life_days: float | None = None) -> None:
        self.name = name
        self.half_life_days = half_life_days

    def top(self, users: Sequence[str], k: int, observed: Observed) -> dict[str, list[str]]:
        scores = observed.popularity(self.half_life_days, observed.now_ms)
        ranked = sorted(scores, key=lambda i: (-scores[i], i))
        return {u: filtered(ranked, observed.clicked(u), k) for u in users}


class ALSArm:
    """``implicit`` ALS refitted by :meth:`refit` (at each nightly run) on every click so far."""

    def __init__(self, name: str = "als", *, seed: int = 0, **params: float) -> None:
        self.name = name
        self.seed = seed
        self.params = params
        self._model: ALS | None = None

    def refit(self, observed: Observed) -> None:
        log = observed.click_log
        if not log:
            return
        users, items, ts = zip(*log, strict=True)
        clicks = Clicks(np.array(users, dtype=object), np.array(items, dtype=object), np.array(ts, dtype=np.int64))
        model = ALS(seed=self.seed, **self.params)  # type: ignore[arg-type]
        model.fit(Dataset(items={}, users={}, clicks=clicks))
        self._model = model

    def top(self, users: Sequence[str], k: int, observed: Observed) -> dict[str, list[str]]:
        if self._model is None:
            raise RuntimeError(f"{self.name}: refit() before top()")
        out = {}
        for user in users:
            clicked = observed.clicked(user)
            ranked = self._model.recommend([user], k + len(clicked), observed.now_ms)[0]
            out[user] = filtered(ranked, clicked, k)
        return out
