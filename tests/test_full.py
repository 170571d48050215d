"""The nightly full retrain end to end: archive -> warm start -> one epoch -> version -> gate -> promote."""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import trainer.full
from streaming.archive import ArchiveWriter, read_day
from streaming.events import Click
from streaming.settings import SettingsError, load_settings
from streaming.sources.synthetic import SyntheticWorld, WorldConfig
from tests.full_fixtures import DAY1, DAY2, MODEL, full_settings
from trainer.__main__ import main
from trainer.artifact import load_version
from trainer.dataset import Dataset
from trainer.distributed import shard_by_user
from trainer.full import (
    EXIT_BUSY,
    EXIT_NO_DATA,
    EXIT_PROMOTED,
    EXIT_REFUSED,
    FullResult,
    FullSettings,
    load_day,
    load_days,
    pick_day,
    run_full,
)
from trainer.registry import Registry
from trainer.train import TrainConfig

torch.set_num_threads(1)
TRAIN = TrainConfig(batch_size=128)
RECALL = "recall@20"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    world = SyntheticWorld(
        WorldConfig(seed=4, n_users=200, n_items=300, days=2.0, requests_per_day=2500.0, new_items_per_day=10.0)
    )
    with ArchiveWriter(root) as writer:
        writer.write(world.events())
    return root


@pytest.fixture(scope="module")
def runs(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[FullResult, Path]]:
    """Day 1 from scratch, then day 2 four ways: warm on 1 process, warm on 2, fresh, and diverging."""
    root = tmp_path_factory.mktemp("models")
    out: dict[str, tuple[FullResult, Path]] = {}
    first = root / "warm"
    out["day1"] = (run_full(full_settings(archive, first, DAY1), MODEL, TRAIN), first)
    for name in ("warm2", "diverged"):
        shutil.copytree(first, root / name)
    out["warm"] = (run_full(full_settings(archive, first, DAY2), MODEL, TRAIN), first)
    out["warm2"] = (run_full(full_settings(archive, root / "warm2", DAY2, nproc=2), MODEL, TRAIN), root / "warm2")
    out["fresh"] = (run_full(full_settings(archive, root / "fresh", DAY2), MODEL, TRAIN), root / "fresh")
    # lr = inf in a single step (the batch holds the whole day): every weight becomes inf or NaN, while the
    # one loss computed before the step is still finite, so the broken model reaches the gate.
    broken = dataclasses.replace(TRAIN, lr=math.inf, batch_size=100_000)
    out["diverged"] = (run_full(full_settings(archive, root / "diverged", DAY2), MODEL, broken), root / "diverged")
    return out


def test_first_run_promotes_a_fresh_model(runs: dict, archive: Path) -> None:
    result, models = runs["day1"]
    assert result.exit_code == EXIT_PROMOTED and result.promoted and result.parent is None
    registry = Registry(models)
    manifest = load_version(registry.path(result.version_id)).manifest
    assert manifest["parent"] is None
    day_start = 1_704_067_200_000  # 2024-01-01T00:00:00Z
    assert manifest["data_range"] == {"start_ms": day_start, "end_ms": day_start + 86_400_000}
    # The cutoff is the newest click trained on: the last one before the held-back 10% of the day.
    ts = np.array([e.ts_ms for e in read_day(archive, DAY1, types={"click"})])
    cut = ts[int(0.9 * len(ts))]
    assert manifest["data_cutoff_ms"] == ts[ts < cut].max()
    assert manifest["metrics"]["gate"]["accepted"] is True
    assert manifest["metrics"]["train"]["steps"] == math.ceil((ts < cut).sum() / TRAIN.batch_size)


