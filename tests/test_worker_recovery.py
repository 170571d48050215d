"""SIGKILL the worker process at random points; the state it ends with equals an uninterrupted run's."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from streaming.events import Click
from tests.conftest import free_port
from tests.worker_fixtures import produce, read_state, register_model, split_world

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def worker_command(settings, models: Path, state: Path, group: str, metrics_port: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "streaming", "worker",
        "--bootstrap", settings.bootstrap_servers,
        "--topic-prefix", settings.topic_prefix,
        "--models", str(models),
        "--state-dir", str(state),
        "--group", group,
        "--batch-size", "16",
        "--exit-when-idle", "2",
        "--metrics-port", str(metrics_port),
    ]  # fmt: skip


def events_applied(port: int) -> float:
    """The worker's own count of events applied since it started, read from its /metrics endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("freshtower_events_consumed_total{")
    )


def test_sigkill_at_random_points_loses_nothing_and_applies_nothing_twice(kafka_settings, tmp_path):
    _, day_one, day_two = split_world()
    models = tmp_path / "models"
    register_model(models, day_one)
    produce(kafka_settings, day_two)
    total = len(day_two)
    # Frequent checkpoints so that kills land between them as well as just after them.
    env = {**os.environ, "FRESHTOWER_CHECKPOINT_INTERVAL_S": "0.3", "FRESHTOWER_EXPIRE_EVERY_BATCHES": "7"}

    reference = tmp_path / "reference"
    subprocess.run(worker_command(kafka_settings, models, reference, "reference"), env=env, check=True, timeout=300)

    crashed = tmp_path / "crashed"
    # The crashed worker also keeps only 16 catalogue records and 16 profiles in memory (the world has
    # hundreds of each): features read back from RocksDB, own uncheckpointed writes included, change nothing.
    env = {**env, "FRESHTOWER_RECORD_CACHE": "16"}
    rng = random.Random(20261123)
    progress = []
    for _ in range(5):
        port = free_port()
        process = subprocess.Popen(worker_command(kafka_settings, models, crashed, "crashed", port), env=env)
        # Kill at a random point of the stream: once this run has applied a random number of events
        # (measured by the worker itself, so machine speed and start-up time do not matter).
        target = rng.randint(2_000, 12_000)
        deadline = time.monotonic() + 120
        while events_applied(port) < target and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is not None:
            break  # it finished the stream before this kill
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        if (crashed / "CURRENT").exists():  # RocksDB files exist once the worker opened its state
            progress.append(sum(read_state(crashed)["offsets"].values()))
    subprocess.run(worker_command(kafka_settings, models, crashed, "crashed"), env=env, check=True, timeout=300)

    mid_stream = [p for p in progress if 0 < p < total]
    assert len(mid_stream) >= 2, f"kills did not land mid-stream often enough: progress {progress} of {total}"

    expected, got = read_state(reference), read_state(crashed)
    clicks = sum(1 for e in day_two if isinstance(e, Click))
    assert expected["meta"]["examples"] == clicks
    assert sum(expected["offsets"].values()) == total
    # Counters, last-N lists and admission counts: exactly equal (nothing lost, nothing applied twice).
    assert got["offsets"] == expected["offsets"]
    assert got["counts"] == expected["counts"]
    for key in ("examples", "batches", "frequency_step", "watermark_ms"):
        assert got["meta"][key] == expected["meta"][key], key
    assert got["meta"]["builder"] == expected["meta"]["builder"]
    # Embedding rows: the same rows, equal within float tolerance.
    assert got["rows"].keys() == expected["rows"].keys()
    assert len(expected["rows"]) > 500
    for key, row in expected["rows"].items():
        np.testing.assert_allclose(got["rows"][key], row, rtol=0, atol=1e-6, err_msg=key)
