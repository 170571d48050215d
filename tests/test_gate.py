"""The promotion gate: finite checks, the recall comparison with its margin, and what it refuses."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from streaming.sources.synthetic import SyntheticWorld, WorldConfig
from trainer.artifact import ModelVersion, make_version
from trainer.dataset import Dataset
from trainer.evaluate import TemporalSplit
from trainer.features import FeatureEncoder
from trainer.gate import GateConfig, check_finite, decide, evaluate_version, holdout_split
from trainer.model import ModelConfig, TwoTowerModel
from trainer.train import TrainConfig, make_optimizer, train_epoch

torch.set_num_threads(1)
K = 20
GATE = GateConfig(recall_k=K, margin=0.02)


@pytest.fixture(scope="module")
def day() -> tuple[Dataset, TemporalSplit]:
    world = SyntheticWorld(
        WorldConfig(seed=2, n_users=200, n_items=300, days=1.0, requests_per_day=2500.0, new_items_per_day=10.0)
    )
    dataset = Dataset.from_events(world.events())
    return dataset, holdout_split(dataset, 0.2)


def _version(model: TwoTowerModel, encoder: FeatureEncoder, split: TemporalSplit, version_id: str) -> ModelVersion:
    return make_version(
        model, encoder, split.train.items, version_id=version_id, parent=None, data_range=(0, 1), data_cutoff_ms=0
    )


@pytest.fixture(scope="module")
def current(day: tuple[Dataset, TemporalSplit]) -> ModelVersion:
    """A model trained for 4 epochs on the day before the cut: clearly better than chance on the held-back part."""
    _, split = day
    encoder = FeatureEncoder.fit(split.train)
    model = TwoTowerModel(encoder, ModelConfig(dim=16, id_dim=16, hidden=(64,)))
    config = TrainConfig(batch_size=128)
    optimizer = make_optimizer(model, config)
    for epoch in range(4):
        train_epoch(model, encoder, split.train, config, progress=False, optimizer=optimizer, epoch=epoch)
    return _version(model, encoder, split, "current")


def _with_weights(version: ModelVersion, split: TemporalSplit, change: Callable[[TwoTowerModel], None]) -> ModelVersion:
    """A candidate with the weights of ``version`` changed in place by ``change`` (on a copy)."""
    model = copy.deepcopy(version.model)
    with torch.no_grad():
        change(model)
    return _version(model, version.encoder, split, "candidate")


def test_margin_floor() -> None:
    # absolute: 0.30 - 0.01 = 0.29; relative: 0.30 * (1 - 0.05) = 0.285.
    assert GateConfig(margin=0.01).floor(0.30) == pytest.approx(0.29)
    assert GateConfig(margin=0.05, margin_mode="relative").floor(0.30) == pytest.approx(0.285)
    with pytest.raises(ValueError, match="margin_mode must be 'absolute' or 'relative', got 'percent'"):
        GateConfig(margin_mode="percent")  # type: ignore[arg-type]


def test_holdout_split_cuts_the_newest_clicks(day: tuple[Dataset, TemporalSplit]) -> None:
    dataset, split = day
    ts = dataset.clicks.ts_ms
    # 20% held back: the cut is the time of click floor(0.8 * n); everything before it is training data.
    assert split.cut_ms == ts[int(0.8 * len(ts))]
    assert split.train.clicks.ts_ms.max() < split.cut_ms
    assert len(split.train.clicks) == int((ts < split.cut_ms).sum())
    with pytest.raises(ValueError, match="holdout fraction must lie in"):
        holdout_split(dataset, 1.0)


def test_identical_candidate_is_accepted(current: ModelVersion, day: tuple[Dataset, TemporalSplit]) -> None:
    decision = decide(current, current, day[1], GATE)
    assert decision.accepted, decision.reasons
    assert decision.candidate_metrics[f"recall@{K}"] == decision.current_metrics[f"recall@{K}"]
    assert decision.reasons[0].startswith("ok: candidate recall@20")


def test_a_slice_of_one_user_is_thin_not_broken(current: ModelVersion, day: tuple[Dataset, TemporalSplit]) -> None:
    # One scored user: recall's standard error is NaN (ddof=1 over one value), recall itself is finite. A quiet
    # week of MovieLens gives such slices; the candidate is judged on recall, not refused as "not finite".
    one = dataclasses.replace(day[1], users=day[1].users[:1], relevant=day[1].relevant[:1])
    decision = decide(current, current, one, GATE)
    assert math.isnan(decision.candidate_metrics[f"recall@{K}_se"])
    assert decision.accepted, decision.reasons


def test_trained_model_beats_chance(current: ModelVersion, day: tuple[Dataset, TemporalSplit]) -> None:
    # A sanity check of the evaluation itself: 4 epochs reach a recall far above the untrained model's.
    metrics = evaluate_version(current, day[1], K)
    untrained = _version(TwoTowerModel(current.encoder, current.model_config), current.encoder, day[1], "fresh")
    assert metrics[f"recall@{K}"] > evaluate_version(untrained, day[1], K)[f"recall@{K}"] + 0.1
    assert metrics["users"] == len(day[1].users) > 50


def test_noise_weights_are_refused(current: ModelVersion, day: tuple[Dataset, TemporalSplit]) -> None:
    generator = torch.Generator().manual_seed(0)

    def noise(model: TwoTowerModel) -> None:
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))

    degraded = _with_weights(current, day[1], noise)
    decision = decide(degraded, current, day[1], GATE)
    assert not decision.accepted
    assert decision.reasons[0].startswith("worse than allowed: candidate recall@20")
    assert decision.candidate_metrics[f"recall@{K}"] < decision.current_metrics[f"recall@{K}"] - GATE.margin


def test_nan_weights_are_refused(current: ModelVersion, day: tuple[Dataset, TemporalSplit]) -> None:
    def poison(model: TwoTowerModel) -> None:
        model.dense_parameters()[-1][0] = float("nan")  # the item tower's last bias: NaN reaches every item vector

    broken = _with_weights(current, day[1], poison)
    reasons = check_finite(broken)
    assert any(r.startswith("weights item_tower.mlp.") and "NaN or infinite" in r for r in reasons), reasons
    assert any(r.startswith("item vectors:") for r in reasons), reasons
    decision = decide(broken, current, day[1], GATE)
    assert not decision.accepted
    assert math.isnan(decision.candidate_metrics[f"recall@{K}"])
    assert any("not finite on the held-back slice" in r for r in decision.reasons)
    # Not even as a first version.
    assert not decide(broken, None, day[1], GATE).accepted


def test_nan_item_vectors_alone_are_refused(current: ModelVersion, day: tuple[Dataset, TemporalSplit]) -> None:
    vectors = current.item_vectors.copy()
    vectors[3, 0] = np.inf
    broken = dataclasses.replace(current, item_vectors=vectors)
    assert check_finite(broken) == [f"item vectors: 1 of {vectors.size} values are NaN or infinite"]
    assert not decide(broken, current, day[1], GATE).accepted


def test_first_version_and_missing_holdout(current: ModelVersion, day: tuple[Dataset, TemporalSplit]) -> None:
    first = decide(current, None, day[1], GATE)
    assert first.accepted and first.current_metrics is None
    assert first.reasons == ["no current version: the first finite candidate is accepted"]
    # Without held-back clicks a candidate cannot be compared, so it never replaces a current version.
    blind = decide(current, current, None, GATE)
    assert not blind.accepted
    assert blind.reasons == [
        "no held-back clicks of users with a history to compare against the current version current"
    ]
    # Held-back clicks of new users only: nothing can be scored, which is the same as no held-back clicks.
    cold = dataclasses.replace(day[1], users=[], relevant=[])
    assert decide(current, None, cold, GATE).reasons == first.reasons
    assert decide(current, current, cold, GATE).reasons == blind.reasons