def test_warm_start_continues_from_the_parent(runs: dict) -> None:
    (parent, _), (child, models), (fresh, _) = runs["day1"], runs["warm"], runs["fresh"]
    assert child.exit_code == EXIT_PROMOTED and child.parent == parent.version_id
    registry = Registry(models)
    assert registry.current() == child.version_id and registry.previous() == parent.version_id
    manifest = load_version(registry.path(child.version_id)).manifest
    assert manifest["parent"] == parent.version_id
    # Same day, same seed, same example order: starting from yesterday's weights, the first batches already
    # fit better than from a fresh initialisation.
    assert child.stats.first_loss < fresh.stats.first_loss - 0.1, (child.stats, fresh.stats)
    assert fresh.parent is None and fresh.exit_code == EXIT_PROMOTED
    # The child's encoder kept every id of the parent at its index (new ids appended).
    old = load_version(registry.path(parent.version_id)).encoder.item_vocab.tokens
    new = load_version(registry.path(child.version_id)).encoder.item_vocab.tokens
    assert new[: len(old)] == old and len(new) >= len(old)


def test_two_processes_match_one(runs: dict) -> None:
    (one, _), (two, models) = runs["warm"], runs["warm2"]
    assert two.exit_code == EXIT_PROMOTED and two.parent == runs["day1"][0].version_id
    r1, r2 = one.decision.candidate_metrics[RECALL], two.decision.candidate_metrics[RECALL]
    current = one.decision.current_metrics[RECALL]
    # Both improve on the parent, and land close to each other.
    assert r1 > current and r2 > current, (r1, r2, current)
    assert abs(r1 - r2) < 0.1, (r1, r2)
    # Each rank took batch 128 / 2 = 64 and the replicas stepped together: the same number of optimizer steps.
    assert two.stats.steps == one.stats.steps
    assert two.stats.examples == one.stats.examples
    assert load_version(Registry(models).path(two.version_id)).manifest["metrics"]["nproc"] == 2


def test_broken_candidate_is_refused_and_current_stays(runs: dict) -> None:
    (parent, _), (refused, models) = runs["day1"], runs["diverged"]
    assert refused.exit_code == EXIT_REFUSED and not refused.promoted
    assert any(r.startswith("weights ") for r in refused.decision.reasons), refused.decision.reasons
    registry = Registry(models)
    assert registry.current() == parent.version_id
    # The refused version is kept for inspection, with the gate's verdict in its manifest.
    assert {v.version_id for v in registry.list()} == {parent.version_id, refused.version_id}
    manifest = load_version(registry.path(refused.version_id)).manifest
    assert manifest["metrics"]["gate"]["accepted"] is False


def test_shard_by_user_balances_clicks() -> None:
    # Users with 5, 3, 2 and 2 clicks onto 2 ranks, largest first to the least loaded rank:
    # u5 -> 0 (5|0), u3 -> 1 (5|3), a2 -> 1 (5|5), b2 -> 0 (7|5).
    clicks = [("u5", 5), ("u3", 3), ("a2", 2), ("b2", 2)]
    events = [Click(u, f"i{k}", "r", 1000 * k + len(u)) for u, n in clicks for k in range(n)]
    shards = shard_by_user(Dataset.from_events(events), 2)
    assert [sorted(set(s.clicks.user.tolist())) for s in shards] == [["b2", "u5"], ["a2", "u3"]]
    assert [len(s.clicks) for s in shards] == [7, 5]


def test_pick_day(archive: Path) -> None:
    assert pick_day(archive, None, today=dt.date(2024, 1, 3)) == DAY2  # yesterday
    assert pick_day(archive, None, today=dt.date(2024, 1, 2)) == DAY1  # today's partition is still being written
    assert pick_day(archive, None, today=dt.date(2030, 1, 1)) == DAY2  # the newest there is
    assert pick_day(archive, None, today=DAY1) is None
    assert pick_day(archive, "2024-01-01") == DAY1
    assert pick_day(archive, "2023-12-31") is None


