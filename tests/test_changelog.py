"""The user-state changelog's parts (streaming.changelog, the builder's scoped counters), worked by hand."""

from __future__ import annotations

import json
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer

from streaming.changelog import Changelog, partition_of_key
from streaming.events import Click, Impression, Item, encode
from streaming.examples import ExampleBuilder, ExampleSettings
from streaming.item_rows import MODEL_HEADER, partition_of
from streaming.producer import EventProducer
from streaming.state import StateStore
from streaming.topics import SCALE_OUT_TOPICS, USER_STATE_TOPIC, ensure_topics
from streaming.worker import Worker, WorkerSettings
from tests.worker_fixtures import register_model, run_to_idle, split_world
from trainer.artifact import load_version

HOUR = 3_600_000


def test_every_key_of_a_users_state_belongs_to_the_users_partition():
    user = "u42"
    home = partition_of(user, 4)
    keys = [
        b"t:user:u42", b"p:user:u42", b"n:u42", b"na:u42", b"prof:u42", b"j:u42\tr7\ti3", b"k:u42\tr7\ti3",
    ]  # fmt: skip
    assert [partition_of_key(k, 4) for k in keys] == [home] * len(keys)
    # Counters and event time kept per partition name it; what is not partitioned stays local.
    assert [partition_of_key(k, 4) for k in (b"c@3:i9", b"e@0:i9", b"s@2", b"w@1")] == [3, 0, 2, 1]
    for local in (b"t:item:i9", b"p:item:i9", b"cat:i9", b"f:0:17", b"x:0000000000000001:u:u42", b"m:meta", b"c:i9"):
        assert partition_of_key(local, 4) is None, local
    # The join window's key is "<user>\t<request>\t<item>": a user id that hashes elsewhere than the request.
    assert partition_of_key(b"j:u1\tu42\ti3", 4) == partition_of("u1", 4)


@pytest.mark.kafka
def test_kafka_puts_a_users_events_on_the_partition_their_state_keys_name(kafka_settings):
    """The contract with the producers: Kafka's default partitioner on the user id (KafkaSettings.partitions = 4)."""
    users = [f"u{n}" for n in range(40)]
    with EventProducer(kafka_settings) as producer:
        producer.send_all([Click(u, "i1", f"r-{u}", 1_700_000_000_000) for u in users])
    consumer = KafkaConsumer(
        kafka_settings.topic("clicks"), auto_offset_reset="earliest", consumer_timeout_ms=5000,
        **kafka_settings.client_config(),
    )  # fmt: skip
    seen = {r.key.decode(): r.partition for r in consumer}
    consumer.close()
    assert seen == {u: partition_of_key(b"n:" + u.encode(), 4) for u in users}
    assert len(set(seen.values())) == 4


def _event(builder: ExampleBuilder, partition: int, event) -> None:
    builder.partition = partition
    builder.add(event)


def test_scoped_builder_keeps_counters_and_event_time_per_partition(tmp_path):
    state = StateStore(tmp_path / "s", sync=False)
    builder = ExampleBuilder(ExampleSettings(join_window_ms=HOUR), state, scoped=True)
    t = 1_700_000_000_000
    _event(builder, 1, Impression("u1", "i1", "r1", 0, t))
    _event(builder, 1, Click("u1", "i1", "r1", t + 1))
    _event(builder, 0, Click("u2", "i1", "r2", t + 10 * HOUR))  # partition 0 is ten hours ahead of partition 1
    _event(builder, 1, Click("u3", "i1", "r3", t + 2))  # not late: partition 1's own event time is t + 1
    _event(builder, 1, Click("u3", "i1", "r3", t + 3))  # the same click again: a duplicate (its time counts)
    _event(builder, 0, Click("u2", "i2", "r4", t + 8 * HOUR))  # late on partition 0 (two hours behind it)
    _event(
        builder, 2, Item("i9", "c1", (), {}, t, t + 20 * HOUR)
    )  # the catalogue is no partition's: no counter, no event time
    assert builder.clicks == {"i1": 3, "i2": 1} and builder.exposures == {"i1": 1}
    assert (builder.stats.clicks, builder.stats.duplicates, builder.stats.unjoined, builder.stats.late) == (4, 1, 3, 1)
    assert builder.watermarks == {1: t + 3, 0: t + 10 * HOUR}
    assert builder.watermark_ms == t + 20 * HOUR and builder.expiry_ms == t + 3
    builder.flush()
    staged = state.staged()
    assert [k for k in staged if k[:2] in (b"c@", b"e@")] == [b"e@1:i1", b"c@1:i1", b"c@0:i1", b"c@0:i2"]
    assert json.loads(staged[b"s@1"]) == {"clicks": 2, "duplicates": 1, "impressions": 1, "late": 0, "unjoined": 1}
    assert json.loads(staged[b"s@0"]) == {"clicks": 2, "duplicates": 0, "impressions": 0, "late": 1, "unjoined": 2}
    assert not any(k.startswith((b"c:", b"e:")) for k in staged)  # no unpartitioned totals are written
    state.checkpoint({}, {"watermark_ms": builder.watermark_ms})
    # A state holding partition 1 only (after a move): its totals are partition 1's.
    for key in [k for k in staged if k[:2] in (b"c@", b"s@", b"w@") and k[2:3] == b"0"]:
        state.delete(key)
    state.checkpoint({}, {"watermark_ms": builder.watermark_ms})
    again = ExampleBuilder(ExampleSettings(join_window_ms=HOUR), state, scoped=True)
    assert again.clicks == {"i1": 2} and again.exposures == {"i1": 1}
    assert (again.stats.clicks, again.stats.duplicates, again.stats.late) == (2, 1, 0)
    assert again.watermarks == {1: t + 3}
    state.close()


