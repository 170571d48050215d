"""Simple peers that the two-tower retriever must beat offline: popularity, item-item CF and ALS.

Every peer follows the same protocol as :class:`trainer.retriever.TwoTowerRetriever` (river's uniform
``learn``/``predict`` verbs make learners interchangeable; here the pair is ``fit``/``recommend``):

- ``name``: a short label for tables and JSON;
- ``fit(train)``: learn from the clicks of a :class:`~trainer.dataset.Dataset`;
- ``recommend(user_ids, k, at_ms)``: for each user, the ``k`` best item ids, best first, never an item the
  user clicked in training. ``at_ms`` is the request time (the start of the test period offline); the
  peers here are static and ignore it.

A user with no training clicks gets the popularity list: none of these peers knows anything else about
them, and an empty list would only hide that fact in the averages. The peers only know items that were
clicked in training; a catalogue item without a click is invisible to them (the two-tower model can still
score it from its features).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from trainer.dataset import Dataset

__all__ = ["ALS", "ItemCF", "Interactions", "Popularity", "Recommender"]

logger = logging.getLogger(__name__)

_DAY_MS = 86_400_000


@runtime_checkable
class Recommender(Protocol):
    """What the offline evaluation needs from a model."""

    name: str

    def fit(self, train: Dataset) -> None: ...

    def recommend(self, user_ids: Sequence[str], k: int, at_ms: int) -> list[list[str]]: ...


@dataclass(frozen=True)
class Interactions:
    """The training clicks as a user × item count matrix with the id ↔ row/column maps.

    matrix: ``[n_users, n_items]`` CSR of click counts (implicit 0.7 expects users as rows, too).
    """

    users: np.ndarray  # [n_users] str, sorted
    items: np.ndarray  # [n_items] str, sorted
    matrix: sp.csr_matrix

    @classmethod
    def from_dataset(cls, train: Dataset) -> Interactions:
        clicks = train.clicks
        users, u_idx = np.unique(clicks.user, return_inverse=True)
        items, i_idx = np.unique(clicks.item, return_inverse=True)
        counts = np.ones(len(u_idx), dtype=np.float32)
        # coo → csr sums duplicate (user, item) entries, so repeated clicks become counts.
        matrix = sp.coo_matrix((counts, (u_idx, i_idx)), shape=(len(users), len(items))).tocsr()
        matrix.sum_duplicates()
        return cls(users, items, matrix)

    def user_rows(self, user_ids: Sequence[str]) -> np.ndarray:
        """Row index per user id, -1 for users without training clicks. Returns ``[len(user_ids)]`` int64."""
        if len(self.users) == 0:
            return np.full(len(user_ids), -1, dtype=np.int64)
        query = np.asarray(user_ids, dtype=str)
        pos = np.searchsorted(self.users, query)
        pos = np.minimum(pos, len(self.users) - 1)
        return np.where(self.users[pos] == query, pos, -1).astype(np.int64)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest scores per row, best first (equal scores in column order).

    scores: ``[n_rows, n_items]`` float with -inf for items that must not be recommended.
    Returns ``[n_rows, min(k, n_items)]`` int64; callers drop the columns whose score is -inf.
    """
    k = min(k, scores.shape[1])
    if k == 0:
        return np.empty((scores.shape[0], 0), dtype=np.int64)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part.sort(axis=1)  # a stable order among equal scores
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


class _MatrixPeer:
    """Shared plumbing: id maps, the popularity fallback and top-k over a dense score block."""

    name = "peer"
    _batch_users = 512  # users scored per dense [batch, n_items] block, to bound memory

    def __init__(self) -> None:
        self._data: Interactions | None = None
        self._popular: np.ndarray = np.empty(0, dtype=np.int64)

    def _fit_common(self, train: Dataset) -> Interactions:
        self._data = Interactions.from_dataset(train)
        counts = np.asarray(self._data.matrix.sum(axis=0)).ravel()
        self._popular = np.lexsort((np.arange(len(counts)), -counts))  # most clicked first, ties by id
        return self._data

    def _require_fit(self) -> Interactions:
        if self._data is None:
            raise RuntimeError(f"{self.name}: call fit(train) before recommend()")
        return self._data

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        """Dense ``[len(rows), n_items]`` scores for known users (rows >= 0)."""
        raise NotImplementedError

    def recommend(self, user_ids: Sequence[str], k: int, at_ms: int) -> list[list[str]]:
        """Top ``k`` item ids per user, best first, never an item the user clicked in training."""
        data = self._require_fit()
        rows = data.user_rows(user_ids)
        out: list[list[str]] = [[] for _ in user_ids]
        fallback = data.items[self._popular[:k]].tolist()
        known = np.flatnonzero(rows >= 0)
        for i in np.flatnonzero(rows < 0):
            out[i] = list(fallback)
        for start in range(0, len(known), self._batch_users):
            batch = known[start : start + self._batch_users]
            scores = self._scores(rows[batch]).astype(np.float64)
            seen = data.matrix[rows[batch]]
            scores[seen.nonzero()] = -np.inf  # never recommend what the user clicked in training
            top = _top_k(scores, k)
            valid = np.isfinite(np.take_along_axis(scores, top, axis=1))
            for j, i in enumerate(batch):
                out[i] = data.items[top[j][valid[j]]].tolist()
        return out