def test_cli(archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["full", "--help"])
    assert exc.value.code == 0
    assert "Exit codes: 0 the candidate passed the gate" in capsys.readouterr().out
    config = tmp_path / "freshtower.toml"
    config.write_text(
        "[full]\nrecall_k = 10\n\n[model]\ndim = 8\nid_dim = 8\nhidden = [16]\n\n[train]\nbatch_size = 512\n"
    )
    models = tmp_path / "models"
    args = ["full", "--archive", str(archive), "--models", str(models), "--config", str(config), "--no-progress"]
    assert main([*args, "--day", "2024-01-01", "--no-promote"]) == EXIT_PROMOTED
    registry = Registry(models)
    assert registry.current() is None  # --no-promote: written and gated, not promoted
    (info,) = registry.list()
    manifest = load_version(info.path).manifest
    assert manifest["config"]["model"]["dim"] == 8 and manifest["config"]["train"]["batch_size"] == 512
    assert "recall@10" in manifest["metrics"]["holdout"]
    assert main([*args, "--day", "2023-12-31"]) == EXIT_NO_DATA
    assert main([*args, "--holdout-fraction", "1.5"]) == 2


def test_one_run_at_a_time_per_models_directory(archive: Path, tmp_path: Path) -> None:
    # A run holds <models>/.full.lock (here: this test, as pid 4242); a second one does nothing at all.
    models = tmp_path / "models"
    models.mkdir()
    with open(models / ".full.lock", "a+") as held:
        held.write("4242\n")
        held.flush()
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        busy = run_full(full_settings(archive, models, DAY1), MODEL, TRAIN)
    assert (busy.exit_code, busy.outcome) == (EXIT_BUSY, "busy")
    assert "pid 4242" in busy.message and busy.version_id is None
    assert Registry(models).list() == []
    # Released: the next run goes ahead.
    assert run_full(full_settings(archive, models, DAY1), MODEL, TRAIN).outcome == "promoted"


