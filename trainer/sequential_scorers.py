"""How each fitted model scores a history in the sequential evaluation (:mod:`trainer.sequential`).

A scorer turns a block of states (user, history, instant) into dense scores over its own candidates; the caller
excludes the history's items and takes the top K. Every scorer reads a model frozen at the cut:

- :class:`TwoTowerScorer`: the user tower on the trained user-id row (row 0, the unknown row, for a user the model
  does not know), the user's profile when it is dated before the click (or before the cut, see
  :class:`~trainer.sequential.SequentialConfig`) and the last N items of the history; the candidates are the
  catalogue items created before the cut, as :meth:`~trainer.retriever.TwoTowerRetriever.recommend` at the cut.
- :class:`ALSScorer`: folds the user in. With the item factors ``Y`` fixed, the user factor is the least-squares
  solution of Hu et al. (ICDM 2008) for the history's click counts ``r``:
  ``x = (YᵀY + λI + Σ_j (c_j − 1) y_j y_jᵀ)⁻¹ Σ_j c_j y_j``, ``c_j = 1 + α r_j`` over the history's items ``j``,
  the equation ``implicit``'s ``recalculate_user`` solves, batched here. Also for warm users: their fold-in
  from the training clicks alone is what the trained factor approximates.
- :class:`ItemCFScorer`: the history's binary item vector times the frozen similarity matrix.
- :class:`PopularityScorer`: the training (recency-weighted) counts, static at the cut.

ALS and ItemCF score a history that holds no item they know (an empty one, or only items first clicked after the
cut) with the training popularity, as their static ``recommend`` does for a user without training clicks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import scipy.sparse as sp
import torch

from trainer.peers import ALS, ItemCF, Popularity, Recommender

if TYPE_CHECKING:
    from trainer.sequential import SequentialConfig, SequentialSplit

__all__ = ["ALSScorer", "ItemCFScorer", "PopularityScorer", "StateScorer", "TwoTowerScorer", "make_scorer"]


class StateScorer(Protocol):
    """``columns``: ``[n_items]`` the candidate column of each item of the split's global index, -1 if the model
    cannot recommend it. ``scores``: ``[B, n_candidates]`` float64, higher is better."""

    columns: np.ndarray

    def scores(self, users: Sequence[str], histories: Sequence[np.ndarray], times: np.ndarray) -> np.ndarray: ...


def _columns(global_items: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``[len(global_items)]`` int64: the position of each global item in ``candidates``, -1 if absent."""
    candidates = np.asarray(candidates, dtype=str)
    order = np.argsort(candidates, kind="stable")
    if len(candidates) == 0:
        return np.full(len(global_items), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(candidates[order], global_items), len(candidates) - 1)
    return np.where(candidates[order][pos] == global_items, order[pos], -1).astype(np.int64)


def history_counts(histories: Sequence[np.ndarray], columns: np.ndarray, n_columns: int) -> sp.csr_matrix:
    """``[B, n_columns]`` CSR of click counts of each history over the model's columns (unknown items dropped)."""
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    flat = columns[np.concatenate(histories)] if lengths.sum() else np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(histories)), lengths)
    known = flat >= 0
    data = np.ones(int(known.sum()), dtype=np.float64)
    m = sp.coo_matrix((data, (rows[known], flat[known])), shape=(len(histories), n_columns)).tocsr()
    m.sum_duplicates()
    return m


def _popularity_scores(popular: np.ndarray) -> np.ndarray:
    """Scores that rank the columns in the order ``popular`` (most popular first) lists them."""
    scores = np.empty(len(popular), dtype=np.float64)
    scores[popular] = np.arange(len(popular), 0, -1, dtype=np.float64)
    return scores


class PopularityScorer:
    """Static popularity at the cut: the same scores whatever the history."""

    def __init__(self, model: Popularity, split: SequentialSplit) -> None:
        data = model._require_fit()
        self.columns = _columns(split.items, data.items)
        self._scores = np.asarray(model._item_scores, dtype=np.float64)

    def scores(self, users: Sequence[str], histories: Sequence[np.ndarray], times: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self._scores, (len(users), len(self._scores))).copy()


class _FallbackScorer:
    """Shared by ALS and ItemCF: the columns, and the popularity rows for histories without a known item."""

    def __init__(self, model: ALS | ItemCF, split: SequentialSplit) -> None:
        data = model._require_fit()
        self.columns = _columns(split.items, data.items)
        self.n = len(data.items)
        self._popular = _popularity_scores(model._popular)

    def scores(self, users: Sequence[str], histories: Sequence[np.ndarray], times: np.ndarray) -> np.ndarray:
        counts = history_counts(histories, self.columns, self.n)
        empty = counts.getnnz(axis=1) == 0
        out = np.empty((len(histories), self.n), dtype=np.float64)
        out[empty] = self._popular
        if (~empty).any():
            out[~empty] = self._personal(counts[~empty])
        return out

    def _personal(self, counts: sp.csr_matrix) -> np.ndarray:
        raise NotImplementedError


