"""The online learner on its own (no broker): a step that would write NaN into the ID rows is skipped."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from streaming.examples import ExampleBuilder, ExampleSettings
from streaming.item_rows import ROW_PREFIX, apply_gradient
from streaming.learner import IncrementalLearner, LearnerSettings
from streaming.sources.synthetic import WorldConfig
from streaming.state import StateStore
from streaming.tables import EmbeddingTable, TableSettings
from tests.worker_fixtures import split_world
from trainer.dataset import Dataset
from trainer.features import FeatureEncoder
from trainer.model import ModelConfig, TwoTowerModel

torch.set_num_threads(1)
WORLD = WorldConfig(seed=4, n_users=60, n_items=80, days=2.0, requests_per_day=800)


def test_a_non_finite_loss_moves_no_row(tmp_path: Path) -> None:
    _, day_one, day_two = split_world(WORLD)
    encoder = FeatureEncoder.fit(Dataset.from_events(day_one))
    model = TwoTowerModel(encoder, ModelConfig(dim=8, id_dim=8, embedding_dim=4, hidden=(16,)))
    state = StateStore(tmp_path / "state", sync=False)
    builder = ExampleBuilder(ExampleSettings(last_n=5), state)
    learner = IncrementalLearner(model, encoder, builder, LearnerSettings(batch_size=8), state)
    examples = [x for x in (builder.add(e) for e in day_two) if x is not None]
    assert len(examples) >= 16

    def rows(batch: list) -> list[np.ndarray]:
        users = sorted({x.user_id for x in batch})
        items = sorted({x.item_id for x in batch})
        return [learner.users.row(u).copy() for u in users] + [learner.items.row(i).copy() for i in items]

    # A healthy step moves the rows it touches.
    first = examples[:8]
    before = rows(first)
    assert math.isfinite(learner.learn_batch(first))
    assert all(not np.array_equal(a, b) for a, b in zip(before, rows(first), strict=True))
    assert (learner.batches, learner.skipped) == (1, 0)

    # A frozen dense weight gone bad (NaN): the loss is NaN, and not one row of the batch takes it.
    linear = next(m for m in model.item_tower.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        linear.weight[0, 0] = math.nan
    second = examples[8:16]
    before = rows(second)
    assert math.isnan(learner.learn_batch(second))
    after = rows(second)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(np.isfinite(r).all() for r in after)
    assert (learner.batches, learner.examples, learner.skipped) == (1, 8, 1)


def _learner(
    tmp_path: Path, name: str, min_negatives: int, item_rows: str = "local"
) -> tuple[IncrementalLearner, list]:
    _, day_one, day_two = split_world(WORLD)
    encoder = FeatureEncoder.fit(Dataset.from_events(day_one))
    model = TwoTowerModel(encoder, ModelConfig(dim=8, id_dim=8, embedding_dim=4, hidden=(16,)))
    state = StateStore(tmp_path / name, sync=False)
    builder = ExampleBuilder(ExampleSettings(last_n=5), state)
    settings = LearnerSettings(batch_size=8, min_negatives=min_negatives, item_rows=item_rows)
    learner = IncrementalLearner(model, encoder, builder, settings, state)
    examples = [x for x in (builder.add(e) for e in day_two) if x is not None]
    return learner, examples


def test_a_lone_click_moves_its_user_row_through_easy_negatives(tmp_path: Path) -> None:
    """A softmax over one click has no negative: its gradient is zero. Easy negatives (P ∝ clicks^0.75 over the
    items clicked so far) give the lone click something to be ranked above, and only the click's rows move."""
    lone, examples = _learner(tmp_path, "with", min_negatives=64)
    click = examples[-1]
    user_before = lone.users.row(click.user_id).copy()
    others = sorted(set(lone.builder.counts()) - {click.item_id})
    others_before = [lone.items.row(i).copy() for i in others]
    assert math.isfinite(lone.learn_batch([click]))
    assert not np.array_equal(lone.users.row(click.user_id), user_before)
    assert all(np.array_equal(lone.items.row(i), b) for i, b in zip(others, others_before, strict=True))

    # Without easy negatives the same click moves nothing: the loss is -log 1 = 0.
    bare, examples = _learner(tmp_path, "without", min_negatives=0)
    before = bare.users.row(click.user_id).copy()
    assert bare.learn_batch([examples[-1]]) == 0.0
    assert np.array_equal(bare.users.row(click.user_id), before)

    # The draw is seeded by the batch number and the click counts: a second learner in the same state agrees.
    again, examples = _learner(tmp_path, "again", min_negatives=64)
    again.learn_batch([examples[-1]])
    np.testing.assert_array_equal(again.users.row(click.user_id), lone.users.row(click.user_id))


def test_item_rows_owned_elsewhere_make_the_single_learners_rows_bit_for_bit(tmp_path: Path) -> None:
    """item_rows = "owner": the learner sends each batch's item gradients instead of stepping its item rows. An
    owner applying them (streaming.item_rows.apply_gradient) to a table the learner mirrors makes, batch after
    batch, exactly the rows a learner that trains its item rows itself makes; the user rows are the same too."""
    local, examples = _learner(tmp_path, "local", min_negatives=64)
    remote, _ = _learner(tmp_path, "remote", min_negatives=64, item_rows="owner")
    owner_state = StateStore(tmp_path / "owner", sync=False)
    owner = EmbeddingTable("item", remote.items._base, remote.items._index, TableSettings(), owner_state)
    admitted_later = 0
    # Two clicks on an id nobody has seen, in one batch: admitted at its second use (min_count 2), then trained.
    twice = [dataclasses.replace(x, item_id="brand-new") for x in examples[96:98]]
    batches = [examples[k : k + 8] for k in range(0, 88, 8)] + [twice + examples[98:104], examples[104:105]]
    for batch in batches:  # the last one a lone click (easy negatives)
        local.learn_batch(batch)
        remote.learn_batch(batch)
        assert len(remote.outbox) == len({x.item_id for x in batch})
        for gradient in remote.outbox:
            admitted_later += gradient.item_id not in owner and gradient.item_id not in remote.items._index
            apply_gradient(owner, gradient)
        remote.outbox.clear()
        owner.flush()
        for key, value in owner_state.staged().items():  # what the owner sends to item-rows, mirrored
            if key.startswith(ROW_PREFIX):
                ident = key[len(ROW_PREFIX) :].decode()
                remote.items.put_row(ident, value) if value is not None else remote.items.drop_row(ident)
        owner_state.checkpoint({}, {})
        assert owner.ids() == local.items.ids() == remote.items.ids()
        for ident in local.items.ids():
            assert np.array_equal(owner.row(ident), local.items.row(ident)), ident
            assert np.array_equal(remote.items.row(ident), local.items.row(ident)), ident
        for user in {x.user_id for x in batch}:
            assert np.array_equal(remote.users.row(user), local.users.row(user)), user
    assert admitted_later > 0 and "brand-new" in owner  # ids the model does not know: admission at the owner
