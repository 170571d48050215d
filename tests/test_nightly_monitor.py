"""The nightly run reports its start and outcome to a real Pushgateway, which a real Prometheus scrapes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from prometheus_server import PrometheusServer, Pushgateway, free_port, poll

from streaming.archive import ArchiveWriter, visible_files
from streaming.sources.synthetic import SyntheticWorld, WorldConfig
from tests.full_fixtures import DAY1
from trainer.__main__ import main
from trainer.artifact import load_version
from trainer.full import EXIT_NO_DATA, EXIT_PROMOTED
from trainer.monitor import OUTCOMES, NightlyMonitor, end_registry
from trainer.registry import Registry

torch.set_num_threads(1)
CONFIG = "[model]\ndim = 8\nid_dim = 8\nhidden = [16]\n\n[train]\nbatch_size = 256\n"


def test_end_registry_hand_worked() -> None:
    # A refused candidate: ran from t = 100 to 160 s, learnt from 5 clicks up to 90 s, scored 0.25 against 0.5.
    r = end_registry(
        "refused",
        started_s=100.0,
        now_s=160.0,
        examples=5,
        mean_loss=1.5,
        data_cutoff_ms=90_000,
        recall_k=20,
        candidate={"recall@20": 0.25, "ndcg@20": 0.1},
        current={"recall@20": 0.5},
        id_rows={"user": 3, "item": 4},
        expired={"user": 1, "item": 0},
    )
    value = r.get_sample_value
    assert {o: value("freshtower_full_outcome", {"outcome": o}) for o in OUTCOMES} == {
        "promoted": 0,
        "passed": 0,
        "refused": 1,
        "superseded": 0,
        "diverged": 0,
        "no_data": 0,
        "error": 0,
    }
    assert value("freshtower_full_running") == 0
    assert value("freshtower_full_duration_seconds") == 60.0
    assert value("freshtower_full_last_run_timestamp_seconds") == 160.0
    assert value("freshtower_full_last_success_timestamp_seconds") is None  # refused: the last success stays
    assert value("freshtower_full_examples") == 5 and value("freshtower_full_mean_loss") == 1.5
    assert value("freshtower_full_data_cutoff_timestamp_seconds") == 90.0
    assert value("freshtower_full_holdout_recall", {"model": "candidate", "k": "20"}) == 0.25
    assert value("freshtower_full_holdout_recall", {"model": "current", "k": "20"}) == 0.5
    assert value("freshtower_full_id_rows", {"tower": "item"}) == 4
    assert value("freshtower_full_expired_ids", {"tower": "user"}) == 1

    # No data: only the outcome and the times, so a POST leaves the last candidate's figures on the gateway.
    r = end_registry("no_data", started_s=100.0, now_s=101.0)
    names = {m.name for m in r.collect()}
    assert names == {
        "freshtower_full_running",
        "freshtower_full_outcome",
        "freshtower_full_last_run_timestamp_seconds",
        "freshtower_full_duration_seconds",
    }
    promoted = end_registry("promoted", started_s=100.0, now_s=130.0)
    assert promoted.get_sample_value("freshtower_full_last_success_timestamp_seconds") == 130.0
    with pytest.raises(ValueError, match="outcome must be one of"):
        end_registry("crashed", started_s=0.0, now_s=1.0)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    world = SyntheticWorld(WorldConfig(seed=5, n_users=150, n_items=200, days=2.0, requests_per_day=1500.0))
    with ArchiveWriter(root) as writer:
        writer.write(world.events())
    return root


def nightly(archive: Path, models: Path, config: Path, day: str, gateway: str) -> int:
    return main(
        [
            "full",
            *("--archive", str(archive), "--models", str(models), "--config", str(config)),
            *("--day", day, "--pushgateway", gateway, "--recall-k", "20", "--no-progress"),
        ]
    )


def test_runs_report_to_the_gateway_and_prometheus_alerts(archive: Path, tmp_path: Path) -> None:
    config = tmp_path / "freshtower.toml"
    config.write_text(CONFIG)
    models = tmp_path / "models"
    with (
        Pushgateway() as gateway,
        PrometheusServer(
            {"freshtower-pushgateway": [gateway.address]}, honor_labels=["freshtower-pushgateway"]
        ) as prom,
    ):
        before = time.time()
        assert nightly(archive, models, config, "2024-01-01", gateway.address) == EXIT_PROMOTED
        after = time.time()
        registry = Registry(models)
        manifest = load_version(registry.path(registry.current())).manifest
        metrics = manifest["metrics"]
        g = gateway.value
        assert g("freshtower_full_running") == 0
        assert g("freshtower_full_outcome", outcome="promoted") == 1
        assert g("freshtower_full_outcome", outcome="no_data") == 0
        start = g("freshtower_full_last_start_timestamp_seconds")
        success = g("freshtower_full_last_success_timestamp_seconds")
        assert before <= start <= success <= after
        assert g("freshtower_full_last_run_timestamp_seconds") == success
        assert g("freshtower_full_examples") == metrics["train"]["examples"] > 0
        assert g("freshtower_full_data_cutoff_timestamp_seconds") == manifest["data_cutoff_ms"] / 1000
        recall = metrics["holdout"]["recall@20"]
        assert g("freshtower_full_holdout_recall", model="candidate", k="20") == pytest.approx(recall, abs=1e-12)
        assert g("freshtower_full_holdout_recall", model="current", k="20") is None  # no version before it
        assert g("freshtower_full_id_rows", tower="user") == metrics["ids"]["rows"]["user"]

        # A night with no archived day: the outcome changes, the last success and the figures stay.
        assert nightly(archive, models, config, "2023-12-31", gateway.address) == EXIT_NO_DATA
        assert g("freshtower_full_outcome", outcome="no_data") == 1
        assert g("freshtower_full_outcome", outcome="promoted") == 0
        assert g("freshtower_full_last_success_timestamp_seconds") == success
        assert g("freshtower_full_examples") == metrics["train"]["examples"]

        def firing() -> list[str] | None:
            alerts = [a for a in prom.alerts() if a.name == "FreshtowerNightlyFailed" and a.state == "firing"]
            return [a.labels["outcome"] for a in alerts] or None

        assert poll(firing, 30, "FreshtowerNightlyFailed to fire") == ["no_data"]
        alert = next(a for a in prom.alerts() if a.name == "FreshtowerNightlyFailed")
        assert alert.labels["job"] == "freshtower-full"  # the push's job and instance labels, honoured
        assert alert.labels["instance"] == str(models.resolve())

        # The next night passes the gate against the current version: the alert clears.
        assert nightly(archive, models, config, "2024-01-02", gateway.address) == EXIT_PROMOTED
        assert g("freshtower_full_outcome", outcome="promoted") == 1
        assert g("freshtower_full_holdout_recall", model="current", k="20") is not None
        poll(lambda: not any(a.name == "FreshtowerNightlyFailed" for a in prom.alerts()), 30, "the alert to clear")
        # Nothing else of the nightly group fires: the run ended, and it started moments ago.
        assert not [a.name for a in prom.alerts() if a.name.startswith("FreshtowerNightly")]


def test_two_deployments_share_a_gateway(archive: Path, tmp_path: Path) -> None:
    # Each models directory pushes to its own group: one night's outcome does not overwrite the other's.
    config = tmp_path / "freshtower.toml"
    config.write_text(CONFIG)
    a, b = tmp_path / "a" / "models", tmp_path / "b" / "models"
    with Pushgateway() as gateway:
        assert nightly(archive, a, config, "2024-01-01", gateway.address) == EXIT_PROMOTED
        assert nightly(archive, b, config, "2023-12-31", gateway.address) == EXIT_NO_DATA
        g = gateway.value
        assert g("freshtower_full_outcome", instance=str(a.resolve()), outcome="promoted") == 1
        assert g("freshtower_full_outcome", instance=str(b.resolve()), outcome="no_data") == 1
        assert g("freshtower_full_outcome", instance=str(b.resolve()), outcome="promoted") == 0
        assert g("freshtower_full_last_success_timestamp_seconds", instance=str(a.resolve())) is not None
        assert g("freshtower_full_last_success_timestamp_seconds", instance=str(b.resolve())) is None
        # A name of one's own instead of the path.
        argv = ["full", "--archive", str(archive), "--models", str(b), "--config", str(config), "--day", "2024-01-01"]
        argv += ["--pushgateway", gateway.address, "--pushgateway-instance", "shop-eu", "--no-progress"]
        assert main(argv) == EXIT_PROMOTED
        assert g("freshtower_full_outcome", instance="shop-eu", outcome="promoted") == 1
        assert g("freshtower_full_outcome", instance=str(b.resolve()), outcome="no_data") == 1  # untouched
        with pytest.raises(AssertionError, match="several instances"):
            g("freshtower_full_running")


def test_an_exception_is_reported_as_error(archive: Path, tmp_path: Path) -> None:
    # A damaged archive file: the run raises (exit code 1 with the traceback), and reports the error first.
    damaged = tmp_path / "archive"
    damaged.mkdir()
    for file in visible_files(archive, DAY1):
        target = damaged / file.path.relative_to(archive)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"not parquet" if file.kind == "click" else file.path.read_bytes())
    config = tmp_path / "freshtower.toml"
    config.write_text(CONFIG)
    with Pushgateway() as gateway:
        with pytest.raises(Exception, match="(?i)parquet"):
            nightly(damaged, tmp_path / "models", config, DAY1.isoformat(), gateway.address)
        assert gateway.value("freshtower_full_outcome", outcome="error") == 1
        assert gateway.value("freshtower_full_running") == 0


def test_an_unreachable_gateway_costs_a_warning_not_the_model(
    archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "freshtower.toml"
    config.write_text(CONFIG)
    models = tmp_path / "models"
    nowhere = f"127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="trainer.monitor"):
        assert nightly(archive, models, config, DAY1.isoformat(), nowhere) == EXIT_PROMOTED
    assert Registry(models).current() is not None
    warnings = [r.getMessage() for r in caplog.records if r.name == "trainer.monitor"]
    assert len(warnings) == 2 and all(nowhere in w for w in warnings)  # the start and the end


def test_duration_runs_from_the_start_push() -> None:
    # A fake clock: the start is pushed at 10 s, the end at 25 s.
    ticks = iter([10.0, 25.0])
    with Pushgateway() as gateway:
        monitor = NightlyMonitor(gateway.address, clock=lambda: next(ticks))
        assert monitor.start()
        assert gateway.value("freshtower_full_running") == 1
        assert gateway.value("freshtower_full_last_start_timestamp_seconds") == 10.0
        assert monitor.end("diverged")
        assert gateway.value("freshtower_full_duration_seconds") == 15.0
        assert gateway.value("freshtower_full_last_run_timestamp_seconds") == 25.0
        assert gateway.value("freshtower_full_last_start_timestamp_seconds") == 10.0  # kept by the POST
        assert gateway.value("freshtower_full_outcome", outcome="diverged") == 1
