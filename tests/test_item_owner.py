"""The item owner on the real broker: hand-worked Adagrad steps, and exactly-once rows under SIGKILL and rebalances."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from streaming.item_owner import ItemOwner, OwnerSettings
from streaming.item_rows import (
    MODEL_HEADER,
    PENDING_PREFIX,
    Gradient,
    RowsMirror,
    apply_gradient,
    apply_in_waves,
    decode_gradient,
    encode_gradient,
    partition_of,
)
from streaming.settings import KafkaSettings
from streaming.state import StateStore
from streaming.tables import EmbeddingTable, TableSettings
from streaming.topics import ITEM_PATH_TOPICS, ensure_topics
from tests.conftest import free_port
from tests.worker_fixtures import committed_item_rows, promote_second_version, register_model, split_world, wait_for
from trainer.artifact import load_version

REPO = Path(__file__).resolve().parents[1]
DIM = 16  # the fixture model's id_dim


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    _, day_one, _ = split_world()
    root = tmp_path_factory.mktemp("owner-models")
    registry = register_model(root, day_one)
    return root, load_version(registry.path("v1"))


def _send(settings: KafkaSettings, gradients: list[Gradient], version: str = "v1") -> None:
    producer = KafkaProducer(**settings.producer_config())
    for g in gradients:
        producer.send(
            settings.topic("item-grads"),
            key=g.item_id.encode(),
            value=encode_gradient(g),
            headers=[(MODEL_HEADER, version.encode())],
        )
    producer.flush()
    producer.close()


@pytest.mark.kafka
def test_gradient_codec_round_trips_and_refuses_what_it_cannot_read() -> None:
    g = Gradient("i7", 1_000, 3, np.arange(4, dtype=np.float32))
    back = decode_gradient("i7", encode_gradient(g))
    assert (back.item_id, back.ts_ms, back.uses) == ("i7", 1_000, 3) and back.grad.tolist() == [0, 1, 2, 3]
    assert decode_gradient("i7", encode_gradient(Gradient("i7", 5, 1, None))).grad is None
    with pytest.raises(ValueError, match="shorter"):
        decode_gradient("i7", b"\x01")
    with pytest.raises(ValueError, match="vector bytes"):
        decode_gradient("i7", encode_gradient(g)[:-8])
    with pytest.raises(ValueError, match="not finite"):
        decode_gradient("i7", encode_gradient(Gradient("i7", 1, 1, np.array([np.nan], dtype=np.float32))))
    assert partition_of("i7", 4) == partition_of("i7", 4) and {partition_of(f"i{k}", 4) for k in range(50)} == {
        0,
        1,
        2,
        3,
    }


@pytest.mark.kafka
def test_owner_applies_row_wise_adagrad_worked_by_hand(kafka_settings: KafkaSettings, model, tmp_path: Path) -> None:
    _, version = model
    ensure_topics(kafka_settings, names=ITEM_PATH_TOPICS)
    known = version.encoder.item_vocab.tokens[0]  # vocabulary row 1 of the model's item table
    w0 = version.model.item_tower.id_table.weight[1].detach().numpy().copy()
    default = version.model.item_tower.id_table.weight[0].detach().numpy().copy()
    _send(
        kafka_settings,
        [
            Gradient(known, 10, 1, np.full(DIM, 0.4, dtype=np.float32)),
            Gradient("brand-new", 11, 1, np.full(DIM, 1.0, dtype=np.float32)),  # 1 use of 2: not admitted, ignored
            Gradient(known, 12, 2, np.full(DIM, -0.3, dtype=np.float32)),
            Gradient("brand-new", 13, 1, np.full(DIM, 0.2, dtype=np.float32)),  # 2nd use: admitted, then trained
        ],
    )
    _send(kafka_settings, [Gradient(known, 14, 1, np.full(DIM, 9.0, dtype=np.float32))], version="v0")  # dropped
    owner = ItemOwner(kafka_settings, OwnerSettings(state_dir=tmp_path / "owner", session_timeout_ms=6000), version)
    try:
        applied = 0
        deadline = time.monotonic() + 60
        while applied < 4 or owner.stats.dropped < 1:
            assert time.monotonic() < deadline, owner.stats
            applied += owner.step(timeout_ms=500)
        assert (applied, owner.stats.dropped) == (4, 1)
        sample = owner.metrics.registry.get_sample_value
        assert sample("freshtower_item_owner_gradients_total", {"outcome": "applied"}) == 4
        assert sample("freshtower_item_owner_gradients_total", {"outcome": "dropped"}) == 1
        assert sample("freshtower_item_owner_partitions") == 4 and sample("freshtower_item_owner_rows") == 2
    finally:
        owner.close()
    # Row-wise Adagrad from an accumulator of 0.1: G += mean(g^2); w -= 0.05 * g / sqrt(G).
    # known: G = 0.1 + 0.16 = 0.26, w1 = w0 - 0.05 * 0.4 / sqrt(0.26); G = 0.26 + 0.09 = 0.35, w2 = w1 + 0.05 * 0.3 / sqrt(0.35)
    w2 = w0 - 0.05 * 0.4 / np.sqrt(0.26) + 0.05 * 0.3 / np.sqrt(0.35)
    # brand-new: admitted at its 2nd use from the default row, G = 0.1 + 0.04 = 0.14, w = default - 0.05 * 0.2 / sqrt(0.14)
    new = default - 0.05 * 0.2 / np.sqrt(0.14)
    mirror, last = committed_item_rows(kafka_settings)
    np.testing.assert_allclose(mirror.row(known), w2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(mirror.row("brand-new"), new, rtol=0, atol=1e-6)
    assert (
        mirror.updates(known) == 2 and mirror.updates("brand-new") == 1 and mirror.ids() == sorted([known, "brand-new"])
    )
    # The admission count was written, then removed by a tombstone once the id was admitted.
    assert PENDING_PREFIX + b"brand-new" in last and last[PENDING_PREFIX + b"brand-new"] is None
    assert RowsMirror("v2").row(known) is None  # a mirror of another model version takes none of these rows


def _gradients(item_ids: list[str], n: int, seed: int) -> list[Gradient]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        grad = np.asarray([rng.gauss(0, 0.1) for _ in range(DIM)], dtype=np.float32)
        out.append(Gradient(rng.choice(item_ids), 1_000 + k, rng.choice((1, 1, 2)), grad))
    return out


def _reference(version, gradients: list[Gradient], partitions: int, tmp_path: Path) -> dict[str, np.ndarray]:
    """The rows one uninterrupted owner makes: each partition's records in order (the same table code)."""
    base = version.model.item_tower.id_table.weight.detach().numpy().copy()
    index = {t: k for k, t in enumerate(version.encoder.item_vocab.tokens, start=1)}
    store = StateStore(tmp_path / "reference", sync=False)
    table = EmbeddingTable("item", base, index, TableSettings(), store)
    for p in range(partitions):
        for g in (g for g in gradients if partition_of(g.item_id, partitions) == p):
            table.observe([g.item_id] * g.uses, g.ts_ms)
            _, slots = table.gather([g.item_id])
            table.apply_gradients(slots, g.grad[None, :])
    rows = {i: table.row(i) for i in table.ids()}
    store.close()
    return rows


