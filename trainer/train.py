"""One training epoch of the two-tower model over a stretch of clicks (DESIGN.md "Training objectives").

An example is a click: the user (profile + the last N items clicked strictly before the click) and the clicked
item, the positive. Items that were shown but not clicked are never negatives (seed 000: they passed every ranking
stage already); the negatives are

* the other positives of the batch (listwise, in-batch), corrected by logQ: ``cos / tau - log q_j`` with ``q_j``
  the expected number of copies of item ``j`` in a batch: the probability that it appears, estimated from the
  batches themselves in the order they are trained (Yi et al., RecSys 2019,
  :class:`~trainer.frequency.FrequencyEstimator`), times the copies in this batch;
* easy negatives drawn from the catalogue with ``P ∝ clicks ** 0.75`` (:class:`~trainer.negatives.PowerSampler`),
  corrected by their own sampling probability;
* optionally hard negatives. The data holds no ranking logs ("retrieved but eliminated by ranking", seed 001), so
  they are mined from the model itself: items the current model ranks just below its top (ranks ``hard_skip`` to
  ``hard_skip + hard_depth``) for the batch's users, with the item vectors refreshed every ``hard_refresh_steps``.

Pointwise training labels each positive 1 and ``negative_ratio`` sampled negatives 0; pairwise training pairs each
positive with one sampled negative. A self-supervised contrastive loss on two augmented views of items drawn
*uniformly* from the catalogue (Yao et al. 2021) is added with weight ``ssl_weight``:
``loss = mean(L_main) + ssl_weight * mean(L_self)``.

Everything random is drawn from a numpy Generator seeded by ``(seed, epoch)``; torch's own generator is not used
after model initialisation, so a run is reproducible for a given seed without touching global state.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from trainer.augment import ItemAugmenter
from trainer.dataset import Dataset
from trainer.features import FeatureEncoder, IdFeature, ItemBatch, UserBatch
from trainer.frequency import FrequencyEstimator
from trainer.history import ClickHistory
from trainer.losses import (
    contrastive_loss,
    listwise_loss,
    pointwise_loss,
    triplet_hinge_loss,
    triplet_logistic_loss,
)
from trainer.model import TwoTowerModel
from trainer.negatives import PowerSampler, keep_probability, mix_negatives

__all__ = ["TrainConfig", "TrainStats", "make_estimator", "make_optimizer", "train_epoch"]

logger = logging.getLogger(__name__)

Objective = Literal["listwise", "pointwise", "pairwise_hinge", "pairwise_logistic"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults: listwise with in-batch negatives, logQ, SSL weight 0.1.

    ``easy_negatives``: extra negatives per batch for listwise (0 = in-batch only); the other objectives draw their
    own (``negative_ratio`` per positive for pointwise, one for pairwise). ``hard_fraction``: share of sampled
    negatives that are hard. ``margin`` (hinge) and ``sigma`` (logistic) are in cosine units.
    ``logq_weight``: the strength ``beta`` of the correction, ``cos / tau - beta * log q_j`` (1 = the full correction
    of Yi et al.; 0 = none; between: the model learns ``log P(j | u) - (1 - beta) * log q_j``, a dial between the
    likelihood, which favours hot items, and a PMI-like score, which favours the tail; ``bench/logq_tradeoff.py``).
    ``hot_item_threshold``: word2vec-style down-sampling of hot positives (None = off). ``id_dropout``: probability
    of replacing a user or item id by the default index 0, which trains row 0 into the embedding that new ids start
    from. ``first_batches``: how many batches :attr:`TrainStats.first_loss` averages.
    """

    objective: Objective = "listwise"
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    logq: bool = True
    logq_weight: float = 1.0
    easy_negatives: int = 128
    hard_fraction: float = 0.0
    hard_skip: int = 10
    hard_depth: int = 50
    hard_refresh_steps: int = 20
    negative_ratio: int = 2
    margin: float = 0.2
    sigma: float = 10.0
    ssl_weight: float = 0.1
    ssl_batch: int = 128
    ssl_temperature: float = 0.1
    ssl_method: Literal["cfm", "rfm"] = "cfm"
    hot_item_threshold: float | None = None
    id_dropout: float = 0.0
    frequency_buckets: int = 1 << 18
    frequency_hashes: int = 2
    frequency_alpha: float = 0.01
    first_batches: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in ("listwise", "pointwise", "pairwise_hinge", "pairwise_logistic"):
            raise ValueError(
                f"objective must be listwise, pointwise, pairwise_hinge or pairwise_logistic, got {self.objective!r}"
            )
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if not 1 <= self.negative_ratio <= 3:
            raise ValueError(
                f"negative_ratio must be 1, 2 or 3 (seed 000: about 1:2 or 1:3), got {self.negative_ratio}"
            )
        for name in ("hard_fraction", "id_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (math.isfinite(self.logq_weight) and self.logq_weight >= 0):
            raise ValueError(f"logq_weight must be a finite number >= 0, got {self.logq_weight}")
        if self.easy_negatives < 0 or self.ssl_batch < 0 or self.ssl_weight < 0:
            raise ValueError("easy_negatives, ssl_batch and ssl_weight must be >= 0")
        if self.hot_item_threshold is not None and not self.hot_item_threshold > 0:
            raise ValueError(f"hot_item_threshold must be > 0 or None, got {self.hot_item_threshold}")


@dataclass(frozen=True)
class TrainStats:
    """What one epoch did. Losses are per-batch means of the total loss unless named otherwise."""

    steps: int
    examples: int
    mean_loss: float
    first_loss: float  # mean over the first ``first_batches`` batches: lower after a warm start
    last_loss: float  # mean over the last ``first_batches`` batches
    main_loss: float
    ssl_loss: float
    skipped: int  # clicks on items the encoder does not know (extend the encoder first)
    seconds: float


def make_optimizer(model: TwoTowerModel, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam over all parameters (what :func:`train_epoch` builds when none is given)."""
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def make_estimator(config: TrainConfig) -> FrequencyEstimator:
    """The streaming ``p_j`` estimator :func:`train_epoch` builds when none is given (keep one across epochs)."""
    return FrequencyEstimator(config.frequency_buckets, config.frequency_hashes, config.frequency_alpha, config.seed)


class _HardMiner:
    """Items ranked ``[skip, skip + depth)`` for a user by the current model, from item vectors refreshed
    every ``refresh`` steps (no gradient flows through the mining)."""

    def __init__(self, model: TwoTowerModel, table: ItemBatch, rows: np.ndarray, config: TrainConfig) -> None:
        self.model, self.table, self.rows, self.config = model, table, rows, config
        self.vectors: Tensor | None = None
        self.age = 0

    @torch.no_grad()
    def mine(self, users: Tensor) -> np.ndarray:
        """users: ``[B, d]`` -> ``[B, depth']`` int64 item rows (vocabulary indices)."""
        if self.vectors is None or self.age >= self.config.hard_refresh_steps:
            self.vectors = self.model.item_vectors(self.table.select(self.rows))  # [N, d]
            self.age = 0
        self.age += 1
        skip = min(self.config.hard_skip, max(len(self.rows) - 1, 0))
        depth = min(skip + self.config.hard_depth, len(self.rows))
        top = torch.topk(users.detach() @ self.vectors.T, depth, dim=1).indices[:, skip:]  # [B, depth - skip]
        return self.rows[top.numpy()]


class _Epoch:
    """Everything an epoch derives from (encoder, dataset) once: tables, histories, samplers."""

    def __init__(
        self, model: TwoTowerModel, encoder: FeatureEncoder, dataset: Dataset, config: TrainConfig, epoch: int
    ) -> None:
        self.rng = np.random.default_rng([config.seed, epoch])
        self.config = config
        self.item_vocab = encoder.item_vocab
        self.items = encoder.item_table(dataset.items)  # row = item vocabulary index
        self.users = encoder.user_table(dataset.users)  # row = user vocabulary index
        self.last_n = encoder.last_n
        self.history = ClickHistory(dataset.clicks, self.item_vocab) if self.last_n else None
        self.user_id = next(s.name for s in encoder.user_features if isinstance(s, IdFeature))
        self.item_id = next(s.name for s in encoder.item_features if isinstance(s, IdFeature))
        clicks = dataset.clicks
        self.click_items = self.item_vocab.lookup(clicks.item.tolist())  # [n] vocab rows, 0 = unknown
        self.click_users = encoder.user_vocab.lookup(clicks.user.tolist())
        catalogue = self.item_vocab.lookup(sorted(dataset.items))
        catalogue = catalogue[catalogue > 0]
        # Negatives come from today's catalogue (falling back to clicked items when it holds no records).
        self.catalogue = catalogue if len(catalogue) else np.unique(self.click_items[self.click_items > 0])
        self.position = np.full(len(self.item_vocab), -1, dtype=np.int64)  # vocab row -> catalogue position
        self.position[self.catalogue] = np.arange(len(self.catalogue))
        counts = np.bincount(self.click_items, minlength=len(self.item_vocab)).astype(np.float64)
        self.counts = counts
        needs_sampler = config.objective != "listwise" or config.easy_negatives > 0
        self.sampler = (
            PowerSampler(counts[self.catalogue], power=0.75, seed=int(self.rng.integers(2**31)))
            if needs_sampler and len(self.catalogue)
            else None
        )
        self.miner = (
            _HardMiner(model, self.items, self.catalogue, config)
            if config.hard_fraction > 0 and len(self.catalogue)
            else None
        )
        self.augmenter = (
            ItemAugmenter.fit(encoder.item_features, self.items.select(self.catalogue), method=config.ssl_method)
            if config.ssl_weight > 0 and config.ssl_batch > 1 and len(self.catalogue) > 1
            else None
        )

    def examples(self) -> tuple[np.ndarray, int]:
        """Shuffled click positions to train on, and how many were skipped for an unknown item."""
        known = self.click_items > 0
        positions = np.flatnonzero(known)
        if self.config.hot_item_threshold is not None:
            keep = keep_probability(self.counts, self.config.hot_item_threshold)[self.click_items[positions]]
            positions = positions[self.rng.random(len(positions)) < keep]
        return self.rng.permutation(positions), int((~known).sum())

    def batches(self, positions: np.ndarray) -> tuple[UserBatch, ItemBatch, np.ndarray]:
        """User batch, positive item batch and the positives' item rows for click ``positions``."""
        u_rows = torch.from_numpy(self.click_users[positions])
        i_rows = self.click_items[positions]
        users = self.users.select(u_rows)
        if self.last_n is not None and self.history is not None:
            users = users.with_list(self.last_n.name, *self.history.at_clicks(positions, self.last_n.n))
        items = self.items.select(torch.from_numpy(i_rows))
        p = self.config.id_dropout
        if p > 0:
            drop_u = torch.from_numpy(self.rng.random(len(positions)) < p)
            drop_i = torch.from_numpy(self.rng.random(len(positions)) < p)
            users = users.with_index(self.user_id, users.indices[self.user_id].masked_fill(drop_u, 0))
            items = items.with_index(self.item_id, items.indices[self.item_id].masked_fill(drop_i, 0))
        return users, items, i_rows

    def sampled_negatives(self, user_vecs: Tensor, n_per_row: int) -> np.ndarray:
        """``[B, n_per_row]`` item rows: each hard with probability ``hard_fraction``, else ∝ clicks^0.75."""
        assert self.sampler is not None
        b = user_vecs.shape[0]
        easy = self.catalogue[self.sampler.sample(b * n_per_row)].reshape(b, n_per_row)
        if self.miner is None:
            return easy
        mined = self.miner.mine(user_vecs)  # [B, depth]
        pick = mined[np.arange(b)[:, None], self.rng.integers(0, mined.shape[1], (b, n_per_row))]
        return np.where(self.rng.random((b, n_per_row)) < self.config.hard_fraction, pick, easy)

    def extra_negatives(self, user_vecs: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Shared listwise negatives: item rows ``[M]`` and the log of their expected count ``[M]`` (hard first).

        Each part is corrected by the proposal that drew it: ``log(M_easy * P_sampler(j))`` for the easy part,
        ``log(M_hard / |pool|)`` for uniform draws from the mined pool.
        """
        assert self.sampler is not None
        m = self.config.easy_negatives
        pool = None if self.miner is None else np.unique(self.miner.mine(user_vecs))
        easy = self.catalogue[self.sampler.sample(m)]
        mixed = mix_negatives(easy, pool, m, self.config.hard_fraction, self.rng)
        n_hard = 0 if pool is None or pool.size == 0 else math.floor(m * self.config.hard_fraction + 0.5)
        log_q = np.empty(m)
        if n_hard:
            log_q[:n_hard] = math.log(n_hard / pool.size)
        if m > n_hard:
            log_q[n_hard:] = self.sampler.log_q(self.position[mixed[n_hard:]], num_draws=m - n_hard)
        return mixed, log_q


def _main_loss(
    model: TwoTowerModel,
    data: _Epoch,
    config: TrainConfig,
    users: UserBatch,
    items: ItemBatch,
    rows: np.ndarray,
    estimator: FrequencyEstimator,
) -> Tensor:
    """Per-example loss of the configured objective: ``[B]`` (pointwise: ``[B * (1 + ratio)]``)."""
    tau = model.config.temperature
    user_vecs = model.user_vectors(users)  # [B, d]
    pos_vecs = model.item_vectors(items)  # [B, d]
    if config.objective == "listwise":
        item_ids = [data.item_vocab.token(int(r)) for r in rows]
        # The estimate follows the batches in training order: update with this batch, then read p_j.
        estimator.update(item_ids)
        pos_log_q = None
        if config.logq:
            # The estimator gives P(j appears in a batch), which saturates at 1 for hot items that fill several
            # columns of every batch. The sampled-softmax correction is the log of the *expected number of copies*
            # (Bengio & Senecal 2008; Yi et al. 2019 subtract it from every column): P(appears) times the copies
            # seen in this batch, given that it appeared.
            _, inverse, copies = np.unique(rows, return_inverse=True, return_counts=True)
            log_q = estimator.log_q(item_ids) + np.log(copies[inverse])
            pos_log_q = torch.from_numpy(config.logq_weight * log_q).float()
        extra = extra_log_q = extra_ids = None
        if config.easy_negatives > 0 and data.sampler is not None:
            neg_rows, neg_log_q = data.extra_negatives(user_vecs)
            extra = model.item_vectors(data.items.select(torch.from_numpy(neg_rows)))  # [M, d]
            extra_ids = torch.from_numpy(neg_rows)
            extra_log_q = torch.from_numpy(config.logq_weight * neg_log_q).float() if config.logq else None
        return listwise_loss(
            user_vecs,
            pos_vecs,
            temperature=tau,
            pos_log_q=pos_log_q,
            pos_ids=torch.from_numpy(rows),
            extra=extra,
            extra_log_q=extra_log_q,
            extra_ids=extra_ids,
        )
    n_neg = config.negative_ratio if config.objective == "pointwise" else 1
    neg_rows = data.sampled_negatives(user_vecs, n_neg)  # [B, n_neg]
    neg_vecs = model.item_vectors(data.items.select(torch.from_numpy(neg_rows.reshape(-1))))  # [B * n_neg, d]
    if config.objective == "pointwise":
        b = user_vecs.shape[0]
        all_users = torch.cat([user_vecs, user_vecs.repeat_interleave(n_neg, dim=0)])  # [B * (1 + n_neg), d]
        all_items = torch.cat([pos_vecs, neg_vecs])
        # A sampled "negative" equal to the row's own positive is no negative: label it 1.
        same = torch.from_numpy((neg_rows == rows[:, None]).reshape(-1))
        labels = torch.cat([torch.ones(b), same.float()])
        return pointwise_loss(all_users, all_items, labels, temperature=tau)
    if config.objective == "pairwise_hinge":
        return triplet_hinge_loss(user_vecs, pos_vecs, neg_vecs, margin=config.margin)
    return triplet_logistic_loss(user_vecs, pos_vecs, neg_vecs, sigma=config.sigma)


def _ssl_loss(model: TwoTowerModel, data: _Epoch, config: TrainConfig) -> Tensor:
    """Contrastive loss of two views of items drawn uniformly from the catalogue (not from clicks): ``[S]``."""
    assert data.augmenter is not None
    n = min(config.ssl_batch, len(data.catalogue))
    rows = data.rng.choice(data.catalogue, size=n, replace=False)
    view1, view2 = data.augmenter.views(data.items.select(torch.from_numpy(rows)), data.rng)
    return contrastive_loss(model.item_vectors(view1), model.item_vectors(view2), temperature=config.ssl_temperature)


def train_epoch(
    model: TwoTowerModel,
    encoder: FeatureEncoder,
    dataset: Dataset,
    config: TrainConfig = TrainConfig(),
    *,
    progress: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    estimator: FrequencyEstimator | None = None,
    epoch: int = 0,
) -> TrainStats:
    """One shuffled pass over ``dataset``'s clicks, updating every parameter of ``model``.

    ``encoder`` must know the dataset's items (fit on it, or :meth:`FeatureEncoder.extend` and
    :meth:`TwoTowerModel.resize` first); clicks on unknown items are skipped and counted. Pass ``optimizer`` and
    ``estimator`` to carry their state across epochs; ``epoch`` varies the shuffle between epochs.
    """
    started = time.perf_counter()
    data = _Epoch(model, encoder, dataset, config, epoch)
    optimizer = optimizer if optimizer is not None else make_optimizer(model, config)
    estimator = estimator if estimator is not None else make_estimator(config)
    positions, skipped = data.examples()
    if skipped:
        logger.warning("%d clicks on items unknown to the encoder were skipped; extend the encoder first", skipped)
    steps = math.ceil(len(positions) / config.batch_size)
    losses: list[float] = []
    main_sum = ssl_sum = 0.0
    examples = 0
    model.train()
    bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False)
    try:
        for step in range(steps):
            batch = positions[step * config.batch_size : (step + 1) * config.batch_size]
            if len(batch) < 2:
                break  # a single example has no in-batch negative
            users, items, rows = data.batches(batch)
            main = _main_loss(model, data, config, users, items, rows, estimator).mean()
            loss = main
            if data.augmenter is not None:
                ssl = _ssl_loss(model, data, config).mean()
                loss = main + config.ssl_weight * ssl
                ssl_sum += float(ssl.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step} of epoch {epoch}")
            losses.append(value)
            examples += len(batch)
            main_sum += float(main.detach())
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{value:.4f}")
    finally:
        bar.close()
    model.eval()
    n = max(len(losses), 1)
    head = config.first_batches
    stats = TrainStats(
        steps=len(losses),
        examples=examples,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        first_loss=float(np.mean(losses[:head])) if losses else float("nan"),
        last_loss=float(np.mean(losses[-head:])) if losses else float("nan"),
        main_loss=main_sum / n,
        ssl_loss=ssl_sum / n,
        skipped=skipped,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "epoch %d: %d steps, %d examples, loss %.4f (first %.4f, last %.4f), %.1f s",
        epoch,
        stats.steps,
        stats.examples,
        stats.mean_loss,
        stats.first_loss,
        stats.last_loss,
        stats.seconds,
    )
    return stats
