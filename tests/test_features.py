"""Feature specs, vocabularies, the encoder and click histories on a hand-built catalogue."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from streaming.events import Click, Item, UserProfile
from trainer.dataset import Dataset
from trainer.features import (
    ContinuousFeature,
    DiscreteFeature,
    FeatureEncoder,
    IdFeature,
    LastNFeature,
    MultiValuedFeature,
    Vocab,
    default_item_features,
    default_user_features,
)
from trainer.history import ClickHistory

E = math.e


def _item(item_id: str, category: str, tags: tuple[str, ...], stats: dict[str, float]) -> Item:
    return Item(item_id, category, tags, stats, created_ms=0, ts_ms=0)


def catalogue_dataset() -> Dataset:
    # Prices 0, e-1, e^2-1 have log1p 0, 1, 2: mean 1, std sqrt(2/3).
    items = [
        _item("i1", "books", ("x", "y"), {"price": 0.0, "weight": 1.0}),
        _item("i2", "music", ("y",), {"price": E - 1, "weight": 3.0}),
        _item("i3", "books", (), {"price": E**2 - 1}),
    ]
    users = [
        UserProfile(
            "u1", discrete={"city": "paris", "gender": "f"}, multi={"topics": ("t1", "t2")}, numeric={"age": 20.0}
        ),
        UserProfile("u2", discrete={"city": "rome", "gender": "m"}, numeric={"age": 40.0}),
    ]
    clicks = [
        Click("u1", "i1", "r1", 1000),
        Click("u2", "i1", "r2", 1500),
        Click("u1", "i2", "r3", 2000),
        Click("u1", "i3", "r4", 2000),  # same instant as the previous click of u1
        Click("u1", "i2", "r5", 3000),
    ]
    return Dataset.from_events([*items, *users, *clicks])


ITEM_FEATURES = (
    IdFeature("item_id"),
    DiscreteFeature("category", "category"),
    MultiValuedFeature("tags", "tags"),
    ContinuousFeature("price_log", "stats.price", "log"),
    ContinuousFeature("weight", "stats.weight", "standard"),
    ContinuousFeature("price_bucket", "stats.price", "bucket", num_buckets=2),
)
USER_FEATURES = (
    IdFeature("user_id"),
    DiscreteFeature("city", "discrete.city"),
    DiscreteFeature("gender", "discrete.gender", one_hot=3),
    MultiValuedFeature("topics", "multi.topics"),
    ContinuousFeature("age", "numeric.age"),
    LastNFeature("last_n", 2, "item_id"),
)


@pytest.fixture
def encoder() -> FeatureEncoder:
    return FeatureEncoder.fit(catalogue_dataset(), USER_FEATURES, ITEM_FEATURES)


def test_vocab_reserves_zero_for_unknown_and_appends_without_renumbering() -> None:
    vocab = Vocab(["b", "a"])
    assert (vocab.index("b"), vocab.index("a"), vocab.index("zzz")) == (1, 2, 0)
    grown = vocab.extended(["c", "a", "0"])
    # Existing tokens keep 1 and 2; the new ones follow in sorted order: "0" < "c".
    assert grown.tokens == ("b", "a", "0", "c")
    assert grown.lookup(["a", "c", "nope"]).tolist() == [2, 4, 0]
    assert Vocab.from_dict(json.loads(json.dumps(grown.to_dict()))) == grown
    capped = Vocab(["x", "y", "z"], max_size=3)  # unknown + 2 tokens
    assert len(capped) == 3 and capped.index("z") == 0


def test_item_encoding_of_a_hand_built_catalogue(encoder: FeatureEncoder) -> None:
    ds = catalogue_dataset()
    batch = encoder.encode_items(["i1", "i2", "i3", "new"], ds.items)
    assert batch.indices["item_id"].tolist() == [1, 2, 3, 0]
    # Sorted vocabulary: books=1, music=2; an id missing from the catalogue has default features.
    assert batch.indices["category"].tolist() == [1, 2, 1, 0]
    # Tags vocab x=1, y=2; values left-aligned, padding masked.
    assert batch.lists["tags"].tolist() == [[1, 2], [2, 0], [0, 0], [0, 0]]
    assert batch.masks["tags"].tolist() == [[True, True], [True, False], [False, False], [False, False]]
    # log1p(price) = 0, 1, 2 -> standardised with mean 1, std sqrt(2/3): -1.2247, 0, 1.2247; missing -> 0.
    s = math.sqrt(2 / 3)
    assert batch.values["price_log"].tolist() == pytest.approx([-1 / s, 0.0, 1 / s, 0.0], abs=1e-6)
    # weight 1, 3 -> mean 2, std 1; i3 has no weight -> 0 (the mean).
    assert encoder.stats("item", "weight") == pytest.approx({"mean": 2.0, "std": 1.0})
    assert batch.values["weight"].tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])
    # Two buckets split at the median price (e - 1): bucket 1 below, 2 at or above; missing -> 0.
    assert encoder.stats("item", "price_bucket")["edges"] == pytest.approx([E - 1])
    assert batch.indices["price_bucket"].tolist() == [1, 2, 2, 0]


def test_user_encoding_profile_one_hot_cap_and_history(encoder: FeatureEncoder) -> None:
    ds = catalogue_dataset()
    batch = encoder.encode_users(["u1", "u2", "ghost"], ds.users, [["i2", "i1", "i3"], [], ["nope"]])
    assert batch.indices["user_id"].tolist() == [1, 2, 0]
    assert batch.indices["city"].tolist() == [1, 2, 0]
    # one_hot=3 caps the vocabulary at unknown + 2 values: f=1, m=2.
    assert encoder.vocab("user", "gender").tokens == ("f", "m")
    assert batch.indices["gender"].tolist() == [1, 2, 0]
    # Ages 20, 40: mean 30, std 10.
    assert batch.values["age"].tolist() == pytest.approx([-1.0, 1.0, 0.0])
    # last_n = 2 keeps the 2 most recent of i2, i1, i3 -> i1 (1), i3 (3); an unknown item is index 0 but present.
    assert batch.lists["last_n"].tolist() == [[1, 3], [0, 0], [0, 0]]
    assert batch.masks["last_n"].tolist() == [[True, True], [False, False], [True, False]]


def test_click_history_is_strictly_before_the_click(encoder: FeatureEncoder) -> None:
    ds = catalogue_dataset()
    history = ClickHistory(ds.clicks, encoder.item_vocab)
    users = ds.clicks.user.tolist()
    items = ds.clicks.item.tolist()
    # Clicks in time order: (u1,i1,1000) (u2,i1,1500) (u1,i2,2000) (u1,i3,2000) (u1,i2,3000).
    assert list(zip(users, items, strict=True))[:2] == [("u1", "i1"), ("u2", "i1")]
    values, mask = history.at_clicks(np.arange(5), n=5)
    rows = [
        [v for v, m in zip(vr, mr, strict=True) if m] for vr, mr in zip(values.tolist(), mask.tolist(), strict=True)
    ]
    # The two clicks at t=2000 see only i1 (not each other); the click at 3000 sees i1, i2, i3 (vocab 1, 2, 3).
    assert rows == [[], [], [1], [1], [1, 2, 3]]
    values, mask = history.at_clicks(np.array([4]), n=2)
    assert values.tolist() == [[2, 3]] and mask.tolist() == [[True, True]]
    values, mask = history.before(["u1", "u2", "ghost"], 2000, n=3)
    assert values.tolist() == [[1], [1], [0]] and mask.tolist() == [[True], [True], [False]]
    assert history.clicked("u1").tolist() == [1, 2, 3, 2]


def test_json_round_trip_is_plain_json(encoder: FeatureEncoder) -> None:
    text = encoder.to_json()
    json.loads(text)  # plain JSON, nothing else
    again = FeatureEncoder.from_json(text)
    assert again.to_json() == text
    ds = catalogue_dataset()
    a = encoder.encode_items(["i2", "i3"], ds.items)
    b = again.encode_items(["i2", "i3"], ds.items)
    for name in a.indices:
        assert torch.equal(a.indices[name], b.indices[name])
    for name in a.values:
        assert torch.equal(a.values[name], b.values[name])


def test_extend_appends_new_ids_and_values_and_keeps_old_indices(encoder: FeatureEncoder) -> None:
    new_items = [_item("i0", "games", ("z",), {"price": 1e6}), _item("i4", "books", ("x",), {})]
    new_users = [UserProfile("u3", discrete={"city": "oslo", "gender": "x"})]
    day2 = Dataset.from_events([*new_items, *new_users, Click("u3", "i4", "r9", 5000)])
    grown = encoder.extend(day2)
    for tower, name in [
        ("item", "item_id"),
        ("item", "category"),
        ("item", "tags"),
        ("user", "user_id"),
        ("user", "city"),
    ]:
        old, new = encoder.vocab(tower, name), grown.vocab(tower, name)
        assert new.tokens[: len(old.tokens)] == old.tokens
    assert grown.item_vocab.tokens == ("i1", "i2", "i3", "i0", "i4")
    assert grown.vocab("item", "category").index("games") == 3
    assert grown.user_vocab.index("u3") == 3
    # The one-hot vocabulary is full (f, m): "x" stays unknown, the width never changes.
    assert grown.vocab("user", "gender").tokens == ("f", "m")
    assert grown.table_sizes("user")["gender"] == 3
    # Statistics stay as fitted: the trained MLP expects the same scale.
    assert grown.stats("item", "price_log") == encoder.stats("item", "price_log")
    assert grown.table_sizes("user")["last_n"] == len(grown.item_vocab) == 6


def test_table_of_every_vocabulary_row(encoder: FeatureEncoder) -> None:
    ds = catalogue_dataset()
    table = encoder.item_table(ds.items)
    assert len(table) == len(encoder.item_vocab) == 4
    assert table.indices["item_id"].tolist() == [0, 1, 2, 3]
    picked = table.select(torch.tensor([2, 2]))
    # Selecting trims the list width to the widest selected row (i2 has one tag).
    assert picked.lists["tags"].tolist() == [[2], [2]]


def test_default_feature_sets_follow_the_event_contracts() -> None:
    ds = catalogue_dataset()
    users = default_user_features(ds, last_n=7)
    items = default_item_features(ds)
    assert [type(s).__name__ for s in users] == [
        "IdFeature",
        "DiscreteFeature",
        "DiscreteFeature",
        "MultiValuedFeature",
        "ContinuousFeature",
        "LastNFeature",
    ]
    city, gender = users[1], users[2]
    assert (city.source, city.one_hot) == ("discrete.city", 4)  # 2 distinct values: tiny, one-hot
    assert gender.source == "discrete.gender"
    assert users[-1] == LastNFeature("last_n", 7, "item_id")
    assert [s.name for s in items] == ["item_id", "category", "tags", "stats.price", "stats.weight"]


def test_long_tailed_numbers_are_log_transformed() -> None:
    # 30 items, price 1 for 29 of them and 1000 for one: skewness > 2 -> log; a uniform ramp -> standard.
    items = [_item(f"i{k}", "c", (), {"price": 1000.0 if k == 0 else 1.0, "rank": float(k)}) for k in range(30)]
    specs = {s.name: s for s in default_item_features(Dataset.from_events(items))}
    assert specs["stats.price"].transform == "log"
    assert specs["stats.rank"].transform == "standard"


def test_extreme_values_are_clipped_not_overflowed() -> None:
    # Training prices 1, 2, 3 (mean 2, std sqrt(2/3)): 3 -> 1.2247; 1e300 and -1e300 are valid numbers whose
    # z-scores overflow float32 into inf (and the tower into NaN); they enter as +10 / -10. Missing -> 0.
    train = [_item(f"i{k}", "c", (), {"price": float(k)}) for k in (1, 2, 3)]
    spec = ContinuousFeature("stats.price", "stats.price")
    encoder = FeatureEncoder.fit(Dataset.from_events(train), (IdFeature("user_id"),), (IdFeature("item_id"), spec))
    catalogue = {
        "a": _item("a", "c", (), {"price": 3.0}),
        "b": _item("b", "c", (), {"price": 1e300}),
        "c": _item("c", "c", (), {"price": -1e300}),
        "d": _item("d", "c", (), {}),
    }
    values = encoder.encode_items(["a", "b", "c", "d"], catalogue).values["stats.price"]
    assert values.tolist() == pytest.approx([1 / math.sqrt(2 / 3), 10.0, -10.0, 0.0])


def test_specs_are_validated() -> None:
    ds = catalogue_dataset()
    with pytest.raises(ValueError, match="exactly one IdFeature"):
        FeatureEncoder.fit(ds, USER_FEATURES[1:], ITEM_FEATURES)
    with pytest.raises(ValueError, match="unique"):
        FeatureEncoder.fit(ds, USER_FEATURES, (*ITEM_FEATURES, DiscreteFeature("tags", "category")))
    with pytest.raises(ValueError, match="format"):
        FeatureEncoder.from_json(json.dumps({"format": 99}))