def _owner(settings: KafkaSettings, models: Path, tmp_path: Path, name: str, life: int, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "streaming", "item-owner", "--bootstrap", settings.bootstrap_servers,
        "--topic-prefix", settings.topic_prefix, "--models", str(models), "--state-dir", str(tmp_path / name),
        "--instance-id", name, "--session-timeout-ms", "6000", "--transaction-timeout-ms", "8000",
        "--metrics-port", str(port),
    ]  # fmt: skip
    log = open(tmp_path / f"{name}-{life}.log", "w")  # noqa: SIM115 (closed with the process)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _owns(tmp_path: Path, name: str, life: int, count: int) -> bool:
    """Whether that life of the owner last logged owning ``count`` partitions (a restore is done by then)."""
    path = tmp_path / f"{name}-{life}.log"
    lines = [line for line in path.read_text().splitlines() if "owning item partitions" in line]
    return bool(lines) and lines[-1].split("[")[1].split("]")[0].count(",") + 1 == count


def _progress(settings: KafkaSettings) -> int:
    """Gradient records the owner group has committed, over every partition."""
    admin = KafkaAdminClient(**settings.client_config())
    try:
        offsets = admin.list_group_offsets("freshtower-item-owner")["freshtower-item-owner"]
    finally:
        admin.close()
    return sum(o.offset for tp, o in offsets.items() if tp.topic == settings.topic("item-grads"))


