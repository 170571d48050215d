"""The publisher's mirror of a scaled-out worker group, on the real broker: hand-chosen committed, aborted and open
transactions in ``user-state`` and ``item-rows``, catalogue records in ``items``; what the mirror holds, what the
publisher publishes from it, a model switch, and a mirror SIGKILLed mid-stream."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from publisher.changelog_source import ChangelogMirror, ChangelogSource, MirrorStep
from publisher.publish import Publisher
from publisher.settings import PublisherSettings
from publisher.store import RocksStore
from streaming.events import Item, UserProfile, encode
from streaming.item_rows import MODEL_HEADER
from streaming.producer import EventProducer
from streaming.settings import KafkaSettings
from streaming.sources.synthetic import WorldConfig
from streaming.state import StateStore
from streaming.tables import ROW_HEADER
from streaming.topics import SCALE_OUT_TOPICS, USER_STATE_TOPIC, ensure_topics
from tests.worker_fixtures import promote_second_version, register_model, split_world
from trainer.artifact import ModelVersion, load_version

REPO = Path(__file__).resolve().parents[1]
DIM = 16  # the fixture model's id_dim
WORLD = WorldConfig(seed=5, n_users=60, n_items=80, days=2.0, requests_per_day=300, new_items_per_day=10)


def row(last_seen_ms: int, updates: int, base: float) -> bytes:
    """An online row as a worker stores it: the ``<qqf`` header, then ``float32[DIM]`` = base, base + 0.25, ..."""
    vector = base + 0.25 * np.arange(DIM, dtype=np.float32)
    return ROW_HEADER.pack(last_seen_ms, updates, 0.5) + vector.astype("<f4").tobytes()


def vector(base: float) -> np.ndarray:
    return (base + 0.25 * np.arange(DIM, dtype=np.float32)).astype(np.float32)


def count(n: int) -> bytes:
    return np.array([n], dtype="<i8").tobytes()


class Writer:
    """A transactional producer, as a worker or item owner holds one: records go to a chosen partition with the
    model version in the ``model`` header."""

    def __init__(self, settings: KafkaSettings, name: str) -> None:
        self.settings = settings
        self.producer = KafkaProducer(
            **settings.producer_config(), transactional_id=f"{settings.topic_prefix}{name}", enable_idempotence=True
        )
        self.producer.init_transactions()

    def transaction(self, records: list[tuple[str, int, bytes, bytes | None, str]], *, commit: bool = True) -> None:
        """``(topic, partition, key, value, model version)`` records in one transaction, committed or aborted."""
        self.producer.begin_transaction()
        self.send(records)
        if commit:
            self.producer.commit_transaction()
        else:
            self.producer.abort_transaction()

    def send(self, records: list[tuple[str, int, bytes, bytes | None, str]]) -> None:
        for topic, partition, key, value, model in records:
            headers = [(MODEL_HEADER, model.encode())]
            self.producer.send(self.settings.topic(topic), key=key, value=value, partition=partition, headers=headers)
        self.producer.flush()

    def close(self) -> None:
        self.producer.close(timeout=5)


def secondary(path: Path) -> StateStore:
    """The mirror's state read as a RocksDB secondary (beside the mirror that holds it open)."""
    return StateStore(path, secondary=tempfile.mkdtemp(prefix="mirror-secondary-"))


def durable(path: Path) -> tuple[dict[bytes, bytes], dict[str, int], dict]:
    """A mirror's keys (its own ``m:`` and ``x:`` keys left out), read positions and meta."""
    store = secondary(path)
    try:
        keys = {k: v for k, v in store.scan(b"") if not k.startswith((b"m:", b"x:"))}
        return keys, store.offsets(), store.meta()
    finally:
        store.close()


