"""Two augmented views of item features for the self-supervised item loss (Yao et al., CIKM 2021; seed 000).

Long-tail items get too few clicks to learn good vectors from the main loss. The self-supervised task feeds two
views of the same items through the (shared) item tower and asks a contrastive loss to recognise which views
belong together, so the tower must learn to build a vector from whatever features an item has.

Each batch, the item features are split into two complementary halves: view 1 keeps one half and view 2 the
other, a masked feature taking its default value (index 0, the training mean for a standardised number, no values
for a multi-valued one). Then half of the values of every remaining multi-valued feature are dropped, per view.

The halves come from one of two masking schemes of the paper:

* ``"rfm"`` (random feature masking): a random half.
* ``"cfm"`` (correlated feature masking): a random seed feature plus its most correlated features by mutual
  information, so that a masked feature cannot be read back from a kept one it predicts (masking ``category`` but
  keeping ``tags`` from the same category would make the task easy and teach little). Mutual information is
  computed once from the catalogue (:func:`mutual_information`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

from trainer.features import (
    ContinuousFeature,
    DiscreteFeature,
    FeatureSpec,
    IdFeature,
    ItemBatch,
    LastNFeature,
    MultiValuedFeature,
)

__all__ = ["ItemAugmenter", "drop_values", "mask_features", "mutual_information"]

logger = logging.getLogger(__name__)


def _distribution_matrix(spec: FeatureSpec, batch: ItemBatch, bins: int) -> sp.csr_matrix:
    """``[n, V]`` sparse matrix whose row ``r`` is item ``r``'s distribution over the feature's values.

    Single-valued features put weight 1 on their value (index 0 when missing); a multi-valued feature spreads
    weight ``1 / count`` over its values (index 0 when it has none); standardised numbers are cut into ``bins``
    quantile bins. The id has a value of its own for every row.
    """
    n = len(batch)
    rows = np.arange(n)
    if isinstance(spec, IdFeature):
        return sp.identity(n, format="csr")
    if isinstance(spec, MultiValuedFeature):
        values = batch.lists[spec.name].numpy()
        mask = batch.masks[spec.name].numpy()
        count = mask.sum(axis=1)
        r, c = np.nonzero(mask)
        data = 1.0 / count[r]
        empty = np.flatnonzero(count == 0)
        r = np.concatenate([r, empty])
        cols = np.concatenate([values[mask], np.zeros(len(empty), dtype=np.int64)])
        data = np.concatenate([data, np.ones(len(empty))])
        return sp.csr_matrix((data, (r, cols)), shape=(n, int(cols.max(initial=0)) + 1))
    if isinstance(spec, ContinuousFeature) and spec.transform != "bucket":
        x = batch.values[spec.name].numpy().astype(np.float64)
        edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1])) if n else np.zeros(0)
        codes = np.searchsorted(edges, x, side="right")
    elif isinstance(spec, DiscreteFeature | ContinuousFeature):
        codes = batch.indices[spec.name].numpy()
    else:
        raise TypeError(f"{spec!r} is not an item feature")
    return sp.csr_matrix((np.ones(n), (rows, codes)), shape=(n, int(codes.max(initial=0)) + 1))


def mutual_information(batch: ItemBatch, features: Sequence[FeatureSpec], *, bins: int = 8) -> np.ndarray:
    """``[F, F]`` mutual information (nats) between item features over the rows of ``batch`` (the catalogue).

    ``I(a; b) = sum_{x,y} P(x, y) log(P(x, y) / (P(x) P(y)))`` with ``P(x, y) = mean_r A[r, x] B[r, y]`` for the
    per-row value distributions ``A``, ``B`` of :func:`_distribution_matrix` (for a multi-valued feature, a
    value drawn at random from the item). The diagonal is the entropy of single-valued features.
    """
    n = len(batch)
    if n == 0:
        raise ValueError("mutual information needs at least one item row, got an empty batch")
    mats = [_distribution_matrix(spec, batch, bins) for spec in features]
    marginals = [np.asarray(m.sum(axis=0)).ravel() / n for m in mats]
    k = len(features)
    out = np.zeros((k, k))
    for a in range(k):
        for b in range(a, k):
            joint = (mats[a].T @ mats[b]).tocoo()  # [V_a, V_b] co-occurrence mass
            p = joint.data / n
            keep = p > 0
            p, rows, cols = p[keep], joint.row[keep], joint.col[keep]
            out[a, b] = out[b, a] = float(np.sum(p * np.log(p / (marginals[a][rows] * marginals[b][cols]))))
    return np.maximum(out, 0.0)  # rounding can leave -1e-17


def mask_features(batch: ItemBatch, names: Sequence[str]) -> ItemBatch:
    """``batch`` with features ``names`` set to their default: index 0, value 0, or no values."""
    names = set(names)
    return ItemBatch(
        {k: torch.zeros_like(v) if k in names else v for k, v in batch.indices.items()},
        {k: torch.zeros_like(v) if k in names else v for k, v in batch.values.items()},
        {k: torch.zeros_like(v) if k in names else v for k, v in batch.lists.items()},
        {k: torch.zeros_like(v) if k in names else v for k, v in batch.masks.items()},
    )


def drop_values(batch: ItemBatch, fraction: float, rng: np.random.Generator) -> ItemBatch:
    """``batch`` with each value of every multi-valued feature dropped (masked) with probability ``fraction``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    masks = {}
    for name, mask in batch.masks.items():
        keep = torch.from_numpy(rng.random(tuple(mask.shape)) >= fraction)
        masks[name] = mask & keep
    return ItemBatch(batch.indices, batch.values, batch.lists, masks)