class Popularity(_MatrixPeer):
    """The most-clicked items in training, optionally recency-weighted.

    With ``half_life_days`` each click counts ``2 ** (-age / half_life)`` where ``age`` is its distance
    from the last training click, so items that are hot now outrank items that were hot long ago.
    """

    def __init__(self, half_life_days: float | None = None) -> None:
        super().__init__()
        if half_life_days is not None and half_life_days <= 0:
            raise ValueError(f"half_life_days must be > 0 or None, got {half_life_days}")
        self.half_life_days = half_life_days
        self.name = "popularity" if half_life_days is None else f"popularity[half_life={half_life_days:g}d]"
        self._item_scores = np.empty(0)

    def fit(self, train: Dataset) -> None:
        data = self._fit_common(train)
        if self.half_life_days is None:
            self._item_scores = np.asarray(data.matrix.sum(axis=0)).ravel().astype(np.float64)
            return
        ts = train.clicks.ts_ms
        age_days = (ts.max() - ts) / _DAY_MS if len(ts) else ts
        weight = np.exp2(-age_days / self.half_life_days)
        cols = np.searchsorted(data.items, train.clicks.item)
        self._item_scores = np.bincount(cols, weights=weight, minlength=len(data.items))
        self._popular = np.lexsort((np.arange(len(self._item_scores)), -self._item_scores))

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self._item_scores, (len(rows), len(self._item_scores))).copy()


class ItemCF(_MatrixPeer):
    """Item-item collaborative filtering on the binary user × item click matrix (Sarwar et al., WWW 2001).

    ``sim(i, j) = |U_i ∩ U_j| / (sqrt(|U_i|) sqrt(|U_j|) + shrinkage)``: cosine over the users who clicked
    each item, shrunk towards 0 when few users support it. Each item keeps its ``neighbours`` most similar
    items. A user's score for ``j`` is the sum of ``sim(i, j)`` over the items ``i`` in the user's history;
    items with no co-click are ordered by popularity (a tie-break worth ``1e-9`` at most).
    Defaults were picked on validation periods before the test period (as for :class:`ALS`): few neighbours
    and some shrinkage did best on both MovieLens-100K and the synthetic world.
    """

    def __init__(self, neighbours: int = 10, shrinkage: float = 20.0) -> None:
        super().__init__()
        if neighbours < 1 or shrinkage < 0:
            raise ValueError(f"expected neighbours >= 1 and shrinkage >= 0, got {neighbours}, {shrinkage}")
        self.neighbours = neighbours
        self.shrinkage = shrinkage
        self.name = "itemcf"
        self._sim: sp.csr_matrix | None = None
        self._tiebreak = np.empty(0)

    def fit(self, train: Dataset) -> None:
        data = self._fit_common(train)
        x = data.matrix.copy()
        x.data[:] = 1.0  # binary: a user clicking an item twice is one co-click, not two
        x = x.tocsc()
        support = np.asarray(x.sum(axis=0)).ravel()  # [n_items] users per item
        co = (x.T @ x).tocsr()  # [n_items, n_items] co-click counts
        co.setdiag(0.0)
        co.eliminate_zeros()
        norms = np.sqrt(support)
        rows, cols = co.nonzero()
        co.data = (co.data / (norms[rows] * norms[cols] + self.shrinkage)).astype(np.float64)
        self._sim = _keep_top_per_row(co, self.neighbours)
        n = len(data.items)
        rank = np.empty(n)
        rank[self._popular] = np.arange(n)
        self._tiebreak = 1e-9 * (1.0 - rank / max(n, 1))

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        assert self._sim is not None and self._data is not None
        x = self._data.matrix[rows].copy()
        x.data[:] = 1.0
        return (x @ self._sim).toarray() + self._tiebreak


def _keep_top_per_row(m: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """Keep the ``n`` largest entries of each CSR row (ties by column), dropping the rest."""
    m = m.tocsr()
    m.sort_indices()
    keep = np.zeros(m.nnz, dtype=bool)
    for r in range(m.shape[0]):
        lo, hi = m.indptr[r], m.indptr[r + 1]
        if hi - lo <= n:
            keep[lo:hi] = True
        else:
            best = np.argsort(-m.data[lo:hi], kind="stable")[:n]
            keep[lo + best] = True
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    return sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)


