"""Incremental SGD on ID embeddings only: the online half of "full + incremental" (seed 000, 001, 003).

Every dense parameter of the current model (MLPs, feature tables, the last-N table) is frozen:
``requires_grad`` is off and no optimizer ever sees it, so they stay bit-identical until the next
full retrain is promoted. Only user-ID and item-ID rows move, through the
:class:`~streaming.tables.EmbeddingTable` overlays, with row-wise Adagrad.

A mini-batch is a list of clicks in event-time order; the loss is the listwise in-batch softmax
with the logQ correction, ``p_j`` estimated from the stream itself (Yi et al., RecSys 2019), the
same estimator the nightly job uses.

The estimate describes the worker's own batches (the stream in time order), which go on unchanged when a new
model version is switched in: it is the stream's, not the model's, so it is kept across a switch (the nightly
job's estimate in the version is of its shuffled day, ends at the version's cutoff, and hashes items into other
buckets). Each click is counted once, like the builder's click counters: the clicks a switch replays
(``Example.replay``) are learnt again through the new model but not counted again, and the unfinished batch a
switch drops for the replay is counted before it is dropped (:func:`count_clicks`). Counting the replay again
skewed ``log p_j`` by 0.11 nats on average (p90 0.19, at worst 4.3) against a worker that never switched, over
MovieLens-100K with a switch a day replaying 6 h, and made 26% more steps than there were batches.

A live stream does not always fill a batch: the worker trains a partial one after ``max_batch_delay_s``. An
in-batch softmax over one click has no negative, so its gradient is zero and nothing moves. A partial batch with
fewer than ``min_negatives`` distinct items therefore gets easy negatives up to that many columns, drawn from the items
clicked so far with ``P ∝ clicks ** 0.75`` (seed 000/002; :class:`~trainer.negatives.PowerSampler`) and
corrected by that proposal (``log(M * P)``). Their rows only shape the softmax: no gradient reaches them. The
draw is seeded by the batch number and the click counts are part of the checkpoint, so a replay after a crash
draws the same negatives.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from streaming.examples import Example, ExampleBuilder
from streaming.item_rows import Gradient
from streaming.state import StateStore
from streaming.tables import EmbeddingTable, TableSettings
from trainer.features import FeatureEncoder
from trainer.frequency import FrequencyEstimator
from trainer.losses import listwise_loss
from trainer.model import TwoTowerModel
from trainer.negatives import PowerSampler

__all__ = ["IncrementalLearner", "LearnerSettings", "count_clicks", "load_frequency"]

logger = logging.getLogger(__name__)

_BUCKET = struct.Struct("<qd")  # last_step, mean_gap


@dataclass(frozen=True)
class LearnerSettings:
    batch_size: int = 256
    logq: bool = True
    logq_weight: float = 1.0
    frequency_buckets: int = 1 << 16
    frequency_hashes: int = 2
    frequency_alpha: float = 0.01
    min_negatives: int = 64
    user_table: TableSettings = field(default_factory=TableSettings)
    item_table: TableSettings = field(default_factory=TableSettings)
    # "local": the learner trains its item rows itself (one worker). "owner": it sends each batch's item gradients
    # to the items' owners (outbox, streaming.item_rows) and its item table mirrors the rows they publish.
    item_rows: str = "local"

    def __post_init__(self) -> None:
        if self.item_rows not in ("local", "owner"):
            raise ValueError(f"item_rows must be 'local' or 'owner', got {self.item_rows!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for in-batch negatives, got {self.batch_size}")
        if not (math.isfinite(self.logq_weight) and self.logq_weight >= 0):
            raise ValueError(f"logq_weight must be a finite number >= 0, got {self.logq_weight}")
        if self.min_negatives < 0:
            raise ValueError(f"min_negatives must be >= 0, got {self.min_negatives}")


class IncrementalLearner:
    """Applies mini-batches of :class:`Example` to the ID rows of ``model``; ``learn_batch`` is the one verb."""

    def __init__(
        self,
        model: TwoTowerModel,
        encoder: FeatureEncoder,
        builder: ExampleBuilder,
        settings: LearnerSettings,
        state: StateStore,
    ) -> None:
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)  # dense layers frozen: nothing but the ID rows below can change
        self.encoder = encoder
        self.builder = builder
        self.settings = settings
        self._state = state
        self.temperature = model.config.temperature
        self.users = self._table(
            "user", model.user_tower.id_table.weight, encoder.user_vocab.tokens, settings.user_table
        )
        self.items = self._table(
            "item", model.item_tower.id_table.weight, encoder.item_vocab.tokens, settings.item_table
        )
        self.frequency = load_frequency(state, settings)
        # item_rows = "owner": each batch's item gradients, for the caller to send to item-grads (streaming.item_rows).
        self.outbox: list[Gradient] = []
        self.batches = int(state.meta().get("batches", 0))
        self.examples = int(state.meta().get("examples", 0))
        self.skipped = 0  # steps skipped for a non-finite loss since this process started

    def _table(
        self, name: str, weight: torch.Tensor, tokens: tuple[str, ...], settings: TableSettings
    ) -> EmbeddingTable:
        # Vocabulary index k (k >= 1) is row k of the model's table; row 0 is the unknown/default row.
        index = {token: k for k, token in enumerate(tokens, start=1)}
        return EmbeddingTable(name, weight.detach().numpy().copy(), index, settings, self._state)

    # ------------------------------------------------------------------ learning
    def learn_batch(self, examples: list[Example]) -> float:
        """One SGD step on the ID rows touched by ``examples`` (in event-time order); returns the batch loss.

        A loss that is not finite moves no row (``skipped`` counts such steps) and is returned as it is."""
        if not examples:
            return 0.0
        user_ids = [e.user_id for e in examples]
        item_ids = [e.item_id for e in examples]
        owned_elsewhere = self.settings.item_rows == "owner"
        for e in examples:
            self.users.observe([e.user_id], e.ts_ms)
            # With owners too: the table steps its item rows at once, as a single worker does, and the owners' rows
            # replace them as they come (streaming.item_path). Without that, every batch until the owner's row
            # arrives would train against a row that lacks this worker's own recent steps: a new item would get the
            # same gradient, from its default row, many times over.
            self.items.observe([e.item_id], e.ts_ms)
        live = [e.item_id for e in examples if not e.replay]  # a replayed click was counted when it first came
        if live:
            _count(state=self._state, frequency=self.frequency, item_ids=live)

        users = self.encoder.encode_users(user_ids, self.builder.profiles, [list(e.history) for e in examples])
        items = self.encoder.encode_items(item_ids, self.builder.catalogue)
        user_rows, user_slots = self.users.gather(user_ids)
        item_rows, item_slots = self.items.gather(item_ids)
        user_leaf = torch.from_numpy(user_rows).requires_grad_(True)  # [B, id_dim]
        item_leaf = torch.from_numpy(item_rows).requires_grad_(True)  # [B, id_dim]
        a = self.model.user_tower(users, id_rows=user_leaf)  # [B, dim]
        b = self.model.item_tower(items, id_rows=item_leaf)  # [B, dim]
        _, item_keys, copies = np.unique(np.asarray(item_ids), return_inverse=True, return_counts=True)
        log_q = None
        if self.settings.logq:
            # As in the nightly job (trainer/train.py): log of the expected copies of j in a batch,
            # P(j appears) times the copies seen here, subtracted from every column (Yi et al. 2019).
            log_q = self.settings.logq_weight * (self.frequency.log_q(item_ids) + np.log(copies[item_keys]))
            log_q = torch.from_numpy(log_q)
        extra = self._easy_negatives(item_ids)
        loss = listwise_loss(
            a,
            b,
            temperature=self.temperature,
            pos_log_q=log_q,
            pos_ids=torch.from_numpy(item_keys.astype(np.int64)),
            **extra,
        ).mean()
        if not torch.isfinite(loss):
            # Through the softmax a NaN or inf reaches every row of the batch: better that none moves.
            value = float(loss.detach())
            self.skipped += 1
            logger.warning(
                "skipped an SGD step: the loss is %s (%d clicks, items %s...)", value, len(examples), item_ids[:5]
            )
            if owned_elsewhere:
                self._send_gradients(examples, None)
            return value
        loss.backward()
        self.users.apply_gradients(user_slots, user_leaf.grad.numpy())
        self.items.apply_gradients(item_slots, item_leaf.grad.numpy())
        if owned_elsewhere:
            self._send_gradients(examples, item_leaf.grad.numpy())
        self.batches += 1
        self.examples += len(examples)
        return float(loss.detach())

    def _send_gradients(self, examples: list[Example], grads: np.ndarray | None) -> None:
        """One :class:`Gradient` per item of the batch, by id: its uses, their latest time and the summed gradient
        of its row (float64, summed in batch order as :meth:`EmbeddingTable.apply_gradients` sums), or None when the
        step was skipped. The owner then makes the step this learner would have made (an item it has not admitted
        gets no step, as here)."""
        ids = [e.item_id for e in examples]
        unique, inverse = np.unique(np.asarray(ids), return_inverse=True)
        uses = np.bincount(inverse, minlength=len(unique))
        latest = np.full(len(unique), np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(latest, inverse, np.fromiter((e.ts_ms for e in examples), dtype=np.int64, count=len(examples)))
        summed = None
        if grads is not None:
            summed = np.zeros((len(unique), grads.shape[1]), dtype=np.float64)
            np.add.at(summed, inverse, grads)
        for k, item_id in enumerate(unique.tolist()):
            grad = None if summed is None else summed[k]
            self.outbox.append(Gradient(item_id, int(latest[k]), int(uses[k]), grad))

    def _easy_negatives(self, item_ids: list[str]) -> dict[str, torch.Tensor]:
        """``extra``, ``extra_log_q`` and ``extra_ids`` for :func:`listwise_loss` when a partial batch (fewer clicks
        than ``batch_size``) has fewer than ``min_negatives`` distinct items (an empty dict otherwise).
        extra: [M, dim], no gradient."""
        if len(item_ids) >= self.settings.batch_size:
            return {}  # a full batch trains as the nightly job does: in-batch negatives only
        distinct = sorted(set(item_ids))
        m = self.settings.min_negatives - len(distinct)
        clicked = self.builder.counts()
        if m <= 0 or not clicked:
            return {}
        catalogue = sorted(clicked)  # a deterministic order: the draw must not depend on dict history
        counts = np.fromiter((clicked[i] for i in catalogue), dtype=np.float64, count=len(catalogue))
        sampler = PowerSampler(counts, power=0.75, seed=self.batches, smoothing=0.0)
        drawn = sampler.sample(m)  # [M] indices into catalogue
        negative_ids = [catalogue[k] for k in drawn.tolist()]
        with torch.no_grad():
            rows, _ = self.items.gather(negative_ids)
            extra = self.model.item_tower(
                self.encoder.encode_items(negative_ids, self.builder.catalogue), id_rows=torch.from_numpy(rows)
            )  # [M, dim]
        # Ids comparable with the positives' (their index in the sorted distinct items): a drawn negative that is a
        # row's own positive is masked rather than pushed away.
        known = {item: k for k, item in enumerate(distinct)}
        ids = [known.get(item, len(distinct) + k) for k, item in enumerate(negative_ids)]
        return {
            "extra": extra,
            "extra_log_q": torch.from_numpy(sampler.log_q(drawn, num_draws=m)),
            "extra_ids": torch.tensor(ids, dtype=torch.int64),
        }

    def expire(self, now_ms: int) -> int:
        if self.settings.item_rows == "owner":  # the owners expire item rows; the mirror follows their tombstones
            return self.users.expire(now_ms)
        return self.users.expire(now_ms) + self.items.expire(now_ms)

    # ------------------------------------------------------------------ durability
    def flush(self) -> None:
        self.users.flush()
        self.items.flush()

    def meta(self) -> dict[str, int]:
        return {"batches": self.batches, "examples": self.examples, "frequency_step": self.frequency.step}


def load_frequency(state: StateStore, settings: LearnerSettings) -> FrequencyEstimator:
    """The stream's logQ estimate as of the last checkpoint of ``state`` (touched buckets under ``f:<h>:<b>``, the
    step in the meta's ``frequency_step``)."""
    # A worker runs for days: an item it first meets late must not start from the whole wait since its stream
    # began (trainer/frequency.py), or logQ mutes the clicks of exactly the new items freshness is for.
    frequency = FrequencyEstimator(
        settings.frequency_buckets,
        settings.frequency_hashes,
        settings.frequency_alpha,
        seed=0,
        from_second_sighting=True,
    )
    arrays = frequency.state_dict()
    for key, value in state.scan(b"f:"):
        _, h, b = key.decode().split(":")
        arrays["last_step"][int(h), int(b)], arrays["mean_gap"][int(h), int(b)] = _BUCKET.unpack(value)
    arrays["step"] = np.array(int(state.meta().get("frequency_step", 0)), dtype=np.int64)
    frequency.load_state_dict(arrays)
    return frequency


def count_clicks(state: StateStore, settings: LearnerSettings, item_ids: list[str]) -> int:
    """Count one batch of clicks that will not be trained as such (a model switch drops the unfinished batch and
    replays its clicks) into the estimate of the last checkpoint; the change is staged in ``state`` and the new step
    returned, for the caller's next checkpoint to write together (meta ``frequency_step``)."""
    frequency = load_frequency(state, settings)
    if item_ids:
        _count(state, frequency, item_ids)
    return frequency.step


def _count(state: StateStore, frequency: FrequencyEstimator, item_ids: list[str]) -> None:
    """One step of the estimate over ``item_ids``, its touched buckets staged in ``state``."""
    frequency.update(item_ids)
    for h, b, last_step, mean_gap in frequency.bucket_state(item_ids):
        state.put(f"f:{h}:{b}".encode(), _BUCKET.pack(last_step, mean_gap))
