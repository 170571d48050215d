"""The nightly warm start carries the Adam moments and the logQ frequency estimate, not only the weights."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from streaming.archive import ArchiveWriter
from streaming.events import Click, Item
from tests.full_fixtures import DAY1, DAY2, MODEL, full_settings
from trainer.__main__ import main
from trainer.artifact import (
    ArtifactError,
    load_training_state,
    load_version,
    save_version,
)
from trainer.frequency import FrequencyEstimator
from trainer.full import EXIT_PROMOTED, FullResult, load_day, run_full
from trainer.gate import holdout_split
from trainer.model import TwoTowerModel
from trainer.registry import Registry
from trainer.train import TrainConfig, make_estimator, make_optimizer
from trainer.warm_state import TrainingState

torch.set_num_threads(1)
# Small hash tables keep the saved frequency state tiny; 20-25 items hardly collide in 1,024 buckets.
TRAIN = TrainConfig(batch_size=32, frequency_buckets=1 << 10)
DAY1_MS, DAY2_MS = 1_704_067_200_000, 1_704_153_600_000  # 2024-01-01 and 2024-01-02, 00:00 UTC


def _item(n: int, ts_ms: int) -> Item:
    return Item(f"i{n}", f"c{n % 3}", (f"t{n % 4}",), {"price": float(n)}, ts_ms, ts_ms)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Day 1: items i0..i19, 100 clicks by users u0..u9. Day 2: 5 new items i20..i24, 60 clicks on i10..i24
    (i0..i9 rest), new user u10.

    Clicks are a minute apart, so the gate's 10% holdout cuts at click floor(0.9 * n): day 1 trains on 90
    clicks (batches of 32: 32 + 32 + 26, 3 steps), day 2 on 54 (32 + 22, 2 steps).
    """
    root = tmp_path_factory.mktemp("archive")
    events: list[Item | Click] = [_item(n, DAY1_MS) for n in range(20)]
    # User u = k mod 10 clicks i(7k mod 20), items of u's parity; the held-back last 10 clicks go to the other
    # parity (7k + 1), pairs never clicked before, so the gate has something to score.
    events += [
        Click(f"u{k % 10}", f"i{(7 * k + (k >= 90)) % 20}", f"r{k}", DAY1_MS + 60_000 * (k + 1)) for k in range(100)
    ]
    events += [_item(n, DAY2_MS) for n in range(20, 25)]
    # k * 7 mod 15 runs through i10..i24, the new ones included, within the first 15 (trained) clicks; pairs
    # repeat only every lcm(11, 15) = 165 clicks, so every held-back pair is new.
    events += [Click(f"u{k % 11}", f"i{10 + k * 7 % 15}", f"s{k}", DAY2_MS + 60_000 * (k + 1)) for k in range(60)]
    with ArchiveWriter(root) as writer:
        writer.write(events)
    return root


@pytest.fixture(scope="module")
def nights(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[FullResult, Path]]:
    """Night 1 from scratch, then night 2 from copies of its registry: carrying everything, on 2 processes,
    with fresh Adam moments, and from a parent saved without training state. The copy ``fresh_freq`` is left
    for the command-line test."""
    root = tmp_path_factory.mktemp("models")
    out: dict[str, tuple[FullResult, Path]] = {}
    out["night1"] = (run_full(full_settings(archive, root / "carry", DAY1), MODEL, TRAIN), root / "carry")
    for name in ("ddp", "fresh_adam", "fresh_freq"):
        shutil.copytree(root / "carry", root / name)
    night1 = out["night1"][0].version_id
    # A parent as versions were written before training state was kept: the same weights, no optional files.
    old = Registry(root / "old")
    with old.new_version(night1) as directory:
        save_version(directory, load_version(Registry(root / "carry").path(night1)))
    old.promote(night1)

    out["carry"] = (run_full(full_settings(archive, root / "carry", DAY2), MODEL, TRAIN), root / "carry")
    out["ddp"] = (run_full(full_settings(archive, root / "ddp", DAY2, nproc=2), MODEL, TRAIN), root / "ddp")
    fresh = full_settings(archive, root / "fresh_adam", DAY2, carry_optimizer=False)
    out["fresh_adam"] = (run_full(fresh, MODEL, TRAIN), root / "fresh_adam")
    out["old"] = (run_full(full_settings(archive, root / "old", DAY2), MODEL, TRAIN), root / "old")
    return out


def _state(result: FullResult, models: Path) -> TrainingState:
    return load_training_state(Registry(models).path(result.version_id))


def _adam_steps(state: TrainingState) -> set[float]:
    assert state.optimizer is not None
    return {float(saved["step"]) for saved in state.optimizer.values()}


def _name(model: TwoTowerModel, param: torch.nn.Parameter) -> str:
    return next(name for name, p in model.named_parameters() if p is param)


