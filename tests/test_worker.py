"""The streaming worker against the real broker: frozen dense layers, dynamic ID tables, broker restarts."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer

from streaming.events import Click, Impression, Item, UserProfile
from streaming.settings import KafkaSettings
from streaming.topics import ensure_topics
from streaming.worker import Worker, WorkerSettings
from tests.conftest import Broker, free_port
from tests.worker_fixtures import produce, produce_raw, register_model, run_to_idle, split_world, wait_for
from trainer.artifact import load_version

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def world_split():
    return split_world()


def test_dense_layers_stay_bit_identical_while_touched_id_rows_move(kafka_settings, tmp_path, world_split):
    world, day_one, day_two = world_split
    registry = register_model(tmp_path / "models", day_one)
    version = load_version(registry.path("v1"))
    dense_before = [p.detach().clone() for p in version.model.dense_parameters()]
    ids_before = [p.detach().clone() for p in version.model.id_embedding_parameters()]
    produce(kafka_settings, day_two)
    # Two malformed records in the middle of the stream: dead-lettered, the stream goes on around them.
    produce_raw(kafka_settings, [("clicks", b"u1", b'{"v": 1, "type": "click"'), ("impressions", b"u1", b'{"v": 9}')])

    settings = WorkerSettings(state_dir=tmp_path / "state", group_id=f"w-{uuid.uuid4().hex[:8]}", batch_size=64)
    worker = Worker(kafka_settings, settings, version)
    run_to_idle(worker)

    clicks = [e for e in day_two if isinstance(e, Click)]
    assert worker.builder.stats.clicks == len(clicks)
    assert worker.learner.examples == len(clicks)  # the idle flush trained the last partial batch too
    dead = worker.metrics.registry.get_sample_value
    assert dead("freshtower_dead_letters_total", {"topic": kafka_settings.topic("clicks")}) == 1
    assert dead("freshtower_dead_letters_total", {"topic": kafka_settings.topic("impressions")}) == 1
    dlq = KafkaConsumer(
        kafka_settings.topic("deadletter"),
        bootstrap_servers=kafka_settings.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    letters = [{k: v.decode() for k, v in m.headers} for m in dlq]
    dlq.close()
    assert sorted((h["source.topic"], h["consumer"]) for h in letters) == [
        (kafka_settings.topic("clicks"), settings.group_id),
        (kafka_settings.topic("impressions"), settings.group_id),
    ]
    # Dense parameters: bit for bit what the full model shipped.
    dense_after = version.model.dense_parameters()
    assert len(dense_after) == len(dense_before) > 0
    assert all(torch.equal(a, b) for a, b in zip(dense_before, dense_after, strict=True))
    # The model's own ID tables are untouched too: online rows live beside them.
    assert all(torch.equal(a, b) for a, b in zip(ids_before, version.model.id_embedding_parameters(), strict=True))
    # Touched rows moved away from their starting point.
    users_vocab = version.encoder.user_vocab
    clicked_users = sorted({c.user_id for c in clicks if c.user_id in users_vocab})
    base = ids_before[0].numpy()
    moved = [not np.allclose(worker.learner.users.row(u), base[users_vocab.index(u)]) for u in clicked_users]
    assert len(moved) > 50 and all(moved)


def test_extreme_valid_events_and_poison_records_leave_every_row_finite(kafka_settings, tmp_path, world_split):
    _, day_one, _ = world_split
    registry = register_model(tmp_path / "models", day_one)
    version = load_version(registry.path("v1"))
    start = day_one[-1].ts_ms + 1000
    # Valid events at the edges of their contracts: an age of 1e300 (standardised, it would overflow float32),
    # a price of 1e300 and a length of 1e-300, ids of 256 characters and ids beyond the BMP.
    odd_user, long_user = "odd-\U0001f600", "u" * 256
    odd_item, long_item = "i-\U0001f3b7", "i" * 256
    events: list = [
        UserProfile(odd_user, {"city": "c1"}, {}, {"age": 1e300, "tenure_days": 1e300}, start),
        UserProfile(long_user, {}, {}, {"age": -1e300}, start),
        Item(odd_item, "c0", ("t1",), {"price": 1e300, "length": 1e-300}, start, start),
        Item(long_item, "c1", (), {"price": -1e300}, start, start),
    ]
    items = [odd_item, long_item, *[e.item_id for e in day_one if isinstance(e, Item)][:6]]
    for k in range(48):
        user = (odd_user, long_user)[k % 2]
        ts = start + 1000 + k * 1000
        events += [Impression(user, items[k % 8], f"r{k}", 0, ts), Click(user, items[k % 8], f"r{k}", ts + 1)]
    produce(kafka_settings, events)
    poison = [b'{"v": 1, "type": ["click"]}', b'{"v": 1, "type": "click", "user_id": "\\ud800"}']
    produce_raw(kafka_settings, [("clicks", b"u1", value) for value in poison])

    settings = WorkerSettings(state_dir=tmp_path / "state", group_id=f"w-{uuid.uuid4().hex[:8]}", batch_size=8)
    worker = Worker(kafka_settings, settings, version)
    run_to_idle(worker)

    learner = worker.learner
    assert learner.examples == 48 and learner.skipped == 0
    get = worker.metrics.registry.get_sample_value
    assert get("freshtower_dead_letters_total", {"topic": kafka_settings.topic("clicks")}) == 2
    assert get("freshtower_sgd_skipped_steps_total") == 0
    default = version.model.user_tower.id_table.weight[0].detach().numpy()
    for user in (odd_user, long_user):
        assert user in learner.users and np.isfinite(learner.users.row(user)).all()
        assert not np.allclose(learner.users.row(user), default)  # admitted and trained, not stuck
    assert all(np.isfinite(learner.items.row(i)).all() for i in items)


def test_new_ids_get_rows_train_and_expire_within_the_bound(kafka_settings, tmp_path, world_split):
    _, day_one, _ = world_split
    registry = register_model(tmp_path / "models", day_one)
    version = load_version(registry.path("v1"))
    start = day_one[-1].ts_ms + 1000
    hour = 3_600_000
    events = [Item(f"new-i{j}", "c0", ("t1",), {}, start, start) for j in range(20)]
    # 300 users the model never saw, two clicks each (admission needs 2), one user every minute;
    # each click is on one of 20 new items.
    for k in range(300):
        ts = start + k * 60_000
        for rep in range(2):
            request = f"r{k}-{rep}"
            item = f"new-i{(k + rep) % 20}"
            events.append(Impression(f"new-u{k}", item, request, 0, ts + rep))
            events.append(Click(f"new-u{k}", item, request, ts + rep + 1))
    produce(kafka_settings, events)

    max_rows, idle_ms = 60, 2 * hour
    settings = WorkerSettings(
        state_dir=tmp_path / "state",
        group_id=f"w-{uuid.uuid4().hex[:8]}",
        batch_size=16,
        min_count=2,
        max_rows=max_rows,
        idle_ms=idle_ms,
        last_n_idle_ms=idle_ms,
        max_last_n_users=max_rows,
        expire_every_batches=1,
    )
    worker = Worker(kafka_settings, settings, version)
    run_to_idle(worker)

    users = worker.learner.users
    assert worker.learner.examples == 600
    assert users.peak_rows == max_rows  # the bound was reached and held: eviction, not growth
    default = version.model.user_tower.id_table.weight[0].detach().numpy()
    # The newest users were admitted on their second click, got a row, and it trained away from the default.
    assert "new-u299" in users and not np.allclose(users.row("new-u299"), default)
    # Users idle for more than 2 h of event time (every one but the last ~2 h) expired back to the default row.
    assert "new-u0" not in users and np.allclose(users.row("new-u0"), default)
    # ... and their last-N lists, by their own expiry and bound: memory does not grow with ever-new users.
    assert "new-u0" not in worker.builder.last_n and "new-u299" in worker.builder.last_n
    assert len(worker.builder.last_n) <= max_rows + settings.batch_size  # bounded at every expiry pass
    live = [k for k in range(300) if f"new-u{k}" in users]
    assert live and min(live) >= 300 - 2 * 60 - 1
    # New items were admitted too (they are clicked again and again) and stay within the bound.
    assert 0 < len(worker.learner.items) <= max_rows


def test_worker_finishes_the_stream_across_a_broker_restart(tmp_path, world_split):
    _, day_one, day_two = world_split
    broker = Broker(free_port(), free_port(), tmp_path / "kafka")
    broker.start()
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, topic_prefix="restart.")
        ensure_topics(kafka)
        registry = register_model(tmp_path / "models", day_one)
        version = load_version(registry.path("v1"))
        half = len(day_two) // 2
        produce(kafka, day_two[:half])
        settings = WorkerSettings(state_dir=tmp_path / "state", group_id="w-restart", batch_size=64)
        worker = Worker(kafka, settings, version)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()

        clicks = [e for e in day_two if isinstance(e, Click)]
        first_half = sum(1 for e in day_two[:half] if isinstance(e, Click))
        wait_for(lambda: worker.builder.stats.clicks >= first_half // 2, 60, "the worker to make progress")
        broker.stop()
        time.sleep(2)  # the worker polls a dead broker meanwhile
        assert thread.is_alive()
        broker.start()
        produce(kafka, day_two[half:])
        wait_for(lambda: worker.learner.examples == len(clicks), 120, "every click to be trained")
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert worker.builder.stats.clicks == len(clicks)
        assert worker.builder.stats.impressions == sum(1 for e in day_two if isinstance(e, Impression))
    finally:
        broker.stop()


def test_a_new_worker_starts_where_its_model_was_trained_up_to(kafka_settings, tmp_path, world_split):
    _, day_one, day_two = world_split
    clicks = [e for e in day_two if isinstance(e, Click)]
    cutoff = clicks[len(clicks) // 3].ts_ms
    # The model has learnt day one and the first third of day two; all of it is in Kafka.
    registry = register_model(tmp_path / "models", day_one + [e for e in day_two if e.ts_ms <= cutoff])
    version = load_version(registry.path("v1"))
    assert version.data_cutoff_ms == cutoff
    produce(kafka_settings, day_one + day_two)

    settings = WorkerSettings(state_dir=tmp_path / "state", group_id=f"w-{uuid.uuid4().hex[:8]}", batch_size=64)
    worker = Worker(kafka_settings, settings, version)
    run_to_idle(worker)
    assert worker.learner.examples == sum(1 for c in clicks if c.ts_ms > cutoff)
    # What came before the cutoff is learnt already: it counts nowhere...
    assert worker.builder.stats.clicks == sum(1 for c in clicks if c.ts_ms > cutoff)
    # ... but the users' last-N lists are whole (every click of the last 30 days, i.e. both days), as serving
    # and the next examples need them, and every profile is known (a compacted topic, read whole).
    every = sorted((e for e in day_one + day_two if isinstance(e, Click)), key=lambda c: c.ts_ms)
    expected: dict[str, list[str]] = {}
    for c in every:
        expected[c.user_id] = [*expected.get(c.user_id, []), c.item_id][-settings.last_n :]
    assert worker.builder.last_n == expected
    profiles = {e.user_id for e in day_one + day_two if isinstance(e, UserProfile)}
    assert profiles and all(worker.builder.profiles.get(u) is not None for u in profiles)
    worker.close()