@pytest.mark.kafka
@pytest.mark.slow
def test_two_owners_sigkill_and_scaling_apply_every_gradient_exactly_once(
    kafka_settings: KafkaSettings, model, tmp_path: Path
) -> None:
    """Owners a and b share the 4 partitions; a is SIGKILLed mid-stream and b takes them all (2 -> 1 owners); a comes
    back under its name (1 -> 2), then b is SIGKILLed and comes back. The rows equal an uninterrupted owner's, bit
    for bit: no gradient lost, none applied twice."""
    models, version = model
    ensure_topics(kafka_settings, names=ITEM_PATH_TOPICS)
    items = [*version.encoder.item_vocab.tokens[:150], *(f"new-{k}" for k in range(30))]
    gradients = _gradients(items, 12_000, seed=4)
    expected = _reference(version, gradients, kafka_settings.partitions, tmp_path)
    lives = {"a": 0, "b": 0}
    ports = {"a": free_port(), "b": free_port()}

    def start(name: str) -> subprocess.Popen:
        lives[name] += 1
        return _owner(kafka_settings, models, tmp_path, name, lives[name], ports[name])

    def owns(name: str, count: int) -> bool:
        return _owns(tmp_path, name, lives[name], count)

    def stream() -> None:  # about 40 s of gradients, in slices
        for begin in range(0, len(gradients), 150):
            _send(kafka_settings, gradients[begin : begin + 150])
            time.sleep(0.5)

    a, b = start("a"), start("b")
    producer = threading.Thread(target=stream)
    try:
        wait_for(lambda: owns("a", 2) and owns("b", 2), 90, "two owners of two partitions each")
        producer.start()
        wait_for(lambda: _progress(kafka_settings) >= 1_500, 60, "both owners applying gradients")
        a.send_signal(signal.SIGKILL)  # mid-stream, most likely inside a transaction
        a.wait(10)
        done = _progress(kafka_settings)
        wait_for(lambda: owns("b", 4), 60, "b owning every partition")
        wait_for(lambda: _progress(kafka_settings) >= done + 1_000, 60, "b alone applying gradients")
        a = start("a")  # back under its name: init_transactions aborts the transaction its last life left open
        wait_for(lambda: owns("a", 2) and owns("b", 2), 60, "two owners again")
        done = _progress(kafka_settings)
        wait_for(lambda: _progress(kafka_settings) >= done + 1_000, 60, "both owners applying gradients again")
        assert producer.is_alive(), "the stream ended before the last crash: make it longer"
        b.send_signal(signal.SIGKILL)
        b.wait(10)
        b = start("b")
        producer.join(120)
        wait_for(lambda: _progress(kafka_settings) == len(gradients), 120, "every gradient applied")
        scraped = {name: httpx.get(f"http://127.0.0.1:{ports[name]}/metrics").text for name in ports}
        for p in (a, b):
            p.send_signal(signal.SIGTERM)
        assert a.wait(15) == 0 and b.wait(15) == 0  # SIGTERM: the step in hand is committed, then a clean exit
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
        if producer.is_alive():
            producer.join(60)
    for text in scraped.values():
        assert "freshtower_item_owner_partitions 2.0" in text, text
    mirror, _ = committed_item_rows(kafka_settings)
    assert mirror.ids() == sorted(expected)
    for item_id, row in expected.items():
        assert np.array_equal(mirror.row(item_id), row), item_id


