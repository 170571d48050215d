"""The two-tower retrieval model: a user tower and an item tower joined only by a cosine (seed 002, seed 003).

``score(user, item) = cos(a, b)`` with ``a = user_tower(user features)`` and ``b = item_tower(item features)``,
both L2-normalised. Item vectors are computed offline and indexed; the user vector is computed online per
request. Training may scale the cosine by ``1 / temperature`` and subtract ``log p_j`` (logQ); serving uses the
plain cosine, so both are left to the losses.

Parameters fall into two groups that are updated on different clocks (DESIGN.md "Updating the model"):
:meth:`TwoTowerModel.id_embedding_parameters` (the user-ID and item-ID tables, trained online by the incremental
learner) and :meth:`TwoTowerModel.dense_parameters` (everything else, trained only by the nightly full retrain).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainer.features import FeatureEncoder, ItemBatch, LastNFeature, UserBatch
from trainer.towers import Tower

__all__ = ["ModelConfig", "TwoTowerModel"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the model. ``dim``: the shared output space; ``id_dim``: ID and last-N tables; ``embedding_dim``:
    other categorical tables; ``hidden``: MLP layer widths; ``temperature``: the training softmax scale (Yi et al.
    2019 use 0.05-0.07 on normalised embeddings; 0.2 gave the best offline Recall@20 on both the synthetic world
    and MovieLens-100K at ``dim=32``, a small model on small data); ``last_n``: clicks in the user's history feature; ``init_std``:
    the standard deviation of embedding initialisation; ``seed``: initialisation seed."""

    dim: int = 32
    id_dim: int = 32
    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128,)
    temperature: float = 0.2
    last_n: int = 20
    init_std: float = 0.05
    seed: int = 0
    # How the user tower pools the last-N list: "mean", or "recency" (learnt per-age weights, trainer.towers).
    last_n_pooling: str = "mean"

    def __post_init__(self) -> None:
        if self.dim < 1 or self.id_dim < 1 or self.embedding_dim < 1:
            raise ValueError(
                f"dims must be >= 1, got dim={self.dim} id_dim={self.id_dim} embedding_dim={self.embedding_dim}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.last_n_pooling not in ("mean", "recency"):
            raise ValueError(f"last_n_pooling must be 'mean' or 'recency', got {self.last_n_pooling!r}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer widths must be >= 1, got {self.hidden}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict` (JSON turns ``hidden`` into a list)."""
        values = dict(raw)
        if "hidden" in values:
            values["hidden"] = tuple(values["hidden"])
        return cls(**values)


class TwoTowerModel(nn.Module):
    """User tower + item tower over the features of a fitted :class:`FeatureEncoder`."""

    def __init__(self, encoder: FeatureEncoder, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        common = {
            "dim": config.dim,
            "id_dim": config.id_dim,
            "embedding_dim": config.embedding_dim,
            "hidden": config.hidden,
            "init_std": config.init_std,
            "generator": generator,
        }
        self.user_tower = Tower(
            encoder.user_features, encoder.table_sizes("user"), list_pooling=config.last_n_pooling, **common
        )
        self.item_tower = Tower(encoder.item_features, encoder.table_sizes("item"), **common)

    def user_vectors(self, batch: UserBatch) -> Tensor:
        """``[B, dim]`` unit user vectors."""
        return self.user_tower(batch)

    def item_vectors(self, batch: ItemBatch) -> Tensor:
        """``[N, dim]`` unit item vectors."""
        return self.item_tower(batch)

    def forward(self, users: UserBatch, items: ItemBatch) -> Tensor:
        """Row-wise cosine ``[B]`` of ``B`` (user, item) pairs: the serving score."""
        return (self.user_vectors(users) * self.item_vectors(items)).sum(dim=1)

    def id_embedding_parameters(self) -> list[nn.Parameter]:
        """The user-ID and item-ID embedding tables, the only parameters the online learner updates."""
        return [self.user_tower.id_table.weight, self.item_tower.id_table.weight]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (MLPs and feature tables), frozen between nightly runs."""
        ids = {id(p) for p in self.id_embedding_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def _id_numbered(self) -> list[tuple[str, str, str]]:
        """``(tower, feature, vocabulary tower)`` of every table whose rows an ID vocabulary numbers."""
        item_id = self.item_tower.id_name
        out = [("user", self.user_tower.id_name, "user"), ("item", item_id, "item")]
        out += [
            ("user", spec.name, "item")
            for spec in self.user_tower.features
            if isinstance(spec, LastNFeature) and spec.item_vocab == item_id
        ]
        return out

    def id_row_tables(self) -> dict[str, str]:
        """``{parameter name: "user" | "item"}``: every table whose rows are numbered by the user- or item-ID
        vocabulary. The ID tables of both towers, and the user tower's last-N table (item-ID numbered)."""
        towers = {"user": self.user_tower, "item": self.item_tower}
        return {
            f"{tower}_tower.{towers[tower].table_parameter(feature)}": vocab
            for tower, feature, vocab in self._id_numbered()
        }

    def take_id_rows(self, encoder: FeatureEncoder, rows: Mapping[str, np.ndarray]) -> TwoTowerModel:
        """Gather every ID-numbered table to a compacted ``encoder`` (:meth:`FeatureEncoder.retain_ids`):
        ``rows[vocabulary tower]`` is the old row of each new one. Kept ids keep their values bit for bit.
        Returns ``self``; build a new optimizer afterwards, as after :meth:`resize`."""
        towers = {"user": self.user_tower, "item": self.item_tower}
        for tower, feature, vocab in self._id_numbered():
            if vocab in rows:
                size = encoder.table_sizes(tower)[feature]  # type: ignore[arg-type]
                towers[tower].take_rows(feature, rows[vocab], size)
        return self

    def resize(self, encoder: FeatureEncoder) -> TwoTowerModel:
        """Grow every table to an extended ``encoder`` (warm start). Old rows keep their values bit for bit, new
        rows start as row 0 (the default embedding). Returns ``self``; build a new optimizer afterwards."""
        for tower, name in ((self.user_tower, "user"), (self.item_tower, "item")):
            specs = encoder.user_features if name == "user" else encoder.item_features
            if specs != tower.features:
                raise ValueError(f"the encoder's {name} features differ from the model's: {specs} vs {tower.features}")
            tower.resize(encoder.table_sizes(name))
        return self
