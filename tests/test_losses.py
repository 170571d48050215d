"""Losses against values worked by hand on 2-d unit vectors, logQ, accidental hits, gradients, stability."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import (
    contrastive_loss,
    listwise_loss,
    pointwise_loss,
    triplet_hinge_loss,
    triplet_logistic_loss,
)

D = torch.float64


def t(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


def sp(x: float) -> float:
    """softplus(x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def test_listwise_by_hand() -> None:
    # a1 = (1, 0), a2 = (0, 1); b1 = (0.6, 0.8), b2 = (0, 1); tau = 1.
    # cos: a1.b1 = 0.6, a1.b2 = 0; a2.b1 = 0.8, a2.b2 = 1.
    # row 1: -log(e^0.6 / (e^0.6 + e^0)) = log(1 + e^-0.6) = 0.43749
    # row 2: -log(e^1 / (e^0.8 + e^1)) = log(1 + e^-0.2) = 0.59814
    user, pos = t((1, 0), (0, 1)), t((0.6, 0.8), (0, 1))
    loss = listwise_loss(user, pos, temperature=1.0)
    torch.testing.assert_close(loss, torch.tensor([sp(-0.6), sp(-0.2)], dtype=D))
    # tau = 0.5 doubles every logit: log(1 + e^-1.2) = 0.26328, log(1 + e^-0.4) = 0.51302.
    loss = listwise_loss(user, pos, temperature=0.5)
    torch.testing.assert_close(loss, torch.tensor([sp(-1.2), sp(-0.4)], dtype=D))


def test_listwise_logq_by_hand() -> None:
    # Same vectors, tau = 1, p = (0.5, 0.25): subtract log p_j from every column, the positive included.
    # row 1 logits: (0.6 - log 0.5, 0 - log 0.25); loss = log(1 + e^(0 + log 4 - 0.6 - log 2)) = log(1 + 2 e^-0.6)
    #   = log(1 + 1.09762) = 0.74080
    # row 2 logits: (0.8 - log 0.5, 1 - log 0.25); loss = log(1 + e^(0.8 + log 2 - 1 - log 4)) = log(1 + 0.5 e^-0.2)
    #   = log(1 + 0.40937) = 0.34314
    user, pos = t((1, 0), (0, 1)), t((0.6, 0.8), (0, 1))
    log_q = torch.log(torch.tensor([0.5, 0.25], dtype=D))
    loss = listwise_loss(user, pos, temperature=1.0, pos_log_q=log_q)
    expected = [math.log(1 + 2 * math.exp(-0.6)), math.log(1 + 0.5 * math.exp(-0.2))]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=D))


def _random_unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=g, dtype=D), dim=1)


def test_logq_equals_manual_log_softmax_and_uniform_q_changes_nothing() -> None:
    user, pos, extra = _random_unit(5, 4, 0), _random_unit(5, 4, 1), _random_unit(3, 4, 2)
    tau = 0.07
    log_q = torch.log(torch.tensor([0.3, 0.01, 0.2, 0.05, 0.6], dtype=D))
    extra_log_q = torch.log(torch.tensor([0.1, 0.02, 0.4], dtype=D))
    loss = listwise_loss(user, pos, temperature=tau, pos_log_q=log_q, extra=extra, extra_log_q=extra_log_q)
    for i in range(5):
        row = [float(user[i] @ pos[j]) / tau - float(log_q[j]) for j in range(5)]
        row += [float(user[i] @ extra[m]) / tau - float(extra_log_q[m]) for m in range(3)]
        manual = -(row[i] - math.log(sum(math.exp(x) for x in row)))
        assert float(loss[i]) == pytest.approx(manual, rel=1e-12)
    # A uniform q shifts every logit of a row by the same constant, which the softmax ignores.
    uniform = torch.full((5,), math.log(0.01), dtype=D)
    torch.testing.assert_close(
        listwise_loss(user, pos, temperature=tau, pos_log_q=uniform), listwise_loss(user, pos, temperature=tau)
    )
    # A non-uniform q does change it (a hot item's column is discounted).
    assert not torch.allclose(loss, listwise_loss(user, pos, temperature=tau, extra=extra))


def test_accidental_hits_are_masked() -> None:
    # Rows 0 and 2 clicked the same item 7 (same vector); tau = 1.
    # a = (1, 0), (0, 1), (0.6, 0.8); b = (1, 0) [id 7], (0, 1) [id 3], (1, 0) [id 7].
    # row 0 logits (1, 0, 1): column 2 is item 7 again -> masked: log(1 + e^-1) = 0.31326
    #   (unmasked it would be log(2 + e^-1) = 0.86199: the positive fighting itself).
    # row 1 logits (0, 1, 0): no hit: -log(e / (e + 2)) = log(1 + 2 e^-1) = 0.55144
    # row 2 logits (0.6, 0.8, 0.6): column 0 masked: -log(e^0.6 / (e^0.8 + e^0.6)) = log(1 + e^0.2) = 0.79814
    user, pos = t((1, 0), (0, 1), (0.6, 0.8)), t((1, 0), (0, 1), (1, 0))
    ids = torch.tensor([7, 3, 7])
    loss = listwise_loss(user, pos, temperature=1.0, pos_ids=ids)
    expected = [sp(-1.0), math.log(1 + 2 * math.exp(-1.0)), sp(0.2)]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=D))
    unmasked = listwise_loss(user, pos, temperature=1.0)
    assert float(unmasked[0]) == pytest.approx(math.log(2 + math.exp(-1.0)))
    # Distinct ids mask nothing.
    torch.testing.assert_close(listwise_loss(user, pos, temperature=1.0, pos_ids=torch.tensor([1, 2, 3])), unmasked)


