"""Training objectives of the two-tower model (seed 000, seed 002; DESIGN.md "Training objectives").

Every loss takes L2-normalised vectors, so a dot product *is* the cosine that serving uses (late fusion only), and
returns one value per example; callers take the mean (total loss = mean(L_main) + alpha * mean(L_self)).

* :func:`listwise_loss` (the default): softmax over one positive and many negatives (in-batch and extra),
  cross-entropy ``-log s+``, with the logQ correction of Yi et al. (RecSys 2019) and accidental-hit masking.
* :func:`pointwise_loss`: binary classification of (user, item) pairs.
* :func:`triplet_hinge_loss`, :func:`triplet_logistic_loss`: pairwise (user, b+, b-).
* :func:`contrastive_loss`: the self-supervised item loss of Yao et al. (CIKM 2021).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "contrastive_loss",
    "listwise_loss",
    "pointwise_loss",
    "triplet_hinge_loss",
    "triplet_logistic_loss",
]

logger = logging.getLogger(__name__)


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor, *, same_rows: bool = True) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{name_a} and {name_b} must be [rows, dim], got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} has dim {a.shape[1]}, {name_b} has dim {b.shape[1]}")
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} has {a.shape[0]} rows, {name_b} has {b.shape[0]}")


def _check_vector(name: str, v: Tensor | None, length: int) -> None:
    if v is not None and tuple(v.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(v.shape)}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _softmax_loss(logits: Tensor) -> Tensor:
    """``-log softmax(logits)[i, i]`` for each row: [B, C] with C >= B -> [B]. Stable for any logit scale."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return torch.logsumexp(logits, dim=1) - logits[rows, rows]


