"""Compressed record batches from a producer this project did not write (librdkafka's kcat), read by every consumer.

Java and librdkafka producers commonly compress, and a broker recompresses a topic whose ``compression.type`` is
set, so the worker, the archive sink, ``streaming consume``, the nightly job's Kafka source and the replica must
read gzip, snappy, lz4 and zstd alike. kcat produces with the Java client's murmur2 partitioner, so the records
land where this project's producer would put them, and the worker's state must come out bit for bit the same as
from an uncompressed stream of the same events produced by this project.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import uuid
from collections import Counter

import numpy as np
import pytest

from publisher.fanout import Fanout, Replica
from publisher.publish import Publisher
from publisher.settings import PublisherSettings
from publisher.source import MemorySource
from publisher.store import RocksStore
from streaming.__main__ import consume_until_idle
from streaming.archive import days, read_events, visible_files
from streaming.archive_sink import ArchiveSink
from streaming.events import Click, Event, encode, event_key
from streaming.kafka_day import read_day
from streaming.settings import KafkaSettings
from streaming.sources.synthetic import WorldConfig
from streaming.topics import ensure_topics, topic_for
from streaming.worker import Worker, WorkerSettings
from tests.worker_fixtures import produce, read_state, register_model, run_to_idle, split_world
from trainer.artifact import load_version

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CODECS = ("gzip", "snappy", "lz4", "zstd")
DAY_MS = 86_400_000


def _recent_world() -> WorldConfig:
    """A small world whose second day is the last 24 hours: the Kafka source reads a day by record time, kcat stamps
    records with the time they are produced, and the broker refuses record times more than an hour ahead."""
    now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000) // 1000 * 1000
    return WorldConfig(
        seed=5,
        n_users=150,
        n_items=200,
        days=2.0,
        requests_per_day=1200,
        new_items_per_day=30,
        start_ms=now_ms - 2 * DAY_MS,
    )


@pytest.fixture(scope="module")
def world():
    return split_world(_recent_world())


def kcat_produce(settings: KafkaSettings, events: list[Event], codec: str) -> None:
    """Produce ``events`` with kcat: one batch-compressed run per topic, keyed, in time order."""
    by_topic: dict[str, list[bytes]] = {}
    for event in events:
        line = event_key(event) + b"\t" + encode(event)
        assert b"\n" not in line and line.count(b"\t") == 1
        by_topic.setdefault(topic_for(event, settings), []).append(line)
    for topic, lines in by_topic.items():
        subprocess.run(
            ["kcat", "-P", "-b", settings.bootstrap_servers, "-t", topic, "-K", "\t", "-z", codec,
             "-X", "partitioner=murmur2_random", "-X", "linger.ms=50"],
            input=b"\n".join(lines) + b"\n",
            check=True,
            timeout=120,
        )  # fmt: skip


@pytest.fixture(scope="module")
def streams(kafka_bootstrap, world):
    """Per codec, a fresh set of topics holding day two as kcat produced it; and a reference set this project's
    producer wrote uncompressed."""
    if shutil.which("kcat") is None:
        pytest.fail("kcat is not installed (Debian package kcat; `make test` installs it)")
    _, _, day_two = world
    out = {}
    for codec in ("none", *CODECS):
        settings = KafkaSettings(
            bootstrap_servers=kafka_bootstrap, topic_prefix=f"codec-{codec}-{uuid.uuid4().hex[:6]}."
        )
        ensure_topics(settings)
        if codec == "none":
            produce(settings, day_two)
        else:
            kcat_produce(settings, day_two, codec)
        out[codec] = settings
    return out


def _counts(events: list[Event]) -> Counter[str]:
    return Counter(e.TYPE for e in events)


@pytest.mark.parametrize("codec", CODECS)
def test_streaming_consume_and_the_archive_sink_read_every_codec(streams, world, codec, tmp_path):
    _, _, day_two = world
    settings = streams[codec]
    expected = _counts(day_two)
    per_type, user_partitions, dead = consume_until_idle(settings, f"c-{uuid.uuid4().hex[:6]}", idle_s=2.0)
    assert (per_type, dead) == (expected, 0)
    # murmur2, as this project's producer: each user's records on one partition number of every topic.
    assert all(len(parts) == 1 for parts in user_partitions.values())

    sink = ArchiveSink(settings, tmp_path / "archive", group_id=f"a-{uuid.uuid4().hex[:6]}", flush_every_s=0.5)
    run_to_idle(sink)
    archived = [
        e for day in days(tmp_path / "archive") for f in visible_files(tmp_path / "archive", day)
        for e in read_events(f.path, f.kind)
    ]  # fmt: skip
    assert sorted(encode(e) for e in archived) == sorted(encode(e) for e in day_two)


@pytest.mark.parametrize("codec", CODECS)
def test_the_nightly_kafka_source_reads_every_codec(streams, world, codec):
    _, _, day_two = world
    today = dt.datetime.now(dt.UTC).date()  # the day kcat's record times fall in
    start_ms = int(dt.datetime.combine(today, dt.time(), dt.UTC).timestamp() * 1000)
    got = read_day(streams[codec], today, timeout_s=60)
    behaviour = [e for e in day_two if e.TYPE in ("click", "impression") and e.ts_ms >= start_ms]
    assert sorted(encode(e) for e in got.events if e.TYPE in ("click", "impression")) == sorted(
        encode(e) for e in behaviour
    )
    assert sum(got.skipped.values()) == 0


def test_the_worker_applies_every_codec_exactly_once(streams, world, tmp_path):
    """Each codec's stream gives the worker exactly the state the uncompressed reference stream gives."""
    _, day_one, day_two = world
    registry = register_model(tmp_path / "models", day_one)
    clicks = sum(isinstance(e, Click) for e in day_two)
    states = {}
    for codec, settings in streams.items():
        state_dir = tmp_path / f"state-{codec}"
        worker = Worker(
            settings,
            WorkerSettings(state_dir=state_dir, group_id=f"w-{uuid.uuid4().hex[:6]}", batch_size=64, sync=False),
            load_version(registry.path("v1")),
        )
        run_to_idle(worker)
        assert worker.learner.examples == clicks, codec
        assert (
            worker.metrics.registry.get_sample_value(
                "freshtower_events_consumed_total", {"topic": settings.topic("clicks")}
            )
            == clicks
        )
        worker.close()
        states[codec] = read_state(state_dir)
    reference = states.pop("none")
    prefix = streams["none"].topic_prefix
    for codec, state in states.items():
        # Same partitions and offsets, hence the same merge order, batches and updates.
        offsets = {k.replace(streams[codec].topic_prefix, prefix): v for k, v in state["offsets"].items()}
        assert offsets == reference["offsets"], codec
        assert state["counts"] == reference["counts"], codec
        assert state["rows"].keys() == reference["rows"].keys(), codec
        for key, row in reference["rows"].items():
            np.testing.assert_array_equal(state["rows"][key], row, err_msg=f"{codec} {key}")


