"""Serving over a real RocksDB store and real faiss indexes: the user vector, filters, snapshots, the prior, the API.

The model is a small untrained version (its towers are fixed random functions, which is all these tests need);
tests/test_serving_e2e.py runs a trained one behind the real worker and publisher.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from publisher.store import RocksStore
from serving.metrics import ServingMetrics
from serving.recommend import recommend, similar
from serving.settings import ServingSettings
from serving.snapshot import ServedVersions
from serving.user_vector import user_vectors
from serving.worker_records import WorkerRecords
from streaming.events import UserProfile
from streaming.sources.synthetic import WorldConfig
from streaming.state import StateStore
from tests.serving_fixtures import model_rows, publish_version, serving_process
from tests.worker_fixtures import register_model, split_world, wait_for
from trainer.artifact import ModelVersion, load_version

WORLD = WorldConfig(seed=3, n_users=150, n_items=200, days=2.0, requests_per_day=600, new_items_per_day=20)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelVersion]:
    _, day_one, _ = split_world(WORLD)
    models = tmp_path_factory.mktemp("models")
    registry = register_model(models, day_one)
    return models, load_version(registry.path("v1"))


def served_versions(store: Path, models: Path, **changes: object) -> ServedVersions:
    settings = ServingSettings(store_path=store, models_dir=models, **changes)
    return ServedVersions(settings, ServingMetrics(CollectorRegistry(), settings.latency_target_s))


def test_user_vector_is_the_model_user_tower_on_the_published_row(model) -> None:
    _, version = model
    encoder = version.encoder
    user = encoder.user_vocab.tokens[4]
    history = list(version.item_ids[10:13])
    profile = UserProfile(user, {"city": "c1"}, {}, {"age": 31.0})
    batch = encoder.encode_users([user], {user: profile}, [history])
    with torch.no_grad():
        expected = version.model.user_vectors(batch)[0].numpy()  # the model's own ID row of the user
    row = model_rows(version, [user])[user]
    got = user_vectors(version, [user], [row], [history], [profile])[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)
    # A trained row moves the vector; None (an unknown user) is row 0, the default row.
    moved = user_vectors(version, [user], [row + 0.5], [history], [profile])[0]
    assert np.abs(moved - got).max() > 1e-3
    cold = user_vectors(version, ["stranger"], [None], [history], [None])[0]
    with torch.no_grad():
        default = version.model.user_vectors(encoder.encode_users(["stranger"], {}, [history]))[0].numpy()
    np.testing.assert_allclose(cold, default, rtol=0, atol=1e-6)


def test_recommend_filters_clicked_and_removed_items_and_serves_new_ones(model, tmp_path: Path) -> None:
    models, version = model
    user = version.encoder.user_vocab.tokens[0]
    row = model_rows(version, [user])[user]
    with RocksStore(tmp_path / "kv", sync=False) as store:
        publish_version(store, version, 1, users={user: (row, ())})
        served = served_versions(tmp_path / "kv", models)
        try:
            assert served.refresh() and not served.refresh()  # nothing new: no swap
            with served.acquire() as snap:
                first = recommend(snap, user, 10)
            assert (first.publish_version, first.model_version, first.cold) == (1, "v1", False)
            top = [i for i, _ in first.items]
            assert len(top) == 10 and all(a[1] >= b[1] for a, b in zip(first.items, first.items[1:], strict=False))

            # Version 2: the user clicked the first two (they join the last-N); the third is removed from the
            # catalogue; a new item whose vector is the user's query direction arrives.
            query = user_vectors(version, [user], [row], [top[:2]], [None])[0]
            publish_version(
                store,
                version,
                2,
                users={user: (row, tuple(top[:2]))},
                items={"brand-new": query},
                removed_items=frozenset([top[2]]),
            )
            assert served.refresh()
            with served.acquire() as snap:
                second = recommend(snap, user, 10)
                with pytest.raises(LookupError, match="not in the served catalogue"):
                    similar(snap, top[2], 5)
            ids = [i for i, _ in second.items]
            assert second.publish_version == 2 and len(ids) == 10
            assert not {top[0], top[1], top[2]} & set(ids)
            # cos(a, a) = 1 for a unit vector: the new item is first, with score 1.
            assert ids[0] == "brand-new" and second.items[0][1] == pytest.approx(1.0, abs=1e-5)
            # Context of a POST joins the exclusions too.
            with served.acquire() as snap:
                third = recommend(snap, user, 10, recent_items=["brand-new"])
            assert "brand-new" not in [i for i, _ in third.items]
        finally:
            served.close()


@pytest.mark.parametrize("ann_kind", ["ivf", "hnsw"])
def test_auto_index_turns_approximate_above_the_exact_limit_and_follows_removals(
    model, tmp_path: Path, ann_kind
) -> None:
    models, version = model
    with RocksStore(tmp_path / "kv", sync=False) as store:
        publish_version(store, version, 1)
        served = served_versions(tmp_path / "kv", models, exact_max_items=100, ann_kind=ann_kind)
        try:
            served.refresh()
            assert served.current.index.kind == ann_kind and len(served.current.index) == len(version.item_ids)
            item = version.item_ids[5]
            with served.acquire() as snap:
                assert similar(snap, version.item_ids[6], 300).items  # every other item, none missing
                assert item in {i for i, _ in similar(snap, version.item_ids[6], 300).items}
            publish_version(store, version, 2, items={}, removed_items=frozenset([item]))
            served.refresh()
            with served.acquire() as snap:
                found = {i for i, _ in similar(snap, version.item_ids[6], 300).items}
            assert item not in found and len(found) == len(version.item_ids) - 2
        finally:
            served.close()


def test_not_ready_until_the_publisher_has_made_the_store_and_a_version_with_items(model, tmp_path: Path) -> None:
    models, version = model
    served = served_versions(tmp_path / "kv", models)
    try:
        assert not served.refresh() and not served.ready
        with pytest.raises(LookupError, match="no store version"), served.acquire():
            pass
        with RocksStore(tmp_path / "kv", sync=False) as store:
            assert not served.refresh() and not served.ready  # a store, but no version in it yet
            user = version.encoder.user_vocab.tokens[1]
            publish_version(store, version, 1, users={user: (model_rows(version, [user])[user], ())}, items={})
            # Users but no item vector yet: nothing to search, so not ready (an empty index answered 500s).
            assert not served.refresh() and not served.ready
            publish_version(store, version, 2)
            assert served.refresh() and served.current.meta.version == 2
            assert served.current.index.dim == version.item_vectors.shape[1]
    finally:
        served.close()


def test_a_request_keeps_its_version_while_newer_ones_are_swapped_in(model, tmp_path: Path) -> None:
    models, version = model
    user = version.encoder.user_vocab.tokens[1]
    row = model_rows(version, [user])[user]
    with RocksStore(tmp_path / "kv", sync=False) as store:
        publish_version(store, version, 1, users={user: (row, ())})
        served = served_versions(tmp_path / "kv", models)
        try:
            served.refresh()
            with served.acquire() as held:
                publish_version(store, version, 2, users={user: (row * 2, ())}, items={})
                assert served.refresh()  # the other side: no wait for the held request
                assert served.current.meta.version == 2
                with held.view() as view:  # the held side was not caught up: still version 1's row
                    assert view.version() == 1 and view.user(user).version == 1
                    np.testing.assert_array_equal(view.user(user).vector, row)
                publish_version(store, version, 3, items={})
                assert not served.refresh(drain_timeout_s=0.2)  # the held side is the standby now: wait, give up
                assert served.current.meta.version == 2
            assert served.refresh() and served.current.meta.version == 3
        finally:
            served.close()


def test_serve_time_prior_reranks_by_log_click_share(model, tmp_path: Path) -> None:
    models, version = model
    # A serving process started before the worker's first run: no prior, no profile, and no error ...
    early = WorkerRecords(tmp_path / "worker")
    early.catch_up()
    assert early.profile("u1") is None
    np.testing.assert_allclose(early.log_prior(["x", "y"]), np.log([1 / 2, 1 / 2]), rtol=1e-6)
    state = StateStore(tmp_path / "worker", sync=False)
    a, b, c = version.item_ids[1:4]
    # Click counts 3, 1, 0 (and none elsewhere): total 4.
    for item, count in ((a, 3), (b, 1)):
        state.put(b"c:" + item.encode(), count.to_bytes(8, "little", signed=True))
    state.checkpoint({}, {"checkpoints": 1})
    # ... until the worker has made its state: the same reader picks it up at its next catch-up.
    early.catch_up()
    np.testing.assert_allclose(early.log_prior([a, b, c]), np.log([4 / 7, 2 / 7, 1 / 7]), rtol=1e-6)
    early.close()
    records = WorkerRecords(tmp_path / "worker")
    try:
        records.catch_up()
        # Add-one smoothing over the 3 asked-for items: p = (3+1)/(4+3), (1+1)/7, (0+1)/7.
        np.testing.assert_allclose(records.log_prior([a, b, c]), np.log([4 / 7, 2 / 7, 1 / 7]), rtol=1e-6)
        with RocksStore(tmp_path / "kv", sync=False) as store:
            # Three items only, all with the same vector: cosine ties, so the prior alone orders them.
            same = version.item_vectors[0]
            publish_version(store, version, 1, items={c: same, b: same, a: same})
            served = served_versions(tmp_path / "kv", models, worker_state=tmp_path / "worker", prior_gamma=1.0)
            try:
                served.refresh()
                with served.acquire() as snap:
                    plain = recommend(snap, None, 3)
                    prior = recommend(snap, None, 3, records=records, prior_gamma=1.0, prior_candidates=3)
            finally:
                served.close()
        assert [i for i, _ in prior.items] == [a, b, c]
        cos = plain.items[0][1]
        tau = version.model_config.temperature
        # score = cos / τ + γ log p_j, γ = 1
        expected = [cos / tau + np.log(4 / 7), cos / tau + np.log(2 / 7), cos / tau + np.log(1 / 7)]
        np.testing.assert_allclose([s for _, s in prior.items], expected, rtol=1e-5)
    finally:
        records.close()
        state.close()


# ------------------------------------------------------------------------------------------- HTTP


def _malformed(rng: random.Random, known_user: str) -> tuple[str, str, dict]:
    """One request that breaks the API's contract in a random way: (method, path, httpx keyword arguments)."""
    long_id = "x" * rng.randint(257, 2000)
    bad_k = rng.choice(["0", "-1", "501", "1e3", "abc", "", "2.5", str(10**30), "NaN", " "])
    choice = rng.randrange(16)
    if choice == 0:
        return "GET", "/recommend", {"params": {"k": "5"}}
    if choice == 1:
        return "GET", "/recommend", {"params": {"user_id": rng.choice(["", long_id])}}
    if choice == 2:
        return "GET", "/recommend", {"params": {"user_id": known_user, "k": bad_k}}
    if choice == 3:
        return "GET", "/recommend", {"params": {"user_id": known_user, rng.choice(["kk", "user", "x", "K"]): "1"}}
    if choice == 4:
        return "GET", "/recommend", {"params": [("user_id", known_user), ("user_id", "u2")]}
    if choice == 5:
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
        return "POST", "/recommend", {"content": b"{" + junk, "headers": {"content-type": "application/json"}}
    if choice == 6:
        body = rng.choice(["[]", "3", '"u1"', "null", "true", '{"k": 5,}'])
        return "POST", "/recommend", {"content": body, "headers": {"content-type": "application/json"}}
    if choice == 7:
        return "POST", "/recommend", {"json": {"user_id": known_user, rng.choice(["items", "K", "extra"]): 1}}
    if choice == 8:
        bad = rng.choice(
            [{"user_id": 5}, {"k": "ten"}, {"k": 0}, {"k": 10_001}, {"recent_items": "i1"}, {"user_id": ""}]
        )
        return "POST", "/recommend", {"json": bad}
    if choice == 9:
        return "POST", "/recommend", {"json": {"recent_items": ["i1", long_id]}}
    if choice == 10:
        numeric = rng.choice(['{"age": NaN}', '{"age": Infinity}', '{"age": "old"}', '{"age": 1e999}'])
        body = '{"profile": {"numeric": ' + numeric + "}}"
        return "POST", "/recommend", {"content": body, "headers": {"content-type": "application/json"}}
    if choice == 11:
        return "POST", "/recommend", {"json": {"recent_items": [f"i{j}" for j in range(rng.randint(257, 400))]}}
    if choice == 12:
        return "POST", "/recommend", {"content": b"x" * rng.randint(65_537, 200_000)}
    if choice == 13:
        return "GET", "/similar", {"params": rng.choice([{}, {"item_id": long_id}, {"item_id": "no-such-item"}])}
    if choice == 14:
        return rng.choice(["PUT", "DELETE", "PATCH"]), "/recommend", {}
    return "GET", rng.choice(["/recommend/", "/admin", "/similar/x", "/%2e%2e/etc"]), {}


