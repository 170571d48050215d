"""Training epochs (every objective, logQ, negatives, SSL, warm start) and the retriever on small synthetic worlds."""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streaming.sources.synthetic import DAY_MS, SyntheticWorld, WorldConfig
from trainer.dataset import Dataset
from trainer.features import FeatureEncoder
from trainer.history import ClickHistory
from trainer.metrics import ranking_metrics
from trainer.model import ModelConfig, TwoTowerModel
from trainer.peers import Popularity
from trainer.retriever import TwoTowerRetriever
from trainer.train import TrainConfig, train_epoch

MODEL = ModelConfig(dim=16, id_dim=16, embedding_dim=8, hidden=(32,))
TRAIN = TrainConfig(batch_size=64, ssl_batch=32)
WORLD = WorldConfig(seed=3, n_users=200, n_items=300, n_categories=8, n_tags=40, days=2.0, requests_per_day=1500.0)


@cache
def world_events() -> tuple:
    return tuple(SyntheticWorld(WORLD).events())


def dataset() -> Dataset:
    return Dataset.from_events(world_events())


def catalogue_loss(model: TwoTowerModel, encoder: FeatureEncoder, ds: Dataset, n: int = 400) -> float:
    """Mean full-softmax cross-entropy of the first ``n`` clicks over every catalogue item, ``-log softmax(cos / tau)``.

    A fixed yardstick outside train_epoch: the exact loss that in-batch softmax with logQ estimates by sampling.
    """
    positions = np.arange(min(n, len(ds.clicks)))
    history = ClickHistory(ds.clicks, encoder.item_vocab).at_clicks(positions, MODEL.last_n)
    users = encoder.encode_users(ds.clicks.user[positions].tolist(), ds.users, history)
    target = torch.from_numpy(encoder.item_vocab.lookup(ds.clicks.item[positions].tolist()))
    with torch.no_grad():
        logits = model.user_vectors(users) @ model.item_vectors(encoder.item_table(ds.items)).T  # [n, V]
        logits[:, 0] = float("-inf")  # row 0 is the unknown item, not a candidate
        return float(F.cross_entropy(logits / model.config.temperature, target))