def test_extra_negatives_and_their_hits_by_hand() -> None:
    # a1 = (1, 0), a2 = (0, 1); b1 = (0.6, 0.8) [id 7], b2 = (0, 1) [id 3]; extra e1 = (-1, 0) [id 9],
    # e2 = (0, 1) [id 3, row 2's own positive]; tau = 1, extra_log_q = log(0.5) for both.
    # row 1 logits (0.6, 0, -1 - log 0.5, 0 - log 0.5) = (0.6, 0, -1 + log 2, log 2):
    #   loss = log(e^0.6 + 1 + 2e^-1 + 2) - 0.6
    # row 2 logits (0.8, 1, 0 + log 2, [masked]): loss = log(e^0.8 + e + 2) - 1
    user, pos = t((1, 0), (0, 1)), t((0.6, 0.8), (0, 1))
    extra = t((-1, 0), (0, 1))
    loss = listwise_loss(
        user,
        pos,
        temperature=1.0,
        pos_ids=torch.tensor([7, 3]),
        extra=extra,
        extra_log_q=torch.log(torch.tensor([0.5, 0.5], dtype=D)),
        extra_ids=torch.tensor([9, 3]),
    )
    expected = [
        math.log(math.exp(0.6) + 1 + 2 * math.exp(-1) + 2) - 0.6,
        math.log(math.exp(0.8) + math.e + 2) - 1,
    ]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=D))


def test_listwise_rejects_bad_shapes() -> None:
    user = _random_unit(3, 4, 0)
    with pytest.raises(ValueError, match="user has 3 rows, pos has 2"):
        listwise_loss(user, _random_unit(2, 4, 1))
    with pytest.raises(ValueError, match=r"pos_log_q must have shape \(3,\), got \(2,\)"):
        listwise_loss(user, user, pos_log_q=torch.zeros(2))
    with pytest.raises(ValueError, match="extra_ids needs pos_ids"):
        listwise_loss(user, user, extra=user, extra_ids=torch.arange(3))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        listwise_loss(user, user, temperature=0.0)


def test_pointwise_by_hand() -> None:
    # tau = 0.5; BCE(z, y) = y * log(1 + e^-z) + (1 - y) * log(1 + e^z).
    # (1,0)·(0.6,0.8) = 0.6, z = 1.2, y = 1 -> log(1 + e^-1.2) = 0.26328
    # (1,0)·(0,1)     = 0,   z = 0,   y = 0 -> log 2 = 0.69315
    # (0,1)·(0.6,-0.8) = -0.8, z = -1.6, y = 0 -> log(1 + e^-1.6) = 0.18182 (a negative near cos = -1 costs little)
    user = t((1, 0), (1, 0), (0, 1))
    items = t((0.6, 0.8), (0, 1), (0.6, -0.8))
    loss = pointwise_loss(user, items, torch.tensor([1, 0, 0]), temperature=0.5)
    torch.testing.assert_close(loss, torch.tensor([sp(-1.2), math.log(2), sp(-1.6)], dtype=D))


def test_triplet_hinge_by_hand() -> None:
    # m = 0.2: max(0, cos(a, b-) + 0.2 - cos(a, b+)).
    # a = (1,0),  b+ = (0.6,0.8) 0.6, b- = (0,1) 0     -> max(0, 0 + 0.2 - 0.6) = 0
    # a = (0,1),  b+ = (0.6,0.8) 0.8, b- = (0,1) 1     -> 1 + 0.2 - 0.8 = 0.4
    # a = (1,0),  b+ = (0.6,0.8) 0.6, b- = (0.8,0.6) 0.8 -> 0.8 + 0.2 - 0.6 = 0.4
    user = t((1, 0), (0, 1), (1, 0))
    pos = t((0.6, 0.8), (0.6, 0.8), (0.6, 0.8))
    neg = t((0, 1), (0, 1), (0.8, 0.6))
    torch.testing.assert_close(triplet_hinge_loss(user, pos, neg, margin=0.2), torch.tensor([0.0, 0.4, 0.4], dtype=D))