def test_each_version_carries_optimizer_and_frequency_state(nights: dict) -> None:
    (night1, models), (night2, _) = nights["night1"], nights["carry"]
    assert night1.exit_code == EXIT_PROMOTED and night1.stats.steps == 3  # 90 clicks / 32 per batch
    assert night2.stats.steps == 2 and night2.parent == night1.version_id  # 54 clicks / 32
    for result in (night1, night2):
        files = load_version(Registry(models).path(result.version_id)).manifest["files"]
        assert {"optimizer.pt", "frequency.npz"} <= set(files)
    first, second = _state(night1, models), _state(night2, models)
    # Every parameter got a gradient in every step: Adam stepped each 3 times on night 1, 3 + 2 = 5 by night 2.
    assert _adam_steps(first) == {3.0} and _adam_steps(second) == {5.0}
    assert first.optimizer_kind == second.optimizer_kind == "Adam"
    # The estimator sees one batch per step and its clock runs on: 3, then 3 + 2 = 5 (fresh it would read 2).
    assert first.frequency is not None and second.frequency is not None
    assert int(first.frequency["step"]) == 3 and int(second.frequency["step"]) == 5
    # Buckets night 2 did not touch (i0..i9 rested) hold night 1's arrays exactly; fresh ones would be 0.
    untouched = second.frequency["last_step"] <= 3
    assert (first.frequency["last_step"][untouched] > 0).sum() > 0
    for key in ("last_step", "mean_gap"):
        assert np.array_equal(second.frequency[key][untouched], first.frequency[key][untouched])
    assert first.frequency["last_step"].max() == 3 and second.frequency["last_step"].max() == 5


def test_two_processes_carry_the_state_too(nights: dict) -> None:
    (night1, _), (ddp, models) = nights["night1"], nights["ddp"]
    assert ddp.parent == night1.version_id
    # Day 2's 54 trained clicks by user (LPT): rank 0 gets u0, u2, u4, u6, u8 (5 each) and u10 (4) = 29 clicks,
    # rank 1 the other 25. Batches of 32 // 2 = 16: 2 steps on each rank, so 2 averaged optimizer steps.
    assert ddp.stats.steps == 2
    state = _state(ddp, models)
    assert _adam_steps(state) == {5.0}  # 3 carried + 2, identical on every replica; rank 0's came back
    assert state.frequency is not None and int(state.frequency["step"]) == 5  # rank 0: 3 carried + 2 local batches


def test_grown_tables_keep_old_moments_and_start_new_rows_at_zero(nights: dict, archive: Path) -> None:
    (night1, models) = nights["night1"]
    parent = load_version(Registry(models).path(night1.version_id))
    saved = load_training_state(parent.path)
    assert saved.optimizer is not None
    # What the warm start does: extend the encoder by day 2 (5 new items, 1 new user), grow the tables.
    encoder = parent.encoder.extend(holdout_split(load_day(archive, DAY2), 0.1).train)
    model = copy.deepcopy(parent.model).resize(encoder)
    optimizer = make_optimizer(model, TRAIN)
    restored = saved.restore_optimizer(model, optimizer)
    assert sorted(restored) == sorted(name for name, _ in model.named_parameters())
    for table, grown in ((model.item_tower.id_table.weight, 5), (model.user_tower.id_table.weight, 1)):
        before = saved.optimizer[_name(model, table)]
        state = optimizer.state[table]
        old = before["exp_avg"].shape[0]
        assert table.shape[0] - old == grown
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][:old], before[key])
            assert torch.equal(state[key][old:], torch.zeros(grown, table.shape[1]))
        assert float(state["step"]) == 3.0


def test_state_is_matched_by_name_not_by_position(nights: dict) -> None:
    (night1, models) = nights["night1"]
    parent = load_version(Registry(models).path(night1.version_id))
    saved = load_training_state(parent.path)
    assert saved.optimizer is not None
    model = copy.deepcopy(parent.model)
    reversed_params = list(reversed(list(model.parameters())))
    optimizer = torch.optim.Adam(reversed_params, lr=TRAIN.lr)
    saved.restore_optimizer(model, optimizer)
    for name, param in model.named_parameters():
        assert torch.equal(optimizer.state[param]["exp_avg"], saved.optimizer[name]["exp_avg"]), name


def test_shape_change_starts_that_parameter_fresh(nights: dict, caplog: pytest.LogCaptureFixture) -> None:
    (night1, models) = nights["night1"]
    parent = load_version(Registry(models).path(night1.version_id))
    saved = load_training_state(parent.path)
    assert saved.optimizer is not None
    model = copy.deepcopy(parent.model)
    table = _name(model, model.item_tower.id_table.weight)
    dense = next(name for name, _ in model.named_parameters() if ".mlp." in name and name.endswith(".weight"))
    # A different id_dim (one column fewer), and an MLP weight saved with one row fewer: that looks like row
    # growth but only embedding tables grow, so both start fresh; a parameter the model lacks is dropped.
    changed = {name: dict(state) for name, state in saved.optimizer.items()}
    changed[table] = {k: v[:, :-1] if v.ndim else v for k, v in changed[table].items()}
    changed[dense] = {k: v[:-1] if v.ndim else v for k, v in changed[dense].items()}
    changed["gone.weight"] = changed[dense]
    optimizer = make_optimizer(model, TRAIN)
    with caplog.at_level(logging.WARNING, logger="trainer.artifact"):
        restored = TrainingState("Adam", changed).restore_optimizer(model, optimizer)
    assert table not in restored and dense not in restored
    assert len(restored) == len(list(model.parameters())) - 2
    assert len(optimizer.state[model.item_tower.id_table.weight]) == 0
    assert float(optimizer.state[model.user_tower.id_table.weight]["step"]) == 3.0  # the others came back
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert table in warnings and dense in warnings and "gone.weight" in warnings
    # Another optimizer kind: nothing is restored.
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert saved.restore_optimizer(model, sgd) == [] and len(sgd.state) == 0


