"""The main job's harness, without the system: the plan of steps and nights, the metrics, the intervals, the arms.

Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import numpy as np
import pytest

from prequential.arms import PopularityArm, filtered
from prequential.metrics import Scored, hit_rate, paired_difference, rate_interval
from prequential.observed import Observed
from prequential.timeline import DAY_MS, plan_steps
from streaming.events import Click, Impression, Item

D0 = 1_704_067_200_000  # 2024-01-01T00:00Z


def _clicks(times: list[int]) -> list:
    out = []
    for n, ts in enumerate(times):
        out += [Impression(f"u{n % 3}", f"i{n}", f"r{n}", 0, ts), Click(f"u{n % 3}", f"i{n}", f"r{n}", ts)]
    return out


def test_the_plan_cuts_steps_at_the_click_budget_and_never_across_a_night() -> None:
    hour = 3_600_000
    # Day 0: 2 clicks (bootstrap). Day 1: 3 clicks (warm-up). Day 2: 5 clicks, day 3: 2 clicks (scored).
    times = [D0 + hour, D0 + 2 * hour]
    times += [D0 + DAY_MS + h * hour for h in (1, 2, 3)]
    times += [D0 + 2 * DAY_MS + h * hour for h in (1, 2, 3, 4, 5)]
    times += [D0 + 3 * DAY_MS + h * hour for h in (1, 2)]
    events = _clicks(times)
    plan = plan_steps(
        events, first_cut_ms=D0 + DAY_MS, score_from_ms=D0 + 2 * DAY_MS, step_clicks=2, night_every_days=1
    )
    assert plan.bootstrap_end == 4  # 2 clicks with their impressions
    # Warm-up day 1: one unscored step of 3 clicks. Day 2 (night first): 2 + 2 + 1 clicks. Day 3 (night): 2.
    assert [(s.clicks, s.scored, s.night_ms) for s in plan.steps] == [
        (3, False, None),
        (2, True, D0 + 2 * DAY_MS),
        (2, True, None),
        (1, True, None),
        (2, True, D0 + 3 * DAY_MS),
    ]
    assert [s.lo for s in plan.steps] == [4, 10, 14, 18, 20]
    assert plan.steps[-1].hi == len(events)


def test_a_step_takes_the_events_of_its_last_millisecond_along() -> None:
    events = _clicks([D0 + 10, D0 + 20, D0 + 20, D0 + 30])
    plan = plan_steps(events, first_cut_ms=D0, score_from_ms=D0, step_clicks=2, night_every_days=1)
    # Clicks 2 and 3 share a millisecond: the first step has 3 clicks, the second 1.
    assert [s.clicks for s in plan.steps] == [3, 1]


def test_a_gap_of_several_nights_gives_one_nightly_run() -> None:
    events = _clicks([D0 + 10, D0 + 5 * DAY_MS + 10])
    plan = plan_steps(events, first_cut_ms=D0, score_from_ms=D0, step_clicks=5, night_every_days=1)
    assert [s.night_ms for s in plan.steps] == [None, D0 + 5 * DAY_MS]


def _scored() -> Scored:
    # users a (3 clicks), b (1 click); ranks under arms x and y.
    rows = [
        {"user": "a", "item": "i1", "ts_ms": 1, "step": 0, "new_user": False, "new_item": False, "head_item": True,
         "ranks": {"x": 0, "y": 30}},
        {"user": "a", "item": "i2", "ts_ms": 2, "step": 0, "new_user": False, "new_item": True, "head_item": False,
         "ranks": {"x": 25, "y": 5}},
        {"user": "a", "item": "i3", "ts_ms": 3, "step": 1, "new_user": False, "new_item": False, "head_item": True,
         "ranks": {"x": 19, "y": -1}},
        {"user": "b", "item": "i1", "ts_ms": 4, "step": 1, "new_user": True, "new_item": False, "head_item": True,
         "ranks": {"x": -1, "y": 3}},
    ]  # fmt: skip
    return Scored.from_rows(rows, ["x", "y"])


def test_hit_rates_by_hand() -> None:
    scored = _scored()
    # @20: x hits rows 1 and 3 (ranks 0, 19) -> 2/4; y hits rows 2 and 4 (5, 3) -> 2/4.
    assert hit_rate(scored, "x", 20) == 0.5
    assert hit_rate(scored, "y", 20) == 0.5
    # @50: x 3/4 (-1 misses), y 3/4.
    assert hit_rate(scored, "x", 50) == 0.75
    # @1: only x's rank 0.
    assert hit_rate(scored, "x", 1) == 0.25
    new_users = scored.subset(scored.mask("new user"))
    assert len(new_users) == 1 and hit_rate(new_users, "y", 20) == 1.0
    assert len(scored.subset(scored.mask("tail item"))) == 1


def test_paired_difference_and_its_interval_by_hand() -> None:
    scored = _scored()
    # x - y @20 per row: +1, -1, +1, -1. Per user (sorted: a, b): sums a = +1 over 3 rows, b = -1 over 1 row.
    draws = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    # Replicates: (1+1)/(3+3) = 1/3; (1-1)/(3+1) = 0; (-1-1)/(1+1) = -1; 0.
    # Percentiles of [-1, 0, 0, 1/3]: 2.5% -> -1 + 0.075 * 1 = -0.925; 97.5% -> 0 + 0.925 * (1/3) = 0.30833.
    d = paired_difference(scored, "x", "y", 20, draws=draws)
    assert d.value == 0.0 and d.n == 4 and d.users == 2
    assert d.low == pytest.approx(-0.925)
    assert d.high == pytest.approx(0.925 / 3)
    # HitRate of x @20 by user: a 2 hits / 3, b 0 / 1. Replicates: 4/6, 2/4, 0/2, 2/4 -> [0, .5, .5, .6667].
    r = rate_interval(scored, "x", 20, draws=draws)
    assert r.value == 0.5
    assert r.low == pytest.approx(0.075 * 0.5)
    assert r.high == pytest.approx(0.5 + 0.925 * (2 / 3 - 0.5))


def test_the_click_filter_and_popularity_arm() -> None:
    assert filtered(["a", "b", "c", "d"], {"b"}, 2) == ["a", "c"]
    observed = Observed(last_n=2)
    observed.add([Item("i1", "c", (), {}, D0, D0), Item("i9", "c", (), {}, D0, D0)])
    observed.add(_clicks([D0 + 1, D0 + 2, D0 + 3, D0 + 4]))  # u0: i0, i3; u1: i1; u2: i2
    observed.add([Click("u1", "i0", "x", D0 + 5)])  # i0 clicked twice
    top = PopularityArm("popularity").top(["u0", "u1", "u2"], 2, observed)
    # Counts: i0 2, i1 1, i2 1, i3 1 (ties by id); each user's own clicks left out.
    assert top == {"u0": ["i1", "i2"], "u1": ["i2", "i3"], "u2": ["i0", "i1"]}
    assert observed.history("u0") == ["i0", "i3"]
    assert observed.history("u0", before_ms=D0 + 4) == ["i0"]
    assert observed.first_seen_ms["i1"] == D0 and observed.first_seen_ms["i3"] == D0 + 4
    assert observed.catalogue_ids() == ["i0", "i1", "i2", "i3", "i9"]


def test_recent_popularity_weighs_each_click_by_its_age() -> None:
    observed = Observed(last_n=2)
    day = 86_400_000
    observed.add(
        [Click("u0", "old", "a", D0), Click("u1", "old", "b", D0 + day), Click("u2", "new", "c", D0 + 2 * day)]
    )
    # Half-life 1 day, now = D0 + 2 days: "old" 2^-2 + 2^-1 = 0.75, "new" 2^0 = 1.
    assert observed.popularity(1.0, observed.now_ms) == pytest.approx({"old": 0.75, "new": 1.0})
    assert observed.popularity(None, observed.now_ms) == {"old": 2.0, "new": 1.0}
