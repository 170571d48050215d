"""Offline retrieval metrics: Recall@K and NDCG@K with binary relevance, overall and for head / tail items.

Conventions (the usual ones for top-K retrieval, e.g. Krichene & Rendle, "On Sampled Metrics for Item
Recommendation", KDD 2020, computed here over the full catalogue, never a sampled one):

- Relevance is binary: an item is relevant to a user if the user clicked it in the test period.
- ``Recall@K = |top-K ∩ relevant| / |relevant|`` per user.
- ``NDCG@K = DCG@K / IDCG@K`` with ``DCG@K = sum_{r=1..K} rel_r / log2(r + 1)`` and the ideal DCG over
  ``min(K, |relevant|)`` hits in the first ranks, so a perfect list scores 1 even when ``|relevant| > K``.
- Every metric is averaged over the users with at least one relevant item; users without any are skipped.

Head and tail: :func:`head_items` puts the most-clicked ``head_fraction`` (default 20%) of the catalogue in
the head, ranked by training clicks, ties broken by item id so the split is deterministic; items with no
training click are always tail. ``Recall@K`` restricted to the head counts, per user, the head test items
that appear in the top K over the user's head test items, averaged over users with at least one head test
item; the tail likewise. The ranked list itself is not filtered, so a tail item is still competing with
every head item for the K slots, which is the point: a model that only recommends hot items scores 0 there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Literal

import numpy as np

__all__ = ["head_items", "hit_matrix", "ndcg_at_k", "ranking_metrics", "recall_at_k", "recall_per_user"]


def hit_matrix(recommended: Sequence[Sequence[str]], relevant: Sequence[Iterable[str]], depth: int) -> np.ndarray:
    """``hits[u, r]`` is True when the item at rank ``r`` (0-based) for user ``u`` is relevant.

    recommended: one ranked list per user (may be shorter than ``depth``; the rest counts as misses).
    relevant: one set of relevant items per user, aligned with ``recommended``.
    Returns a bool array ``[n_users, depth]``.
    """
    if len(recommended) != len(relevant):
        raise ValueError(
            f"expected one relevant set per ranked list, got {len(recommended)} lists and {len(relevant)} sets"
        )
    hits = np.zeros((len(recommended), depth), dtype=bool)
    for u, (ranked, rel) in enumerate(zip(recommended, relevant, strict=True)):
        rel_set = rel if isinstance(rel, set | frozenset) else set(rel)
        if not rel_set:
            continue
        row = ranked[:depth]
        hits[u, : len(row)] = [item in rel_set for item in row]
    return hits


def _check_k(ks: Sequence[int]) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"expected cut-offs K >= 1, got {ks}")
    return ks


def recall_per_user(hits: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """Recall@K of each user with ``n_relevant >= 1``: ``{K: [n_kept]}``.

    hits: ``[n_users, depth]`` bool from :func:`hit_matrix`; n_relevant: ``[n_users]`` int.
    """
    ks = _check_k(ks)
    keep = n_relevant > 0
    if ks[-1] > hits.shape[1]:
        raise ValueError(f"hit matrix has depth {hits.shape[1]}, but Recall@{ks[-1]} was asked for")
    # cumsum over ranks: found[:, K-1] = number of relevant items in the top K.
    found = np.cumsum(hits[keep], axis=1)
    denom = n_relevant[keep].astype(np.float64)
    return {k: found[:, k - 1] / denom for k in ks}


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Mean Recall@K over users with ``n_relevant >= 1`` (NaN when there is none).

    hits: ``[n_users, depth]`` bool from :func:`hit_matrix`; n_relevant: ``[n_users]`` int.
    """
    per_user = recall_per_user(hits, n_relevant, ks)
    return {k: float(np.mean(v)) if len(v) else float("nan") for k, v in per_user.items()}


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Mean NDCG@K (binary relevance) over users with ``n_relevant >= 1``.

    hits: ``[n_users, depth]`` bool from :func:`hit_matrix`; n_relevant: ``[n_users]`` int.
    """
    ks = _check_k(ks)
    keep = n_relevant > 0
    depth = hits.shape[1]
    if ks[-1] > depth:
        raise ValueError(f"hit matrix has depth {depth}, but NDCG@{ks[-1]} was asked for")
    if not keep.any():
        return {k: float("nan") for k in ks}
    # discount[r] = 1 / log2(r + 2) for 0-based rank r, i.e. 1/log2(2), 1/log2(3), ...
    discount = 1.0 / np.log2(np.arange(depth) + 2.0)
    dcg = np.cumsum(hits[keep] * discount, axis=1)  # [n_kept, depth]: DCG@(r+1)
    ideal = np.cumsum(discount)  # ideal[m-1] = IDCG with m hits in the first m ranks
    n_rel = n_relevant[keep]
    out = {}
    for k in ks:
        idcg = ideal[np.minimum(n_rel, k) - 1]
        out[k] = float(np.mean(dcg[:, k - 1] / idcg))
    return out


def head_items(click_counts: Mapping[str, int], catalogue: Iterable[str] = (), head_fraction: float = 0.2) -> set[str]:
    """The head: the ``ceil(head_fraction * n)`` most-clicked items of the ``n``-item catalogue.

    The catalogue is ``catalogue`` together with every item in ``click_counts``. Items are ranked by
    training clicks (descending), ties by item id; items with zero clicks never enter the head even if
    the quota is not filled. Everything else is the tail.
    """
    if not 0.0 < head_fraction < 1.0:
        raise ValueError(f"head_fraction must lie in (0, 1), got {head_fraction}")
    n = len(set(catalogue) | set(click_counts))
    quota = math.ceil(head_fraction * n)
    ranked = sorted((item for item, c in click_counts.items() if c > 0), key=lambda i: (-click_counts[i], i))
    return set(ranked[:quota])


def ranking_metrics(
    recommended: Sequence[Sequence[str]],
    relevant: Sequence[Iterable[str]],
    recall_ks: Sequence[int] = (10, 20, 50),
    ndcg_ks: Sequence[int] = (10, 20),
    head: AbstractSet[str] | None = None,
    split_ks: Sequence[int] = (20, 50),
    catalogue_size: int | None = None,
) -> dict[str, float]:
    """All offline metrics for one model, keyed ``recall@K``, ``ndcg@K``, ``head_recall@K``, ``tail_recall@K``.

    recommended: one ranked list per test user; relevant: that user's test items. ``head``: the head item
    set from :func:`head_items`; without it the head / tail entries are left out. Also reports ``users``
    (how many users had at least one relevant item), ``recall@K_se`` (the standard error of the mean over
    users) and, given ``catalogue_size``, ``coverage@K`` for the
    largest recall K: distinct items in anyone's top K over the catalogue size, a cheap sign of a model that
    shows everyone the same list.
    """
    rel_sets = [r if isinstance(r, set | frozenset) else set(r) for r in relevant]
    depth = max([*recall_ks, *ndcg_ks, *(split_ks if head is not None else ())])
    hits = hit_matrix(recommended, rel_sets, depth)
    n_rel = np.fromiter((len(r) for r in rel_sets), dtype=np.int64, count=len(rel_sets))
    out: dict[str, float] = {"users": float(np.count_nonzero(n_rel))}
    for k, per_user in recall_per_user(hits, n_rel, recall_ks).items():
        n = len(per_user)
        out[f"recall@{k}"] = float(np.mean(per_user)) if n else float("nan")
        # Standard error of the mean over users: with ~100 test users (MovieLens-100K) it is not small.
        out[f"recall@{k}_se"] = float(np.std(per_user, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    out.update({f"ndcg@{k}": v for k, v in ndcg_at_k(hits, n_rel, ndcg_ks).items()})
    if head is not None:
        for part in ("head", "tail"):
            out.update(_part_recall(recommended, rel_sets, head, part, split_ks))
    if catalogue_size:
        k_max = max(recall_ks)
        shown = {item for ranked in recommended for item in ranked[:k_max]}
        out[f"coverage@{k_max}"] = len(shown) / catalogue_size
    return out


def _part_recall(
    recommended: Sequence[Sequence[str]],
    relevant: Sequence[set[str]],
    head: AbstractSet[str],
    part: Literal["head", "tail"],
    ks: Sequence[int],
) -> dict[str, float]:
    """Recall@K restricted to the head (or tail) test items; the ranked lists are left as they are."""
    in_head = part == "head"
    rel = [{i for i in r if (i in head) == in_head} for r in relevant]
    hits = hit_matrix(recommended, rel, max(ks))
    n_rel = np.fromiter((len(r) for r in rel), dtype=np.int64, count=len(rel))
    return {f"{part}_recall@{k}": v for k, v in recall_at_k(hits, n_rel, ks).items()}
