"""The towers, the two-tower model (late fusion, parameter groups, warm-start resize) and the SSL item views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streaming.events import Click, Item, UserProfile
from trainer.augment import ItemAugmenter, mask_features, mutual_information
from trainer.dataset import Dataset
from trainer.features import (
    DiscreteFeature,
    FeatureBatch,
    FeatureEncoder,
    IdFeature,
    MultiValuedFeature,
)
from trainer.history import ClickHistory
from trainer.model import ModelConfig, TwoTowerModel
from trainer.towers import Tower, masked_mean, recency_pool

CONFIG = ModelConfig(dim=8, id_dim=4, embedding_dim=3, hidden=(16,), seed=1)


def world(n_items: int = 12, n_users: int = 6, prefix: str = "") -> Dataset:
    """A small deterministic catalogue: category = item % 3, tags from the category, one click per (user, item)."""
    items = [
        Item(f"i{k}", f"c{k % 3}", (f"t{k % 3}", f"t{k % 2 + 3}"), {"price": float(1 + k), "views": float(k * k)}, 0, 0)
        for k in range(n_items)
    ]
    users = [
        UserProfile(
            f"{prefix}u{u}",
            discrete={"city": f"city{u % 2}"},
            multi={"topics": (f"c{u % 3}",)},
            numeric={"age": 20.0 + u},
        )
        for u in range(n_users)
    ]
    clicks = [
        Click(f"{prefix}u{u}", f"i{(u + 3 * j) % n_items}", f"r{u}-{j}", 1000 * (j + 1))
        for u in range(n_users)
        for j in range(3)
    ]
    return Dataset.from_events([*items, *users, *clicks])


def batches(encoder: FeatureEncoder, ds: Dataset) -> tuple[FeatureBatch, FeatureBatch]:
    users = sorted(ds.users)
    history = ClickHistory(ds.clicks, encoder.item_vocab).before(users, 10_000, CONFIG.last_n)
    return encoder.encode_users(users, ds.users, history), encoder.encode_items(sorted(ds.items), ds.items)


def test_masked_mean_by_hand() -> None:
    emb = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]], [[7.0, 7.0]] * 3])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    # Row 0: mean of (1,2),(3,4) = (2,3); row 1: (5,6); row 2: no value -> zeros.
    assert masked_mean(emb, mask).tolist() == [[2.0, 3.0], [5.0, 6.0], [0.0, 0.0]]


def test_recency_pool_by_hand() -> None:
    emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]], [[2.0, 2.0], [0.0, 0.0], [0.0, 0.0]], [[7.0, 7.0]] * 3])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    # Age 0 (the newest click) has logit log 3, age 1 logit 0: row 0's newest click (0,1) weighs 3/4, its older
    # one (1,0) 1/4; row 1 has one click (weight 1); row 2 none (zeros). Zero logits are the plain mean.
    logits = torch.tensor([math.log(3.0), 0.0, 0.0])
    assert torch.allclose(recency_pool(emb, mask, logits), torch.tensor([[0.25, 0.75], [2.0, 2.0], [0.0, 0.0]]))
    assert torch.equal(recency_pool(emb, mask, torch.zeros(3)), masked_mean(emb, mask))
    # Ages past the last logit share it: with 2 logits, ages 1 and 2 of a 3-click row both take logits[1].
    three = torch.tensor([[[1.0], [2.0], [3.0]]])
    pooled = recency_pool(three, torch.ones(1, 3, dtype=torch.bool), torch.tensor([math.log(2.0), 0.0]))
    assert torch.allclose(pooled, torch.tensor([[(1.0 + 2.0 + 2 * 3.0) / 4]]))


def test_recency_pooling_starts_as_the_mean_and_learns_per_age_weights() -> None:
    ds = world()
    encoder = FeatureEncoder.fit(ds, last_n=CONFIG.last_n)
    mean = TwoTowerModel(encoder, CONFIG)
    recency = TwoTowerModel(encoder, ModelConfig(**{**CONFIG.to_dict(), "last_n_pooling": "recency"}))
    users, _ = batches(encoder, ds)
    with torch.no_grad():
        # Zero logits: the same model (up to rounding: softmax weights against a division by the count).
        assert torch.allclose(mean.user_vectors(users), recency.user_vectors(users), atol=1e-6)
    extra = {n for n, _ in recency.named_parameters()} - {n for n, _ in mean.named_parameters()}
    assert extra == {"user_tower.recency.last_n"}
    assert any(p is recency.user_tower.recency["last_n"] for p in recency.dense_parameters())
    recency.user_vectors(users).sum().backward()
    assert recency.user_tower.recency["last_n"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="last_n_pooling"):
        ModelConfig(last_n_pooling="attention")


def test_multi_valued_mean_pooling_against_a_hand_computation() -> None:
    tower = Tower(
        (IdFeature("item_id"), MultiValuedFeature("tags", "tags")),
        {"item_id": 3, "tags": 4},
        dim=2,
        id_dim=1,
        embedding_dim=2,
        hidden=(),
    )
    with torch.no_grad():
        tower.table("item_id").weight.copy_(torch.tensor([[0.0], [10.0], [20.0]]))
        tower.table("tags").weight.copy_(torch.tensor([[100.0, 100.0], [1.0, 2.0], [3.0, 6.0], [5.0, 1.0]]))
    batch = FeatureBatch(
        indices={"item_id": torch.tensor([1, 2])},
        lists={"tags": torch.tensor([[1, 2, 3], [3, 0, 0]])},
        masks={"tags": torch.tensor([[True, True, True], [True, False, False]])},
    )
    # Row 0: id 10, tags mean((1,2),(3,6),(5,1)) = (3,3); row 1: id 20, tags (5,1); padding row 0 (100s) ignored.
    assert tower.inputs(batch).tolist() == [[10.0, 3.0, 3.0], [20.0, 5.0, 1.0]]


def test_towers_output_unit_vectors_of_the_configured_dim() -> None:
    ds = world()
    encoder = FeatureEncoder.fit(ds, last_n=CONFIG.last_n)
    model = TwoTowerModel(encoder, CONFIG)
    users, items = batches(encoder, ds)
    u, v = model.user_vectors(users), model.item_vectors(items)
    assert u.shape == (6, 8) and v.shape == (12, 8)
    assert torch.allclose(u.norm(dim=1), torch.ones(6), atol=1e-6)
    assert torch.allclose(v.norm(dim=1), torch.ones(12), atol=1e-6)
    # forward() is the row-wise cosine: late fusion, nothing else.
    assert torch.allclose(model(users, items.select(torch.arange(6))), (u * v[:6]).sum(1))


def test_no_user_input_reaches_the_item_tower() -> None:
    ds = world()
    encoder = FeatureEncoder.fit(ds, last_n=CONFIG.last_n)
    model = TwoTowerModel(encoder, CONFIG)
    users, items = batches(encoder, ds)
    before = model.item_vectors(items).detach().clone()
    # Gradients of anything computed from the user tower never touch an item-tower parameter.
    model.user_vectors(users).sum().backward()
    assert all(p.grad is None for p in model.item_tower.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.user_tower.parameters())
    # Changing every user input (ids, profiles, history) leaves the item vectors as they were.
    scrambled = FeatureBatch(
        {k: torch.zeros_like(v) for k, v in users.indices.items()},
        {k: v + 5.0 for k, v in users.values.items()},
        users.lists,
        {k: torch.zeros_like(v) for k, v in users.masks.items()},
    )
    model.user_vectors(scrambled)
    assert torch.equal(model.item_vectors(items), before)
    assert not (set(map(id, model.user_tower.parameters())) & set(map(id, model.item_tower.parameters())))


def test_id_and_dense_parameters_partition_the_model() -> None:
    ds = world()
    encoder = FeatureEncoder.fit(ds, last_n=CONFIG.last_n)
    model = TwoTowerModel(encoder, CONFIG)
    ids = model.id_embedding_parameters()
    dense = model.dense_parameters()
    everything = list(model.parameters())
    assert len(ids) + len(dense) == len(everything)
    assert {id(p) for p in ids} | {id(p) for p in dense} == {id(p) for p in everything}
    assert not {id(p) for p in ids} & {id(p) for p in dense}
    # Exactly the user-ID table (6 users + unknown) and the item-ID table (12 items + unknown).
    assert [tuple(p.shape) for p in ids] == [(7, 4), (13, 4)]


def test_resize_keeps_old_rows_bit_identical_and_new_rows_start_at_the_default() -> None:
    day1 = world(n_items=12)
    encoder = FeatureEncoder.fit(day1, last_n=CONFIG.last_n)
    model = TwoTowerModel(encoder, CONFIG)
    old_state = {k: v.clone() for k, v in model.state_dict().items()}
    _, old_items = batches(encoder, day1)
    old_vectors = model.item_vectors(old_items).detach()

    day2 = world(n_items=15, prefix="new-")  # 3 new items, 6 new users
    grown = encoder.extend(day2)
    model.resize(grown)
    state = model.state_dict()
    assert set(state) == set(old_state)
    for key, old in old_state.items():
        new = state[key]
        assert torch.equal(new[: old.shape[0]], old), key  # old rows (and every dense tensor) unchanged
        if new.shape != old.shape:
            assert torch.equal(new[old.shape[0] :], old[:1].expand(new.shape[0] - old.shape[0], -1)), key
    assert state["item_tower.embeddings.item_id.weight"].shape == (16, 4)
    assert state["user_tower.embeddings.user_id.weight"].shape == (13, 4)
    # Old items keep their vectors exactly: a warm start changes nothing until training does.
    _, same_items = batches(grown, day1)
    assert torch.equal(model.item_vectors(same_items), old_vectors)
    with pytest.raises(ValueError, match="shrink"):
        model.resize(encoder)


def test_state_dict_round_trip_into_a_model_built_from_the_same_encoder() -> None:
    ds = world()
    encoder = FeatureEncoder.from_json(FeatureEncoder.fit(ds, last_n=CONFIG.last_n).to_json())
    model = TwoTowerModel(encoder, CONFIG)
    other = TwoTowerModel(encoder, ModelConfig.from_dict({**CONFIG.to_dict(), "seed": 2}))
    users, items = batches(encoder, ds)
    assert not torch.equal(model.user_vectors(users), other.user_vectors(users))
    other.load_state_dict(model.state_dict())
    assert torch.equal(model.user_vectors(users), other.user_vectors(users))
    assert all(type(v) is torch.Tensor for v in model.state_dict().values())


def test_mutual_information_by_hand() -> None:
    # 4 items: a = (0, 0, 1, 1), b = a (perfectly dependent), c = (0, 1, 0, 1) (independent of a).
    # I(a; b) = H(a) = log 2; I(a; c) = 0; I(id; a) = H(a) = log 2; H(id) = log 4.
    specs = (IdFeature("item_id"), DiscreteFeature("a", "a"), DiscreteFeature("b", "b"), DiscreteFeature("c", "c"))
    batch = FeatureBatch(
        indices={
            "item_id": torch.tensor([1, 2, 3, 4]),
            "a": torch.tensor([1, 1, 2, 2]),
            "b": torch.tensor([2, 2, 1, 1]),
            "c": torch.tensor([1, 2, 1, 2]),
        }
    )
    mi = mutual_information(batch, specs)
    ln2 = math.log(2)
    expected = np.array(
        [
            [2 * ln2, ln2, ln2, ln2],
            [ln2, ln2, ln2, 0.0],
            [ln2, ln2, ln2, 0.0],
            [ln2, 0.0, 0.0, ln2],
        ]
    )
    np.testing.assert_allclose(mi, expected, atol=1e-12)
    # A multi-valued feature spreads weight 1/count over its values (a value drawn at random from the item):
    # item 1 tags {x, y} -> (1/2, 1/2), item 2 tags {x} -> (1, 0); P(x) = 3/4, P(y) = 1/4.
    multi = FeatureBatch(
        indices={"item_id": torch.tensor([1, 2])},
        lists={"tags": torch.tensor([[1, 2], [1, 0]])},
        masks={"tags": torch.tensor([[True, True], [True, False]])},
    )
    mi = mutual_information(multi, (IdFeature("item_id"), MultiValuedFeature("tags", "tags")))
    # I(id; tags) = H(tags) - mean_r H(tags | item r) = -(3/4 ln 3/4 + 1/4 ln 1/4) - (ln 2) / 2 = 0.215762.
    assert mi[0, 1] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) - ln2 / 2)
    # The diagonal pairs two values drawn from the same item: P(x,x) = 5/8, P(x,y) = P(y,x) = P(y,y) = 1/8:
    # 5/8 ln((5/8)/(9/16)) + 2/8 ln((1/8)/(3/16)) + 1/8 ln((1/8)/(1/16)) = 0.051127.
    expected_self = 0.625 * math.log(10 / 9) + 0.25 * math.log(2 / 3) + 0.125 * ln2
    assert mi[1, 1] == pytest.approx(expected_self)


def test_correlated_masking_groups_the_most_informative_features() -> None:
    specs = (IdFeature("item_id"), DiscreteFeature("a", "a"), DiscreteFeature("b", "b"), DiscreteFeature("c", "c"))
    # a and b share the most information; c is closest to the id.
    mi = np.array([[3.0, 0.5, 0.4, 0.3], [0.5, 1.0, 0.9, 0.1], [0.4, 0.9, 1.0, 0.2], [0.3, 0.1, 0.2, 1.0]])
    augmenter = ItemAugmenter(specs, mi, method="cfm")
    rng = np.random.default_rng(0)
    splits = {augmenter.split(rng) for _ in range(50)}
    # Half = 2 features: the seed and its most informative partner. Seed id -> a; seed a -> b; seed b -> a;
    # seed c -> id. The first half is listed in feature order.
    assert splits <= {
        (("item_id", "a"), ("b", "c")),
        (("a", "b"), ("item_id", "c")),
        (("item_id", "c"), ("a", "b")),
    }
    assert len(splits) == 3


def test_augmented_views_are_complementary_and_differ() -> None:
    ds = world(n_items=30)
    encoder = FeatureEncoder.fit(ds, last_n=CONFIG.last_n)
    table = encoder.item_table(ds.items).select(torch.arange(1, 31))
    for method in ("cfm", "rfm"):
        augmenter = ItemAugmenter.fit(encoder.item_features, table, method=method)
        rng = np.random.default_rng(3)
        keep1, keep2 = augmenter.split(rng)
        names = {s.name for s in encoder.item_features}
        assert set(keep1) | set(keep2) == names and not set(keep1) & set(keep2)
        assert len(keep1) == len(names) // 2
        view1, view2 = augmenter.apply(table, (keep1, keep2), rng)
        for view, kept, masked in ((view1, keep1, keep2), (view2, keep2, keep1)):
            for name in masked:  # masked -> default everywhere
                for group in (view.indices, view.values, view.masks):
                    if name in group:
                        assert not group[name].any(), (method, name)
            for name in kept:  # kept -> unchanged, except that multi-valued values may be dropped
                if name in view.indices:
                    assert torch.equal(view.indices[name], table.indices[name])
                if name in view.values:
                    assert torch.equal(view.values[name], table.values[name])
                if name in view.masks:
                    assert not (view.masks[name] & ~table.masks[name]).any()
                    kept_share = view.masks[name].sum() / table.masks[name].sum()
                    assert 0.2 < float(kept_share) < 0.8, "about half of the values are dropped"
        model = TwoTowerModel(encoder, CONFIG)
        v1, v2 = model.item_vectors(view1), model.item_vectors(view2)
        assert (v1 - v2).abs().sum(dim=1).min() > 0


def test_mask_features_sets_defaults() -> None:
    batch = FeatureBatch(
        indices={"a": torch.tensor([3, 4])},
        values={"x": torch.tensor([1.5, -2.0])},
        lists={"tags": torch.tensor([[1, 2]])[[0, 0]]},
        masks={"tags": torch.tensor([[True, True], [True, False]])},
    )
    masked = mask_features(batch, ["a", "tags"])
    assert masked.indices["a"].tolist() == [0, 0]
    assert masked.values["x"].tolist() == [1.5, -2.0]
    assert not masked.masks["tags"].any()


def test_id_rows_passed_in_replace_the_id_table_lookup() -> None:
    ds = world()
    encoder = FeatureEncoder.fit(ds, last_n=CONFIG.last_n)
    model = TwoTowerModel(encoder, CONFIG)
    users, items = batches(encoder, ds)
    # The rows the table would look up give exactly the ordinary vectors ...
    rows = model.item_tower.id_table(items.indices["item_id"]).detach()
    assert torch.equal(model.item_tower(items, id_rows=rows), model.item_vectors(items))
    # ... other rows change them, and gradients reach the rows passed in (the online learner's leaf tensors).
    leaf = torch.zeros_like(rows, requires_grad=True)
    moved = model.item_tower(items, id_rows=leaf)
    assert not torch.equal(moved, model.item_vectors(items))
    moved.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="id_rows must be"):
        model.user_tower(users, id_rows=torch.zeros(len(users), CONFIG.id_dim + 1))