@pytest.mark.kafka
def test_restore_takes_what_committed_after_the_position_and_drop_forgets_a_partition(kafka_settings, tmp_path):
    ensure_topics(kafka_settings, names=SCALE_OUT_TOPICS)
    topic = kafka_settings.topic(USER_STATE_TOPIC)
    producer = KafkaProducer(
        **kafka_settings.producer_config(), transactional_id=f"t-{uuid.uuid4().hex[:6]}", enable_idempotence=True
    )
    producer.init_transactions()
    v1 = [(MODEL_HEADER, b"v1")]
    u0 = next(u for u in (f"u{n}" for n in range(99)) if partition_of(u, 4) == 0)
    u1 = next(u for u in (f"u{n}" for n in range(99)) if partition_of(u, 4) != 0)
    p1 = partition_of(u1, 4)

    def transaction(records, commit=True):
        producer.begin_transaction()
        for partition, key, value in records:
            producer.send(topic, key=key, value=value, partition=partition, headers=v1)
        (producer.commit_transaction if commit else producer.abort_transaction)()

    transaction([(0, b"n:" + u0.encode(), b'["i1"]'), (p1, b"n:" + u1.encode(), b'["i2"]'), (p1, b"s@%d" % p1, b"{}")])
    transaction([(0, b"n:" + u0.encode(), b'["i9"]')], commit=False)  # aborted: never restored
    transaction([(p1, b"n:" + u1.encode(), None), (p1, b"na:" + u1.encode(), b"x")])
    producer.close()

    changelog = Changelog(kafka_settings, 4)
    state = StateStore(tmp_path / "s", sync=False)
    positions = changelog.restore(state, {0: 0, p1: 0}, "v1")
    assert state.staged() == {
        b"n:" + u0.encode(): b'["i1"]', b"n:" + u1.encode(): None, b"s@%d" % p1: b"{}", b"na:" + u1.encode(): b"x"
    }  # fmt: skip
    state.checkpoint({}, {})
    # From the positions returned, nothing more; from an earlier one, the records after it.
    assert changelog.restore(state, positions, "v1") == positions and state.staged() == {}
    assert changelog.restore(state, {p1: 2}, "v1") == {p1: positions[p1]}
    assert state.staged() == {b"n:" + u1.encode(): None, b"na:" + u1.encode(): b"x"}
    state.discard()
    with pytest.raises(RuntimeError, match="model switches are not supported"):
        changelog.restore(state, {0: 0}, "v2")
    state.discard()
    assert changelog.drop(state, {p1}) == 2  # s@p1 and na:u1 (n:u1 was deleted)
    state.checkpoint({}, {})
    assert [k for k, _ in state.scan(b"")] == [b"m:meta", b"m:offsets", b"n:" + u0.encode()]
    changelog.close()
    state.close()


@pytest.mark.kafka
def test_a_worker_sharing_partitions_dead_letters_an_event_on_another_users_partition(kafka_settings, tmp_path):
    _, day_one, day_two = split_world()
    version = load_version(register_model(tmp_path / "models", day_one).path("v1"))
    ensure_topics(kafka_settings, names=SCALE_OUT_TOPICS)
    click = next(e for e in day_two if isinstance(e, Click))
    wrong = (partition_of(click.user_id, 4) + 1) % 4
    producer = KafkaProducer(bootstrap_servers=kafka_settings.bootstrap_servers, acks="all")
    producer.send(kafka_settings.topic("clicks"), key=click.user_id.encode(), value=encode(click), partition=wrong)
    producer.send(kafka_settings.topic("clicks"), key=click.user_id.encode(), value=encode(click))  # its partition
    producer.close()
    settings = WorkerSettings(
        state_dir=tmp_path / "w", group_id=f"w-{uuid.uuid4().hex[:6]}", user_state="changelog", item_rows="owner",
        start_at_cutoff=False,
    )  # fmt: skip
    worker = Worker(kafka_settings, settings, version)
    run_to_idle(worker)
    assert worker.builder.stats.clicks == 1
    dlq = KafkaConsumer(
        kafka_settings.topic("deadletter"), auto_offset_reset="earliest", consumer_timeout_ms=5000,
        **kafka_settings.client_config(),
    )  # fmt: skip
    (letter,) = list(dlq)
    dlq.close()
    reason = dict(letter.headers)["reason"].decode()
    assert f"on partition {wrong}, but Kafka's default partitioner puts it on" in reason, reason
