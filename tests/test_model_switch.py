"""A newly promoted full model replaces the online one: fresh ID rows, clicks after its cutoff replayed, once."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest
import torch

from streaming.events import Click
from streaming.worker import Worker, WorkerSettings
from tests.worker_fixtures import produce, promote_second_version, register_model, split_world, wait_for
from trainer.artifact import load_version

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("when", ["live", "at_restart"])
def test_switch_replays_the_clicks_after_the_cutoff_once(kafka_settings, tmp_path, when):
    _, day_one, day_two = split_world()
    registry = register_model(tmp_path / "models", day_one)
    produce(kafka_settings, day_two)
    clicks = [e for e in day_two if isinstance(e, Click)]
    cutoff = clicks[len(clicks) // 2].ts_ms
    after_cutoff = [c for c in clicks if c.ts_ms > cutoff]
    settings = WorkerSettings(
        state_dir=tmp_path / "state", group_id=f"w-{uuid.uuid4().hex[:8]}", batch_size=64, model_poll_s=0.2
    )

    worker = Worker(kafka_settings, settings, load_version(registry.path("v1")), registry=registry)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(lambda: worker.learner.examples == len(clicks), 120, "the stream to be learnt under v1")
    if when == "at_restart":
        stop.set()
        thread.join(timeout=60)
        promote_second_version(registry, day_one + [e for e in day_two if e.ts_ms <= cutoff], cutoff)
        worker = Worker(kafka_settings, settings, load_version(registry.path("v2")), registry=registry)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
    else:
        promote_second_version(registry, day_one + [e for e in day_two if e.ts_ms <= cutoff], cutoff)
    v2 = load_version(registry.path("v2"))

    # Every click after v2's cutoff is learnt again, through v2, exactly once.
    wait_for(lambda: worker.learner.examples == len(clicks) + len(after_cutoff), 120, "the replay")
    time.sleep(1.0)  # anything applied twice would show up now
    stop.set()
    thread.join(timeout=60)
    assert worker.model_version == "v2"
    assert worker.learner.examples == len(clicks) + len(after_cutoff)
    # What Prometheus sees: the model in use and how fresh its data is (FreshtowerModelStale).
    metrics = worker.metrics.registry
    assert metrics.get_sample_value("freshtower_model_info", {"version": "v2"}) == 1.0
    assert metrics.get_sample_value("freshtower_model_data_cutoff_timestamp_seconds") == cutoff / 1000
    assert metrics.get_sample_value("freshtower_model_created_timestamp_seconds") == v2.manifest["created_ms"] / 1000
    assert metrics.get_sample_value("freshtower_model_switches_total") == (1.0 if when == "live" else 0.0)
    # The stream's statistics are not counted twice by the replay.
    assert worker.builder.clicks == dict(Counter(c.item_id for c in clicks))
    assert worker.builder.stats.clicks == len(clicks)
    # Online rows were reset: only users who clicked after the cutoff hold rows now, trained through v2.
    users_after = {c.user_id for c in after_cutoff}
    known_after = {u for u in users_after if u in v2.encoder.user_vocab}
    before_only = {c.user_id for c in clicks} - users_after
    assert known_after and all(u in worker.learner.users for u in known_after)
    assert before_only and not any(u in worker.learner.users for u in before_only)
    # v2's dense layers stay exactly as promoted.
    fresh = load_version(registry.path("v2"))
    for a, b in zip(fresh.model.dense_parameters(), worker.learner.model.dense_parameters(), strict=True):
        assert torch.equal(a, b)
