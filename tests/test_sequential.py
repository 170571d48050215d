"""Sequential evaluation: the history each test click is scored with, the cold stratum, the ALS fold-in and no
leakage, by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from streaming.events import Click, Item, UserProfile
from trainer.dataset import Dataset
from trainer.peers import ALS, ItemCF, Popularity
from trainer.sequential import SequentialConfig, click_ranks, fit_models, run_sequential, sequential_split, user_hits
from trainer.sequential_report import summarize, write_reports
from trainer.sequential_scorers import ALSScorer, ItemCFScorer, fold_in, history_counts

REPO = Path(__file__).resolve().parents[1]

CLICKS = [
    ("u1", "a", 10),
    ("u2", "a", 20),
    ("u1", "b", 30),
    ("u2", "c", 40),
    # 11 clicks; F = 0.6: the cut is the time of click floor(0.4 * 11) = 4 (0-based), 50
    ("u1", "c", 50),
    ("u3", "b", 55),  # u3's first click: cold, nothing before it
    ("u1", "d", 60),
    ("u1", "e", 60),  # the same instant as (u1, d): neither sees the other
    ("u3", "a", 60),
    ("u1", "c", 70),  # a repeat of (u1, c, 50): not scored
    ("u3", "c", 80),
]
PROFILE_TS = {"u1": 0, "u2": 0, "u3": 55}
ITEM_CREATED = {"a": 0, "b": 0, "c": 0, "d": 45, "e": 52}  # e enters the catalogue after the cut
FRACTION = 0.6


def tiny(clicks: list[tuple[str, str, int]] = CLICKS) -> Dataset:
    events: list = [UserProfile(u, {"g": u}, ts_ms=t) for u, t in PROFILE_TS.items()]
    events += [Item(i, "cat", (), {}, created_ms=t, ts_ms=t) for i, t in ITEM_CREATED.items()]
    events += [Click(u, i, f"r{n}", t) for n, (u, i, t) in enumerate(clicks)]
    return Dataset.from_events(events)


def test_each_click_is_scored_with_the_history_strictly_before_it() -> None:
    split = sequential_split(tiny(), FRACTION)
    assert split.cut_ms == 50
    assert split.users == ["u1", "u3"] and split.cold.tolist() == [False, True]
    items = split.items.tolist()
    assert items == ["a", "b", "c", "d", "e"]
    states = [
        (split.users[split.state_user[s]], int(split.state_ts[s]), "".join(items[i] for i in split.history(s)))
        for s in range(len(split.state_ts))
    ]
    # u1 at 50: its training clicks; at 60: those and c (d and e share the instant, so neither sees the other);
    # u1's c at 70 is a repeat and makes no state. u3 (cold) starts from nothing.
    assert states == [("u1", 50, "ab"), ("u1", 60, "abc"), ("u3", 55, ""), ("u3", 60, "b"), ("u3", 80, "ba")]
    targets = [(int(s), items[i]) for s, i in zip(split.click_state, split.click_item, strict=True)]
    assert targets == [(0, "c"), (1, "d"), (1, "e"), (2, "b"), (3, "a"), (4, "c")]
    assert split.click_user.tolist() == [0, 0, 0, 1, 1, 1]
    info = split.info
    assert info["test_clicks_scored"] == 6 and info["test_clicks_repeat_not_scored"] == 1
    assert info["test_clicks_duplicate_same_instant"] == 0 and info["clicks_with_empty_history"] == 1
    assert (info["warm_test_users"], info["cold_test_users"]) == (1, 1)


def test_the_same_click_twice_at_one_instant_counts_once() -> None:
    split = sequential_split(tiny([*CLICKS, ("u3", "c", 80)]), FRACTION)  # 12 clicks: the cut is still at 50
    assert split.cut_ms == 50
    assert split.info["test_clicks_scored"] == 6 and split.info["test_clicks_duplicate_same_instant"] == 1


def test_a_subsample_keeps_each_click_with_its_own_history() -> None:
    full = sequential_split(tiny(), FRACTION)
    sub = sequential_split(tiny(), FRACTION, config=SequentialConfig(max_clicks=3, subsample_seed=1))
    again = sequential_split(tiny(), FRACTION, config=SequentialConfig(max_clicks=3, subsample_seed=1))
    assert len(sub.click_item) == 3 and np.array_equal(sub.click_item, again.click_item)

    def clicks(split) -> set:
        return {
            (split.users[split.state_user[s]], int(split.state_ts[s]), tuple(split.history(s)), int(i))
            for s, i in zip(split.click_state, split.click_item, strict=True)
        }

    assert clicks(sub) < clicks(full)
    assert sub.info["subsampled_clicks"] == 3


class SpyPopularity(Popularity):
    """Popularity that records every training set it is fit on."""

    fits: list[Dataset] = []

    def fit(self, train: Dataset) -> None:
        SpyPopularity.fits.append(train)
        super().fit(train)


def test_nothing_at_or_after_the_cut_reaches_fit_and_each_model_is_fit_once_per_cut_and_seed() -> None:
    SpyPopularity.fits = []
    report = run_sequential(tiny(), lambda seed: {"spy": SpyPopularity}, [FRACTION, 0.1], [0, 1], resamples=10)
    assert len(SpyPopularity.fits) == 4  # 2 cuts x 2 seeds, never again inside a test period
    for train, cut in zip(SpyPopularity.fits, [50, 50, 70, 70], strict=True):
        assert train.clicks.ts_ms.max() < cut
        assert len(train.clicks) == sum(t < cut for _, _, t in CLICKS)
        assert all(p.ts_ms < cut for p in train.users.values())
        assert all(i.created_ms < cut for i in train.items.values())
        assert not train.exposures
    assert [c["split"]["cut_ms"] for c in report["cuts"]] == [50, 70]


def test_popularity_ranks_and_cold_users_fall_back_to_popularity_before_their_first_click() -> None:
    split = sequential_split(tiny(), FRACTION)
    models, _ = fit_models(
        {"popularity": Popularity, "als": lambda: ALS(factors=2, iterations=3), "itemcf": ItemCF}, split
    )
    ranks = click_ranks(models, split, SequentialConfig(ks=(1, 2)))
    # Training counts a 2, b 1, c 1 (ties by id): the list is a, b, c less the history; d and e were never clicked
    # in training, so no peer can name them. u1@50 (a, b seen): c first; u1@60: nothing left, d and e miss;
    # u3@55 (nothing seen): a, b, so b at rank 1; u3@60 (b seen): a first; u3@80 (b, a seen): c first.
    assert ranks["popularity"].tolist() == [0, 2, 2, 1, 0, 0]
    # Every peer answers for u3's first click, with the popularity list: b at rank 1.
    assert ranks["als"][3] == 1 and ranks["itemcf"][3] == 1
    hits = user_hits(ranks["popularity"], split, (1, 2))
    assert hits[1].tolist() == [1.0, 2.0] and hits[2].tolist() == [1.0, 3.0]


def test_itemcf_scores_the_current_history() -> None:
    split = sequential_split(tiny(), FRACTION)
    model = ItemCF(shrinkage=0.0)
    model.fit(split.train)
    scorer = ItemCFScorer(model, split)
    # Training: u1 a, b; u2 a, c. sim(a, b) = sim(a, c) = 1 / (sqrt(2) * 1), sim(b, c) = 0.
    a, b, c = (int(np.flatnonzero(split.items == x)[0]) for x in "abc")
    got = scorer.scores(["u3", "u3", "u3"], [np.array([], dtype=np.int64), np.array([b]), np.array([b, c])], None)
    s = 1 / np.sqrt(2)
    cols = scorer.columns[[a, b, c]]
    np.testing.assert_allclose(got[1][cols], [s, 0, 0], atol=1e-8)  # only the popularity tie-break (1e-9) besides
    np.testing.assert_allclose(got[2][cols], [2 * s, 0, 0], atol=1e-8)
    assert list(np.argsort(-got[0][cols])) == [0, 1, 2]  # empty history: popularity, a then b then c


def test_fold_in_by_hand_with_one_factor() -> None:
    # Y = (1, 2, 3); counts r = (1, 0, 2), alpha 0.5: c = 1.5 and 2 on items 0 and 2, lambda 1.
    # A = Y'Y + lambda + (c0 - 1) y0^2 + (c2 - 1) y2^2 = 14 + 1 + 0.5 + 9 = 24.5; b = 1.5 * 1 + 2 * 3 = 7.5.
    y = np.array([[1.0], [2.0], [3.0]])
    counts = sp.csr_matrix(np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))
    x = fold_in(y, counts, regularization=1.0, alpha=0.5)
    # An empty history gives b = 0, hence x = 0 (the scorer answers with popularity before that).
    np.testing.assert_allclose(x, [[7.5 / 24.5], [0.0]])


def test_fold_in_equals_implicits_recalculate_user() -> None:
    from implicit.cpu.als import AlternatingLeastSquares

    rng = np.random.default_rng(0)
    y = rng.normal(size=(6, 3)).astype(np.float32)
    counts = sp.csr_matrix(np.array([[2.0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 3]]))
    ours = fold_in(y, counts, regularization=0.7, alpha=4.0)
    model = AlternatingLeastSquares(factors=3, regularization=0.7, alpha=1.0, random_state=0)
    model.item_factors = y
    conf = counts.copy()
    conf.data = 1.0 + 4.0 * conf.data  # what trainer.peers.ALS stores: Hu et al.'s confidence, implicit alpha 1
    theirs = model.recalculate_user(np.arange(2), conf.astype(np.float32))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_als_folds_a_cold_user_in_once_they_have_a_history() -> None:
    split = sequential_split(tiny(), FRACTION)
    model = ALS(factors=2, iterations=3, regularization=0.5, alpha=2.0)
    model.fit(split.train)
    scorer = ALSScorer(model, split)
    b = np.array([int(np.flatnonzero(split.items == "b")[0])])
    empty = np.array([], dtype=np.int64)
    got = scorer.scores(["u3", "u3"], [empty, b], None)
    y = model._item_factors
    x = fold_in(y, history_counts([b], scorer.columns, len(y)), 0.5, 2.0)
    np.testing.assert_allclose(got[1], (x @ y.T)[0])
    assert list(np.argsort(-got[0])) == list(model._popular)  # before the first click: popularity


def test_two_tower_first_states_match_the_static_answer_and_later_clicks_move_it() -> None:
    from trainer.model import ModelConfig
    from trainer.retriever import TwoTowerRetriever
    from trainer.sequential_scorers import TwoTowerScorer
    from trainer.train import TrainConfig

    split = sequential_split(tiny(), FRACTION)
    model = TwoTowerRetriever(ModelConfig(seed=0), TrainConfig(seed=0, batch_size=4), epochs=1)
    model.fit(split.train)
    scorer = TwoTowerScorer(model, split, SequentialConfig())
    states = np.arange(len(split.state_ts))
    users = [split.users[u] for u in split.state_user]
    scores = scorer.scores(users, [split.history(s) for s in states], split.state_ts)
    ids, _ = model.item_vectors(split.cut_ms)
    assert ids == ["a", "b", "c", "d"]  # e is created after the cut: no model may recommend it
    # u1's first state (history = its training clicks) and u3's first click (no history, the unknown row and, its
    # profile being dated at that click, no profile) are scored as the static evaluation scores them at the cut.
    static = model.recommend(["u1", "u3"], 4, split.cut_ms)
    for state, answer in zip((0, 2), static, strict=True):
        own = scores[state].copy()
        own[scorer.columns[split.history(state)]] = -np.inf
        order = [ids[c] for c in np.argsort(-own, kind="stable") if np.isfinite(own[c])]
        assert order == answer
    assert not np.allclose(scores[0], scores[1])  # u1 after clicking c
    assert not np.allclose(scores[2], scores[3])  # u3 after clicking b (and with its profile)


def test_summarize_pools_hits_over_seeds_per_user_and_per_click_by_hand() -> None:
    cold = np.array([False, True])
    clicks = np.array([2.0, 1.0])
    seed0 = {"two_tower": {20: np.array([1.0, 0.0])}, "als": {20: np.array([0.0, 1.0])}}
    seed1 = {"two_tower": {20: np.array([2.0, 0.0])}, "als": {20: np.array([0.0, 0.0])}}
    out = summarize([seed0, seed1], clicks, cold, (20,), resamples=50)
    # Pooled hits: two_tower 1.5 and 0 (rates 0.75, 0), als 0 and 0.5 (rates 0, 0.5).
    assert (out["all"]["users"], out["all"]["clicks"]) == (2, 3)
    assert out["all"]["models"]["two_tower"]["hit@20"]["value"] == pytest.approx(0.375)
    assert out["all"]["models"]["two_tower"]["click_hit@20"]["value"] == pytest.approx(0.5)  # 1.5 of 3 clicks
    assert out["all"]["models"]["als"]["click_hit@20"]["value"] == pytest.approx(0.5 / 3)
    assert out["all"]["vs_two_tower"]["als"]["hit@20"]["value"] == pytest.approx(0.125)
    assert out["all"]["ratio_two_tower_als"]["hit@20"]["value"] == pytest.approx(1.5)
    assert out["warm"]["models"]["two_tower"]["hit@20"] == {"value": 0.75, "low": 0.75, "high": 0.75}
    assert out["cold"]["models"]["als"]["hit@20"]["value"] == pytest.approx(0.5)


def test_run_and_reports_on_the_tiny_dataset(tmp_path: Path) -> None:
    def build(seed: int) -> dict:
        return {"two_tower": ItemCF, "als": lambda: ALS(seed=seed, factors=2, iterations=2), "popularity": Popularity}

    report = run_sequential(tiny(), build, [FRACTION, 0.1], [0, 1], resamples=20)
    report = {"dataset": "tiny", "quick": True, **report}
    assert [c["split"]["cut_ms"] for c in report["cuts"]] == [50, 70]  # floor(0.9 * 11) = 9: the click at 70
    assert [c["strata"]["cold"]["users"] for c in report["cuts"]] == [1, 0]  # at 70, u3 has a training click
    assert [c["strata"]["all"]["clicks"] for c in report["cuts"]] == [6, 1]  # at 70 only (u3, c, 80) is scored
    paths = [tmp_path / "s.json", tmp_path / "s.md", tmp_path / "s.png"]
    body = write_reports(report, *paths, command="python -m trainer eval --protocol sequential ...")
    stored = json.loads(paths[0].read_text())
    assert stored["over_cuts"]["all"]["models"]["popularity"]["hit@20"] == pytest.approx(
        np.mean([c["strata"]["all"]["models"]["popularity"]["hit@20"]["value"] for c in report["cuts"]])
    )
    assert "| two_tower − als (per user) |" in body and paths[2].stat().st_size > 0


@pytest.mark.slow
def test_sequential_eval_command_end_to_end(tmp_path: Path) -> None:
    paths = {"json": tmp_path / "s.json", "markdown": tmp_path / "s.md", "plot": tmp_path / "s.png"}
    cmd = [sys.executable, "-m", "trainer", "eval", "--quick", "--protocol", "sequential", "--test-fractions", "0.2"]
    cmd += [
        "--seeds",
        "0,1",
        "--models",
        "two_tower,als,popularity",
        "--bootstrap-resamples",
        "50",
        "--max-clicks",
        "500",
    ]
    for flag, path in paths.items():
        cmd += [f"--{flag}", str(path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(paths["json"].read_text())
    assert report["protocol"] == "sequential" and report["models"] == ["two_tower", "als", "popularity"]
    [cut] = report["cuts"]
    assert cut["split"]["subsampled_clicks"] == 500 and cut["strata"]["all"]["clicks"] == 500
    assert cut["strata"]["all"]["users"] == cut["strata"]["warm"]["users"] + cut["strata"]["cold"]["users"]
    for stratum in cut["strata"].values():
        for m in stratum["models"].values():
            assert m["hit@20"]["low"] <= m["hit@20"]["value"] <= m["hit@20"]["high"]
    assert "| two_tower − als (per user) |" in done.stdout and paths["plot"].stat().st_size > 0
