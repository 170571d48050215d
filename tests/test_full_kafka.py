"""The nightly job reading its day from the Kafka topics by timestamp (a real broker) instead of the archive."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from streaming.archive import ArchiveWriter
from streaming.events import Click, Event, Impression, Item, UserProfile, encode
from streaming.kafka_day import DayTruncated, ReadStats, as_of, iter_day, read_day
from streaming.producer import EventProducer
from streaming.settings import KafkaSettings
from streaming.sources.synthetic import SyntheticWorld, WorldConfig
from streaming.topics import ensure_topics
from tests.full_fixtures import DAY1, DAY2
from trainer.__main__ import main
from trainer.artifact import load_version
from trainer.dataset import Dataset
from trainer.full import EXIT_NO_DATA, EXIT_PROMOTED, load_day, load_days, load_kafka_day
from trainer.registry import Registry

torch.set_num_threads(1)
HOUR_MS = 3_600_000
DAY1_END = 1_704_153_600_000  # 2024-01-02T00:00:00Z


def item(item_id: str, ts_ms: int, created_ms: int = 0, category: str = "c") -> Item:
    return Item(item_id, category, (), {}, created_ms, ts_ms)


def test_as_of_keeps_the_newest_record_before_the_end() -> None:
    profile_old = UserProfile("u", {"city": "paris"}, ts_ms=10)
    profile_new = UserProfile("u", {"city": "oslo"}, ts_ms=30)
    records = [
        item("a", 10),
        item("a", 20, category="second"),
        item("a", 30, category="after the end"),  # end = 25: a's record at 20 is the one of that time
        item("b", 30, created_ms=5),  # b's records before 25 were compacted away: 30 stands in
        item("b", 40, created_ms=5),  # ... the oldest one left, not this
        item("c", 30, created_ms=28),  # created after the end: not in the catalogue yet
        profile_old,
        profile_new,  # a profile is never taken from after the end
        UserProfile("v", ts_ms=26),
    ]
    kept = {(type(r).__name__, getattr(r, "item_id", None) or r.user_id): r for r in as_of(records, 25)}
    assert set(kept) == {("Item", "a"), ("Item", "b"), ("UserProfile", "u")}
    assert kept[("Item", "a")].category == "second"
    assert kept[("Item", "b")].ts_ms == 30
    assert kept[("UserProfile", "u")] is profile_old
    # Equal times: the later record wins, as in the archive's state.
    twin = item("a", 20, category="twin")
    assert as_of([item("a", 20), twin], 25) == [twin]


@pytest.fixture(scope="module")
def streams(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[KafkaSettings, Path, Click]:
    """Two synthetic days in Kafka and in an archive, with a late click of day 1 and some invalid records.

    The late click reaches Kafka after day 2's first 10 minutes, within the default lateness of an hour, so
    both sources hold it. A straggler of day 1 sent after all of day 2 goes to the archive only: Kafka's
    reader stops at the first record an hour past midnight. Returns the settings, the archive root and the
    straggler.
    """
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=f"test-{uuid.uuid4().hex[:10]}.")
    ensure_topics(settings)
    world = SyntheticWorld(WorldConfig(seed=6, n_users=150, n_items=200, days=2.0, requests_per_day=1500.0))
    events = list(world.events())
    late = Click("late-user", next(e.item_id for e in events if isinstance(e, Item)), "r-late", DAY1_END - 5_000)
    straggler = Click("straggler", late.item_id, "r-straggler", DAY1_END - 6_000)
    at = next(i for i, e in enumerate(events) if e.ts_ms >= DAY1_END + HOUR_MS // 6 and not isinstance(e, Item))
    kafka_events: list[Event] = [*events[:at], late, *events[at:], straggler]
    # Invalid records on day 1's clicks topic, sent first: not JSON, and a click under another user's key.
    raw = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    ts = DAY1_END - 20 * HOUR_MS
    raw.send(settings.topic("clicks"), key=b"u1", value=b"not json", timestamp_ms=ts)
    raw.send(settings.topic("clicks"), key=b"someone-else", value=encode(Click("u1", "i1", "r", ts)), timestamp_ms=ts)
    raw.flush()
    raw.close()
    with EventProducer(settings) as producer:
        producer.send_all(kafka_events)
    root = tmp_path_factory.mktemp("archive")
    with ArchiveWriter(root) as writer:
        writer.write(kafka_events)
    return settings, root, straggler


def as_tuples(dataset: Dataset) -> tuple:
    clicks = sorted(
        zip(dataset.clicks.user.tolist(), dataset.clicks.item.tolist(), dataset.clicks.ts_ms.tolist(), strict=True)
    )
    return clicks, dict(dataset.exposures), dataset.items, dataset.users


def test_kafka_day_equals_the_archived_day_but_the_straggler(streams: tuple[KafkaSettings, Path, Click]) -> None:
    settings, root, straggler = streams
    read = read_day(settings, DAY1)
    assert read.skipped == {settings.topic("clicks"): 2}
    assert read.outside > 0  # day 2's first hour was read, and dropped
    from_kafka = Dataset.from_events(read.events)
    archived = load_day(root, DAY1)
    clicks, exposures, items, users = as_tuples(from_kafka)
    a_clicks, a_exposures, a_items, a_users = as_tuples(archived)
    assert any(user == "late-user" for user, _, _ in clicks)  # within the lateness: read
    missed = (straggler.user_id, straggler.item_id, straggler.ts_ms)
    assert missed not in clicks and missed in a_clicks
    assert clicks == [c for c in a_clicks if c != missed]
    assert len(clicks) > 500
    assert exposures == a_exposures and sum(exposures.values()) > 5_000
    assert items == a_items and users == a_users
    assert len(items) >= 200

    # The trainer's path streams: the first click or impression comes before the rest of the day is read.
    stats = ReadStats()
    stream = iter_day(settings, DAY1, stats=stats)
    first = next(e for e in stream if isinstance(e, Click | Impression))
    assert DAY1_END - 86_400_000 <= first.ts_ms < DAY1_END
    assert stats.records < read.records // 10
    stream.close()

    # With no lateness allowed, the late click is left out too; a longer one brings the straggler in.
    strict = Dataset.from_events(read_day(settings, DAY1, lateness_ms=0).events)
    assert not any(u == "late-user" for u in strict.clicks.user.tolist())
    generous = Dataset.from_events(read_day(settings, DAY1, lateness_ms=48 * HOUR_MS).events)
    assert as_tuples(generous)[0] == a_clicks


def test_trainer_full_from_kafka(streams: tuple[KafkaSettings, Path, Click], tmp_path: Path) -> None:
    settings, _, _ = streams
    config = tmp_path / "freshtower.toml"
    config.write_text("[model]\ndim = 8\nid_dim = 8\nhidden = [16]\n\n[train]\nbatch_size = 256\n")
    models = tmp_path / "models"
    argv = ["full", "--source", "kafka", "--bootstrap", settings.bootstrap_servers]
    argv += ["--topic-prefix", settings.topic_prefix, "--day", DAY1.isoformat(), "--models", str(models)]
    argv += ["--config", str(config), "--recall-k", "20", "--no-progress"]
    assert main(argv) == EXIT_PROMOTED
    registry = Registry(models)
    manifest = load_version(registry.path(registry.current())).manifest
    assert manifest["metrics"]["source"] == "kafka" and manifest["metrics"]["day"] == "2024-01-01"
    dataset = load_kafka_day(settings, DAY1, 3600.0)
    assert manifest["data_cutoff_ms"] <= int(dataset.clicks.ts_ms.max())
    trained = manifest["metrics"]["train"]["examples"]
    assert 0 < trained < len(dataset.clicks)  # the newest 10% held back for the gate


def test_several_days_from_kafka(streams: tuple[KafkaSettings, Path, Click], tmp_path: Path) -> None:
    settings, root, straggler = streams
    # Days 1 and 2 as one range: every click and impression of both (day 1's late click and straggler
    # included: they are timed inside the range), the catalogue and profiles as of day 2's end.
    stats = ReadStats()
    events = list(iter_day(settings, DAY2, days=2, lateness_ms=0, stats=stats))
    assert stats.skipped == {settings.topic("clicks"): 2} and stats.outside == 0
    behaviour = [e for e in events if isinstance(e, Click | Impression)]
    assert all(DAY1_END - 86_400_000 <= e.ts_ms < DAY1_END + 86_400_000 for e in behaviour)
    from_kafka = Dataset.from_events(events)
    archived = load_days(root, DAY2, 2)
    clicks, exposures, items, users = as_tuples(from_kafka)
    assert clicks == as_tuples(archived)[0]
    assert (straggler.user_id, straggler.item_id, straggler.ts_ms) in clicks
    assert min(ts for _, _, ts in clicks) < DAY1_END <= max(ts for _, _, ts in clicks)
    day1, day2 = as_tuples(load_day(root, DAY1))[0], as_tuples(load_day(root, DAY2))[0]
    assert clicks == sorted(day1 + day2)
    assert exposures == as_tuples(archived)[1]
    assert items == as_tuples(archived)[2] and users == as_tuples(archived)[3]
    listed = read_day(settings, DAY2, days=2, lateness_ms=0)  # read_day: the same, as a list
    assert as_tuples(Dataset.from_events(listed.events)) == (clicks, exposures, items, users)

    # The nightly job on both days: the version's data range covers them.
    config = tmp_path / "freshtower.toml"
    config.write_text("[model]\ndim = 8\nid_dim = 8\nhidden = [16]\n\n[train]\nbatch_size = 256\n")
    models = tmp_path / "models"
    argv = ["full", "--source", "kafka", "--bootstrap", settings.bootstrap_servers, "--topic-prefix"]
    argv += [settings.topic_prefix, "--day", DAY2.isoformat(), "--days", "2", "--kafka-lateness", "0"]
    argv += ["--models", str(models), "--config", str(config), "--recall-k", "20", "--no-progress"]
    assert main(argv) == EXIT_PROMOTED
    manifest = load_version(Registry(models).path(Registry(models).current())).manifest
    assert manifest["data_range"] == {"start_ms": DAY1_END - 86_400_000, "end_ms": DAY1_END + 86_400_000}
    assert manifest["metrics"]["day"] == "2024-01-02" and manifest["metrics"]["days"] == 2
    assert manifest["metrics"]["train"]["examples"] < len(clicks)


def test_a_day_retention_has_begun_to_delete_is_refused(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    start = 1_704_067_200_000  # day 1's midnight
    clicks = [Click("u", f"i{k}", f"r{k}", start + k * HOUR_MS) for k in range(6)]  # one user: one partition
    with EventProducer(kafka_settings) as producer:
        producer.send_all([item(f"i{k}", start - 1000, created_ms=start - 1000) for k in range(6)])
        producer.send_all(clicks)
    assert len(Dataset.from_events(read_day(kafka_settings, DAY1).events).clicks) == 6  # whole: nothing deleted
    topic = kafka_settings.topic("clicks")
    (tp,) = [TopicPartition(topic, p) for p in range(kafka_settings.partitions) if end_offset(kafka_settings, topic, p)]
    admin = KafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_servers)
    try:
        admin.delete_records({tp: 2})  # as retention would: the day's first two clicks are gone
    finally:
        admin.close()
    with pytest.raises(DayTruncated, match=rf"{topic}-{tp.partition}: oldest record left at {start + 2 * HOUR_MS} ms"):
        read_day(kafka_settings, DAY1)
    # The nightly job says so and trains nothing (exit code 4: no data).
    argv = ["full", "--source", "kafka", "--bootstrap", kafka_settings.bootstrap_servers]
    argv += ["--topic-prefix", kafka_settings.topic_prefix, "--day", DAY1.isoformat(), "--models", str(tmp_path)]
    assert main([*argv, "--no-progress"]) == EXIT_NO_DATA
    assert Registry(tmp_path).list() == []


def end_offset(settings: KafkaSettings, topic: str, partition: int) -> int:
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    try:
        tp = TopicPartition(topic, partition)
        return consumer.end_offsets([tp])[tp]
    finally:
        consumer.close()