@pytest.mark.slow
def test_api_refuses_1000_malformed_requests_with_4xx_and_keeps_serving(model, tmp_path: Path) -> None:
    models, version = model
    user = version.encoder.user_vocab.tokens[0]
    with RocksStore(tmp_path / "kv", sync=False) as store:
        publish_version(store, version, 1, users=None)
    with serving_process(tmp_path / "kv", models, tmp_path) as served, served.client() as client:
        rng = random.Random(13)
        statuses: dict[int, int] = {}
        for n in range(1200):
            method, path, kwargs = _malformed(rng, user)
            response = client.request(method, path, **kwargs)
            assert 400 <= response.status_code < 500, (n, method, path, kwargs, response.status_code, response.text)
            assert response.headers["content-type"].startswith("application/json")
            assert "error" in response.json() or "detail" in response.json(), response.text
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert {400, 404, 405, 413} <= set(statuses), statuses
        ok = client.get("/recommend", params={"user_id": user, "k": 5})
        assert ok.status_code == 200 and len(ok.json()["items"]) == 5
        metrics = httpx.get(served.metrics_url).text
    assert 'outcome="error"' not in metrics
    assert "Traceback" not in served.log.read_text()


@pytest.mark.slow
def test_bearer_token_guards_the_api_but_not_healthz(model, tmp_path: Path) -> None:
    models, version = model
    with RocksStore(tmp_path / "kv", sync=False) as store:
        publish_version(store, version, 1)
    env = {"FRESHTOWER_SERVING_TOKEN": "s3cret"}
    with serving_process(tmp_path / "kv", models, tmp_path, env=env) as served:
        params = {"user_id": "anyone", "k": 3}
        assert httpx.get(served.url + "/healthz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            refused = httpx.get(served.url + "/recommend", params=params, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in refused.json()["error"]
        with served.client(token="s3cret") as client:
            answer = client.get("/recommend", params=params).json()
        assert answer["cold_start"] is True and len(answer["items"]) == 3


@pytest.mark.slow
def test_two_processes_serve_one_store_and_follow_its_publishes(model, tmp_path: Path) -> None:
    models, version = model
    user = version.encoder.user_vocab.tokens[2]
    row = model_rows(version, [user])[user]
    with RocksStore(tmp_path / "kv", sync=False) as store:
        publish_version(store, version, 1, users={user: (row, ())})
        with (
            serving_process(tmp_path / "kv", models, tmp_path) as one,
            serving_process(tmp_path / "kv", models, tmp_path) as two,
        ):
            publish_version(store, version, 2, users={user: (row, tuple(version.item_ids[:3]))}, items={})
            answers = {}
            for served in (one, two):
                wait_for(lambda s=served: httpx.get(s.url + "/readyz").json()["publish_version"] == 2, 10, "version 2")
                answers[served.url] = httpx.get(served.url + "/recommend", params={"user_id": user, "k": 10}).json()
            a, b = answers.values()
            assert a["publish_version"] == b["publish_version"] == 2
            assert a["items"] == b["items"] and not set(version.item_ids[:3]) & {h["item_id"] for h in a["items"]}
            metrics = httpx.get(one.metrics_url).text
            assert "freshtower_served_publish_version 2.0" in metrics
            assert 'freshtower_served_model_info{version="v1"} 1.0' in metrics
            start = time.monotonic()
            one.process.send_signal(signal.SIGTERM)
            one.process.wait(10)
            assert time.monotonic() - start < 5 and one.process.returncode == 0
            # The other keeps serving.
            assert httpx.get(two.url + "/recommend", params={"user_id": user}).status_code == 200
    assert json.loads(json.dumps(a))  # answers are plain JSON