class ALS(_MatrixPeer):
    """Implicit-feedback matrix factorisation (Hu, Koren & Volinsky, ICDM 2008) from the ``implicit`` library.

    ``weighting="bm25"`` re-weights the click counts by BM25 with items as documents and users as terms, as
    implicit's own examples do (it damps heavy users), scaled by ``alpha``; ``"confidence"`` uses
    ``1 + alpha * count`` as in the paper. CPU only, ``threads`` native threads and one BLAS thread (implicit warns that a threaded BLAS
    slows its solver down), seeded so two fits give the same factors.

    ``serving_prior`` (``gamma``) adds ``gamma * log p_j`` to every score, ``p_j`` the item's add-one smoothed
    share of the training clicks, each click weighted ``2 ** (-age / prior_half_life_days)`` (age from the last
    training click) when that is set: the same popularity prior :class:`~trainer.retriever.TwoTowerRetriever`
    can serve with, so that the two are compared on equal terms (``bench/serving_prior.py``).
    """

    def __init__(
        self,
        factors: int = 16,
        regularization: float = 10.0,
        iterations: int = 15,
        alpha: float = 1.0,
        weighting: Literal["bm25", "confidence"] = "confidence",
        bm25_k1: float = 100.0,
        bm25_b: float = 0.8,
        threads: int = 1,
        seed: int = 0,
        serving_prior: float = 0.0,
        prior_half_life_days: float | None = None,
    ) -> None:
        super().__init__()
        if weighting not in ("bm25", "confidence"):
            raise ValueError(f"weighting must be 'bm25' or 'confidence', got {weighting!r}")
        if not (np.isfinite(serving_prior) and serving_prior >= 0):
            raise ValueError(f"serving_prior must be a finite number >= 0, got {serving_prior}")
        if prior_half_life_days is not None and not prior_half_life_days > 0:
            raise ValueError(f"prior_half_life_days must be > 0 or None, got {prior_half_life_days}")
        self.serving_prior, self.prior_half_life_days = float(serving_prior), prior_half_life_days
        self.factors, self.regularization, self.iterations = factors, regularization, iterations
        self.alpha, self.weighting, self.bm25_k1, self.bm25_b = alpha, weighting, bm25_k1, bm25_b
        self.threads, self.seed = threads, seed
        self.name = "als"
        self._user_factors = np.empty((0, factors))
        self._item_factors = np.empty((0, factors))
        self._clicks: tuple[np.ndarray, np.ndarray] = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))

    def fit(self, train: Dataset) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.nearest_neighbours import bm25_weight
        from threadpoolctl import threadpool_limits

        data = self._fit_common(train)
        if self.weighting == "bm25":
            # bm25_weight weighs the rows of its input; rows = items here, as in implicit's lastfm example.
            weighted = bm25_weight(data.matrix.T.tocsr(), K1=self.bm25_k1, B=self.bm25_b).T.tocsr()
            alpha = self.alpha
        else:
            # implicit reads a stored value c as the confidence itself (its solver adds (c - 1) y y^T), so
            # Hu et al.'s c = 1 + alpha * r is stored as is and implicit's own alpha stays 1.
            weighted = data.matrix.copy()
            weighted.data = 1.0 + self.alpha * weighted.data
            alpha = 1.0
        # implicit checks the BLAS thread pool when the model is built, so build it inside the limit, too.
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=alpha,
                iterations=self.iterations,
                num_threads=self.threads,
                random_state=self.seed,
            )
            # implicit >= 0.5: fit takes user_items (users as rows), not item_users.
            model.fit(weighted.astype(np.float32).tocsr(), show_progress=False)
        self._user_factors = np.asarray(model.user_factors, dtype=np.float64)
        self._item_factors = np.asarray(model.item_factors, dtype=np.float64)
        self._clicks = (np.searchsorted(data.items, train.clicks.item), train.clicks.ts_ms)

    def item_log_prior(self) -> np.ndarray:
        """``log p_j`` ``[n_items]`` over the clicked items (see the class docstring)."""
        data = self._require_fit()
        cols, ts = self._clicks
        weights = None
        if self.prior_half_life_days is not None and len(ts):
            weights = np.exp2(-((ts.max() - ts) / _DAY_MS) / self.prior_half_life_days)
        counts = np.bincount(cols, weights=weights, minlength=len(data.items))
        return np.log((counts + 1.0) / (counts.sum() + len(counts)))

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        scores = self._user_factors[rows] @ self._item_factors.T
        if self.serving_prior > 0:
            scores += self.serving_prior * self.item_log_prior()
        return scores
