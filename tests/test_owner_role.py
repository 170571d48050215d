"""The item-owner role in a worker (streaming.owner_role) on the real broker: a life stuck inside a client call is
replaced and no gradient is lost or applied twice; a life that fails stops the worker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from kafka.errors import KafkaConnectionError

from streaming.item_owner import ItemOwner, OwnerSettings
from streaming.lifecycle import EXIT_STALLED
from streaming.metrics import OwnerMetrics
from streaming.owner_role import OwnerRole
from streaming.settings import KafkaSettings
from streaming.topics import ITEM_PATH_TOPICS, ensure_topics
from tests.test_item_owner import _gradients, _progress, _reference, _send
from tests.worker_fixtures import committed_item_rows, register_model, split_world, wait_for
from trainer.artifact import ModelVersion, load_version
from trainer.registry import Registry

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, day_one, _ = split_world()
    root = tmp_path_factory.mktemp("role-models")
    register_model(root, day_one)
    return root


@pytest.fixture(scope="module")
def version(models: Path) -> ModelVersion:
    return load_version(Registry(models).path("v1"))


def _settings(tmp_path: Path, life: int, stall_s: float) -> OwnerSettings:
    return OwnerSettings(
        state_dir=tmp_path / f"owner-{life}", instance_id="w1", session_timeout_ms=6000, stall_s=stall_s
    )


def test_a_life_stuck_in_poll_is_replaced_and_every_gradient_is_applied_exactly_once(
    kafka_settings: KafkaSettings, version: ModelVersion, tmp_path: Path
) -> None:
    ensure_topics(kafka_settings, names=ITEM_PATH_TOPICS)
    items = [*version.encoder.item_vocab.tokens[:60], *(f"new-{k}" for k in range(10))]
    gradients = _gradients(items, 1_200, seed=7)
    expected = _reference(version, gradients, kafka_settings.partitions, tmp_path)
    metrics = OwnerMetrics()

    def make(life: int, _previous: ItemOwner | None) -> ItemOwner:
        owner = ItemOwner(kafka_settings, _settings(tmp_path, life, stall_s=4), version, metrics=metrics)
        if life == 0:
            # As kafka-python 3.0's poll was seen to: mid-stream, it waits for good on its network loop, until the
            # client is closed, which stops the loop and fails the wait.
            poll, close, closed = owner.consumer.poll, owner.close, threading.Event()

            def stuck_after_a_step(*args, **kwargs):
                if owner.stats.steps > 0:
                    closed.wait()
                    raise KafkaConnectionError("Event loop stopped")
                return poll(*args, **kwargs)

            def close_and_fail_the_wait() -> None:
                closed.set()
                close()

            owner.consumer.poll, owner.close = stuck_after_a_step, close_and_fail_the_wait
        return owner

    worker_stop = threading.Event()
    role = OwnerRole(make, worker_stop, stall_s=4)
    try:
        _send(kafka_settings, gradients[:600])
        wait_for(lambda: role.life == 1, 60, "the stuck life replaced")
        _send(kafka_settings, gradients[600:])
        wait_for(lambda: _progress(kafka_settings) == len(gradients), 90, "every gradient committed")
        assert not role.failed and not worker_stop.is_set() and role.life == 1
        assert metrics.registry.get_sample_value("freshtower_item_owner_replacements_total") == 1
        assert sorted(role.owner.owned) == list(range(kafka_settings.partitions))  # the new life took them all
    finally:
        role.close()
    # The first life applied some steps before it stuck; the second restored them from item-rows and went on from the
    # committed offsets: the rows are an uninterrupted owner's, bit for bit.
    mirror, _ = committed_item_rows(kafka_settings)
    assert mirror.ids() == sorted(expected)
    for item_id, row in expected.items():
        assert np.array_equal(mirror.row(item_id), row), item_id


def test_a_life_that_fails_stops_the_worker_instead_of_being_replaced(
    kafka_settings: KafkaSettings, version: ModelVersion, tmp_path: Path
) -> None:
    ensure_topics(kafka_settings, names=ITEM_PATH_TOPICS)

    def make(life: int, _previous: ItemOwner | None) -> ItemOwner:
        owner = ItemOwner(kafka_settings, _settings(tmp_path, life, stall_s=30), version)

        def broken(*args, **kwargs):
            raise RuntimeError("a bug in the owner")

        owner.step = broken
        return owner

    worker_stop = threading.Event()
    role = OwnerRole(make, worker_stop, stall_s=30)
    try:
        assert worker_stop.wait(30), "the worker was not stopped"
        assert role.failed and role.life == 0
        role.thread.join(10)
        assert not role.thread.is_alive()
    finally:
        role.close()


# Loaded before the owner process (sitecustomize): the owner group's poll waits for good, as kafka-python 3.0's did.
HANG = """
import threading
from kafka import KafkaConsumer
poll = KafkaConsumer.poll
def hang(self, *args, **kwargs):
    if self.config["group_id"] and self.config["client_id"] == "freshtower-item-owner":
        threading.Event().wait()
    return poll(self, *args, **kwargs)
KafkaConsumer.poll = hang
"""


def test_a_standalone_owner_stuck_in_poll_exits_69_for_its_supervisor(
    kafka_settings: KafkaSettings, models: Path, tmp_path: Path
) -> None:
    ensure_topics(kafka_settings, names=ITEM_PATH_TOPICS)
    (tmp_path / "hang").mkdir()
    (tmp_path / "hang" / "sitecustomize.py").write_text(HANG)
    command = [
        sys.executable, "-m", "streaming", "item-owner", "--bootstrap", kafka_settings.bootstrap_servers,
        "--topic-prefix", kafka_settings.topic_prefix, "--models", str(models), "--state-dir", str(tmp_path / "o"),
        "--metrics-port", "0", "--stall-s", "3",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'hang'}{os.pathsep}{REPO}"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_STALLED, done.stderr[-3000:]
    assert "item-owner made no progress for" in done.stderr and "hang" in done.stderr, done.stderr[-3000:]