def test_triplet_logistic_by_hand_and_stable() -> None:
    # sigma = 10: log(1 + exp(10 * (cos- - cos+))).
    # row 1: cos+ 0.6, cos- 0 -> log(1 + e^-6) = 0.00248;  row 2: cos+ 0.8, cos- 1 -> log(1 + e^2) = 2.12693
    user, pos, neg = t((1, 0), (0, 1)), t((0.6, 0.8), (0.6, 0.8)), t((0, 1), (0, 1))
    torch.testing.assert_close(
        triplet_logistic_loss(user, pos, neg, sigma=10.0), torch.tensor([sp(-6), sp(2)], dtype=D)
    )
    # sigma = 1000 in float32 would overflow exp(200); softplus returns the linear limit 1000 * 0.2 = 200.
    big = triplet_logistic_loss(user.float(), pos.float(), neg.float(), sigma=1000.0)
    assert torch.isfinite(big).all()
    assert float(big[1]) == pytest.approx(200.0, rel=1e-5)


def test_contrastive_by_hand() -> None:
    # view1 = (1,0), (0,1); view2 = (0.6,0.8), (0,1); tau = 0.5.
    # row 1 logits (1.2, 0):   log(1 + e^-1.2) = 0.26328;  row 2 logits (1.6, 2): log(1 + e^-0.4) = 0.51302
    view1, view2 = t((1, 0), (0, 1)), t((0.6, 0.8), (0, 1))
    torch.testing.assert_close(
        contrastive_loss(view1, view2, temperature=0.5), torch.tensor([sp(-1.2), sp(-0.4)], dtype=D)
    )
    # The same item twice among uniformly drawn items: with ids the duplicate is not a negative.
    # view1 = (1,0), (1,0); view2 = (1,0), (1,0); tau = 1: unmasked log(2) each, masked 0.
    same = t((1, 0), (1, 0))
    torch.testing.assert_close(contrastive_loss(same, same, temperature=1.0), torch.full((2,), math.log(2), dtype=D))
    masked = contrastive_loss(same, same, temperature=1.0, item_ids=torch.tensor([4, 4]))
    torch.testing.assert_close(masked, torch.zeros(2, dtype=D))


def test_gradients_match_finite_differences() -> None:
    user, pos, extra = _random_unit(4, 3, 10), _random_unit(4, 3, 11), _random_unit(2, 3, 12)
    log_q = torch.log(torch.tensor([0.2, 0.05, 0.2, 0.5], dtype=D))
    extra_log_q = torch.log(torch.tensor([0.1, 0.3], dtype=D))
    ids = torch.tensor([1, 2, 1, 3])  # rows 0 and 2 share an item: masked columns must stay differentiable
    extra_ids = torch.tensor([3, 9])  # extra 0 is row 3's positive
    inputs = tuple(x.clone().requires_grad_(True) for x in (user, pos, extra, log_q, extra_log_q))

    def listwise(u, p, e, lq, elq):
        return listwise_loss(
            u, p, temperature=0.2, pos_log_q=lq, pos_ids=ids, extra=e, extra_log_q=elq, extra_ids=extra_ids
        )

    assert torch.autograd.gradcheck(listwise, inputs)
    views = tuple(x.clone().requires_grad_(True) for x in (user, pos))
    assert torch.autograd.gradcheck(lambda a, b: contrastive_loss(a, b, temperature=0.2), views)
    assert torch.autograd.gradcheck(lambda a, b: contrastive_loss(a, b, temperature=0.2, item_ids=ids), views)


def test_tiny_temperature_is_stable() -> None:
    # tau = 1e-4: logits reach 1e4 and exp overflows even in float64; the loss must tend to its hinge limit.
    # a = (1,0), (0,1); b = (0.6,0.8), (1,0).
    # row 1 logits (0.6, 1) / tau, target 0.6 / tau: log(1 + e^(0.4/tau)) = 0.4 / tau + log(1 + e^-4000) = 4000
    # row 2 logits (0.8, 0) / tau, target 0:          log(1 + e^(0.8/tau)) = 8000
    tau = 1e-4
    user, pos = t((1, 0), (0, 1)), t((0.6, 0.8), (1, 0))
    loss = listwise_loss(user, pos, temperature=tau)
    torch.testing.assert_close(loss, torch.tensor([0.4 / tau, 0.8 / tau], dtype=D))
    contrast = contrastive_loss(user, pos, temperature=tau)
    torch.testing.assert_close(contrast, torch.tensor([0.4 / tau, 0.8 / tau], dtype=D))
    # With logQ (p down to 1e-6), in float32 too: finite values and finite gradients.
    for dtype in (torch.float32, torch.float64):
        u = user.to(dtype).requires_grad_(True)
        out = listwise_loss(u, pos.to(dtype), temperature=tau, pos_log_q=torch.log(torch.tensor([0.5, 1e-6])))
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(u.grad).all()
    # A positive at cos = -1: BCE = log(1 + e^(1/tau)) ~ 1 / tau = 10000.
    point = pointwise_loss(t((1, 0)), t((-1, 0)), torch.tensor([1]), temperature=tau)
    assert float(point[0]) == pytest.approx(1 / tau, rel=1e-9)
