"""The offline peers on tiny hand-made click logs whose expected top items are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from streaming.events import Click
from trainer.dataset import Dataset
from trainer.peers import ALS, ItemCF, Popularity, Recommender

DAY_MS = 86_400_000


def clicks(pairs: list[tuple[str, str]], ts_ms: list[int] | None = None) -> Dataset:
    ts = ts_ms if ts_ms is not None else list(range(len(pairs)))
    return Dataset.from_events(Click(u, i, f"r{n}", t) for n, ((u, i), t) in enumerate(zip(pairs, ts, strict=True)))


# Click counts: a 5, b 4, c 3, d 1.
#      a b c d
# u1   1 1 . .
# u2   1 1 . .
# u3   1 . 1 .
# u4   1 . 1 .
# u5   1 . 1 .
# u6   . 1 . 1
# u7   . 1 . .
SMALL = [
    ("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "a"), ("u3", "c"), ("u4", "a"), ("u4", "c"),
    ("u5", "a"), ("u5", "c"), ("u6", "b"), ("u6", "d"), ("u7", "b"),
]  # fmt: skip


def test_popularity_order_excludes_seen_and_serves_unknown_users() -> None:
    model = Popularity()
    model.fit(clicks(SMALL))
    # a 5 > b 4 > c 3 > d 1.
    assert model.recommend(["nobody"], 3, 0) == [["a", "b", "c"]]
    # u7 clicked b: the rest in order.
    assert model.recommend(["u7"], 3, 0) == [["a", "c", "d"]]
    # u6 clicked b and d: only a and c remain, whatever k asks for.
    assert model.recommend(["u6"], 10, 0) == [["a", "c"]]


def test_recency_weighted_popularity_prefers_what_is_hot_now() -> None:
    # a: 3 clicks on day 0; b: 2 clicks on day 10 (the last training day).
    # Counts: a 3 > b 2. Half-life 1 day: a weighs 3 * 2**-10 = 0.0029, b weighs 2 * 2**0 = 2 -> b first.
    data = clicks(
        [("x", "a"), ("y", "a"), ("z", "a"), ("x", "b"), ("y", "b")],
        [0, 1, 2, 10 * DAY_MS, 10 * DAY_MS + 1],
    )
    plain, recent = Popularity(), Popularity(half_life_days=1.0)
    plain.fit(data)
    recent.fit(data)
    assert plain.recommend(["new"], 2, 0) == [["a", "b"]]
    assert recent.recommend(["new"], 2, 0) == [["b", "a"]]


def test_itemcf_recommends_the_co_clicked_neighbour() -> None:
    # u7 clicked only b. Users per item: a 5, b 4, c 3, d 1; co-clicks with b: a 2 (u1, u2), d 1 (u6), c 0.
    # shrinkage 0: sim(b, d) = 1 / (sqrt(4) * sqrt(1)) = 0.5 > sim(b, a) = 2 / (sqrt(4) * sqrt(5)) = 0.447;
    # c has no co-click, so it comes last (ordered by popularity among the zeros).
    # Popularity would say [a, c, d]: ItemCF puts the co-clicked neighbour d first.
    model = ItemCF(neighbours=10, shrinkage=0.0)
    model.fit(clicks(SMALL))
    assert model.recommend(["u7"], 3, 0) == [["d", "a", "c"]]
    # shrinkage 1: sim(b, d) = 1 / (2 + 1) = 0.333 < sim(b, a) = 2 / (4.472 + 1) = 0.365: the
    # one-user co-click is shrunk harder than the two-user one, so a overtakes d.
    shrunk = ItemCF(neighbours=10, shrinkage=1.0)
    shrunk.fit(clicks(SMALL))
    assert shrunk.recommend(["u7"], 3, 0) == [["a", "d", "c"]]


def test_itemcf_sums_over_the_history_and_keeps_only_top_neighbours() -> None:
    # u1 clicked a and b. Scores (shrinkage 0): c = sim(a, c) + sim(b, c) = 3/sqrt(15) + 0 = 0.775;
    # d = sim(a, d) + sim(b, d) = 0 + 0.5 = 0.5 -> [c, d].
    model = ItemCF(neighbours=10, shrinkage=0.0)
    model.fit(clicks(SMALL))
    assert model.recommend(["u1"], 2, 0) == [["c", "d"]]
    # With one neighbour per item: a keeps c (0.775 > sim(a, b) = 0.447), b keeps d (0.5 > 0.447).
    # u1's scores are then c 0.775, d 0.5 (same order), and for u7 (history b) only d scores: [d, a, c].
    one = ItemCF(neighbours=1, shrinkage=0.0)
    one.fit(clicks(SMALL))
    assert one.recommend(["u1"], 2, 0) == [["c", "d"]]
    assert one.recommend(["u7"], 3, 0) == [["d", "a", "c"]]


def two_communities() -> tuple[Dataset, dict[str, set[str]]]:
    """Users 0-9 click among items a0-a5, users 10-19 among b0-b5; each user misses two items of its side.

    Left-side items are clicked a little more often overall, so popularity alone would put them first for
    everyone; a collaborative model must recommend each user the two unclicked items of its own side.
    """
    pairs: list[tuple[str, str]] = []
    missing: dict[str, set[str]] = {}
    for u in range(20):
        side = "a" if u < 10 else "b"
        skip = {u % 6, (u + 1) % 6} if side == "a" else {u % 6, (u + 3) % 6}
        missing[f"u{u}"] = {f"{side}{j}" for j in skip}
        pairs += [(f"u{u}", f"{side}{j}") for j in range(6) if j not in skip]
    pairs += [("extra", f"a{j}") for j in range(6)]
    return clicks(pairs), missing


@pytest.mark.parametrize(
    "make", [lambda: ItemCF(neighbours=5, shrinkage=0.0), lambda: ALS(factors=4, regularization=1.0, iterations=20)]
)
def test_collaborative_peers_stay_within_the_users_community(make) -> None:
    data, missing = two_communities()
    model = make()
    model.fit(data)
    users = sorted(missing)
    recs = model.recommend(users, 2, 0)
    for user, rec in zip(users, recs, strict=True):
        assert set(rec) == missing[user], f"{model.name} gave {user} {rec}, expected {sorted(missing[user])}"


# (factory, whether an unknown user gets the plain popularity list)
ALL_PEERS = [
    (Popularity, True),
    (lambda: Popularity(half_life_days=2.0), False),
    (ItemCF, True),
    (lambda: ALS(factors=4, iterations=5), True),
]


@pytest.mark.parametrize(("make", "plain_fallback"), ALL_PEERS)
def test_protocol_contract(make, plain_fallback: bool) -> None:
    data, _ = two_communities()
    model = make()
    assert isinstance(model, Recommender)
    with pytest.raises(RuntimeError, match="fit"):
        model.recommend(["u0"], 3, 0)
    model.fit(data)
    seen: dict[str, set[str]] = {}
    for u, i in zip(data.clicks.user.tolist(), data.clicks.item.tolist(), strict=True):
        seen.setdefault(u, set()).add(i)
    users = ["u3", "u15", "stranger", "u3"]
    recs = model.recommend(users, 5, 0)
    assert len(recs) == len(users)
    assert recs[0] == recs[3]  # a user asked twice gets the same list
    for user, rec in zip(users, recs, strict=True):
        assert len(rec) == len(set(rec)) <= 5
        assert not set(rec) & seen.get(user, set()), f"{model.name} recommended training-seen items to {user}"
    assert len(recs[2]) == 5
    if plain_fallback:
        # A user with no history gets the popularity list: the a-items, clicked by "extra" as well, lead.
        popularity = Popularity()
        popularity.fit(data)
        assert recs[2] == popularity.recommend(["stranger"], 5, 0)[0]
        assert all(item.startswith("a") for item in recs[2])


def test_als_is_deterministic_for_a_seed() -> None:
    data, missing = two_communities()
    runs = []
    for _ in range(2):
        model = ALS(factors=4, iterations=5, seed=3)
        model.fit(data)
        runs.append(model.recommend(sorted(missing), 4, 0))
    assert runs[0] == runs[1]


def test_als_rejects_unknown_weighting() -> None:
    with pytest.raises(ValueError, match="bm25' or 'confidence"):
        ALS(weighting="tfidf")  # type: ignore[arg-type]


def test_als_serving_prior_is_the_smoothed_click_share() -> None:
    # SMALL's counts a 5, b 4, c 3, d 1 (13 clicks, 4 items): add-one shares (6, 5, 4, 2) / 17.
    model = ALS(factors=2, iterations=2, serving_prior=1.0)
    model.fit(clicks(SMALL))
    assert model.item_log_prior() == pytest.approx(np.log(np.array([6, 5, 4, 2]) / 17))
    # Recency-weighted, half-life 1 day: a clicked 2 days and 1 day before the last click, d at it.
    model = ALS(factors=2, iterations=2, serving_prior=1.0, prior_half_life_days=1.0)
    model.fit(clicks([("u1", "a"), ("u2", "a"), ("u1", "d")], [0, DAY_MS, 2 * DAY_MS]))
    # a = 0.25 + 0.5 = 0.75, d = 1; total 1.75 + 2 items.
    assert model.item_log_prior() == pytest.approx(np.log(np.array([1.75, 2.0]) / 3.75))
    # A prior far larger than any factor score ranks a user's unclicked items by popularity.
    strong = ALS(factors=2, iterations=2, serving_prior=1e3)
    strong.fit(clicks(SMALL))
    assert strong.recommend(["u6"], 2, 0) == [["a", "c"]]
    with pytest.raises(ValueError, match="serving_prior"):
        ALS(serving_prior=-1.0)