def test_a_rollback_by_hand_during_the_run_is_not_undone(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    first = run_full(full_settings(archive, models, DAY1), MODEL, TRAIN)
    second = run_full(full_settings(archive, models, DAY2), MODEL, TRAIN)
    assert Registry(models).current() == second.version_id
    real_decide = trainer.full.decide

    def decide_while_someone_rolls_back(*args, **kwargs):
        # An operator rolls the second version back while the third run, grown from it, is being gated.
        Registry(models).rollback(reason="by hand")
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(trainer.full, "decide", decide_while_someone_rolls_back)
    third = run_full(full_settings(archive, models, DAY2), MODEL, TRAIN)
    assert third.decision.accepted  # it passed the gate ...
    assert (third.exit_code, third.outcome, third.promoted) == (EXIT_REFUSED, "superseded", False)
    registry = Registry(models)
    assert registry.current() == first.version_id  # ... and the rollback stands
    assert third.parent == second.version_id and third.version_id in {v.version_id for v in registry.list()}
    assert "changed by hand during the run" in third.message


def test_the_default_day_is_not_learnt_twice(archive: Path, tmp_path: Path) -> None:
    # Nightly runs without --day: the newest archived day before today. When the archive holds nothing newer than
    # what the current version learnt (the sink stopped), the run says so instead of training the day again.
    models = tmp_path / "models"
    newest = dataclasses.replace(full_settings(archive, models, DAY1), day=None)
    first = run_full(dataclasses.replace(newest, day=DAY1.isoformat()), MODEL, TRAIN)
    second = run_full(newest, MODEL, TRAIN)  # day 2, the newest
    assert second.outcome == "promoted" and second.parent == first.version_id
    manifest = load_version(Registry(models).path(second.version_id)).manifest
    assert manifest["metrics"]["day"] == DAY2.isoformat()
    again = run_full(newest, MODEL, TRAIN)
    assert (again.exit_code, again.outcome, again.version_id) == (EXIT_NO_DATA, "no_data", None)
    assert f"nothing new: the newest archived day before today is {DAY2}" in again.message
    assert "2024-01-03 00:00 UTC" in again.message and "is the archive sink running?" in again.message
    assert Registry(models).current() == second.version_id and len(Registry(models).list()) == 2
    # Asked for by name, the day is trained again.
    assert run_full(dataclasses.replace(newest, day=DAY2.isoformat()), MODEL, TRAIN).outcome == "promoted"


DAY3 = dt.date(2024, 1, 3)


@pytest.fixture(scope="module")
def three_days(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive3")
    world = SyntheticWorld(
        WorldConfig(seed=5, n_users=150, n_items=200, days=3.0, requests_per_day=1200.0, new_items_per_day=10.0)
    )
    with ArchiveWriter(root) as writer:
        writer.write(world.events())
    return root


def clicks_of(root: Path, *days: dt.date) -> np.ndarray:
    return np.sort(np.array([e.ts_ms for day in days for e in read_day(root, day, types={"click"})], dtype=np.int64))


def test_days_trains_on_the_clicks_of_the_last_days(three_days: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    result = run_full(full_settings(three_days, models, DAY3, days=2), MODEL, TRAIN)
    assert result.outcome == "promoted", result.message
    manifest = load_version(Registry(models).path(result.version_id)).manifest
    # 2024-01-02T00:00Z to 2024-01-04T00:00Z: days 2 and 3, not day 1.
    assert manifest["data_range"] == {"start_ms": 1_704_153_600_000, "end_ms": 1_704_326_400_000}
    assert manifest["metrics"]["day"] == "2024-01-03" and manifest["metrics"]["days"] == 2
    ts = clicks_of(three_days, DAY2, DAY3)
    assert len(clicks_of(three_days, DAY1)) > 100 and ts[0] >= 1_704_153_600_000 and ts[-1] < 1_704_326_400_000
    # The holdout is the newest 10% of both days' clicks; the rest is trained on, once.
    cut = ts[int(0.9 * len(ts))]
    trained = ts[ts < cut]
    assert cut > 1_704_240_000_000  # held back from day 3 only
    assert manifest["data_cutoff_ms"] == trained.max()
    assert result.stats.examples == manifest["metrics"]["train"]["examples"] == len(trained)
    assert manifest["metrics"]["train"]["steps"] == math.ceil(len(trained) / TRAIN.batch_size)


def test_days_skip_what_is_not_archived(three_days: Path, tmp_path: Path) -> None:
    gap = tmp_path / "archive"
    shutil.copytree(three_days, gap)
    shutil.rmtree(gap / "date=2024-01-02")
    # Five days asked for, three of them (two before the archive began, and day 2) not archived: skipped.
    dataset = load_days(gap, DAY3, 5)
    assert dataset.clicks.ts_ms.tolist() == clicks_of(three_days, DAY1, DAY3).tolist()
    # The catalogue and profiles as of the last day's end, as for that day alone.
    last = load_day(three_days, DAY3)
    assert dataset.items == last.items and dataset.users == last.users
    # The last day itself must be archived.
    models = tmp_path / "models"
    missing = run_full(full_settings(gap, models, DAY2, days=2), MODEL, TRAIN)
    assert (missing.exit_code, missing.outcome) == (EXIT_NO_DATA, "no_data")


def test_days_setting(tmp_path: Path) -> None:
    assert FullSettings().days == 1
    with pytest.raises(SettingsError, match="days must be >= 1"):
        FullSettings(days=0)
    config = tmp_path / "freshtower.toml"
    config.write_text("[full]\ndays = 3\n")
    assert load_settings(FullSettings, section="full", config=config, environ={}).days == 3
    env = {"FRESHTOWER_DAYS": "7"}
    assert load_settings(FullSettings, section="full", config=config, environ=env).days == 7
    assert main(["full", "--days", "0", "--models", str(tmp_path / "models")]) == 2
