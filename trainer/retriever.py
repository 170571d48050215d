"""The two-tower model behind the offline evaluation protocol (``fit`` / ``recommend``, see :mod:`trainer.peers`).

``fit`` fits a :class:`~trainer.features.FeatureEncoder` on the training data, builds a fresh
:class:`~trainer.model.TwoTowerModel` and trains it for ``epochs`` shuffled epochs (the nightly job does one; an
offline comparison from scratch needs several). ``recommend`` does what serving does: the user vector from the
profile and the last N clicks before the request time, the item vectors of every catalogue item that exists at
that time, and the exact top-k by inner product (= cosine; the logQ correction is a training-only term).

``serving_prior`` (``gamma``) is the alternative to logQ of seed 004: train without the correction and multiply
the softmax score by the item's prior at serving time, ``exp(cos / tau) * p_j ** gamma``, i.e. rank by
``cos / tau + gamma * log p_j`` with ``p_j`` the item's share of the training clicks (add-one smoothed, so an item
never clicked still ranks). In an inner-product index this is one extra dimension: ``[a / tau, gamma]`` for the
user, ``[b, log p_j]`` for the item. With ``prior_half_life_days`` each click counts ``2 ** (-age / half_life)``,
its age taken at the request time: the prior follows what is popular now rather than over the training window
(a stream keeps such counts cheaply; offline it is the recency-weighted popularity peer's score).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from trainer.dataset import Dataset
from trainer.features import FeatureEncoder
from trainer.history import ClickHistory
from trainer.model import ModelConfig, TwoTowerModel
from trainer.train import TrainConfig, TrainStats, make_estimator, make_optimizer, train_epoch

__all__ = ["TwoTowerRetriever"]

logger = logging.getLogger(__name__)

DEFAULT_EPOCHS = 5


class TwoTowerRetriever:
    """Trains a two-tower model on ``fit`` and answers ``recommend`` with exact inner-product top-k."""

    def __init__(
        self,
        model_config: ModelConfig | None = None,
        train_config: TrainConfig | None = None,
        epochs: int = DEFAULT_EPOCHS,
        *,
        name: str = "two_tower",
        serving_prior: float = 0.0,
        prior_half_life_days: float | None = None,
        progress: bool = False,
        batch_users: int = 1024,
    ) -> None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if not (np.isfinite(serving_prior) and serving_prior >= 0):
            raise ValueError(f"serving_prior must be a finite number >= 0, got {serving_prior}")
        self.serving_prior = float(serving_prior)
        if prior_half_life_days is not None and not prior_half_life_days > 0:
            raise ValueError(f"prior_half_life_days must be > 0 or None, got {prior_half_life_days}")
        self.prior_half_life_days = prior_half_life_days
        self.name = name
        self.model_config = model_config if model_config is not None else ModelConfig()
        self.train_config = train_config if train_config is not None else TrainConfig()
        self.epochs = epochs
        self.progress = progress
        self.batch_users = batch_users
        self.stats: list[TrainStats] = []
        self._model: TwoTowerModel | None = None
        self._encoder: FeatureEncoder | None = None
        self._train: Dataset | None = None
        self._history: ClickHistory | None = None
        self._item_ids: list[str] = []
        self._item_created: np.ndarray = np.zeros(0, dtype=np.int64)
        self._item_vectors: Tensor | None = None
        self._click_columns: np.ndarray = np.zeros(0, dtype=np.int64)  # training click -> row of _item_ids
        self._click_ts: np.ndarray = np.zeros(0, dtype=np.int64)

    @property
    def model(self) -> TwoTowerModel:
        if self._model is None:
            raise RuntimeError(f"{self.name}: call fit(train) first")
        return self._model

    @property
    def encoder(self) -> FeatureEncoder:
        if self._encoder is None:
            raise RuntimeError(f"{self.name}: call fit(train) first")
        return self._encoder

    def fit(self, train: Dataset) -> None:
        """Fit the encoder, train a fresh model for ``epochs`` epochs and precompute the catalogue's vectors."""
        for _ in self.fit_stages(train, [self.epochs]):
            pass

    def fit_stages(self, train: Dataset, epochs: Sequence[int]) -> Iterator[int]:
        """One training run for ``max(epochs)`` epochs that stops at each count in ``epochs``: the retriever then
        answers ``recommend`` exactly as if it had been fit with that many epochs, and the count is yielded.
        An epoch-count search (``bench/tune_two_tower.py``) scores every count with one run."""
        if not epochs or min(epochs) < 1:
            raise ValueError(f"epochs must be counts >= 1, got {list(epochs)}")
        encoder = FeatureEncoder.fit(train, last_n=self.model_config.last_n)
        model = TwoTowerModel(encoder, self.model_config)
        optimizer = make_optimizer(model, self.train_config)
        estimator = make_estimator(self.train_config)
        self.stats = []
        for epoch in range(max(epochs)):
            stats = train_epoch(
                model,
                encoder,
                train,
                self.train_config,
                progress=self.progress,
                optimizer=optimizer,
                estimator=estimator,
                epoch=epoch,
            )
            self.stats.append(stats)
            if epoch + 1 in epochs:
                self._ready(model, encoder, train)
                yield epoch + 1

    def _ready(self, model: TwoTowerModel, encoder: FeatureEncoder, train: Dataset) -> None:
        """Catalogue, histories and item vectors of ``model`` as it is now."""
        self._model, self._encoder, self._train = model, encoder, train
        self._history = ClickHistory(train.clicks, encoder.item_vocab)
        self._item_ids = sorted(train.items) if train.items else sorted(set(train.clicks.item.tolist()))
        self._item_created = np.array(
            [train.items[i].created_ms if i in train.items else -1 for i in self._item_ids], dtype=np.int64
        )
        self._item_vectors = self._compute_item_vectors(self._item_ids)
        column = {item: c for c, item in enumerate(self._item_ids)}
        columns = np.array([column.get(i, -1) for i in train.clicks.item.tolist()], dtype=np.int64)
        self._click_columns, self._click_ts = columns[columns >= 0], train.clicks.ts_ms[columns >= 0]

    @torch.no_grad()
    def _compute_item_vectors(self, item_ids: Sequence[str]) -> Tensor:
        assert self._train is not None
        model, encoder = self.model, self.encoder
        model.eval()
        parts = [
            model.item_vectors(encoder.encode_items(item_ids[s : s + 4096], self._train.items))
            for s in range(0, len(item_ids), 4096)
        ]
        return torch.cat(parts) if parts else torch.zeros((0, model.config.dim))

    def item_vectors(self, at_ms: int | None = None) -> tuple[list[str], Tensor]:
        """Ids and ``[N, dim]`` unit vectors of the training catalogue items created before ``at_ms`` (all: None)."""
        if self._item_vectors is None:
            raise RuntimeError(f"{self.name}: call fit(train) first")
        rows = self._rows_at(at_ms)
        return [self._item_ids[r] for r in rows], self._item_vectors[torch.from_numpy(rows)]

    def _rows_at(self, at_ms: int | None) -> np.ndarray:
        keep = np.ones(len(self._item_ids), dtype=bool) if at_ms is None else self._item_created < at_ms
        return np.flatnonzero(keep)

    def item_log_prior(self, at_ms: int) -> np.ndarray:
        """``log p_j`` ``[N]`` for every training catalogue item: its add-one smoothed share of the training clicks
        made before ``at_ms``, each weighted ``2 ** (-age / half_life)`` when ``prior_half_life_days`` is set."""
        before = self._click_ts < at_ms
        weights = None
        if self.prior_half_life_days is not None:
            age_days = (at_ms - self._click_ts[before]) / 86_400_000
            weights = np.exp2(-age_days / self.prior_half_life_days)
        counts = np.bincount(self._click_columns[before], weights=weights, minlength=len(self._item_ids))
        return np.log((counts + 1.0) / (counts.sum() + len(counts)))

    @torch.no_grad()
    def user_vectors(self, user_ids: Sequence[str], at_ms: int) -> Tensor:
        """``[B, dim]`` unit vectors from each user's profile and last-N training clicks before ``at_ms``."""
        assert self._train is not None and self._history is not None
        model, encoder = self.model, self.encoder
        model.eval()
        spec = encoder.last_n
        history = self._history.before(user_ids, at_ms, spec.n) if spec is not None else None
        return model.user_vectors(encoder.encode_users(list(user_ids), self._train.users, history))

    @torch.no_grad()
    def recommend(self, user_ids: Sequence[str], k: int, at_ms: int) -> list[list[str]]:
        """Top ``k`` item ids per user, best first, never an item the user clicked in training."""
        assert self._history is not None
        item_ids, item_vecs = self.item_vectors(at_ms)  # [N, d]
        bias = None
        if self.serving_prior > 0:
            # Rank by cos / tau + gamma * log p_j; multiplying by tau keeps the cosine scale of the other models.
            prior = torch.from_numpy(self.item_log_prior(at_ms)[self._rows_at(at_ms)]).float()  # [N]
            bias = self.model.config.temperature * self.serving_prior * prior
        # vocabulary index -> column of item_vecs, to exclude clicked items by index.
        vocab = self.encoder.item_vocab
        column = np.full(len(vocab), -1, dtype=np.int64)
        column[vocab.lookup(item_ids)] = np.arange(len(item_ids))
        column[0] = -1  # unknown items are not in the catalogue
        out: list[list[str]] = []
        k_eff = min(k, len(item_ids))
        for start in range(0, len(user_ids), self.batch_users):
            users = list(user_ids[start : start + self.batch_users])
            scores = self.user_vectors(users, at_ms) @ item_vecs.T  # [b, N]
            if bias is not None:
                scores += bias
            for row, user in enumerate(users):
                cols = column[self._history.clicked(user)]
                scores[row, torch.from_numpy(cols[cols >= 0])] = float("-inf")
            top = torch.topk(scores, k_eff, dim=1) if k_eff else None
            for row in range(len(users)):
                if top is None:
                    out.append([])
                    continue
                valid = torch.isfinite(top.values[row])
                out.append([item_ids[c] for c in top.indices[row][valid].tolist()])
        return out
