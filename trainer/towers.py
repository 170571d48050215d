"""One tower of the two-tower model: feature embeddings -> concat -> MLP -> L2-normalised vector (seed 002).

The user tower and the item tower are two instances of :class:`Tower` over different feature specs. Nothing
crosses between them before the final cosine (late fusion): concatenating user and item features before an MLP
would make a ranking model, whose score cannot be served from an index of precomputed item vectors.

The last-N clicked items are embedded in a table that belongs to the user tower, not in the item tower's ID table.
Sharing would tie two things that move at different speeds: the online learner rewrites item-ID rows between
nightly runs, and every user vector built from a shared table would shift with them, while the published user
embeddings and the item index would not. It also keeps each tower servable from its own parameters alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.features import (
    ContinuousFeature,
    DiscreteFeature,
    FeatureBatch,
    FeatureSpec,
    IdFeature,
    LastNFeature,
    MultiValuedFeature,
)

__all__ = ["LIST_POOLINGS", "Tower", "masked_mean", "recency_pool"]

LIST_POOLINGS = ("mean", "recency")

logger = logging.getLogger(__name__)


def masked_mean(embedded: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid positions: embedded ``[B, L, e]``, mask ``[B, L]`` bool -> ``[B, e]``; 0 for empty rows."""
    weights = mask.to(embedded.dtype).unsqueeze(-1)  # [B, L, 1]
    count = weights.sum(dim=1).clamp_min(1.0)  # [B, 1]
    return (embedded * weights).sum(dim=1) / count


def recency_pool(embedded: Tensor, mask: Tensor, logits: Tensor) -> Tensor:
    """A weighted mean by recency: embedded ``[B, L, e]`` (oldest first, left-aligned), mask ``[B, L]`` bool,
    ``logits`` ``[n]`` one per age (0 = the most recent click, ages past ``n - 1`` share the last) -> ``[B, e]``.

    Each row's weights are the softmax of its valid positions' logits, so zero logits give the plain mean, and a
    logit ``log 3`` above the rest makes the newest of two clicks weigh 3/4; 0 for empty rows."""
    lengths = mask.sum(dim=1, keepdim=True)  # [B, 1]
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)  # [1, L]
    ages = (lengths - 1 - positions).clamp(min=0, max=logits.shape[0] - 1)  # [B, L]
    scores = logits[ages].masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=1).nan_to_num(0.0) * mask  # an empty row: all -inf, NaN -> 0
    return (embedded * weights.unsqueeze(-1)).sum(dim=1)


def _module_key(name: str, used: set[str]) -> str:
    """A ModuleDict key for a feature name (no dots allowed there), unique within the tower."""
    base = re.sub(r"\W", "_", name) or "feature"
    key, n = base, 2
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


