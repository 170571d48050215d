"""Recall@K, NDCG@K and the head / tail split against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.metrics import head_items, hit_matrix, ndcg_at_k, ranking_metrics, recall_at_k

LOG2_3 = math.log2(3)  # 1.58496...


def test_recall_and_ndcg_one_user() -> None:
    # Ranked [a, b, c], relevant {a, c}.
    # Recall@1 = 1/2 (a), Recall@2 = 1/2 (a; b misses), Recall@3 = 2/2.
    # DCG@2 = 1/log2(2) = 1; IDCG@2 = 1/log2(2) + 1/log2(3) = 1 + 0.6309 -> NDCG@2 = 1 / 1.6309 = 0.6131.
    # DCG@3 = 1 + 1/log2(4) = 1.5; IDCG@3 = IDCG over min(3, 2) = 2 hits = 1.6309 -> NDCG@3 = 0.9197.
    out = ranking_metrics([["a", "b", "c"]], [{"a", "c"}], recall_ks=(1, 2, 3), ndcg_ks=(1, 2, 3))
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["recall@2"] == pytest.approx(0.5)
    assert out["recall@3"] == pytest.approx(1.0)
    assert out["ndcg@1"] == pytest.approx(1.0)
    assert out["ndcg@2"] == pytest.approx(1 / (1 + 1 / LOG2_3))
    assert out["ndcg@3"] == pytest.approx(1.5 / (1 + 1 / LOG2_3))
    assert out["ndcg@3"] == pytest.approx(0.9197, abs=1e-4)
    assert out["users"] == 1


def test_average_over_users_skips_users_without_relevant_items() -> None:
    # User 1: [a, b, c] vs {a, c}: Recall@2 = 1/2, NDCG@2 = 1 / 1.6309 = 0.6131.
    # User 2: [x, y] vs {y}: Recall@2 = 1, NDCG@2 = (1/log2(3)) / (1/log2(2)) = 0.6309.
    # User 3: no relevant item -> not counted at all (otherwise the means would be 1/2 and 0.4147).
    recs = [["a", "b", "c"], ["x", "y"], ["p", "q"]]
    rel = [{"a", "c"}, {"y"}, set()]
    out = ranking_metrics(recs, rel, recall_ks=(2,), ndcg_ks=(2,))
    assert out["users"] == 2
    assert out["recall@2"] == pytest.approx((0.5 + 1.0) / 2)  # 0.75
    # Standard error: sample std of [0.5, 1] = sqrt(((0.5-0.75)^2 + (1-0.75)^2) / 1) = 0.3536; / sqrt(2) = 0.25.
    assert out["recall@2_se"] == pytest.approx(0.25)
    assert out["ndcg@2"] == pytest.approx((1 / (1 + 1 / LOG2_3) + 1 / LOG2_3) / 2)


def test_ideal_dcg_is_capped_at_k_and_short_lists_count_as_misses() -> None:
    # [a, b] vs {a, b, c, d}: both ranks hit. Recall@2 = 2/4, but NDCG@2 = 1 because the ideal list also has
    # only K = 2 slots: IDCG@2 = 1 + 1/log2(3) = DCG@2.
    # Recall@4 with a 2-item list: ranks 3 and 4 are misses -> still 2/4; DCG@4 = 1.6309,
    # IDCG@4 = 1 + 0.6309 + 0.5 + 0.4307 = 2.5616 -> NDCG@4 = 0.6367.
    out = ranking_metrics([["a", "b"]], [{"a", "b", "c", "d"}], recall_ks=(2, 4), ndcg_ks=(2, 4))
    assert out["recall@2"] == pytest.approx(0.5)
    assert out["ndcg@2"] == pytest.approx(1.0)
    assert out["recall@4"] == pytest.approx(0.5)
    idcg4 = 1 + 1 / LOG2_3 + 1 / 2 + 1 / math.log2(5)
    assert out["ndcg@4"] == pytest.approx((1 + 1 / LOG2_3) / idcg4)
    assert out["ndcg@4"] == pytest.approx(0.6367, abs=1e-4)


def test_hit_matrix_and_vectorised_metrics_agree_with_a_direct_loop() -> None:
    rng = np.random.default_rng(7)
    items = [f"i{j}" for j in range(30)]
    recs = [list(rng.permutation(items)[:12]) for _ in range(50)]
    rel = [set(rng.choice(items, size=rng.integers(0, 6), replace=False).tolist()) for _ in range(50)]
    hits = hit_matrix(recs, rel, 12)
    n_rel = np.array([len(r) for r in rel])
    recall = recall_at_k(hits, n_rel, (5, 10))
    ndcg = ndcg_at_k(hits, n_rel, (5, 10))
    for k in (5, 10):
        r_loop, n_loop = [], []
        for ranked, relevant in zip(recs, rel, strict=True):
            if not relevant:
                continue
            r_loop.append(len(set(ranked[:k]) & relevant) / len(relevant))
            dcg = sum(1 / math.log2(i + 2) for i, item in enumerate(ranked[:k]) if item in relevant)
            idcg = sum(1 / math.log2(i + 2) for i in range(min(k, len(relevant))))
            n_loop.append(dcg / idcg)
        assert recall[k] == pytest.approx(np.mean(r_loop))
        assert ndcg[k] == pytest.approx(np.mean(n_loop))


def test_head_items_rule() -> None:
    counts = {"a": 10, "b": 5, "c": 5, "d": 1}
    catalogue = ["a", "b", "c", "d", "e"]  # e has no training click: n = 5 items
    assert head_items(counts, catalogue, 0.2) == {"a"}  # ceil(0.2 * 5) = 1
    assert head_items(counts, catalogue, 0.3) == {"a", "b"}  # ceil(1.5) = 2; b and c tie, broken by id
    assert head_items(counts, catalogue, 0.5) == {"a", "b", "c"}  # ceil(2.5) = 3
    # Zero-click items are never head, even when the quota (ceil(0.9 * 5) = 5) is not filled.
    assert head_items(counts, catalogue, 0.9) == {"a", "b", "c", "d"}
    with pytest.raises(ValueError, match="head_fraction"):
        head_items(counts, catalogue, 1.0)


def test_head_and_tail_recall() -> None:
    # head = {a}. User 1: [a, b, c] vs {a, c}: head test {a} found at rank 1 -> head Recall@2 = 1;
    # tail test {c} is at rank 3 -> tail Recall@2 = 0, tail Recall@3 = 1.
    # User 2: [x, y] vs {y}: no head test item (skipped for head); tail Recall@2 = 1.
    # head_recall@2 = 1 (one user); tail_recall@2 = (0 + 1) / 2 = 0.5; tail_recall@3 = (1 + 1) / 2 = 1.
    out = ranking_metrics(
        [["a", "b", "c"], ["x", "y"]], [{"a", "c"}, {"y"}], recall_ks=(2,), ndcg_ks=(2,), head={"a"}, split_ks=(2, 3)
    )
    assert out["head_recall@2"] == pytest.approx(1.0)
    assert out["tail_recall@2"] == pytest.approx(0.5)
    assert out["head_recall@3"] == pytest.approx(1.0)
    assert out["tail_recall@3"] == pytest.approx(1.0)
    assert "head_recall@2" not in ranking_metrics([["a"]], [{"a"}], recall_ks=(1,), ndcg_ks=(1,))


def test_coverage_counts_distinct_items_in_top_k() -> None:
    # Top-2 lists [a, b] and [a, c]: 3 distinct items over a catalogue of 6 -> 0.5.
    out = ranking_metrics([["a", "b", "z"], ["a", "c"]], [{"a"}, {"c"}], recall_ks=(2,), ndcg_ks=(2,), catalogue_size=6)
    assert out["coverage@2"] == pytest.approx(0.5)


def test_errors_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match="one relevant set per ranked list"):
        hit_matrix([["a"]], [{"a"}, {"b"}], 1)
    with pytest.raises(ValueError, match="K >= 1"):
        recall_at_k(np.zeros((1, 3), bool), np.ones(1, int), (0,))
    with pytest.raises(ValueError, match="depth 3"):
        ndcg_at_k(np.zeros((1, 3), bool), np.ones(1, int), (5,))
