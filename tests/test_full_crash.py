"""The nightly job SIGKILLed at random moments: the registry stays whole, and the next run goes ahead.

A killed run leaves either the version current before it or, when it got that far, the one it promoted, never
a half-written version; it releases its run lock with its life; and it leaves ``running`` = 1 on the Pushgateway,
which is what FreshtowerNightlyStuck fires on.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from prometheus_server import Pushgateway

from streaming.archive import ArchiveWriter
from streaming.sources.synthetic import SyntheticWorld, WorldConfig
from tests.full_fixtures import DAY1, DAY2, MODEL, full_settings
from tests.worker_fixtures import wait_for
from trainer.artifact import load_version
from trainer.full import run_full
from trainer.registry import Registry
from trainer.train import TrainConfig

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
START, END = "freshtower_full_last_start_timestamp_seconds", "freshtower_full_last_run_timestamp_seconds"
CONFIG = "[model]\ndim = 16\nid_dim = 16\nhidden = [64]\n\n[train]\nbatch_size = 128\n"


def check_registry(models: Path) -> str:
    """Every listed version loads (its files checked against its manifest), and so does the current one."""
    registry = Registry(models)
    for info in registry.list():
        load_version(info.path)
    current = registry.current()
    assert current is not None
    load_version(registry.path(current))
    return current


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_whole_registry(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    world = SyntheticWorld(WorldConfig(seed=8, n_users=200, n_items=300, days=2.0, requests_per_day=2500.0))
    with ArchiveWriter(archive) as writer:
        writer.write(world.events())
    models = tmp_path / "models"
    first = run_full(full_settings(archive, models, DAY1), MODEL, TrainConfig(batch_size=128))
    config = tmp_path / "freshtower.toml"
    config.write_text(CONFIG)

    with Pushgateway() as gateway:
        argv = [sys.executable, "-m", "trainer", "full", "--archive", str(archive), "--models", str(models)]
        argv += ["--config", str(config), "--day", DAY2.isoformat(), "--recall-k", "20", "--no-progress"]
        argv += ["--pushgateway", gateway.address]
        env = {**os.environ, "PYTHONPATH": str(REPO)}

        def launch() -> subprocess.Popen[bytes]:
            return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        # One whole run, to learn how long a run takes from the start it pushes to its end.
        assert launch().wait(timeout=300) == 0
        span = gateway.value(END) - gateway.value(START)
        assert Registry(models).current() != first.version_id

        rng = random.Random(11)
        killed_mid_run = 0
        for _ in range(4):
            start0, end0 = gateway.value(START), gateway.value(END)
            proc = launch()
            # A random moment of the run itself, counted from the start it pushes. (A window from the whole run's
            # start push to its exit, 1.6 s to 4.1 s here, held the 1.4 s of the run itself about half the time, so
            # all four kills missed it about once in 25 runs; a process killed before its start wrote nothing.)
            started = lambda p=proc, s0=start0: gateway.value(START) != s0 or p.poll() is not None  # noqa: E731
            wait_for(started, 120, "the run starting")
            time.sleep(rng.uniform(0, span))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            check_registry(models)  # the version current before, or the whole one the killed run promoted
            start1, end1 = gateway.value(START), gateway.value(END)
            if start1 != start0 and end1 == end0:
                killed_mid_run += 1
                assert gateway.value("freshtower_full_running") == 1  # FreshtowerNightlyStuck's signal
        assert killed_mid_run >= 1, "no kill landed between a run's start and its end"

        # The lock died with the killed runs: the next night goes ahead and reports its end.
        assert launch().wait(timeout=300) == 0
        assert gateway.value("freshtower_full_running") == 0
        assert gateway.value("freshtower_full_outcome", outcome="promoted") == 1
    check_registry(models)