class Tower(nn.Module):
    """Features -> per-feature inputs -> concat -> MLP (ReLU between layers) -> unit vector ``[B, dim]``.

    table_sizes: rows per embedding table by feature name (:meth:`FeatureEncoder.table_sizes`).
    ID and last-N tables have ``id_dim`` columns, other categorical tables ``embedding_dim``; standardised
    continuous features enter as one column each, one-hot features as ``one_hot`` columns.
    """

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        table_sizes: Mapping[str, int],
        *,
        dim: int,
        id_dim: int,
        embedding_dim: int,
        hidden: Sequence[int],
        init_std: float = 0.05,
        generator: torch.Generator | None = None,
        list_pooling: str = "mean",
    ) -> None:
        super().__init__()
        if list_pooling not in LIST_POOLINGS:
            raise ValueError(f"list_pooling must be one of {LIST_POOLINGS}, got {list_pooling!r}")
        self.features = tuple(features)
        self.dim = dim
        self.embeddings = nn.ModuleDict()
        # "recency": each last-N list is pooled by a softmax over learnt per-age logits (recency_pool), starting
        # from zeros (the plain mean); dense parameters, trained nightly and frozen online like the MLP.
        self.recency = nn.ParameterDict()
        self._keys: dict[str, str] = {}
        used: set[str] = set()
        width = 0
        for spec in self.features:
            columns = self._table_columns(spec, id_dim, embedding_dim)
            if columns is not None:
                key = _module_key(spec.name, used)
                self._keys[spec.name] = key
                table = nn.Embedding(int(table_sizes[spec.name]), columns)
                nn.init.normal_(table.weight, 0.0, init_std, generator=generator)
                self.embeddings[key] = table
                width += columns
                if list_pooling == "recency" and isinstance(spec, LastNFeature):
                    self.recency[key] = nn.Parameter(torch.zeros(spec.n))
            elif isinstance(spec, DiscreteFeature):
                width += int(spec.one_hot or 0)
            else:
                width += 1  # a standardised continuous value
        self.input_width = width
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)
        self._id_name = next(s.name for s in self.features if isinstance(s, IdFeature))

    @staticmethod
    def _table_columns(spec: FeatureSpec, id_dim: int, embedding_dim: int) -> int | None:
        """Embedding width of a feature, or None when it enters without a table."""
        if isinstance(spec, IdFeature | LastNFeature):
            return id_dim
        if isinstance(spec, DiscreteFeature):
            return None if spec.one_hot else embedding_dim
        if isinstance(spec, MultiValuedFeature):
            return embedding_dim
        if isinstance(spec, ContinuousFeature):
            return embedding_dim if spec.transform == "bucket" else None
        raise TypeError(f"unknown feature spec {spec!r}")

    def table(self, name: str) -> nn.Embedding:
        """The embedding table of feature ``name``."""
        try:
            return self.embeddings[self._keys[name]]  # type: ignore[return-value]
        except KeyError:
            raise KeyError(f"feature {name!r} has no embedding table; tables: {sorted(self._keys)}") from None

    @property
    def id_name(self) -> str:
        """The name of the tower's ID feature."""
        return self._id_name

    @property
    def id_table(self) -> nn.Embedding:
        return self.table(self._id_name)

    def inputs(self, batch: FeatureBatch, id_rows: Tensor | None = None) -> Tensor:
        """The concatenated MLP input ``[B, input_width]``.

        ``id_rows`` (``[B, id_dim]``) replaces the ID-table lookup: the online learner trains ID rows kept outside
        the model (including ids the table has no row for) through the frozen rest of the tower.
        """
        parts: list[Tensor] = []
        for spec in self.features:
            try:
                if id_rows is not None and isinstance(spec, IdFeature):
                    if id_rows.shape != (len(batch), self.id_table.embedding_dim):
                        raise ValueError(
                            f"id_rows must be [{len(batch)}, {self.id_table.embedding_dim}], got {tuple(id_rows.shape)}"
                        )
                    parts.append(id_rows)
                elif isinstance(spec, MultiValuedFeature | LastNFeature):
                    values, mask = batch.lists[spec.name], batch.masks[spec.name]  # [B, L]
                    key = self._keys[spec.name]
                    if key in self.recency:
                        parts.append(recency_pool(self.table(spec.name)(values), mask, self.recency[key]))
                    else:
                        parts.append(masked_mean(self.table(spec.name)(values), mask))
                elif isinstance(spec, ContinuousFeature) and spec.transform != "bucket":
                    parts.append(batch.values[spec.name].to(torch.float32).unsqueeze(1))  # [B, 1]
                elif isinstance(spec, DiscreteFeature) and spec.one_hot:
                    parts.append(F.one_hot(batch.indices[spec.name], spec.one_hot).to(torch.float32))
                else:
                    parts.append(self.table(spec.name)(batch.indices[spec.name]))  # [B, e]
            except KeyError:
                raise KeyError(
                    f"batch lacks feature {spec.name!r} ({spec.kind}); it has indices {sorted(batch.indices)}, "
                    f"values {sorted(batch.values)}, lists {sorted(batch.lists)}"
                ) from None
        return torch.cat(parts, dim=1)

    def forward(self, batch: FeatureBatch, id_rows: Tensor | None = None) -> Tensor:
        """``[B, dim]`` unit vectors (cosine = dot product); ``id_rows`` as in :meth:`inputs`."""
        return F.normalize(self.mlp(self.inputs(batch, id_rows)), dim=1)

    def table_parameter(self, name: str) -> str:
        """The name of feature ``name``'s table weight among this tower's parameters (``embeddings.<key>.weight``)."""
        self.table(name)  # a clear error for a feature without a table
        return f"embeddings.{self._keys[name]}.weight"

    @torch.no_grad()
    def take_rows(self, name: str, rows: np.ndarray, size: int) -> None:
        """Replace feature ``name``'s table by its ``rows`` (old row of each new row), then rows of the default
        row 0 up to ``size`` rows (a table preallocated for a capped vocabulary)."""
        table = self.table(name)
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        if len(index) > size or (len(index) and (int(index.min()) < 0 or int(index.max()) >= table.num_embeddings)):
            raise ValueError(f"rows for table {name!r} ({table.num_embeddings} rows) out of range or over {size}")
        weight = table.weight.detach()
        taken = torch.cat([weight[index], weight[:1].expand(size - len(index), -1)], dim=0).clone()
        table.weight = nn.Parameter(taken, requires_grad=table.weight.requires_grad)
        table.num_embeddings = size

    @torch.no_grad()
    def resize(self, table_sizes: Mapping[str, int]) -> None:
        """Grow tables to ``table_sizes``; old rows are kept bit-identical, new rows start as a copy of row 0.

        Row 0 is the unknown/default embedding (learnt from rows the training masks to 0), which is what a new id
        should look like until it has trained: a new item's vector then comes from its features alone.
        """
        for spec in self.features:
            if spec.name not in self._keys:
                continue
            table = self.table(spec.name)
            old, new = table.num_embeddings, int(table_sizes[spec.name])
            if new < old:
                raise ValueError(f"table {spec.name!r} would shrink from {old} to {new} rows; vocabularies only grow")
            if new == old:
                continue
            weight = table.weight.detach()
            grown = torch.cat([weight, weight[:1].expand(new - old, -1)], dim=0).clone()
            table.weight = nn.Parameter(grown, requires_grad=table.weight.requires_grad)
            table.num_embeddings = new
            logger.debug("table %s grown from %d to %d rows", spec.name, old, new)
