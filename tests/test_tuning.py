"""Settings chosen on a validation window before each cut (trainer.tuning): boundaries, no leakage, the argmax."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from streaming.events import Click, Item, UserProfile
from trainer.dataset import Dataset
from trainer.rolling import rolling_split, run_rolling, write_reports
from trainer.tuning import Tuner, TuningGrid, argmax, choose, rescore_prior, validation_split
from trainer.worlds import pool_worlds

CLICKS = [
    ("u1", "a", 10),
    ("u1", "b", 20),
    ("u2", "a", 30),
    ("u2", "c", 40),
    ("u3", "b", 50),
    ("u1", "c", 60),
    ("u3", "a", 70),  # validation cut (F_val = 0.3 of the 9 training clicks: click floor(0.7 * 9) = 6)
    ("u2", "b", 80),
    ("u4", "a", 90),
    ("u1", "d", 100),  # test cut (F = 0.25 of the 12 clicks: click floor(0.75 * 12) = 9)
    ("u5", "c", 110),
    ("u3", "d", 120),
]
PROFILE_TS = {"u1": 0, "u2": 0, "u3": 0, "u4": 85, "u5": 105}  # u4 signs up inside the validation window
ITEM_CREATED = {"a": 0, "b": 0, "c": 0, "d": 95}  # d enters the catalogue after the validation cut
TEST_F, VAL_F = 0.25, 0.3
TEST_CUT, VAL_CUT = 100, 70


def hand_made() -> Dataset:
    events: list = [UserProfile(u, {"g": "x"}, ts_ms=t) for u, t in PROFILE_TS.items()]
    events += [Item(i, "cat", (), {}, created_ms=t, ts_ms=t) for i, t in ITEM_CREATED.items()]
    events += [Click(u, i, f"r{n}", t) for n, (u, i, t) in enumerate(CLICKS)]
    return Dataset.from_events(events)


def test_validation_window_boundaries_by_hand() -> None:
    split = rolling_split(hand_made(), TEST_F)
    assert split.cut_ms == TEST_CUT
    assert split.train.clicks.ts_ms.tolist() == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert (split.warm.users, split.warm.relevant) == (["u1", "u3"], [{"d"}, {"d"}])
    assert (split.cold_users, split.cold_relevant) == (["u5"], [{"c"}])
    v = validation_split(split.train, VAL_F)
    assert v.cut_ms == VAL_CUT
    # Validation-train: the six clicks before 70; the validation window: the three from 70 to 90, none after.
    assert v.train.clicks.ts_ms.tolist() == [10, 20, 30, 40, 50, 60]
    assert v.warm.users == ["u2", "u3"] and v.warm.relevant == [{"b"}, {"a"}]
    assert v.cold_users == ["u4"] and v.cold_relevant == [{"a"}]
    # u4's profile (85) and item d (95) are dated after the validation cut: not in the validation-train part.
    assert set(v.train.users) == {"u1", "u2", "u3"} and set(v.train.items) == {"a", "b", "c"}
    assert set(split.train.users) == {"u1", "u2", "u3", "u4"} and set(split.train.items) == {"a", "b", "c", "d"}


class Fixed:
    """Recommends the same list to everyone (minus what the user clicked in training)."""

    def __init__(self, items: Sequence[str]) -> None:
        self.items, self.name, self.seen = list(items), "fixed", {}

    def fit(self, train: Dataset) -> None:
        self.seen = {}
        for u, i in zip(train.clicks.user.tolist(), train.clicks.item.tolist(), strict=True):
            self.seen.setdefault(u, set()).add(i)

    def recommend(self, user_ids: Sequence[str], k: int, at_ms: int) -> list[list[str]]:
        return [[i for i in self.items if i not in self.seen.get(u, set())][:k] for u in user_ids]


def test_the_chosen_setting_is_the_validation_argmax_by_hand() -> None:
    v = validation_split(rolling_split(hand_made(), TEST_F).train, VAL_F)
    # Validation users u2 {b} (clicked a, c), u3 {a} (clicked b), u4 {a} (cold).
    # ["a"]: u2 gets nothing (a seen), u3 1, u4 1 -> 2/3.  ["b"]: u2 1, u3 0 (b seen), u4 0 -> 1/3.
    # ["a", "b"]: 1, 1, 1 -> 1, tied by ["b", "a"] later in the grid: the first wins.
    settings = [{"list": ("a",)}, {"list": ("b",)}, {"list": ("a", "b")}, {"list": ("b", "a")}]
    best, scored, model = choose(lambda s: Fixed(s["list"]), settings, v)
    assert [round(s, 6) for _, s in scored] == [round(2 / 3, 6), round(1 / 3, 6), 1.0, 1.0]
    assert best == {"list": ("a", "b")} and model.items == ["a", "b"]
    assert argmax([({"x": 1}, 0.2), ({"x": 2}, 0.5), ({"x": 3}, 0.5)]) == {"x": 2}
    with pytest.raises(ValueError):
        argmax([])


def test_tuner_chooses_per_cut_and_reports_every_candidate() -> None:
    lists = {1.0: ("b",), 2.0: ("a", "b"), 3.0: ("a",)}  # validation Recall@20 1/3, 1, 2/3 (as above)
    grid = TuningGrid(validation_fraction=VAL_F, recent_half_life_days=(1.0, 2.0, 3.0))
    tuner = Tuner(
        ["popularity_recent"], grid, makers={"popularity_recent": lambda s, seed: Fixed(lists[s["half_life_days"]])}
    )
    factories, chosen = tuner(rolling_split(hand_made(), TEST_F), seed=0)
    assert chosen["popularity_recent"]["setting"] == {"half_life_days": 2.0}
    assert [r["recall"] for r in chosen["popularity_recent"]["validation"]] == [0.333333, 1.0, 0.666667]
    assert chosen["validation"]["cut_ms"] == VAL_CUT and chosen["validation"]["validation_clicks"] == 3
    assert factories["popularity_recent"]().items == ["a", "b"]


class Spy:
    """Records every fit (the clicks, profiles and items it received) and every request (time, users)."""

    log: list[tuple[str, Dataset | None, int | None, list[str]]] = []

    def __init__(self, kind: str) -> None:
        self.kind, self.name = kind, kind
        self.serving_prior, self.prior_half_life_days = 0.0, None
        self.train: Dataset | None = None

    def fit(self, train: Dataset) -> None:
        self.train = train
        Spy.log.append((f"{self.kind}.fit", train, None, []))

    def fit_stages(self, train: Dataset, epochs: Sequence[int]) -> Iterator[int]:
        self.fit(train)
        yield from epochs

    def recommend(self, user_ids: Sequence[str], k: int, at_ms: int) -> list[list[str]]:
        Spy.log.append((f"{self.kind}.recommend", self.train, at_ms, list(user_ids)))
        return [[] for _ in user_ids]


def test_no_test_click_and_nothing_dated_at_or_after_a_cut_reaches_the_tuning() -> None:
    data = hand_made()
    grid = TuningGrid(
        validation_fraction=VAL_F, als_factors=(2,), als_regularization=(0.1, 1.0), als_alpha=(1.0,),
        als_prior_gamma=(0.0, 1.0), itemcf_neighbours=(5,), itemcf_shrinkage=(0.0,),
        recent_half_life_days=(1.0, 3.0), two_tower_epochs=(1, 2), two_tower_prior_gamma=(0.0, 1.0),
        prior_half_life_days=(3.0,),
    )  # fmt: skip
    makers = {n: (lambda s, seed, n=n: Spy(n)) for n in ("als", "itemcf", "popularity_recent")}
    tuner = Tuner(["two_tower", "als", "itemcf", "popularity_recent"], grid, lambda s, e: Spy("two_tower"), makers)
    Spy.log = []
    report = run_rolling(data, lambda seed: {}, [TEST_F], [0, 1], resamples=10, tuner=tuner)
    test_clicks = {c for c in CLICKS if c[2] >= TEST_CUT}
    val_users = ["u2", "u3", "u4"]
    fits = [(kind, train) for kind, train, _, _ in Spy.log if kind.endswith(".fit")]
    assert fits and all(train is not None for _, train in fits)
    for kind, train, at_ms, users in Spy.log:
        assert train is not None
        clicks = set(
            zip(train.clicks.user.tolist(), train.clicks.item.tolist(), train.clicks.ts_ms.tolist(), strict=True)
        )
        assert not clicks & test_clicks, kind
        assert all(p.ts_ms < TEST_CUT for p in train.users.values())
        assert all(i.created_ms < TEST_CUT for i in train.items.values())
        if at_ms is None:  # a fit
            continue
        if at_ms == VAL_CUT:  # a validation request: its model saw nothing from the validation cut on
            assert users == val_users and int(train.clicks.ts_ms.max()) < VAL_CUT
            assert all(p.ts_ms < VAL_CUT for p in train.users.values())
            assert all(i.created_ms < VAL_CUT for i in train.items.values())
        else:  # the one test request per model and seed, from a model fit on the whole training part
            assert at_ms == TEST_CUT and int(train.clicks.ts_ms.max()) == 90
    # Per seed: ALS 2 settings + 1 final fit + 1 final fit with the prior; ItemCF 1 + 1 and popularity 2 + 1
    # (chosen once per cut, refit per seed); the two-tower model one validation run and one shared final fit.
    kinds = [kind for kind, _ in fits]
    assert kinds.count("als.fit") == 2 * 4 and kinds.count("itemcf.fit") == 1 + 2
    assert kinds.count("popularity_recent.fit") == 2 + 2 and kinds.count("two_tower.fit") == 2 * 2
    # The two-tower validation run scored every prior at each epoch stop: (gamma 0) + (gamma 1, 3 d), x 2 stops.
    assert len(report["cuts"][0]["tuning"]["0"]["two_tower"]["validation"]) == 2 * 2
    assert report["models"] == ["two_tower", "two_tower[no prior]", "als", "als+prior", "itemcf", "popularity_recent"]


def test_priors_grid_and_rescoring_leave_the_model_as_it_was() -> None:
    grid = TuningGrid(prior_half_life_days=(3.0, None))
    assert grid.priors((0.0, 1.0)) == [
        {"gamma": 0.0, "half_life_days": None},
        {"gamma": 1.0, "half_life_days": 3.0},
        {"gamma": 1.0, "half_life_days": None},
    ]
    v = validation_split(rolling_split(hand_made(), TEST_F).train, VAL_F)
    spy = Spy("als")
    spy.fit(v.train)
    seen: list[tuple[float, float | None]] = []
    spy.recommend = lambda users, k, at: seen.append((spy.serving_prior, spy.prior_half_life_days)) or [[]] * len(users)  # type: ignore[method-assign]
    rescore_prior(spy, v, grid.priors((0.0, 1.0)))
    assert seen == [(0.0, None), (1.0, 3.0), (1.0, None)]
    assert (spy.serving_prior, spy.prior_half_life_days) == (0.0, None)


def test_real_models_tune_end_to_end_on_the_hand_made_data(tmp_path: Path) -> None:
    from trainer.evaluate import EvalConfig
    from trainer.rolling_cli import make_tuner
    from trainer.tuning import QUICK_GRID, settings_markdown

    grid = TuningGrid(**{**QUICK_GRID.__dict__, "validation_fraction": VAL_F, "two_tower_epochs": (1,)})
    config = EvalConfig(models=("two_tower", "als", "popularity"))
    report = run_rolling(hand_made(), lambda seed: {}, [TEST_F], [0], resamples=10, tuner=make_tuner(config, grid))
    cut = report["cuts"][0]
    assert set(cut["tuning"]["0"]) == {"validation", "two_tower", "two_tower[no prior]", "als", "als+prior"}
    assert cut["fit_s"]["two_tower[no prior]"][0] < cut["fit_s"]["two_tower"][0]  # the shared fit, not a second one
    assert cut["strata"]["all"]["users"] == 3
    report = {"dataset": "hand-made", "quick": True, **report}
    body = write_reports(
        report, tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png", "cmd", settings_markdown(report)
    )
    assert "| F=0.25 | 0 |" in body and "| two_tower − two_tower[no prior] |" in body


def test_worlds_pool_users_side_by_side_by_hand() -> None:
    def world(tt: list[float], als: list[float], cold: list[bool]) -> tuple[dict, list]:
        arrays = {"two_tower": {20: np.array(tt)}, "als": {20: np.array(als)}}
        report = {"seeds": [0], "test_fractions": [0.1], "models": ["two_tower", "als"], "resamples": 10,
                  "level": 0.95, "elapsed_s": 1.0, "cuts": [{"split": {}}]}  # fmt: skip
        return report, [(arrays, np.array(cold))]

    (r0, p0), (r1, p1) = world([1.0, 0.0], [0.0, 0.0], [False, True]), world([0.5], [0.5], [False])
    pooled = pool_worlds({0: r0, 1: r1}, {0: p0, 1: p1}, resamples=10)
    strata = pooled["cuts"][0]["strata"]
    # Users 1, 0, 0.5 for two_tower and 0, 0, 0.5 for ALS: means 0.5 and 1/6, ratio 3; warm users 1 and 0.5.
    assert strata["all"]["users"] == 3 and strata["warm"]["users"] == 2
    assert strata["all"]["models"]["two_tower"]["recall@20"]["value"] == pytest.approx(0.5)
    assert strata["all"]["ratio_two_tower_als"]["recall@20"]["value"] == pytest.approx(3.0)
    assert strata["warm"]["vs_two_tower"]["als"]["recall@20"]["value"] == pytest.approx(0.5)
    assert pooled["world_seeds"] == [0, 1] and set(pooled["worlds"]) == {"0", "1"}


@pytest.mark.slow
def test_tuned_eval_over_world_seeds_end_to_end(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    paths = {"json": tmp_path / "r.json", "markdown": tmp_path / "r.md", "plot": tmp_path / "r.png"}
    cmd = [sys.executable, "-m", "trainer", "eval", "--quick", "--tune", "--world-seeds", "0,1", "--test-fractions"]
    cmd += ["0.3", "--seeds", "0", "--models", "two_tower,als,popularity_recent", "--bootstrap-resamples", "50"]
    for flag, path in paths.items():
        cmd += [f"--{flag}", str(path)]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(paths["json"].read_text())
    assert report["tuned"] and report["world_seeds"] == [0, 1]
    worlds = [report["worlds"][w]["cuts"][0] for w in ("0", "1")]
    assert report["cuts"][0]["strata"]["all"]["users"] == sum(c["strata"]["all"]["users"] for c in worlds)
    assert all(set(c["tuning"]["0"]) >= {"two_tower", "als", "als+prior", "popularity_recent"} for c in worlds)
    assert report["models"] == ["two_tower", "two_tower[no prior]", "als", "als+prior", "popularity_recent"]
    text = paths["markdown"].read_text()
    assert "World seed 1:" in text and "## World seed 0: settings chosen" in text
