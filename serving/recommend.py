"""Recommendations from one snapshot: rows from the store, the user tower, index search, filters, the prior.

``recommend`` and ``similar`` read everything from the one :class:`~serving.snapshot.Snapshot` they are given,
and return what they used (model version, publish version, watermark) with per-stage timings.

Filters: items the user already clicked (the published last-N plus the recent items a request sent) are never
returned; items gone from the catalogue cannot be, because a removal is a tombstone row that takes the item out
of the index in the same version (:func:`publisher.index.apply_delta`). The index is searched for ``k`` plus the
number of excluded ids, so filtering never leaves fewer than ``k`` results when the catalogue has them.

The serve-time item prior (seed 004; ``trainer eval --serving-prior``): with ``prior_gamma`` γ > 0 the nearest
``prior_candidates`` items by cosine are re-ranked by ``cos/τ + γ·log p_j``, ``p_j`` each item's share of the
stream's clicks. The design planned the same score as one more index dimension (``[a/τ, γ]·[b, log p_j]``;
docs/limits.md); the re-rank is exact for every item among the candidates and misses a popular item only when it
is not among them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from serving.snapshot import Snapshot
from serving.user_vector import is_known, user_vectors
from serving.worker_records import WorkerRecords
from streaming.events import UserProfile

__all__ = ["Answer", "UnknownItem", "recommend", "similar"]


class UnknownItem(LookupError):
    """``/similar`` of an item the served version does not hold."""


@dataclass(frozen=True)
class Answer:
    """Items best first with their scores, and what they were computed from."""

    items: list[tuple[str, float]]
    model_version: str
    publish_version: int
    watermark_ms: int
    cold: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)


def _search(snapshot: Snapshot, query: np.ndarray, k: int, exclude: set[str]) -> list[tuple[str, float]]:
    want = min(k + len(exclude), max(len(snapshot.index), 1))
    ids, scores = snapshot.index.search(query[None, :], want)
    out = [(i, float(s)) for i, s in zip(ids[0], scores[0].tolist(), strict=False) if i not in exclude]
    return out[:k]


def recommend(
    snapshot: Snapshot,
    user_id: str | None,
    k: int,
    *,
    recent_items: Sequence[str] = (),
    profile: UserProfile | None = None,
    records: WorkerRecords | None = None,
    prior_gamma: float = 0.0,
    prior_candidates: int = 0,
) -> Answer:
    """Top ``k`` for ``user_id`` (None: an anonymous session). ``recent_items`` (oldest first) follow the published
    last-N; ``profile`` replaces the profile the worker state holds."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    row = None
    if user_id is not None:
        with snapshot.view() as view:
            row = view.user(user_id)
    if profile is None and records is not None and user_id is not None:
        profile = records.profile(user_id)
    history = [*(row.last_n if row is not None else ()), *recent_items]
    t1 = time.perf_counter()
    key = user_id if user_id is not None else ""
    query = user_vectors(snapshot.model, [key], [row.vector if row is not None else None], [history], [profile])[0]
    t2 = time.perf_counter()
    exclude = set(history)
    if prior_gamma > 0 and records is not None:
        candidates = _search(snapshot, query, max(k, prior_candidates), exclude)
        tau = snapshot.model.model_config.temperature
        log_p = records.log_prior([i for i, _ in candidates])
        rescored = [(i, s / tau + prior_gamma * float(lp)) for (i, s), lp in zip(candidates, log_p, strict=True)]
        items = sorted(rescored, key=lambda pair: -pair[1])[:k]
    else:
        items = _search(snapshot, query, k, exclude)
    t3 = time.perf_counter()
    timings = {"store_ms": (t1 - t0) * 1e3, "user_tower_ms": (t2 - t1) * 1e3, "search_ms": (t3 - t2) * 1e3}
    meta = snapshot.meta
    return Answer(
        items,
        meta.model_version,
        meta.version,
        meta.watermark_ms,
        cold=row is None and not is_known(snapshot.model, key),
        timings_ms=timings,
    )


def similar(snapshot: Snapshot, item_id: str, k: int) -> Answer:
    """The ``k`` items nearest ``item_id``'s vector, the item itself left out."""
    t0 = time.perf_counter()
    with snapshot.view() as view:
        row = view.item(item_id)
    if row is None or row.vector.shape[0] != snapshot.index.dim:
        raise UnknownItem(f"item {item_id!r} is not in the served catalogue (publish version {snapshot.meta.version})")
    t1 = time.perf_counter()
    items = _search(snapshot, np.asarray(row.vector, dtype=np.float32), k, {item_id})
    t2 = time.perf_counter()
    meta = snapshot.meta
    timings = {"store_ms": (t1 - t0) * 1e3, "search_ms": (t2 - t1) * 1e3}
    return Answer(items, meta.model_version, meta.version, meta.watermark_ms, timings_ms=timings)
