"""A worker whose item rows have an owner (item_rows = "owner"), on the real broker, SIGKILLed at random points."""

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
from kafka import KafkaConsumer, TopicPartition

from streaming.events import Click
from streaming.item_path import ItemPath
from streaming.item_rows import Gradient, decode_gradient
from streaming.topics import ITEM_PATH_TOPICS, ensure_topics
from tests.conftest import free_port
from tests.test_worker_recovery import events_applied, worker_command
from tests.worker_fixtures import (
    committed_item_rows,
    committed_records,
    produce,
    read_state,
    register_model,
    split_world,
    wait_for,
)
from trainer.artifact import load_version
from trainer.registry import Registry

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def committed_gradients(settings) -> list:
    """Every gradient record committed to item-grads (read committed, up to the high watermark)."""
    return [decode_gradient(r.key.decode(), r.value) for r in committed_records(settings, settings.topic("item-grads"))]


def owner_applied(port: int) -> float:
    """Gradient records the owner process has applied, from its /metrics endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return -1.0
    for line in text.splitlines():
        if line.startswith('freshtower_item_owner_gradients_total{outcome="applied"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_worker_sigkilled_sends_every_batchs_item_gradients_once_and_mirrors_the_owners_rows(
    kafka_settings, tmp_path: Path
) -> None:
    _, day_one, day_two = split_world()
    models = tmp_path / "models"
    register_model(models, day_one)
    ensure_topics(kafka_settings, names=ITEM_PATH_TOPICS)
    produce(kafka_settings, day_two)
    clicks = sum(1 for e in day_two if isinstance(e, Click))
    env = {**os.environ, "FRESHTOWER_CHECKPOINT_INTERVAL_S": "0.3", "PYTHONPATH": str(REPO)}

    # The same stream through a worker that trains its item rows itself: what must be counted.
    local = tmp_path / "local"
    subprocess.run(worker_command(kafka_settings, models, local, "local"), env=env, check=True, timeout=300)

    owner_port = free_port()
    owner = subprocess.Popen(
        [
            sys.executable, "-m", "streaming", "item-owner", "--bootstrap", kafka_settings.bootstrap_servers,
            "--topic-prefix", kafka_settings.topic_prefix, "--models", str(models), "--state-dir",
            str(tmp_path / "owner"), "--instance-id", "owner-0", "--metrics-port", str(owner_port),
        ],
        cwd=REPO, env=env, stderr=open(tmp_path / "owner.log", "w"),  # noqa: SIM115
    )  # fmt: skip
    crashed = tmp_path / "crashed"
    env = {**env, "FRESHTOWER_ITEM_ROWS": "owner"}
    rng = random.Random(20261205)
    kills = 0
    try:
        for _ in range(4):
            port = free_port()
            process = subprocess.Popen(worker_command(kafka_settings, models, crashed, "crashed", port), env=env)
            target = rng.randint(2_000, 10_000)
            deadline = time.monotonic() + 120
            while events_applied(port) < target and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if process.poll() is not None:
                break
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            kills += 1
        subprocess.run(worker_command(kafka_settings, models, crashed, "crashed"), env=env, check=True, timeout=300)
        gradients = committed_gradients(kafka_settings)
        wait_for(lambda: owner_applied(owner_port) == len(gradients), 120, "the owner applying every gradient")
        # Once more, now that the owner has applied everything: the worker mirrors its last rows and stops.
        subprocess.run(worker_command(kafka_settings, models, crashed, "crashed"), env=env, check=True, timeout=300)
    finally:
        owner.send_signal(signal.SIGTERM)
        assert owner.wait(15) == 0
    assert kills >= 2, f"only {kills} kills landed mid-stream"

    expected, got = read_state(local), read_state(crashed)
    # Every trained click's use reached the owner once: nothing lost with a killed worker, nothing sent twice.
    assert expected["meta"]["examples"] == got["meta"]["examples"] == clicks
    assert sum(g.uses for g in gradients) == clicks
    # The counters and lists of the worker are what the single worker made (exactly: nothing lost, nothing twice).
    assert got["offsets"] == expected["offsets"]
    assert got["meta"]["builder"] == expected["meta"]["builder"]
    user_counts = {k: v for k, v in expected["counts"].items() if not k.startswith("p:item:")}
    assert {k: v for k, v in got["counts"].items() if not k.startswith("p:item:")} == user_counts
    # The worker's item rows are the owner's, bit for bit; the owner admitted the ids the single worker admitted.
    mirror, _ = committed_item_rows(kafka_settings)
    items = {k[len("t:item:") :]: v for k, v in got["rows"].items() if k.startswith("t:item:")}
    local_items = {k[len("t:item:") :] for k in expected["rows"] if k.startswith("t:item:")}
    assert sorted(items) == mirror.ids() == sorted(local_items)
    for ident, row in items.items():
        assert np.array_equal(row, mirror.row(ident)), ident
    # The rows themselves differ from the single worker's only by the owner's delay: each batch trains against
    # item rows that may lack the last few batches' own steps. What the online updates moved (row minus the
    # model's row) points the same way: the cosine of the two moves, per item.
    version = load_version(Registry(models).path("v1"))
    weight = version.model.item_tower.id_table.weight.detach().numpy()
    index = {t: k for k, t in enumerate(version.encoder.item_vocab.tokens, start=1)}

    def moved(row: np.ndarray, ident: str) -> np.ndarray:
        return row.astype(np.float64) - weight[index.get(ident, 0)]

    cosines = []
    for ident, row in items.items():
        a, b = moved(row, ident), moved(expected["rows"][f"t:item:{ident}"], ident)
        if np.linalg.norm(a) > 0 and np.linalg.norm(b) > 0:
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    print(f"item moves: cosine to the single worker's median {np.median(cosines):.3f}, mean {np.mean(cosines):.3f}")
    assert len(cosines) > 0.9 * len(items) and np.median(cosines) > 0.5


def test_recovery_sends_a_checkpoints_gradients_again_only_when_its_transaction_did_not_commit(
    kafka_settings, tmp_path: Path
) -> None:
    """The transaction record of a checkpoint, written locally, then a crash before its Kafka transaction: the
    next life sends it (once); a record whose transaction committed is not sent again."""
    ensure_topics(kafka_settings, names=ITEM_PATH_TOPICS)
    clicks = kafka_settings.topic("clicks")
    group = KafkaConsumer(
        group_id="g-recover",
        enable_auto_commit=False,
        isolation_level="read_committed",
        **kafka_settings.client_config(),
    )
    first = ItemPath(kafka_settings, "g-recover-w", {})
    first.take("v1", [Gradient("i1", 5, 2, np.ones(4)), Gradient("i2", 6, 1, None)])
    lost = first.prepare(7, {f"{clicks}:0": 3})  # written with checkpoint 7 ... and the process dies here
    first.producer.close(timeout=2)
    second = ItemPath(kafka_settings, "g-recover-w", {})
    assert second.recover(lost, group)  # not committed: sent
    assert group.committed(TopicPartition(clicks, 0), metadata=True).metadata == "txn:7"
    assert not second.recover(lost, group)  # committed now: not again
    second.take("v1", [Gradient("i3", 9, 1, np.zeros(4))])
    done = second.prepare(8, {f"{clicks}:0": 3})  # same offsets as checkpoint 7 (no new event): told apart by seq
    assert second.commit(done, group)
    assert not ItemPath(kafka_settings, "g-recover-w", {}).recover(done, group)
    got = committed_gradients(kafka_settings)
    assert [(g.item_id, g.uses) for g in got if g.item_id in ("i1", "i2", "i3")] == [("i1", 2), ("i2", 1), ("i3", 1)]
    group.close()
