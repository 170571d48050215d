"""The promotion gate: a candidate version replaces the current one only if it is sound and not worse.

A candidate is accepted when

1. every weight, every item vector and every metric it produces is finite (a NaN anywhere would make
   serving return garbage, and a NaN metric compares False against anything, so it is refused outright);
2. its Recall@K on the held-back slice is at least the current version's minus the margin. The margin is
   ``absolute`` by default (``candidate >= current - margin``, in recall points: 0.01 = one point), or
   ``relative`` (``candidate >= current * (1 - margin)``: 0.05 = may lose 5% of the current recall).

The held-back slice is the newest part of the day (:func:`holdout_split`, by time): both versions see
the clicks before the cut (profiles, last-N history) and are asked, at the cut, for each user's top K;
the clicks after the cut are the relevant items (the protocol of :func:`trainer.evaluate.temporal_split`:
pairs already clicked before the cut are dropped and excluded from the lists, users with no click before
the cut are skipped). Retrieval goes through each version's own item index, as serving would.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from trainer.artifact import ModelVersion
from trainer.dataset import Dataset
from trainer.evaluate import TemporalSplit, temporal_split
from trainer.history import ClickHistory
from trainer.metrics import ranking_metrics

__all__ = ["GateConfig", "GateDecision", "check_finite", "evaluate_version", "decide", "holdout_split"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    """``recall_k``: the K of the gating Recall@K; ``margin`` and ``margin_mode``: see the module docstring."""

    recall_k: int = 50
    margin: float = 0.01
    margin_mode: Literal["absolute", "relative"] = "absolute"

    def __post_init__(self) -> None:
        if self.recall_k < 1:
            raise ValueError(f"recall_k must be >= 1, got {self.recall_k}")
        if self.margin_mode not in ("absolute", "relative"):
            raise ValueError(f"margin_mode must be 'absolute' or 'relative', got {self.margin_mode!r}")
        if not (0.0 <= self.margin <= 1.0):
            raise ValueError(f"margin must lie in [0, 1], got {self.margin}")

    def floor(self, current: float) -> float:
        """The lowest candidate recall accepted against a current recall of ``current``."""
        if self.margin_mode == "absolute":
            return current - self.margin
        return current * (1.0 - self.margin)


@dataclass(frozen=True)
class GateDecision:
    """Whether the candidate may become current, and why (or why not)."""

    accepted: bool
    reasons: list[str]
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    current_metrics: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "reasons": list(self.reasons),
            "candidate_metrics": dict(self.candidate_metrics),
            "current_metrics": None if self.current_metrics is None else dict(self.current_metrics),
        }


def holdout_split(dataset: Dataset, fraction: float) -> TemporalSplit:
    """Cut ``dataset`` so that about the last ``fraction`` of its clicks (by time) are held back.

    The cut is the time of the first held-back click, so clicks at one instant are never split. Raises
    ``ValueError`` when either side would be empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must lie in (0, 1), got {fraction}")
    ts = dataset.clicks.ts_ms
    if len(ts) < 2:
        raise ValueError(f"expected at least 2 clicks to hold some back, got {len(ts)}")
    cut = int(ts[min(int(math.floor((1.0 - fraction) * len(ts))), len(ts) - 1)])
    return temporal_split(dataset, cut, None, rule=f"held back: last {fraction:.0%} of the clicks by time")


