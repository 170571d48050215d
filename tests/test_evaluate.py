"""The temporal split, the evaluation loop and the ``python -m trainer eval`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streaming.events import Click
from trainer.dataset import Dataset
from trainer.evaluate import (
    DEFAULT_MODELS,
    EvalConfig,
    build_models,
    evaluate_models,
    markdown_table,
    plot_metrics,
    temporal_split,
)
from trainer.peers import ItemCF, Popularity

REPO = Path(__file__).resolve().parents[1]


def dataset(rows: list[tuple[str, str, int]]) -> Dataset:
    return Dataset.from_events(Click(u, i, f"r{n}", t) for n, (u, i, t) in enumerate(rows))


ROWS = [
    # training period: t < 100
    ("u1", "a", 10),
    ("u1", "b", 20),
    ("u2", "a", 30),
    ("u2", "c", 99),
    # test period: t >= 100
    ("u1", "a", 100),  # u1 clicked a in training: dropped
    ("u1", "c", 110),
    ("u1", "c", 120),  # the same pair twice counts once
    ("u1", "d", 130),  # d never clicked in training: a new item, kept
    ("u2", "b", 140),
    ("u3", "a", 150),  # u3 has no training click: a cold user, skipped and counted
]


def test_split_by_hand() -> None:
    split = temporal_split(dataset(ROWS), cut_ms=100, rule="t < 100 | t >= 100")
    assert split.users == ["u1", "u2"]
    assert split.relevant == [{"c", "d"}, {"b"}]
    info = split.info
    assert info["train_clicks"] == 4 and info["test_clicks"] == 6
    assert info["test_pairs_seen_in_train_dropped"] == 1  # (u1, a)
    assert info["test_pairs"] == 3  # (u1, c), (u1, d), (u2, b)
    assert info["test_pairs_new_item"] == 1  # d
    assert info["cold_test_users_skipped"] == 1 and info["cold_test_pairs_skipped"] == 1
    # Catalogue = clicked training items a, b, c (no Item records here); head = ceil(0.2 * 3) = 1 item: a (2 clicks).
    assert info["catalogue_items"] == 3 and split.head == {"a"}


def test_split_has_no_leakage_on_a_synthetic_world() -> None:
    from streaming.sources.synthetic import SyntheticWorld, WorldConfig

    world = SyntheticWorld(WorldConfig(seed=3, n_users=200, n_items=300, days=2.0, requests_per_day=3000.0))
    data = Dataset.from_events(world.events())
    cut = world.end_ms() - 86_400_000
    split = temporal_split(data, cut)
    train = split.train.clicks
    assert len(train) > 0 and split.info["test_pairs"] > 0
    assert train.ts_ms.max() < cut  # every training click is before the cut ...
    test = data.clicks.select(data.clicks.ts_ms >= cut)
    assert test.ts_ms.min() >= cut  # ... and every test click at or after it
    assert len(train) + len(test) == len(data.clicks)
    seen = set(zip(train.user.tolist(), train.item.tolist(), strict=True))
    warm = set(train.user.tolist())
    test_pairs = set(zip(test.user.tolist(), test.item.tolist(), strict=True))
    for user, relevant in zip(split.users, split.relevant, strict=True):
        assert user in warm
        for item in relevant:
            assert (user, item) not in seen
            assert (user, item) in test_pairs
    expected = {(u, i) for u, i in test_pairs if u in warm and (u, i) not in seen}
    assert sum(len(r) for r in split.relevant) == len(expected)


def test_split_refuses_an_empty_side() -> None:
    with pytest.raises(ValueError, match="expected both > 0"):
        temporal_split(dataset(ROWS), cut_ms=5)


def test_evaluate_models_scores_each_model() -> None:
    # Training: u1 {a, b}, u2 {a, c}; test: u1 {c, d}, u2 {b}.
    # Popularity (a 2, b 1, c 1): u1 gets [c] (a, b seen), u2 gets [b] (a, c seen).
    # Recall@10: u1 1/2 (c found, d never trained), u2 1/1 -> 0.75.
    split = temporal_split(dataset(ROWS), cut_ms=100)
    results = evaluate_models({"popularity": Popularity, "itemcf": ItemCF}, split)
    assert list(results) == ["popularity", "itemcf"]
    assert results["popularity"]["recall@10"] == pytest.approx(0.75)
    assert results["popularity"]["users"] == 2
    # head = {a}: no test item is head (a was dropped for u1), so head recall is undefined (nan) and tail = all.
    assert results["popularity"]["tail_recall@20"] == pytest.approx(0.75)
    for metrics in results.values():
        assert {"recall@20", "recall@50", "ndcg@10", "ndcg@20", "head_recall@50", "fit_s"} <= set(metrics)


class Repeater:
    """Recommends a user's own training clicks: the protocol forbids it, the evaluation must say so."""

    name = "repeater"

    def fit(self, train: Dataset) -> None:
        self.clicked: dict[str, list[str]] = {}
        for user, item in zip(train.clicks.user.tolist(), train.clicks.item.tolist(), strict=True):
            self.clicked.setdefault(user, []).append(item)

    def recommend(self, user_ids, k: int, at_ms: int) -> list[list[str]]:
        return [self.clicked.get(u, [])[:k] for u in user_ids]


