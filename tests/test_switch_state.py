"""The stream's logQ estimate across a model switch, without a broker: each click counted once, by hand.

The estimate (``from_second_sighting``) of an item seen once, at step ``s``, is ``p = 1 / max(1, step - s)``; seen
again at step ``t`` its gap ``t - s`` seeds ``B`` and ``p = 1 / B``; every later sighting moves ``B`` by
``alpha * (gap - B)`` (trainer/frequency.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from streaming.examples import Example, ExampleBuilder, ExampleSettings
from streaming.learner import IncrementalLearner, LearnerSettings, count_clicks, load_frequency
from streaming.model_switch import ModelSwitch
from streaming.sources.synthetic import WorldConfig
from streaming.state import StateStore
from streaming.worker_settings import WorkerSettings
from tests.worker_fixtures import split_world
from trainer.dataset import Dataset
from trainer.features import FeatureEncoder
from trainer.model import ModelConfig, TwoTowerModel

torch.set_num_threads(1)
WORLD = WorldConfig(seed=4, n_users=60, n_items=80, days=2.0, requests_per_day=800)


@pytest.fixture()
def learnt(tmp_path: Path) -> tuple[IncrementalLearner, StateStore, dict[str, Example]]:
    """A learner that counted three live batches, [a, b], [b], [b] (steps 1..3), then a replayed [a]."""
    _, day_one, day_two = split_world(WORLD)
    encoder = FeatureEncoder.fit(Dataset.from_events(day_one))
    model = TwoTowerModel(encoder, ModelConfig(dim=8, id_dim=8, embedding_dim=4, hidden=(16,)))
    state = StateStore(tmp_path / "state", sync=False)
    builder = ExampleBuilder(ExampleSettings(last_n=5), state)
    learner = IncrementalLearner(model, encoder, builder, WorkerSettings().learner(), state)
    examples = [x for x in (builder.add(e) for e in day_two) if x is not None]
    by_item: dict[str, Example] = {}
    for x in examples:
        by_item.setdefault(x.item_id, x)
    a, b, c = list(by_item.values())[:3]
    ex = {"a": a, "b": b, "c": c}
    for batch in ([a, b], [b], [b]):
        learner.learn_batch(batch)
    return learner, state, ex


def test_a_replayed_click_is_learnt_but_not_counted_again(learnt) -> None:
    learner, _, ex = learnt
    a, b, c = (ex[k].item_id for k in "abc")
    # a: seen once at step 1, now step 3: 1 / (3 - 1). b: seeded with gap 1 at step 2, then gap 1 again: 1.
    np.testing.assert_allclose(learner.frequency.probability([a, b]), [1 / 2, 1.0])
    batches = learner.batches
    replayed = [dataclasses.replace(ex["a"], replay=True), dataclasses.replace(ex["c"], replay=True)]
    learner.learn_batch(replayed)
    assert learner.batches == batches + 1  # learnt through the new model ...
    assert learner.frequency.step == 3  # ... but not a step of the stream: a and c were counted when they came
    np.testing.assert_allclose(learner.frequency.probability([a, b, c]), [1 / 2, 1.0, 1e-6])
    # A batch mixing replayed and live clicks counts the live ones only: step 4, a's gap 4 - 1 = 3 seeds B.
    learner.learn_batch([replayed[0], ex["a"]])
    assert learner.frequency.step == 4
    np.testing.assert_allclose(learner.frequency.probability([a, c]), [1 / 3, 1e-6])


def test_a_switch_counts_the_dropped_batch_once_and_keeps_the_estimate(learnt) -> None:
    learner, state, ex = learnt
    a, b, c = (ex[k].item_id for k in "abc")
    learner.flush()
    # The checkpoint a switch starts from: an unfinished batch of one live click on a and a replayed one on c.
    pending = [dataclasses.asdict(ex["a"]), dataclasses.asdict(dataclasses.replace(ex["c"], replay=True))]
    state.checkpoint({}, {"model_version": "v1", "pending": pending, **learner.meta()})
    assert any(True for _ in state.scan(b"t:user:"))

    settings = WorkerSettings()
    switch = ModelSwitch()
    switch.state, switch.settings, switch.model_version = state, settings, "v1"
    switch._reset_tables(SimpleNamespace(version_id="v2", data_cutoff_ms=999, train_config=None))

    meta = state.meta()
    assert (meta["model_version"], meta["replay_from_ms"], meta["pending"]) == ("v2", 1000, [])
    assert not any(True for _ in state.scan(b"t:"))  # the old model's rows are gone ...
    estimate = load_frequency(state, settings.learner())
    # ... the stream's estimate is not: the dropped click on a is step 4 (gap 4 - 1 = 3 seeds B), c still unseen.
    assert meta["frequency_step"] == estimate.step == 4
    np.testing.assert_allclose(estimate.probability([a, b, c]), [1 / 3, 1.0, 1e-6])
    # The new model's learner starts from it, and the replayed batch (a, c) does not count them again.
    fresh = IncrementalLearner(learner.model, learner.encoder, learner.builder, settings.learner(), state)
    assert fresh.frequency.step == 4
    fresh.learn_batch([dataclasses.replace(ex["a"], replay=True), dataclasses.replace(ex["c"], replay=True)])
    np.testing.assert_allclose(fresh.frequency.probability([a, b, c]), [1 / 3, 1.0, 1e-6])


def test_count_clicks_stages_one_step_over_the_checkpointed_estimate(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state", sync=False)
    settings = LearnerSettings()
    assert count_clicks(state, settings, ["x", "y"]) == 1
    state.checkpoint({}, {"frequency_step": 1})
    assert count_clicks(state, settings, ["x"]) == 2
    state.checkpoint({}, {"frequency_step": 2})
    assert count_clicks(state, settings, []) == 2  # nothing dropped: no step
    estimate = load_frequency(state, settings)
    np.testing.assert_allclose(estimate.probability(["x", "y", "z"]), [1.0, 1.0, 1e-6])  # x: gap 1; y: once, 1 ago