def _mask_hits(logits: Tensor, hits: Tensor) -> Tensor:
    """Set logits[i, j] = -inf where ``hits[i, j]`` (column j holds row i's own item), except on the diagonal.

    logits, hits: [B, C] with C >= B; the diagonal is row i's target and stays finite, so every row keeps a loss.
    """
    diagonal = torch.eye(logits.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
    return logits.masked_fill(hits & ~diagonal, float("-inf"))


def listwise_loss(
    user: Tensor,
    pos: Tensor,
    *,
    temperature: float = 0.05,
    pos_log_q: Tensor | None = None,
    pos_ids: Tensor | None = None,
    extra: Tensor | None = None,
    extra_log_q: Tensor | None = None,
    extra_ids: Tensor | None = None,
) -> Tensor:
    """In-batch softmax cross-entropy with logQ correction: per-example loss ``[B]``.

    user: [B, d] user vectors a_i; pos: [B, d] clicked-item vectors b_i (row i's positive is column i).
    extra: [M, d] additional negatives (easy / hard) shared by every row.
    pos_log_q: [B], extra_log_q: [M] log sampling probabilities; pos_ids: [B], extra_ids: [M] int64 item ids.

    ``logits[i, j] = cos(a_i, b_j) / tau - log q_j`` for every column, the positive included: an item lands in a
    batch with probability ∝ its clicks, so without the correction hot items are over-punished as negatives
    (Yi et al. 2019; seed 000). Serving scores with the plain cosine; the correction exists only here.
    With ids given, a column whose item equals row i's positive (the same item clicked twice in one batch, or an
    extra negative that happens to be the positive) is masked to -inf rather than pushed away as its own negative.
    ``loss_i = -log softmax(logits[i])[i]``. Masked entries get zero gradient.
    """
    _check_temperature(temperature)
    _check_pair("user", user, "pos", pos)
    batch = user.shape[0]
    _check_vector("pos_log_q", pos_log_q, batch)
    _check_vector("pos_ids", pos_ids, batch)
    if extra is None and (extra_log_q is not None or extra_ids is not None):
        raise ValueError("extra_log_q / extra_ids given without extra")
    if extra_ids is not None and pos_ids is None:
        raise ValueError("extra_ids needs pos_ids: a hit is an extra negative equal to the row's positive")

    logits = user @ pos.T / temperature  # [B, B]
    if pos_log_q is not None:
        logits = logits - pos_log_q.to(logits.dtype)[None, :]
    hits = None if pos_ids is None else pos_ids[:, None] == pos_ids[None, :]  # [B, B]
    if extra is not None:
        _check_pair("user", user, "extra", extra, same_rows=False)
        _check_vector("extra_log_q", extra_log_q, extra.shape[0])
        _check_vector("extra_ids", extra_ids, extra.shape[0])
        extra_logits = user @ extra.T / temperature  # [B, M]
        if extra_log_q is not None:
            extra_logits = extra_logits - extra_log_q.to(extra_logits.dtype)[None, :]
        logits = torch.cat([logits, extra_logits], dim=1)  # [B, B + M]
        if hits is not None:
            # Without extra_ids the extra negatives cannot be recognised as hits and stay unmasked.
            extra_hits = (
                torch.zeros(batch, extra.shape[0], dtype=torch.bool, device=hits.device)
                if extra_ids is None
                else pos_ids[:, None] == extra_ids.to(pos_ids.dtype)[None, :]
            )
            hits = torch.cat([hits, extra_hits], dim=1)  # [B, B + M]
    if hits is not None:
        logits = _mask_hits(logits, hits)
    return _softmax_loss(logits)


def pointwise_loss(user: Tensor, items: Tensor, labels: Tensor, *, temperature: float = 0.1) -> Tensor:
    """Binary cross-entropy on ``cos(a, b) / tau``: per-example loss ``[N]``.

    user: [N, d], items: [N, d], labels: [N] in {0, 1}. Positives are pushed towards cos = +1 and negatives towards
    cos = -1 (seed 000, pointwise training; positive:negative about 1:2 or 1:3 is the caller's choice).
    """
    _check_temperature(temperature)
    _check_pair("user", user, "items", items)
    _check_vector("labels", labels, user.shape[0])
    logits = (user * items).sum(dim=1) / temperature  # [N]
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")


def _triplet_cosines(user: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    _check_pair("user", user, "pos", pos)
    _check_pair("user", user, "neg", neg)
    return (user * pos).sum(dim=1), (user * neg).sum(dim=1)  # [B], [B]


def triplet_hinge_loss(user: Tensor, pos: Tensor, neg: Tensor, *, margin: float = 0.2) -> Tensor:
    """``max(0, cos(a, b-) + m - cos(a, b+))``: per-triplet loss ``[B]``. user, pos, neg: [B, d] (seed 000)."""
    cos_pos, cos_neg = _triplet_cosines(user, pos, neg)
    return F.relu(cos_neg + margin - cos_pos)


def triplet_logistic_loss(user: Tensor, pos: Tensor, neg: Tensor, *, sigma: float = 10.0) -> Tensor:
    """``log(1 + exp(sigma * (cos(a, b-) - cos(a, b+))))``: per-triplet loss ``[B]``. user, pos, neg: [B, d].

    Computed as softplus, which does not overflow for large ``sigma`` (seed 000).
    """
    cos_pos, cos_neg = _triplet_cosines(user, pos, neg)
    return F.softplus(sigma * (cos_neg - cos_pos))


def contrastive_loss(
    view1: Tensor, view2: Tensor, *, temperature: float = 0.1, item_ids: Tensor | None = None
) -> Tensor:
    """Self-supervised item loss (Yao et al., CIKM 2021): per-item loss ``[B]``.

    view1, view2: [B, d] two augmentations of the same B items through the same item tower.
    ``logits = view1 @ view2.T / tau``; the target of row i is column i (the other view of the same item), and the
    other items of the batch are its negatives. item_ids: [B] optional; a column holding the same item as row i
    (possible when items are drawn uniformly with replacement) is masked instead of pushed away.
    """
    _check_temperature(temperature)
    _check_pair("view1", view1, "view2", view2)
    _check_vector("item_ids", item_ids, view1.shape[0])
    logits = view1 @ view2.T / temperature  # [B, B]
    if item_ids is not None:
        logits = _mask_hits(logits, item_ids[:, None] == item_ids[None, :])
    return _softmax_loss(logits)