class ItemCFScorer(_FallbackScorer):
    """``score_j = Σ_{i in history} sim(i, j)`` (binary history) plus the popularity tie-break of :class:`ItemCF`."""

    def __init__(self, model: ItemCF, split: SequentialSplit) -> None:
        super().__init__(model, split)
        assert model._sim is not None
        self._sim, self._tiebreak = model._sim, model._tiebreak

    def _personal(self, counts: sp.csr_matrix) -> np.ndarray:
        x = counts.copy()
        x.data[:] = 1.0
        return (x @ self._sim).toarray() + self._tiebreak


def fold_in(item_factors: np.ndarray, counts: sp.csr_matrix, regularization: float, alpha: float) -> np.ndarray:
    """``[B, f]`` least-squares user factors for the click counts ``counts`` ``[B, n_items]`` (see the module
    docstring): confidence ``c = 1 + alpha * r`` on the clicked items, preference 1 there and 0 elsewhere."""
    y = np.asarray(item_factors, dtype=np.float64)
    f = y.shape[1]
    conf = counts.astype(np.float64).tocsr(copy=True)
    conf.data = 1.0 + alpha * conf.data
    extra = conf.copy()
    extra.data = extra.data - 1.0
    outer = (y[:, :, None] * y[:, None, :]).reshape(len(y), f * f)  # [n_items, f*f]
    a = (extra @ outer).reshape(-1, f, f) + (y.T @ y + regularization * np.eye(f))[None]
    b = np.asarray(conf @ y)  # [B, f]
    return np.linalg.solve(a, b[:, :, None])[:, :, 0]


class ALSScorer(_FallbackScorer):
    """The user folded in from the history against the frozen item factors (confidence weighting only)."""

    def __init__(self, model: ALS, split: SequentialSplit) -> None:
        super().__init__(model, split)
        if model.weighting != "confidence":
            raise ValueError(f"the sequential fold-in supports weighting='confidence', not {model.weighting!r}")
        self._y = np.asarray(model._item_factors, dtype=np.float64)
        self._regularization, self._alpha = float(model.regularization), float(model.alpha)
        self._prior = model.serving_prior * model.item_log_prior() if model.serving_prior > 0 else None

    def _personal(self, counts: sp.csr_matrix) -> np.ndarray:
        scores = fold_in(self._y, counts, self._regularization, self._alpha) @ self._y.T
        return scores + self._prior if self._prior is not None else scores


class TwoTowerScorer:
    """The frozen two-tower model; the user vector from the trained id row, the profile and the history's last N."""

    def __init__(self, model: Recommender, split: SequentialSplit, config: SequentialConfig) -> None:
        from trainer.retriever import TwoTowerRetriever

        assert isinstance(model, TwoTowerRetriever)
        self._model, self._split = model, split
        ids, vecs = model.item_vectors(split.cut_ms)
        self.columns = _columns(split.items, np.asarray(ids, dtype=str))
        self._item_vecs = vecs  # [N, d]
        self._bias = None
        if model.serving_prior > 0:
            prior = model.item_log_prior(split.cut_ms)[model._rows_at(split.cut_ms)]
            self._bias = model.model.config.temperature * model.serving_prior * prior
        spec = model.encoder.last_n
        self._last_n = spec.n if spec is not None else 0
        self._profiles_at_click = config.profiles_at_click

    @torch.no_grad()
    def scores(self, users: Sequence[str], histories: Sequence[np.ndarray], times: np.ndarray) -> np.ndarray:
        model, encoder, split = self._model.model, self._model.encoder, self._split
        model.eval()
        limit = times if self._profiles_at_click else np.full(len(users), split.cut_ms)
        profiles = [split.profiles.get(u) for u in users]
        has = np.array([p is not None and p.ts_ms < t for p, t in zip(profiles, limit.tolist(), strict=True)])
        lists = [split.items[h[-self._last_n :]].tolist() if self._last_n and len(h) else [] for h in histories]
        vectors = torch.zeros((len(users), self._item_vecs.shape[1]))
        for group in (np.flatnonzero(has), np.flatnonzero(~has)):
            if len(group) == 0:
                continue
            ids = [users[g] for g in group]
            known = {users[g]: profiles[g] for g in group if has[g]}
            batch = encoder.encode_users(ids, known, [lists[g] for g in group] if self._last_n else None)  # type: ignore[arg-type]
            vectors[torch.from_numpy(group)] = model.user_vectors(batch)
        scores = (vectors @ self._item_vecs.T).numpy().astype(np.float64)
        return scores + self._bias if self._bias is not None else scores


def make_scorer(model: Recommender, split: SequentialSplit, config: SequentialConfig) -> StateScorer:
    """The scorer of a fitted peer or two-tower retriever; other models cannot take a history and are refused."""
    from trainer.retriever import TwoTowerRetriever

    if isinstance(model, TwoTowerRetriever):
        return TwoTowerScorer(model, split, config)
    if isinstance(model, ALS):
        return ALSScorer(model, split)
    if isinstance(model, ItemCF):
        return ItemCFScorer(model, split)
    if isinstance(model, Popularity):
        return PopularityScorer(model, split)
    raise TypeError(
        f"{type(model).__name__} has no sequential scorer; expected a two-tower model, ALS, ItemCF or a popularity model"
    )