@pytest.mark.kafka
def test_owner_refuses_topics_whose_partition_counts_differ(kafka_settings: KafkaSettings, model, tmp_path) -> None:
    _, version = model
    admin = KafkaAdminClient(**kafka_settings.client_config())
    try:
        admin.create_topics(
            [NewTopic(kafka_settings.topic("item-grads"), 2, 1), NewTopic(kafka_settings.topic("item-rows"), 4, 1)]
        )
    finally:
        admin.close()
    with pytest.raises(RuntimeError, match="has 2 partitions and .* 4"):
        ItemOwner(kafka_settings, OwnerSettings(state_dir=tmp_path / "owner"), version)


@pytest.mark.kafka
def test_owner_follows_the_workers_to_a_promoted_version(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    """Gradients of v2 arrive once the workers switched: the owner adopts v2 (rows start again from v2's rows)
    and drops v1's gradients from then on."""
    _, day_one, day_two = split_world()
    registry = register_model(tmp_path / "models", day_one)
    v1 = load_version(registry.path("v1"))
    ensure_topics(kafka_settings, names=ITEM_PATH_TOPICS)
    item = v1.encoder.item_vocab.tokens[0]
    settings = OwnerSettings(state_dir=tmp_path / "owner", session_timeout_ms=6000)
    owner = ItemOwner(kafka_settings, settings, v1, registry=registry)
    try:

        def drain(n: int) -> None:
            done, deadline = 0, time.monotonic() + 60
            while done < n:
                assert time.monotonic() < deadline, owner.stats
                owner.step(timeout_ms=500)
                done = owner.stats.gradients + owner.stats.dropped

        _send(kafka_settings, [Gradient(item, 10, 1, np.full(DIM, 0.4))])
        drain(1)
        promote_second_version(registry, day_one + day_two[:100], v1.data_cutoff_ms + 1)
        v2 = load_version(registry.path("v2"))
        _send(kafka_settings, [Gradient(item, 20, 1, np.full(DIM, 0.4))], version="v2")
        _send(kafka_settings, [Gradient(item, 21, 1, np.full(DIM, 0.4))], version="v1")  # a straggler: dropped
        drain(3)
        assert (owner.model_version, owner.stats.switches, owner.stats.gradients, owner.stats.dropped) == (
            "v2",
            1,
            2,
            1,
        )
    finally:
        owner.close()
    base = v2.model.item_tower.id_table.weight[v2.encoder.item_vocab.index(item)].detach().numpy()
    mirror, _ = committed_item_rows(kafka_settings, model_version="v2")
    # One step from v2's own row (accumulator 0.1 + 0.16), not from the v1 row the first gradient moved.
    np.testing.assert_allclose(mirror.row(item), base - 0.05 * 0.4 / np.sqrt(0.26), rtol=0, atol=1e-6)
    # The key now holds v2's row: a reader still at v1 takes nothing from it.
    assert committed_item_rows(kafka_settings, model_version="v1")[0].row(item) is None


def test_waves_make_the_rows_of_record_by_record_application(model, tmp_path: Path) -> None:
    """An owner's step applies each item's k-th record of the step in one vectorised call (wave k): the rows,
    accumulators, update counts and admissions are those of applying the records one by one, bit for bit."""
    _, version = model
    base = version.model.item_tower.id_table.weight.detach().numpy().copy()
    index = {t: k for k, t in enumerate(version.encoder.item_vocab.tokens, start=1)}
    items = [*version.encoder.item_vocab.tokens[:20], *(f"new-{k}" for k in range(8))]
    gradients = _gradients(items, 400, seed=9)  # repeats within the step, unknown ids admitted at their 2nd use
    gradients += [Gradient(items[0], 5_000, 1, None), Gradient("new-0", 5_001, 1, None)]  # skipped steps: uses only
    one, waves = (StateStore(tmp_path / name, sync=False) for name in ("one", "waves"))
    by_record = EmbeddingTable("item", base, index, TableSettings(), one)
    by_wave = EmbeddingTable("item", base, index, TableSettings(), waves)
    for g in gradients:
        apply_gradient(by_record, g)
    apply_in_waves(by_wave, gradients)
    by_record.flush()
    by_wave.flush()
    assert by_wave.ids() == by_record.ids() and len(by_record.ids()) > 20
    assert one.staged() == waves.staged()  # every row's header (updates, accumulator, last seen) and vector
    one.close()
    waves.close()