def test_one_epoch_lowers_the_loss() -> None:
    torch.set_num_threads(1)
    ds = dataset()
    encoder = FeatureEncoder.fit(ds, last_n=MODEL.last_n)
    model = TwoTowerModel(encoder, MODEL)
    before = catalogue_loss(model, encoder, ds)
    stats = train_epoch(model, encoder, ds, TRAIN, progress=False)
    after = catalogue_loss(model, encoder, ds)
    assert stats.examples == len(ds.clicks) and stats.skipped == 0
    assert stats.steps == -(-len(ds.clicks) // TRAIN.batch_size)
    assert after < before - 0.3, (before, after)
    assert stats.last_loss < stats.first_loss
    assert stats.ssl_loss > 0  # the self-supervised term ran


@pytest.mark.parametrize(
    "changes",
    [
        {"objective": "listwise"},
        {"objective": "listwise", "logq": False},
        {"objective": "listwise", "easy_negatives": 32, "hard_fraction": 0.5},
        {"objective": "pointwise", "negative_ratio": 3},
        {"objective": "pairwise_hinge", "hard_fraction": 0.5},
        {"objective": "pairwise_logistic", "ssl_weight": 0.0},
        {"objective": "listwise", "hot_item_threshold": 1e-2, "id_dropout": 0.1, "ssl_method": "rfm"},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_each_objective_trains_without_nan(changes: dict) -> None:
    torch.set_num_threads(1)
    ds = dataset()
    encoder = FeatureEncoder.fit(ds, last_n=MODEL.last_n)
    model = TwoTowerModel(encoder, MODEL)
    before = catalogue_loss(model, encoder, ds)
    stats = train_epoch(model, encoder, ds, dataclasses.replace(TRAIN, **changes), progress=False)
    assert np.isfinite([stats.mean_loss, stats.first_loss, stats.last_loss, stats.main_loss]).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Whatever the objective, the model moved towards ranking clicked items first.
    assert catalogue_loss(model, encoder, ds) < before


def test_logq_changes_the_training_loss_and_approaches_the_full_softmax() -> None:
    ds = dataset()
    encoder = FeatureEncoder.fit(ds, last_n=MODEL.last_n)
    models = {}
    stats = {}
    for logq in (True, False):
        models[logq] = TwoTowerModel(encoder, MODEL)
        stats[logq] = train_epoch(models[logq], encoder, ds, dataclasses.replace(TRAIN, logq=logq), progress=False)
    # Same seed, same init, same first batch: only the -log q_j terms differ.
    assert stats[True].first_loss != pytest.approx(stats[False].first_loss, abs=1e-3)
    # In-batch negatives are drawn in proportion to clicks; without the correction the model learns a softmax
    # that over-punishes hot items, so its full-catalogue loss is clearly worse (measured: 5.0 vs 5.8 nats).
    assert catalogue_loss(models[True], encoder, ds) < catalogue_loss(models[False], encoder, ds) - 0.3


def test_logq_weight_scales_the_correction() -> None:
    ds = dataset()
    encoder = FeatureEncoder.fit(ds, last_n=MODEL.last_n)
    config = dataclasses.replace(TRAIN, easy_negatives=16)  # the sampled negatives' correction is scaled too
    states, first = {}, {}
    for name, changes in {
        "off": {"logq": False},
        "zero": {"logq_weight": 0.0},
        "half": {"logq_weight": 0.5},
        "full": {},
        "one": {"logq_weight": 1.0},
    }.items():
        model = TwoTowerModel(encoder, MODEL)
        first[name] = train_epoch(model, encoder, ds, dataclasses.replace(config, **changes), progress=False).first_loss
        states[name] = model.state_dict()

    def same(a: str, b: str) -> bool:
        return all(torch.equal(states[a][k], states[b][k]) for k in states[a])

    # beta = 0 subtracts 0 * log q: bit for bit the uncorrected run; beta = 1 is the default.
    assert same("zero", "off") and same("one", "full")
    assert not same("half", "off") and not same("half", "full")
    # -beta * log q_j lifts rare columns most; the log-sum-exp over a row follows the lifted rare columns, while
    # the positive, drawn in proportion to clicks like every column, is lifted only as much as an average column.
    # So the first batches' loss grows with beta (measured: 4.90, 5.60, 6.99 nats for beta = 0, 0.5, 1).
    assert first["off"] < first["half"] < first["full"]


def test_hot_item_down_sampling_drops_positives() -> None:
    ds = dataset()
    encoder = FeatureEncoder.fit(ds, last_n=MODEL.last_n)
    stats = train_epoch(
        TwoTowerModel(encoder, MODEL), encoder, ds, dataclasses.replace(TRAIN, hot_item_threshold=1e-3), progress=False
    )
    assert 0 < stats.examples < len(ds.clicks)


def test_training_is_deterministic_for_a_seed() -> None:
    ds = dataset()
    encoder = FeatureEncoder.fit(ds, last_n=MODEL.last_n)
    config = dataclasses.replace(TRAIN, easy_negatives=16)
    states = []
    for seed in (0, 0, 1):
        model = TwoTowerModel(encoder, MODEL)
        train_epoch(model, encoder, ds, dataclasses.replace(config, seed=seed), progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_warm_start_gives_a_lower_initial_loss_and_skips_unknown_items() -> None:
    ds = dataset()
    cut = WORLD.start_ms + DAY_MS
    day1, day2 = ds.between(None, cut), ds.between(cut, None)
    encoder1 = FeatureEncoder.fit(day1, last_n=MODEL.last_n)
    warm = TwoTowerModel(encoder1, MODEL)
    for epoch in range(2):
        train_epoch(warm, encoder1, day1, TRAIN, progress=False, epoch=epoch)

    # Without extending the encoder, clicks on items created on day 2 cannot be trained on.
    unknown = train_epoch(TwoTowerModel(encoder1, MODEL), encoder1, day2, TRAIN, progress=False)
    assert unknown.skipped > 0 and unknown.examples == len(day2.clicks) - unknown.skipped

    encoder2 = encoder1.extend(day2)
    warm.resize(encoder2)
    warm_stats = train_epoch(warm, encoder2, day2, TRAIN, progress=False)
    cold_stats = train_epoch(TwoTowerModel(encoder2, MODEL), encoder2, day2, TRAIN, progress=False)
    assert warm_stats.skipped == cold_stats.skipped == 0
    assert warm_stats.first_loss < cold_stats.first_loss - 0.3, (warm_stats.first_loss, cold_stats.first_loss)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="negative_ratio"):
        TrainConfig(negative_ratio=4)
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hard_fraction"):
        TrainConfig(hard_fraction=1.5)
    with pytest.raises(ValueError, match="logq_weight"):
        TrainConfig(logq_weight=-0.5)
    with pytest.raises(ValueError, match="serving_prior"):
        TwoTowerRetriever(MODEL, TRAIN, serving_prior=float("nan"))


def test_retriever_excludes_training_clicks_and_items_created_later() -> None:
    ds = dataset()
    cut = WORLD.start_ms + DAY_MS
    train = ds.between(None, cut + DAY_MS)  # the catalogue holds every item created before the end
    retriever = TwoTowerRetriever(MODEL, TRAIN, epochs=1)
    retriever.fit(train)
    users = sorted(set(train.clicks.user.tolist()))[:20]
    recs = retriever.recommend(users, 30, cut)
    clicked = {u: set(train.clicks.item[train.clicks.user == u].tolist()) for u in users}
    for user, items in zip(users, recs, strict=True):
        assert len(items) == len(set(items)) == 30
        assert not set(items) & clicked[user]
        assert all(train.items[i].created_ms < cut for i in items)
    ids, vectors = retriever.item_vectors(cut)
    assert vectors.shape == (len(ids), MODEL.dim)
    assert len(ids) == sum(1 for it in train.items.values() if it.created_ms < cut)
    assert retriever.user_vectors(users, cut).shape == (20, MODEL.dim)


def test_one_staged_fit_stops_where_plain_fits_end() -> None:
    # A fit that stops after 1 and after 2 epochs recommends, at each stop, what a plain fit of 1 or 2 epochs does:
    # an epoch depends only on (seed, epoch), and the optimizer has no schedule.
    torch.set_num_threads(1)
    ds = dataset()
    cut = WORLD.start_ms + DAY_MS
    train = ds.between(None, cut)
    users = sorted(set(train.clicks.user.tolist()))[:30]
    staged = TwoTowerRetriever(MODEL, TRAIN)
    at = {}
    for epochs in staged.fit_stages(train, [1, 2]):
        at[epochs] = staged.recommend(users, 20, cut)
    assert sorted(at) == [1, 2] and at[1] != at[2]
    for epochs in (1, 2):
        plain = TwoTowerRetriever(MODEL, TRAIN, epochs=epochs)
        plain.fit(train)
        assert plain.recommend(users, 20, cut) == at[epochs]
    with pytest.raises(ValueError, match="counts >= 1"):
        next(staged.fit_stages(train, [0, 2]))


def test_retriever_beats_popularity_on_a_synthetic_world() -> None:
    torch.set_num_threads(1)
    ds = dataset()
    cut = WORLD.start_ms + int(1.5 * DAY_MS)
    train, test = ds.between(None, cut), ds.between(cut, None).clicks
    seen = set(zip(train.clicks.user.tolist(), train.clicks.item.tolist(), strict=True))
    warm = set(train.clicks.user.tolist())
    relevant: dict[str, set[str]] = {}
    for user, item in zip(test.user.tolist(), test.item.tolist(), strict=True):
        if user in warm and (user, item) not in seen:
            relevant.setdefault(user, set()).add(item)
    users = sorted(relevant)
    scores = {}
    for name, model in (("two_tower", TwoTowerRetriever(MODEL, TRAIN, epochs=3)), ("popularity", Popularity())):
        model.fit(train)
        scores[name] = ranking_metrics(model.recommend(users, 50, cut), [relevant[u] for u in users], (50,), (20,))
    assert scores["two_tower"]["recall@50"] > 1.2 * scores["popularity"]["recall@50"], scores


def test_a_strong_serving_prior_ranks_by_training_clicks() -> None:
    # Seed 004's alternative to logQ: score = cos / tau + gamma * log p_j. With gamma = 1000 the prior term
    # (log-count gaps of at least log(2/1) * 1000 * tau = 35 cosine units between items of different counts)
    # dwarfs any cosine difference (at most 2), so the list is the user's unclicked items by training clicks.
    ds = dataset()
    cut = WORLD.start_ms + DAY_MS
    train = ds.between(None, cut)
    plain = TwoTowerRetriever(MODEL, TRAIN, epochs=1)
    plain.fit(train)
    prior = TwoTowerRetriever(MODEL, TRAIN, epochs=1, serving_prior=1000.0)
    prior.fit(train)
    clicked_items, n = np.unique(train.clicks.item, return_counts=True)
    count = dict(zip(clicked_items.tolist(), n.tolist(), strict=True))
    users = sorted(set(train.clicks.user.tolist()))[:10]
    k = 20
    for user, recs, base in zip(users, prior.recommend(users, k, cut), plain.recommend(users, k, cut), strict=True):
        seen = set(train.clicks.item[train.clicks.user == user].tolist())
        candidates = sorted(
            (count.get(i, 0) for i, it in train.items.items() if it.created_ms < cut and i not in seen), reverse=True
        )
        assert [count.get(i, 0) for i in recs] == candidates[:k]
        assert recs != base  # the plain model ranks by cosine alone


def test_the_serving_prior_is_the_smoothed_click_share_optionally_recency_weighted() -> None:
    from streaming.events import Click, Item, UserProfile

    day = DAY_MS
    events = [Item(i, "c", ("t",), {}, 0, 0) for i in ("a", "b", "c")]
    events += [UserProfile(u, ts_ms=0) for u in ("u1", "u2")]
    events += [Click("u1", "a", "r1", 0), Click("u2", "a", "r2", day), Click("u1", "b", "r3", day)]
    train = Dataset.from_events(events)
    model = TwoTowerRetriever(MODEL, TRAIN, epochs=1, serving_prior=1.0)
    model.fit(train)
    # Catalogue order a, b, c. Counts at day 2: a 2, b 1, c 0; add-one over 3 items: (3, 2, 1) / 6.
    np.testing.assert_allclose(np.exp(model.item_log_prior(2 * day)), [3 / 6, 2 / 6, 1 / 6])
    # Only clicks before the request count: at day 1 just a's first click: (2, 1, 1) / 4.
    np.testing.assert_allclose(np.exp(model.item_log_prior(day)), [2 / 4, 1 / 4, 1 / 4])
    # Half-life 1 day at day 2: a = 2**-2 + 2**-1 = 0.75, b = 0.5, c = 0; total 1.25 + 3 = 4.25.
    model.prior_half_life_days = 1.0
    np.testing.assert_allclose(np.exp(model.item_log_prior(2 * day)), [1.75 / 4.25, 1.5 / 4.25, 1 / 4.25])