class ItemAugmenter:
    """Makes two complementary views of an item batch. ``method``: ``"cfm"`` (correlated) or ``"rfm"`` (random);
    ``multi_dropout``: share of multi-valued values dropped in each view; ``mutual_info``: ``[F, F]`` for CFM."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        mutual_info: np.ndarray | None = None,
        *,
        method: Literal["cfm", "rfm"] = "cfm",
        multi_dropout: float = 0.5,
    ) -> None:
        self.features = tuple(f for f in features if not isinstance(f, LastNFeature))
        if len(self.features) < 2:
            raise ValueError(f"a complementary split needs at least 2 item features, got {len(self.features)}")
        if method not in ("cfm", "rfm"):
            raise ValueError(f"method must be 'cfm' or 'rfm', got {method!r}")
        if method == "cfm":
            if mutual_info is None:
                raise ValueError("method 'cfm' needs the mutual information matrix (ItemAugmenter.fit computes it)")
            if np.shape(mutual_info) != (len(self.features), len(self.features)):
                raise ValueError(
                    f"mutual_info must be [{len(self.features)}, {len(self.features)}], got {np.shape(mutual_info)}"
                )
        self.mutual_info = None if mutual_info is None else np.asarray(mutual_info, dtype=np.float64)
        self.method = method
        self.multi_dropout = multi_dropout

    @classmethod
    def fit(
        cls,
        features: Sequence[FeatureSpec],
        catalogue: ItemBatch,
        *,
        method: Literal["cfm", "rfm"] = "cfm",
        multi_dropout: float = 0.5,
    ) -> ItemAugmenter:
        """Compute the mutual information between ``features`` over ``catalogue`` (one row per item) once."""
        specs = [f for f in features if not isinstance(f, LastNFeature)]
        mi = mutual_information(catalogue, specs) if method == "cfm" else None
        return cls(specs, mi, method=method, multi_dropout=multi_dropout)

    def split(self, rng: np.random.Generator) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Two disjoint halves of the feature names covering all of them; the first has ``F // 2`` features."""
        k = len(self.features)
        half = k // 2
        if self.method == "rfm":
            order = rng.permutation(k)
            first = set(order[:half].tolist())
        else:
            assert self.mutual_info is not None
            seed = int(rng.integers(k))
            # The seed feature and the half - 1 features that share the most information with it (Yao et al. 2021).
            others = [j for j in np.argsort(-self.mutual_info[seed], kind="stable").tolist() if j != seed]
            first = {seed, *others[: half - 1]}
        names = [f.name for f in self.features]
        return (
            tuple(n for j, n in enumerate(names) if j in first),
            tuple(n for j, n in enumerate(names) if j not in first),
        )

    def apply(
        self, batch: ItemBatch, split: tuple[Sequence[str], Sequence[str]], rng: np.random.Generator
    ) -> tuple[ItemBatch, ItemBatch]:
        """View 1 keeps ``split[0]`` (masks ``split[1]``), view 2 keeps ``split[1]``; then value dropout per view."""
        keep1, keep2 = split
        view1 = drop_values(mask_features(batch, keep2), self.multi_dropout, rng)
        view2 = drop_values(mask_features(batch, keep1), self.multi_dropout, rng)
        return view1, view2

    def views(self, batch: ItemBatch, rng: np.random.Generator) -> tuple[ItemBatch, ItemBatch]:
        """Two augmented views of ``batch`` from a fresh split (one split per batch, as in the paper)."""
        return self.apply(batch, self.split(rng), rng)