def check_finite(version: ModelVersion) -> list[str]:
    """Reasons the version is unsound: non-finite weights (named) or item vectors. Empty when all is finite."""
    reasons = []
    broken = [
        (name, int((~torch.isfinite(t)).sum()), t.numel())
        for name, t in version.model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    for name, bad, total in broken[:3]:
        reasons.append(f"weights {name}: {bad} of {total} values are NaN or infinite")
    if len(broken) > 3:
        reasons.append(f"weights: {len(broken) - 3} more tensors hold NaN or infinite values")
    if not np.isfinite(version.item_vectors).all():
        bad = int((~np.isfinite(version.item_vectors)).sum())
        reasons.append(f"item vectors: {bad} of {version.item_vectors.size} values are NaN or infinite")
    return reasons


@torch.no_grad()
def evaluate_version(version: ModelVersion, split: TemporalSplit, k: int) -> dict[str, float]:
    """Recall@K and NDCG@K of ``version`` on ``split``, retrieving through the version's own item index.

    A NaN in a user or item vector makes every metric NaN: such a version cannot be scored (faiss would
    rank NaN scores arbitrarily, or not at all).
    """
    encoder, model = version.encoder, version.model
    model.eval()
    nan = {f"recall@{k}": math.nan, f"ndcg@{k}": math.nan, "users": float(len(split.users))}
    if not np.isfinite(version.item_vectors).all():
        return nan
    history = ClickHistory(split.train.clicks, encoder.item_vocab)
    spec = encoder.last_n
    last = history.before(split.users, split.cut_ms, spec.n) if spec is not None else None
    users = model.user_vectors(encoder.encode_users(split.users, split.train.users, last)).numpy()  # [U, dim]
    if not np.isfinite(users).all():
        return nan
    seen: dict[str, set[str]] = defaultdict(set)
    for user, item in zip(split.train.clicks.user.tolist(), split.train.clicks.item.tolist(), strict=True):
        seen[user].add(item)
    # Ask for K plus as many as the user may have seen, then drop the seen ones (they are not test targets).
    depth = k + max((len(seen[u]) for u in split.users), default=0)
    scores, ranked = version.search(users, depth)
    if not np.isfinite(scores).all():
        return nan
    recommended = [[i for i in row if i not in seen[u]][:k] for u, row in zip(split.users, ranked, strict=True)]
    metrics = ranking_metrics(recommended, split.relevant, recall_ks=(k,), ndcg_ks=(k,))
    return {key: float(value) for key, value in metrics.items()}


def decide(
    candidate: ModelVersion, current: ModelVersion | None, split: TemporalSplit | None, config: GateConfig
) -> GateDecision:
    """Decide whether ``candidate`` may replace ``current`` (None: there is no current version).

    ``split``: the held-back slice; None when the day had too few clicks to hold any back, in which case a
    candidate can only replace nothing (the first version), never a current one. A slice without a user to
    score (every held-back click is a user's first) counts as None.
    """
    key = f"recall@{config.recall_k}"
    reasons = check_finite(candidate)
    if split is not None and not split.users:
        # Held-back clicks, but all of users without a click before them: nothing to score (the metrics would
        # be NaN, and a sound first version refused for it). The same as no held-back clicks at all.
        split = None
    cand_metrics: dict[str, float] = {}
    cur_metrics: dict[str, float] | None = None
    if split is not None:
        cand_metrics = evaluate_version(candidate, split, config.recall_k)
        # A standard error is NaN when one user is scored: not a broken candidate, only a thin slice.
        bad = sorted(n for n, value in cand_metrics.items() if not math.isfinite(value) and not n.endswith("_se"))
        if bad:
            reasons.append(f"candidate metrics {bad} are not finite on the held-back slice")
    if current is None:
        if not reasons:
            reasons.append("no current version: the first finite candidate is accepted")
            return GateDecision(True, reasons, cand_metrics, None)
        return GateDecision(False, reasons, cand_metrics, None)
    if split is None:
        reasons.append(
            f"no held-back clicks of users with a history to compare against the current version {current.version_id}"
        )
        return GateDecision(False, reasons, cand_metrics, None)
    cur_metrics = evaluate_version(current, split, config.recall_k)
    if reasons:
        return GateDecision(False, reasons, cand_metrics, cur_metrics)
    cand, cur = cand_metrics[key], cur_metrics[key]
    if not math.isfinite(cur):
        # The current version cannot be scored (it is itself broken): any sound candidate is better.
        return GateDecision(
            True, [f"current {key} is not finite; the finite candidate replaces it"], cand_metrics, cur_metrics
        )
    floor = config.floor(cur)
    verdict = (
        f"candidate {key} {cand:.4f} vs current {cur:.4f} "
        f"(floor {floor:.4f}, {config.margin_mode} margin {config.margin:g}, {int(cand_metrics['users'])} users)"
    )
    accepted = cand >= floor
    return GateDecision(
        accepted, [("ok: " if accepted else "worse than allowed: ") + verdict], cand_metrics, cur_metrics
    )
