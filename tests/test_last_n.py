"""A user's last-N outlives the user's ID row, so a returning user trains with the list serving reads (no broker)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from publisher.worker_source import WorkerSource
from streaming.events import Click, Impression
from streaming.examples import ExampleBuilder, ExampleSettings
from streaming.learner import IncrementalLearner
from streaming.metrics import WorkerMetrics
from streaming.state import StateStore
from streaming.worker import Worker
from streaming.worker_settings import WorkerSettings
from tests.worker_fixtures import register_model, split_world
from trainer.artifact import load_version

torch.set_num_threads(1)
DAY = 86_400_000


def _click(user: str, item: str, ts: int) -> Click:
    return Click(user, item, f"r-{user}-{item}-{ts}", ts)


def test_a_user_back_after_the_row_expired_trains_and_is_served_with_the_whole_list(tmp_path: Path) -> None:
    _, day_one, _ = split_world()
    models = tmp_path / "models"
    version = load_version(register_model(models, day_one).path("v1"))
    users = list(version.encoder.user_vocab.tokens)
    items = list(version.encoder.item_vocab.tokens)
    user, other = users[0], users[1]
    settings = WorkerSettings(state_dir=tmp_path / "state", last_n=3)  # rows go after 3 days idle, lists after 30
    state = StateStore(settings.state_dir, sync=False)
    builder = ExampleBuilder(settings.examples(), state)
    learner = IncrementalLearner(version.model, version.encoder, builder, settings.learner(), state)

    t0 = 1_700_000_000_000
    clicks = [_click(user, items[k], t0 + k) for k in range(4)] + [_click(other, items[5], t0 + 5)]
    learner.learn_batch([builder.add(c) for c in clicks])
    assert user in learner.users and builder.last_n[user] == items[1:4]

    # Four days later another user clicks: the worker's training step (its expiry pass, every batch here) drops
    # the idle user's row, not the list.
    worker = SimpleNamespace(
        settings=dataclasses.replace(settings, expire_every_batches=1),
        metrics=WorkerMetrics(),
        learner=learner,
        builder=builder,
        pending=[builder.add(_click(other, items[k], t0 + 4 * DAY + k)) for k in (6, 7)],
        item_path=None,  # item rows trained here (item_rows = "local")
    )
    Worker._train(worker)
    assert user not in learner.users
    assert builder.last_n[user] == items[1:4]

    # What the publisher reads for the user now: the model's own row (the online one expired) and the same list.
    learner.flush()
    state.checkpoint({}, {"checkpoints": 1, "model_version": "v1", "watermark_ms": builder.watermark_ms})
    with WorkerSource(settings.state_dir, models, tmp_path / "secondary") as source:
        published = source.changes_since("").users[user]
    weight = version.model.user_tower.id_table.weight.detach().numpy()
    np.testing.assert_array_equal(published[0], weight[version.encoder.user_vocab.index(user)])
    assert published[1] == tuple(items[1:4])

    # The user comes back: the example of the click carries that very list, as serving's user vector does.
    back = builder.add(_click(user, items[8], t0 + 4 * DAY + 2))
    assert back.history == published[1] == tuple(items[1:4])
    assert builder.last_n[user] == [*items[2:4], items[8]]
    state.close()


def test_lists_expire_on_their_own_clock_and_bound_least_recently_active_first(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state", sync=False)
    settings = ExampleSettings(last_n=2, last_n_idle_ms=100, max_last_n_users=2)
    builder = ExampleBuilder(settings, state)
    for user, ts in (("a", 10), ("b", 20), ("c", 20)):
        builder.add(_click(user, "i1", ts))
    builder.changed_users.clear()
    builder.expire()  # three lists, room for two: the least recently active goes
    assert sorted(builder.last_n) == ["b", "c"] and builder.changed_users == {"a"}
    builder.add(_click("d", "i2", 30))
    builder.expire()  # b and c were last active at the same time: the tie goes by user id
    assert sorted(builder.last_n) == ["c", "d"]
    state.checkpoint({}, {"watermark_ms": builder.watermark_ms})
    assert json.loads(state.get(b"n:c")) == ["i1"] and state.get(b"n:b") is None and state.get(b"na:b") is None

    # Reloaded, the lists come back with their activity times; 125 ms of event time idles out c (20) but not d (30).
    again = ExampleBuilder(settings, state)
    assert again.last_n == {"c": ["i1"], "d": ["i2"]}
    again.add(Impression("e", "i3", "r-e", 0, 125))
    again.expire()
    assert again.last_n == {"d": ["i2"]}


def test_a_list_from_a_checkpoint_without_activity_times_counts_as_active_at_its_watermark(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state", sync=False)
    state.put(b"n:old", json.dumps(["i1", "i2"]).encode())
    state.checkpoint({}, {"watermark_ms": 1_000})
    builder = ExampleBuilder(ExampleSettings(last_n_idle_ms=100), state)
    builder.add(Impression("e", "i3", "r-e", 0, 1_099))
    builder.expire()
    assert builder.last_n == {"old": ["i1", "i2"]}
    builder.add(Impression("e", "i3", "r-e2", 0, 1_101))
    builder.expire()
    assert builder.last_n == {}