def change_log(path: Path) -> dict[int, set[str]]:
    """checkpoint -> its change-log entries ``u:<id>`` / ``i:<id>``."""
    store = secondary(path)
    try:
        out: dict[int, set[str]] = {}
        for key, _ in store.scan(b"x:"):
            out.setdefault(int(key[2:18], 16), set()).add(key[19:].decode())
        return out
    finally:
        store.close()


def end_offsets(settings: KafkaSettings, topics: tuple[str, ...]) -> dict[str, int]:
    """High watermarks of every partition of ``topics``, as ``{"topic:partition": offset}``."""
    consumer = KafkaConsumer(**settings.client_config())
    try:
        tps = [
            TopicPartition(settings.topic(t), p)
            for t in topics
            for p in consumer.partitions_for_topic(settings.topic(t))
        ]
        return {f"{tp.topic}:{tp.partition}": offset for tp, offset in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


ITEMS = [
    Item("i1", "news", ("a",), {"ctr": 0.1}, 1_000, 3_000),
    Item("i2", "sport", ("b",), {"ctr": 0.2}, 1_000, 3_500),
    Item("i3", "news", (), {}, 1_000, 4_000),
]
PROFILE = UserProfile("u1", discrete={"city": "x"}, ts_ms=900)


def first_records(settings: KafkaSettings) -> Writer:
    """Committed, aborted and (left open) transactions; the open one's writer is returned to end it later."""
    ensure_topics(settings, names=SCALE_OUT_TOPICS)
    worker0, worker1, worker2, owner = (Writer(settings, n) for n in ("w0", "w1", "w2", "owner"))
    worker0.transaction(
        [
            (USER_STATE_TOPIC, 0, b"t:user:u1", row(1_000, 2, 1.0), "v1"),
            (USER_STATE_TOPIC, 0, b"n:u1", json.dumps(["i1", "i2"]).encode(), "v1"),
            (USER_STATE_TOPIC, 0, b"na:u1", count(5_000), "v1"),
            (USER_STATE_TOPIC, 0, b"prof:u1", encode(PROFILE), "v1"),
            (USER_STATE_TOPIC, 0, b"c@0:i1", count(3), "v1"),
            (USER_STATE_TOPIC, 0, b"e@0:i1", count(7), "v1"),
            (USER_STATE_TOPIC, 1, b"c@1:i1", count(4), "v1"),
            (USER_STATE_TOPIC, 1, b"c@1:i2", count(5), "v1"),
            (USER_STATE_TOPIC, 1, b"t:user:u2", row(1_500, 1, 2.0), "v0"),  # another model version: skipped
            (USER_STATE_TOPIC, 2, b"t:user:u3", row(4_500, 1, 3.0), "v1"),
            (USER_STATE_TOPIC, 2, b"p:user:u4", b"\x01\x02", "v1"),
            (USER_STATE_TOPIC, 3, b"m:meta", b"{}", "v1"),  # the mirror's own key: skipped
            (USER_STATE_TOPIC, 3, b"s@3", b'{"clicks": 9}', "v1"),
        ]
    )
    worker1.transaction(
        [
            (USER_STATE_TOPIC, 0, b"n:u1", json.dumps(["i9"]).encode(), "v1"),
            (USER_STATE_TOPIC, 1, b"t:user:u5", row(9_000, 1, 5.0), "v1"),
        ],
        commit=False,
    )
    owner.transaction(
        [
            ("item-rows", 0, b"t:item:i1", row(2_000, 1, 0.5), "v1"),
            ("item-rows", 1, b"t:item:i2", row(2_000, 1, 0.75), "v0"),  # another model version: skipped
            ("item-rows", 2, b"p:item:i3", count(1), "v1"),
        ]
    )
    owner.close()
    with EventProducer(settings) as producer:
        producer.send_all(ITEMS)
    worker2.producer.begin_transaction()
    worker2.send([(USER_STATE_TOPIC, 3, b"n:u9", json.dumps(["i3"]).encode(), "v1")])  # open: not visible yet
    worker0.close()
    worker1.close()
    return worker2


FIRST = {
    b"t:user:u1": row(1_000, 2, 1.0),
    b"n:u1": b'["i1", "i2"]',
    b"na:u1": count(5_000),
    b"prof:u1": encode(PROFILE),
    b"c@0:i1": count(3),
    b"e@0:i1": count(7),
    b"c@1:i1": count(4),
    b"c@1:i2": count(5),
    b"c:i1": count(3 + 4),
    b"c:i2": count(5),
    b"e:i1": count(7),
    b"t:user:u3": row(4_500, 1, 3.0),
    b"p:user:u4": b"\x01\x02",
    b"s@3": b'{"clicks": 9}',
    b"t:item:i1": row(2_000, 1, 0.5),
    b"p:item:i3": count(1),
    **{b"cat:" + item.item_id.encode(): encode(item) for item in ITEMS},
}


@pytest.mark.kafka
def test_the_mirror_holds_exactly_what_was_committed(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    open_txn = first_records(kafka_settings)
    state = tmp_path / "mirror"
    mirror = ChangelogMirror(kafka_settings, state, model_version="v1", step_timeout_s=20)
    try:
        step = mirror.step()
        # 11 + 2 committed state records and 3 catalogue records; 3 skipped (u2 and i2 of v0, m:meta); u5 and the
        # second n:u1 aborted, n:u9 open. Users changed: u1, u3; items: i1 (row, record), i2 and i3 (records).
        assert step == MirrorStep(checkpoint=1, applied=16, skipped=3, users=2, items=3, caught_up=True)
        keys, offsets, meta = durable(state)
        assert keys == FIRST
        assert meta == {"checkpoints": 1, "model_version": "v1", "watermark_ms": 5_000, "replay_until": {}}
        # Every partition is read to its end but user-state 3, which stops before the open transaction's record.
        ends = end_offsets(kafka_settings, ("user-state", "item-rows", "items"))
        assert offsets == {**ends, kafka_settings.topic("user-state:3"): ends[kafka_settings.topic("user-state:3")] - 1}
        assert change_log(state) == {1: {"u:u1", "u:u3", "i:i1", "i:i2", "i:i3"}}

        open_txn.producer.commit_transaction()
        open_txn.close()
        worker = Writer(kafka_settings, "w0")
        worker.transaction(
            [
                (USER_STATE_TOPIC, 2, b"t:user:u3", None, "v1"),  # a tombstone deletes
                (USER_STATE_TOPIC, 2, b"c@2:i1", count(10), "v1"),
                (USER_STATE_TOPIC, 1, b"c@1:i2", None, "v1"),  # i2's only counter: c:i2 goes too
                (USER_STATE_TOPIC, 0, b"t:user:u1", row(8_000, 3, 9.0), "v0"),  # skipped: u1 keeps its v1 row
            ]
        )
        Writer(kafka_settings, "owner").transaction([("item-rows", 1, b"t:item:i2", row(6_000, 2, 0.25), "v1")])
        worker.close()
        tombstone = KafkaProducer(**kafka_settings.producer_config())
        tombstone.send(kafka_settings.topic("items"), key=b"i3", value=None)  # the catalogue forgets i3
        tombstone.close()
        assert mirror.step() == MirrorStep(checkpoint=2, applied=6, skipped=1, users=2, items=2, caught_up=True)
        keys, offsets, meta = durable(state)
        expected = {k: v for k, v in FIRST.items() if k not in (b"t:user:u3", b"c@1:i2", b"c:i2", b"cat:i3")}
        expected |= {
            b"n:u9": b'["i3"]',
            b"c@2:i1": count(10),
            b"c:i1": count(3 + 4 + 10),
            b"t:item:i2": row(6_000, 2, 0.25),
        }
        assert keys == expected
        assert meta["checkpoints"] == 2 and meta["watermark_ms"] == 6_000  # i2's row was last seen at 6,000
        assert offsets == end_offsets(kafka_settings, ("user-state", "item-rows", "items"))
        assert change_log(state)[2] == {"u:u9", "u:u3", "i:i2", "i:i3"}
        # Nothing new: no checkpoint.
        assert mirror.step() == MirrorStep(checkpoint=2, applied=0, skipped=0, users=0, items=0, caught_up=True)
    finally:
        mirror.close()


def item_vector(version: ModelVersion, item: Item | None, item_id: str, id_row: np.ndarray) -> np.ndarray:
    """The serving vector of one item: the item tower on its catalogue record (default features without one)."""
    with torch.no_grad():
        batch = version.encoder.encode_items([item_id], {item_id: item} if item else {})
        return version.model.item_tower(batch, id_rows=torch.from_numpy(id_row[None, :])).numpy()[0]


def model_row(version: ModelVersion, tower: str, ident: str) -> np.ndarray:
    """The model's own ID row of ``ident`` (row 0 for an id it does not know)."""
    vocab = version.encoder.user_vocab if tower == "user" else version.encoder.item_vocab
    table = (version.model.user_tower if tower == "user" else version.model.item_tower).id_table
    return table.weight[vocab.index(ident)].detach().numpy()


@pytest.mark.kafka
def test_the_publisher_publishes_the_mirror_and_follows_the_registry_to_a_new_model(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    _, day_one, _ = split_world(WORLD)
    models = tmp_path / "models"
    registry = register_model(models, day_one)
    v1 = load_version(registry.path("v1"))
    open_txn = first_records(kafka_settings)
    open_txn.producer.commit_transaction()
    open_txn.close()
    # Rows of the next model, written before the registry promotes it: skipped now, read again at the switch.
    early = Writer(kafka_settings, "w3")
    early.transaction([(USER_STATE_TOPIC, 0, b"t:user:u1", row(7_000, 1, 7.0), "v2")])
    early.close()
    settings = PublisherSettings(store_path=tmp_path / "kv", interval_s=1.0, index_kind="none")
    mirror = ChangelogMirror(kafka_settings, tmp_path / "mirror", models_dir=models, step_timeout_s=20)
    with ChangelogSource(mirror, models) as source, RocksStore(settings.store_path, sync=False) as store:
        publisher = Publisher(store, source, settings)
        meta = publisher.publish_once().meta
        assert (meta.version, meta.model_version, meta.watermark_ms) == (1, "v1", 5_000)
        with store.reader() as view:
            assert sorted(view.user_ids()) == ["u1", "u3", "u9"]  # an online row or a last-N list
            assert sorted(view.item_ids()) == ["i1", "i2", "i3"]  # an online row or a catalogue record
            np.testing.assert_array_equal(view.user("u1").vector, vector(1.0))
            assert view.user("u1").last_n == ("i1", "i2")
            np.testing.assert_array_equal(view.user("u3").vector, vector(3.0))
            np.testing.assert_array_equal(view.user("u9").vector, model_row(v1, "user", "u9"))
            assert view.user("u9").last_n == ("i3",)
            expected = item_vector(v1, ITEMS[0], "i1", vector(0.5))
            np.testing.assert_allclose(view.item("i1").vector, expected, rtol=0, atol=1e-6)
            expected = item_vector(v1, ITEMS[2], "i3", model_row(v1, "item", "i3"))  # p:item:i3 is no row
            np.testing.assert_allclose(view.item("i3").vector, expected, rtol=0, atol=1e-6)

        promote_second_version(registry, day_one, int(max(e.ts_ms for e in day_one)) + 1)
        v2 = load_version(registry.path("v2"))
        meta = publisher.publish_once().meta
        assert (meta.version, meta.model_version) == (2, "v2")
        with store.reader() as view:
            np.testing.assert_array_equal(view.user("u1").vector, vector(7.0))  # the early v2 row, by the replay
            assert view.user("u1").last_n == ("i1", "i2")  # the stream's keys carry over
            np.testing.assert_array_equal(view.user("u3").vector, model_row(v2, "user", "u3"))  # its v1 row dropped
            expected = item_vector(v2, ITEMS[0], "i1", model_row(v2, "item", "i1"))
            np.testing.assert_allclose(view.item("i1").vector, expected, rtol=0, atol=1e-6)
    keys, _, meta = durable(tmp_path / "mirror")
    assert {k for k in keys if k.startswith((b"t:", b"p:"))} == {b"t:user:u1"}
    assert keys[b"n:u1"] == FIRST[b"n:u1"] and keys[b"c:i1"] == count(7) and b"cat:i3" in keys
    assert (meta["checkpoints"], meta["model_version"], meta["replay_until"]) == (2, "v2", {})


MIRROR_SCRIPT = """
import sys
from publisher.changelog_source import ChangelogMirror
from streaming.settings import KafkaSettings

kafka = KafkaSettings(bootstrap_servers=sys.argv[1], topic_prefix=sys.argv[2])
mirror = ChangelogMirror(kafka, sys.argv[3], model_version="v1")
while True:
    print("step", mirror.step().checkpoint, flush=True)
"""


def random_transactions(settings: KafkaSettings, stop: threading.Event, committed: list[list[tuple]]) -> None:
    """Transactions of random records, each key always on one partition, about one in six aborted, until ``stop``;
    the committed ones are appended to ``committed`` in the order they committed."""
    rng = random.Random(11)
    writer = Writer(settings, "w-random")
    ts = 10_000
    while not stop.is_set():
        records = []
        for _ in range(rng.randint(3, 12)):
            ts += rng.randint(1, 50)
            u, i, p = rng.randrange(20), rng.randrange(12), rng.randrange(4)
            kind = rng.random()
            if kind < 0.3:
                value = None if rng.random() < 0.15 else row(ts, rng.randint(1, 9), rng.random())
                model = "v0" if rng.random() < 0.1 else "v1"
                records.append((USER_STATE_TOPIC, u % 4, b"t:user:u%d" % u, value, model))
            elif kind < 0.5:
                records.append((USER_STATE_TOPIC, u % 4, b"n:u%d" % u, json.dumps([f"i{i}", f"i{ts}"]).encode(), "v1"))
                records.append((USER_STATE_TOPIC, u % 4, b"na:u%d" % u, count(ts), "v1"))
            elif kind < 0.8:
                value = None if rng.random() < 0.1 else count(rng.randint(1, 100))
                records.append((USER_STATE_TOPIC, p, b"c@%d:i%d" % (p, i), value, "v1"))
            else:
                value = None if rng.random() < 0.1 else row(ts, rng.randint(1, 9), rng.random())
                records.append(("item-rows", i % 4, b"t:item:i%d" % i, value, "v1"))
        commit = rng.random() > 1 / 6
        writer.transaction(records, commit=commit)
        if commit:
            committed.append(records)
        time.sleep(0.01)
    writer.close()


def expected_state(committed: list[list[tuple]]) -> tuple[dict[bytes, bytes], int]:
    """What a mirror of ``v1`` holds after ``committed`` (each key lives on one partition, so the last committed
    value wins), with the ``c:`` sums; and its watermark."""
    state: dict[bytes, bytes] = {}
    watermark = 0
    for records in committed:
        for _, _, key, value, model in records:
            if key.startswith(b"t:") and model != "v1":
                continue
            if value is None:
                state.pop(key, None)
                continue
            state[key] = value
            if key.startswith(b"t:"):
                watermark = max(watermark, ROW_HEADER.unpack_from(value)[0])
            elif key.startswith(b"na:"):
                watermark = max(watermark, int(np.frombuffer(value, dtype="<i8")[0]))
    totals: dict[bytes, int] = {}
    for key, value in state.items():
        if key.startswith(b"c@"):
            item = key.partition(b":")[2]
            totals[item] = totals.get(item, 0) + int(np.frombuffer(value, dtype="<i8")[0])
    return state | {b"c:" + item: count(n) for item, n in totals.items()}, watermark


def mirror_to_end(settings: KafkaSettings, path: Path) -> None:
    """Step a mirror of ``v1`` at ``path`` until it has read every partition to its end."""
    ends = end_offsets(settings, ("user-state", "item-rows", "items"))
    mirror = ChangelogMirror(settings, path, model_version="v1", step_timeout_s=20)
    try:
        deadline = time.monotonic() + 60
        while mirror.positions() != ends:
            assert time.monotonic() < deadline, f"the mirror stopped at {mirror.positions()}, the ends are {ends}"
            mirror.step()
    finally:
        mirror.close()


@pytest.mark.kafka
def test_a_mirror_killed_mid_stream_ends_with_the_state_of_an_uninterrupted_one(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    ensure_topics(kafka_settings, names=SCALE_OUT_TOPICS)
    stop, committed = threading.Event(), []
    producer = threading.Thread(target=random_transactions, args=(kafka_settings, stop, committed))
    producer.start()
    killed = tmp_path / "killed"
    args = [sys.executable, "-c", MIRROR_SCRIPT, kafka_settings.bootstrap_servers, kafka_settings.topic_prefix]
    rng = random.Random(5)
    steps_seen = []
    try:
        for _ in range(3):
            proc = subprocess.Popen([*args, str(killed)], cwd=REPO, stdout=subprocess.PIPE, text=True)
            first = proc.stdout.readline()  # the first step is done: kill in the middle of the ones after it
            assert first.startswith("step"), first
            time.sleep(rng.uniform(0.2, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            steps_seen.append(int(first.split()[1]))
    finally:
        stop.set()
        producer.join(timeout=60)
    assert steps_seen[0] >= 1 and steps_seen[-1] > steps_seen[0], steps_seen  # each life went on from the last
    mirror_to_end(kafka_settings, killed)
    mirror_to_end(kafka_settings, tmp_path / "uninterrupted")
    keys, offsets, meta = durable(killed)
    expected, watermark = expected_state(committed)
    assert len(committed) > 20 and keys == expected and meta["watermark_ms"] == watermark
    assert (keys, offsets) == durable(tmp_path / "uninterrupted")[:2]


@pytest.mark.kafka
def test_publisher_run_source_changelog_follows_kafka_and_publishes(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    _, day_one, _ = split_world(WORLD)
    register_model(tmp_path / "models", day_one)
    first_records(kafka_settings).close()  # its transaction left open: n:u9 is not published
    cmd = [sys.executable, "-m", "publisher", "run", "--source", "changelog", "--mirror-state", str(tmp_path / "m")]
    cmd += ["--models", str(tmp_path / "models"), "--store", str(tmp_path / "kv"), "--interval", "1"]
    cmd += ["--bootstrap", kafka_settings.bootstrap_servers, "--topic-prefix", kafka_settings.topic_prefix]
    proc = subprocess.Popen(
        [*cmd, "--metrics-port", "0", "--index", "none"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "published version 1" in line:
            break
    proc.send_signal(signal.SIGTERM)
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=30) == 0 and any("published version 1" in line for line in lines), "".join(lines)
    with RocksStore(tmp_path / "kv") as store, store.reader() as view:
        meta = view.meta()
        assert (meta.model_version, meta.watermark_ms) == ("v1", 5_000)
        assert sorted(view.user_ids()) == ["u1", "u3"] and sorted(view.item_ids()) == ["i1", "i2", "i3"]
        np.testing.assert_array_equal(view.user("u1").vector, vector(1.0))
        assert view.user("u1").last_n == ("i1", "i2")