def test_evaluation_flags_models_that_recommend_training_clicks() -> None:
    # u1 trained on [a, b], u2 on [a, c]: 4 training-seen slots, none of them a test item.
    split = temporal_split(dataset(ROWS), cut_ms=100)
    results = evaluate_models({"repeater": Repeater, "popularity": Popularity}, split)
    assert results["repeater"]["recommended_seen"] == 4
    assert results["repeater"]["recall@50"] == 0.0
    assert "recommended_seen" not in results["popularity"]


def test_markdown_table_and_plot(tmp_path: Path) -> None:
    results = {
        "x": {"recall@20": 0.5, "recall@20_se": 0.125, "ndcg@20": 0.25, "fit_s": 1.0},
        "y": {"recall@20": 0.25, "ndcg@20": 0.5},
        "z": {"recall@20": float("nan"), "ndcg@20": 0.125},
    }
    table = markdown_table(results, ("recall@20", "ndcg@20"))
    lines = table.splitlines()
    assert lines[0] == "| model | recall@20 | ndcg@20 | fit s |"
    assert lines[2] == "| x | **0.5000** ± 0.1250 | 0.2500 | 1.0 |"  # the best of each column in bold
    assert lines[3] == "| y | 0.2500 | **0.5000** | nan |"
    assert lines[4] == "| z | nan | 0.1250 | nan |"
    png = tmp_path / "plot.png"
    plot_metrics(results, png, "title", ("recall@20", "ndcg@20"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_model_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'bpr'.*two_tower"):
        build_models(EvalConfig(models=("als", "bpr")))


def test_the_prior_row_and_the_logq_ablations_are_built_as_asked() -> None:
    plain = build_models(EvalConfig(models=("two_tower", "als")))
    assert list(plain) == ["two_tower", "als"]
    factories = build_models(EvalConfig(models=("two_tower", "als"), serving_prior=2.0, prior_half_life_days=7.0))
    assert list(factories) == ["two_tower", "two_tower+prior", "als"]
    model = factories["two_tower+prior"]()
    assert (model.name, model.serving_prior, model.prior_half_life_days) == ("two_tower+prior", 2.0, 7.0)
    assert factories["two_tower"]().serving_prior == 0.0
    ablations = build_models(EvalConfig(models=("two_tower",), ablations=True))
    half = ablations["two_tower[logq=0.5]"]()
    assert (half.train_config.logq, half.train_config.logq_weight) == (True, 0.5)
    seed004 = ablations["two_tower[logq=off,serving_prior]"]()
    assert (seed004.train_config.logq, seed004.serving_prior) == (False, 1.0)


@pytest.mark.slow
def test_eval_command_end_to_end(tmp_path: Path) -> None:
    paths = {"json": tmp_path / "m.json", "markdown": tmp_path / "m.md", "plot": tmp_path / "m.png"}
    cmd = [sys.executable, "-m", "trainer", "eval", "--dataset", "synthetic", "--quick"]
    for flag, path in paths.items():
        cmd += [f"--{flag}", str(path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(paths["json"].read_text())
    assert set(report["models"]) == set(DEFAULT_MODELS)
    assert report["split"]["test_users"] > 100 and report["split"]["train_clicks"] > 1000
    for name, metrics in report["models"].items():
        for key in ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "head_recall@20", "tail_recall@20"):
            assert 0.0 <= metrics[key] <= 1.0, (name, key, metrics[key])
        assert metrics["recall@10"] <= metrics["recall@20"] <= metrics["recall@50"]
    # Popularity cannot reach the tail: its top 50 are all head items of the quick world.
    assert report["models"]["popularity"]["tail_recall@20"] == 0.0
    assert "| two_tower |" in done.stdout and "| two_tower |" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
