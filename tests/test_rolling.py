"""Rolling-origin evaluation: the cut points, the cold stratum, no leakage and the bootstrap by user, by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from streaming.events import Click, Item, UserProfile
from trainer.dataset import Dataset
from trainer.intervals import bootstrap_indices, mean_interval, paired_difference, ratio_interval
from trainer.peers import ALS, ItemCF, Popularity
from trainer.rolling import rolling_split, run_rolling, score_users, summarize, write_reports
from trainer.split import quantile_cut

REPO = Path(__file__).resolve().parents[1]

CLICKS = [
    ("u1", "a", 10),
    ("u1", "b", 20),
    ("u2", "a", 30),
    ("u2", "c", 40),
    ("u1", "c", 50),
    ("u3", "b", 60),
    ("u2", "b", 70),
    ("u4", "a", 80),
    ("u1", "d", 90),
    ("u2", "a", 95),  # u2 clicked a at 30: a training-seen pair at every cut below
    ("u3", "a", 100),
]
PROFILE_TS = {"u1": 0, "u2": 0, "u3": 55, "u4": 85, "u5": 200}  # u4 signs up after the 0.3 cut, u5 never clicks
ITEM_CREATED = {"a": 0, "b": 0, "c": 0, "d": 85}  # d enters the catalogue after the 0.3 cut


def tiny() -> Dataset:
    events: list = [UserProfile(u, {"g": "x"}, ts_ms=t) for u, t in PROFILE_TS.items()]
    events += [Item(i, "cat", (), {}, created_ms=t, ts_ms=t) for i, t in ITEM_CREATED.items()]
    events += [Click(u, i, f"r{n}", t) for n, (u, i, t) in enumerate(CLICKS)]
    return Dataset.from_events(events)


# 11 clicks: the cut for F is the time of click floor((1 - F) * 11) (0-based, in time order).
@pytest.mark.parametrize(
    ("fraction", "cut", "warm", "warm_relevant", "cold", "cold_relevant"),
    [
        (0.1, 95, ["u3"], [{"a"}], [], []),  # floor(9.9) = 9; (u2, a, 95) seen in training, dropped
        (0.2, 90, ["u1", "u3"], [{"d"}, {"a"}], [], []),  # floor(8.8) = 8
        (0.3, 80, ["u1", "u3"], [{"d"}, {"a"}], ["u4"], [{"a"}]),  # floor(7.7) = 7: u4's only click is at the cut
        (0.5, 60, ["u1", "u2"], [{"d"}, {"b"}], ["u3", "u4"], [{"a", "b"}, {"a"}]),  # floor(5.5) = 5
    ],
)
def test_cut_points_strata_and_training_set_by_hand(
    fraction: float,
    cut: int,
    warm: list[str],
    warm_relevant: list[set[str]],
    cold: list[str],
    cold_relevant: list[set[str]],
) -> None:
    data = tiny()
    assert quantile_cut(data, fraction) == cut
    split = rolling_split(data, fraction)
    assert split.cut_ms == cut
    assert split.warm.users == warm and split.warm.relevant == warm_relevant
    assert split.cold_users == cold and split.cold_relevant == cold_relevant
    assert split.users == warm + cold and split.relevant == warm_relevant + cold_relevant
    assert split.cold.tolist() == [False] * len(warm) + [True] * len(cold)
    train = split.train
    assert train.clicks.ts_ms.tolist() == [t for _, _, t in CLICKS if t < cut]
    assert set(train.users) == {u for u, t in PROFILE_TS.items() if t < cut}
    assert set(train.items) == {i for i, t in ITEM_CREATED.items() if t < cut}
    assert not train.exposures
    info = split.info
    assert info["warm_test_users"] == len(warm) and info["cold_test_users"] == len(cold)
    assert info["test_pairs_seen_in_train_dropped"] == 1  # (u2, a) at every one of these cuts
    assert info["cold_test_pairs"] == sum(len(r) for r in cold_relevant)


def test_split_refuses_a_fraction_outside_zero_one() -> None:
    with pytest.raises(ValueError, match="test fraction"):
        rolling_split(tiny(), 1.0)


class Recorder:
    """A model that remembers what it was fit on and asked, and recommends nothing."""

    seen: list[tuple[Dataset, int, list[str]]] = []

    def __init__(self) -> None:
        self.train: Dataset | None = None

    def fit(self, train: Dataset) -> None:
        self.train = train

    def recommend(self, user_ids: Sequence[str], k: int, at_ms: int) -> list[list[str]]:
        assert self.train is not None
        Recorder.seen.append((self.train, at_ms, list(user_ids)))
        return [[] for _ in user_ids]


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3, 0.5])
def test_nothing_at_or_after_the_cut_reaches_a_model(fraction: float) -> None:
    data = tiny()
    split = rolling_split(data, fraction)
    Recorder.seen = []
    score_users({"recorder": Recorder}, split)
    [(train, at_ms, users)] = Recorder.seen
    assert at_ms == split.cut_ms and users == split.users
    test = {(u, i, t) for u, i, t in CLICKS if t >= split.cut_ms}
    trained = set(zip(train.clicks.user.tolist(), train.clicks.item.tolist(), train.clicks.ts_ms.tolist(), strict=True))
    assert not trained & test and len(trained) + len(test) == len(CLICKS)
    assert all(p.ts_ms < split.cut_ms for p in train.users.values())
    assert all(i.created_ms < split.cut_ms and i.ts_ms < split.cut_ms for i in train.items.values())


def test_every_model_answers_for_cold_users_and_peers_fall_back_to_popularity() -> None:
    from trainer.model import ModelConfig
    from trainer.retriever import TwoTowerRetriever
    from trainer.train import TrainConfig

    split = rolling_split(tiny(), 0.5)  # cold: u3 (profile dated 55, before the cut), u4 (profile after: default)
    popular = Popularity()
    popular.fit(split.train)
    [expected] = popular.recommend(["nobody"], 2, split.cut_ms)
    for model in (ALS(seed=0, factors=2, iterations=2), ItemCF(), popular):
        model.fit(split.train)
        assert model.recommend(split.cold_users, 2, split.cut_ms) == [expected, expected]
    two_tower = TwoTowerRetriever(ModelConfig(seed=0), TrainConfig(seed=0, batch_size=4), epochs=1)
    two_tower.fit(split.train)
    answers = two_tower.recommend(split.cold_users, 2, split.cut_ms)
    assert [len(a) for a in answers] == [2, 2]  # catalogue a, b, c at the cut; nothing clicked to exclude
    # Its histories come from the training clicks only: u3's click at the cut is not one of them.
    assert two_tower._history is not None and len(two_tower._history.clicked("u3")) == 0


def test_bootstrap_by_user_with_explicit_resamples_by_hand() -> None:
    indices = np.array([[0, 0, 0], [1, 1, 1], [0, 1, 2], [2, 2, 1]])
    a = np.array([0.0, 1.0, 0.5])
    b = np.array([0.0, 0.5, 0.5])
    # Resample means of a: 0, 1, 0.5, 2/3 -> sorted 0, 0.5, 2/3, 1. Linear quantiles at 0.025 and 0.975 sit at
    # positions 0.075 and 2.925: 0 + 0.075 * 0.5 = 0.0375 and 2/3 + 0.925 * 1/3 = 0.975.
    got = mean_interval(a, indices)
    assert got.value == pytest.approx(0.5)
    assert (got.low, got.high) == (pytest.approx(0.0375), pytest.approx(0.975))
    # a - b = 0, 0.5, 0 per user; resample means 0, 0.5, 1/6, 1/6 -> sorted 0, 1/6, 1/6, 0.5:
    # 0 + 0.075 * 1/6 = 0.0125 and 1/6 + 0.925 * 1/3 = 0.475.
    diff = paired_difference(a, b, indices)
    assert diff.value == pytest.approx(1 / 6)
    assert (diff.low, diff.high) == (pytest.approx(0.0125), pytest.approx(0.475))
    # mean(a) / mean(b) = 0.5 / (1/3) = 1.5. Resamples: [0,0,0] has mean(b) = 0 (left out), then 2, 1.5 and
    # (2/3) / 0.5 = 4/3 -> sorted 4/3, 1.5, 2: positions 0.05 and 1.95: 4/3 + 0.05 / 6 and 1.5 + 0.95 * 0.5.
    ratio = ratio_interval(a, b, indices)
    assert ratio.value == pytest.approx(1.5)
    assert (ratio.low, ratio.high) == (pytest.approx(4 / 3 + 0.05 / 6), pytest.approx(1.975))


def test_bootstrap_indices_resample_users_with_replacement() -> None:
    idx = bootstrap_indices(5, resamples=200, seed=1)
    assert idx.shape == (200, 5) and idx.min() >= 0 and idx.max() <= 4
    assert np.array_equal(idx, bootstrap_indices(5, resamples=200, seed=1))
    assert len({tuple(r) for r in idx}) > 1
    with pytest.raises(ValueError):
        mean_interval(np.array([1.0, 2.0]), idx)  # indices beyond the users


def test_summarize_pools_seeds_per_user_and_splits_the_strata() -> None:
    cold = np.array([False, False, True])
    seed0 = {"two_tower": {20: np.array([1.0, 0.0, 0.5])}, "als": {20: np.array([0.0, 0.0, 0.0])}}
    seed1 = {"two_tower": {20: np.array([0.0, 0.0, 0.5])}, "als": {20: np.array([0.0, 1.0, 0.0])}}
    # Pooled per user: two_tower 0.5, 0, 0.5; als 0, 0.5, 0.
    out = summarize([seed0, seed1], cold, resamples=50)
    assert [out[s]["users"] for s in ("warm", "cold", "all")] == [2, 1, 3]
    assert out["warm"]["models"]["two_tower"]["recall@20"]["value"] == pytest.approx(0.25)
    assert out["warm"]["vs_two_tower"]["als"]["recall@20"]["value"] == pytest.approx(0.0)
    assert out["cold"]["models"]["two_tower"]["recall@20"] == {"value": 0.5, "low": 0.5, "high": 0.5}
    assert np.isnan(out["cold"]["ratio_two_tower_als"]["recall@20"]["value"])  # ALS scores 0 there
    assert out["all"]["vs_two_tower"]["als"]["recall@20"]["value"] == pytest.approx(1 / 6)
    assert out["all"]["ratio_two_tower_als"]["recall@20"]["value"] == pytest.approx(2.0)


def test_run_and_reports_on_the_tiny_dataset(tmp_path: Path) -> None:
    def build(seed: int) -> dict:
        return {"two_tower": ItemCF, "als": lambda: ALS(seed=seed, factors=2, iterations=2), "popularity": Popularity}

    report = run_rolling(tiny(), build, [0.3, 0.5], [0, 1], resamples=20)
    report = {"dataset": "tiny", "quick": True, **report}
    assert [c["split"]["cut_ms"] for c in report["cuts"]] == [80, 60]
    assert [c["strata"]["cold"]["users"] for c in report["cuts"]] == [1, 2]
    assert report["cuts"][0]["fit_s"].keys() == {"two_tower", "als", "popularity"}
    paths = [tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"]
    body = write_reports(report, *paths, command="python -m trainer eval ...")
    stored = json.loads(paths[0].read_text())
    assert stored["over_cuts"]["all"]["models"]["popularity"]["recall@20"] == pytest.approx(
        np.mean([c["strata"]["all"]["models"]["popularity"]["recall@20"]["value"] for c in report["cuts"]])
    )
    assert "### cold test users (F=0.3: 1, F=0.5: 2)" in body and "| two_tower − als |" in body
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rolling_eval_command_end_to_end(tmp_path: Path) -> None:
    paths = {"json": tmp_path / "r.json", "markdown": tmp_path / "r.md", "plot": tmp_path / "r.png"}
    cmd = [sys.executable, "-m", "trainer", "eval", "--quick", "--test-fractions", "0.2,0.3", "--seeds", "0,1"]
    cmd += ["--models", "two_tower,als,popularity", "--bootstrap-resamples", "100"]
    for flag, path in paths.items():
        cmd += [f"--{flag}", str(path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(paths["json"].read_text())
    assert report["models"] == ["two_tower", "als", "popularity"] and report["seeds"] == [0, 1]
    for cut in report["cuts"]:
        assert cut["strata"]["all"]["users"] == cut["strata"]["warm"]["users"] + cut["strata"]["cold"]["users"]
        assert cut["strata"]["cold"]["users"] > 0
        for stratum in cut["strata"].values():
            for m in stratum["models"].values():
                assert m["recall@20"]["low"] <= m["recall@20"]["value"] <= m["recall@20"]["high"]
    assert "| two_tower − als |" in done.stdout