def test_frequency_state_of_other_hash_settings_starts_fresh(nights: dict, caplog: pytest.LogCaptureFixture) -> None:
    saved = _state(*nights["night1"])
    assert saved.restore_estimator(make_estimator(TRAIN)) is True
    other = FrequencyEstimator(num_buckets=2048, num_hashes=2, alpha=0.01, seed=0)
    with caplog.at_level(logging.WARNING, logger="trainer.artifact"):
        assert saved.restore_estimator(other) is False
    assert other.step == 0 and "1024" in caplog.text and "2048" in caplog.text


def test_a_parent_without_training_state_warm_starts_weights_with_fresh_state(nights: dict) -> None:
    (night1, _), (night2, models) = nights["night1"], nights["old"]
    registry = Registry(models)
    parent_path = registry.path(night1.version_id)
    assert load_training_state(parent_path) == TrainingState()  # nothing saved: nothing to restore
    assert not (parent_path / "optimizer.pt").exists() and not (parent_path / "frequency.npz").exists()
    assert night2.parent == night1.version_id
    # Weights and vocabulary came from the parent: its ids keep their rows, the 5 new items are appended.
    old = load_version(parent_path).encoder.item_vocab.tokens
    new = load_version(registry.path(night2.version_id)).encoder.item_vocab.tokens
    assert new[: len(old)] == old and len(new) == len(old) + 5
    # Fresh optimizer and estimator: day 2's 2 steps only. The new version has state for tomorrow.
    state = _state(night2, models)
    assert _adam_steps(state) == {2.0}
    assert state.frequency is not None and int(state.frequency["step"]) == 2


def test_carry_flags_reset_the_moments_or_the_estimate(nights: dict, archive: Path, tmp_path: Path) -> None:
    fresh_adam = _state(*nights["fresh_adam"])
    assert _adam_steps(fresh_adam) == {2.0}  # moments restarted: 2 steps of day 2
    assert fresh_adam.frequency is not None and int(fresh_adam.frequency["step"]) == 5  # estimate carried: 3 + 2
    # The command line: --fresh-frequency restarts the estimate and keeps the moments.
    config = tmp_path / "freshtower.toml"
    config.write_text("[full]\nrecall_k = 20\n\n[train]\nbatch_size = 32\nfrequency_buckets = 1024\n")
    models = nights["night1"][1].parent / "fresh_freq"
    args = ["full", "--archive", str(archive), "--models", str(models), "--config", str(config), "--no-progress"]
    assert main([*args, "--day", DAY2.isoformat(), "--fresh-frequency"]) in (0, 3)  # written either way
    night1 = nights["night1"][0].version_id
    (child,) = [v for v in Registry(models).list() if v.version_id != night1]
    state = load_training_state(child.path)
    assert _adam_steps(state) == {5.0}
    assert state.frequency is not None and int(state.frequency["step"]) == 2


def test_damaged_optional_files_are_caught(nights: dict, tmp_path: Path) -> None:
    result, models = nights["carry"]
    copy_dir = tmp_path / "version"
    shutil.copytree(Registry(models).path(result.version_id), copy_dir)
    frequency = copy_dir / "frequency.npz"
    frequency.write_bytes(frequency.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="frequency.npz.*truncated"):
        load_version(copy_dir)
    with pytest.raises(ArtifactError, match="frequency.npz.*truncated"):
        load_training_state(copy_dir)
    # Same size, one byte changed: the sha256 catches it.
    optimizer = copy_dir / "optimizer.pt"
    raw = bytearray(optimizer.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="optimizer.pt.*tampered"):
        load_training_state(copy_dir)


def test_batch_ratio_follows_nproc_and_batch_size() -> None:
    from trainer.full import batch_ratio

    parent = {"config": {"train": {"batch_size": 256}}, "metrics": {"nproc": 1}}
    assert batch_ratio(parent, TrainConfig(batch_size=256), nproc=1) == 1.0
    assert batch_ratio(parent, TrainConfig(batch_size=256), nproc=2) == 0.5  # each rank sees half the batch
    assert batch_ratio({**parent, "metrics": {"nproc": 2}}, TrainConfig(batch_size=512), nproc=1) == 4.0
    assert batch_ratio({"config": {"train": None}, "metrics": {}}, TrainConfig(), nproc=2) == 1.0  # unknown