def assert_fanout_round_trip(settings: KafkaSettings, tmp_path, rows: int = 200) -> None:
    """A publisher with fan-out writes one version of ``rows`` users and items; a replica reads all of it back."""
    source = MemorySource(model_version="m1")
    for i in range(rows):
        source.put_user(f"u{i}", [float(i), 1.0], [f"i{i % 7}"], event_ms=1000)
        source.put_item(f"i{i}", [1.0, float(i), 0.0], event_ms=1000)
    fanout = Fanout(settings)
    store = RocksStore(tmp_path / "primary")
    pub = Publisher(
        store, source, PublisherSettings(store_path=tmp_path / "primary", index_kind="none", fanout=True), fanout=fanout
    )
    replica = Replica(settings, RocksStore(tmp_path / "replica"))
    try:
        version = pub.publish_once().meta.version
        assert replica.catch_up(timeout_s=30, min_version=version).version == version
        with replica.store.reader() as view:
            assert view.user(f"u{rows - 1}").vector.tolist() == [rows - 1.0, 1.0]
            assert view.item("i42").vector.tolist() == [1.0, 42.0, 0.0]
            assert len(view.user_ids()) == len(view.item_ids()) == rows
    finally:
        replica.close()
        fanout.close()
        store.close()


@pytest.mark.parametrize("codec", CODECS)
def test_a_replica_reads_a_fanout_compressed_with_each_codec(kafka_bootstrap, codec, tmp_path):
    """The publisher's producer compresses with the codec its settings name; the replica reads it."""
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap, topic_prefix=f"fan-{codec}-{uuid.uuid4().hex[:6]}.", compression=codec
    )
    assert_fanout_round_trip(settings, tmp_path)
