"""The archive sink against the real broker: every event once in its day, dead letters, SIGKILL, the nightly job."""

from __future__ import annotations

import datetime as dt
import errno
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streaming import archive_sink
from streaming.archive import ArchiveWriter, StagedFile, day_of, days, publish, read_day, read_range
from streaming.archive_sink import ArchiveSink
from streaming.events import Click, Event, encode
from streaming.producer import EventProducer
from streaming.settings import KafkaSettings
from streaming.sources.synthetic import SyntheticWorld, WorldConfig
from streaming.topics import EVENT_TOPICS, ensure_topics
from tests.worker_fixtures import run_to_idle
from trainer.full import EXIT_PROMOTED, FullSettings, load_day, run_full
from trainer.model import ModelConfig
from trainer.registry import Registry
from trainer.train import TrainConfig

pytestmark = pytest.mark.kafka

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
# Two days, 3,641 events: 200 users, 200 items (+10 new a day), 160 slates of 10 a day.
WORLD = WorldConfig(seed=5, n_users=200, n_items=200, days=2.0, requests_per_day=160.0, new_items_per_day=10.0)
DAY1, DAY2 = dt.date(2024, 1, 1), dt.date(2024, 1, 2)


def world_events() -> list[Event]:
    return list(SyntheticWorld(WORLD).events())


def multiset(events: Iterable[Event]) -> Counter[bytes]:
    """Events as a multiset of their encodings: equal iff the same events, each as many times."""
    return Counter(encode(e) for e in events)


def produce(settings: KafkaSettings, events: list[Event]) -> None:
    with EventProducer(settings) as producer:
        producer.send_all(events)


def end_offsets(settings: KafkaSettings) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    try:
        tps = [TopicPartition(settings.topic(t), p) for t in EVENT_TOPICS.values() for p in range(settings.partitions)]
        return consumer.end_offsets(tps)
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def archived(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory):
    """The world plus two malformed clicks produced, then archived by one sink run (flushes of 1,000 events)."""
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=f"test-{uuid.uuid4().hex[:10]}.")
    ensure_topics(settings)
    events = world_events()
    produce(settings, events)
    raw = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    raw.send(settings.topic("clicks"), key=b"u1", value=b'{"v": 1, "type": "cli').get(timeout=30)
    wrong_key = Click("u1", "i1", "r1", WORLD.start_ms + 1000)
    raw.send(settings.topic("clicks"), key=b"u2", value=encode(wrong_key)).get(timeout=30)
    raw.close()
    root = tmp_path_factory.mktemp("archive")
    group = f"archive-{uuid.uuid4().hex[:8]}"
    sink = ArchiveSink(settings, root, group_id=group, flush_every_s=60.0, flush_every_events=1000)
    run_to_idle(sink)
    return settings, events, root, group, sink


def test_every_event_lands_once_in_its_day_in_time_order(archived) -> None:
    _, events, root, _, sink = archived
    assert days(root) == [DAY1, DAY2]
    for day in (DAY1, DAY2):
        got = list(read_day(root, day))
        assert multiset(got) == multiset(e for e in events if day_of(e.ts_ms) == day)
        assert [e.ts_ms for e in got] == sorted(e.ts_ms for e in got)
    # 3,641 events in flushes of 1,000: several flushes, so the day is merged from several files.
    assert len(events) > 3000
    assert sink.flushes >= 3


def test_bad_records_go_to_the_dead_letter_topic_with_their_reason(archived) -> None:
    settings, _, _, _, _ = archived
    dlq = KafkaConsumer(
        settings.topic("deadletter"), bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest"
    )
    letters: list[str] = []
    consumers: set[str] = set()
    deadline = time.monotonic() + 30
    while len(letters) < 2 and time.monotonic() < deadline:
        for records in dlq.poll(timeout_ms=500).values():
            letters += [dict(m.headers)["reason"].decode() for m in records]
            consumers |= {dict(m.headers)["consumer"].decode() for m in records}
    for records in dlq.poll(timeout_ms=500).values():  # and nothing more
        letters += [dict(m.headers)["reason"].decode() for m in records]
    dlq.close()
    letters.sort()
    assert len(letters) == 2
    assert "not valid UTF-8 JSON" in letters[0]
    assert letters[1] == "record key 'u2' does not match the event's key 'u1'"
    assert consumers == {archived[3]}  # the sink's group: a worker reading the same topic adds its own copy


def test_metrics_report_what_was_made_durable(archived) -> None:
    # What Prometheus scrapes from the sink (freshtower-archive; FreshtowerArchiveBehind watches the watermark).
    settings, events, _, _, sink = archived
    value = sink.metrics.registry.get_sample_value
    by_type = Counter(e.TYPE for e in events)
    for kind, n in by_type.items():
        assert value("freshtower_archive_events_total", {"type": kind}) == n
    assert value("freshtower_archive_watermark_timestamp_seconds") == max(e.ts_ms for e in events) / 1000
    assert value("freshtower_dead_letters_total", {"topic": settings.topic("clicks")}) == 2
    assert time.time() - 600 < value("freshtower_archive_flush_timestamp_seconds") <= time.time()


def test_offsets_are_committed_and_a_restart_archives_nothing_twice(archived) -> None:
    settings, events, root, group, sink = archived
    ends = end_offsets(settings)
    # Everything was read (dead letters included), and the group's offsets say so too.
    assert sink.offsets() == {f"{tp.topic}:{tp.partition}": n for tp, n in ends.items() if n > 0}
    probe = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=group, enable_auto_commit=False)
    committed = {tp: probe.committed(tp) for tp, n in ends.items() if n > 0}
    probe.close()
    assert committed == {tp: n for tp, n in ends.items() if n > 0}
    files = sorted(root.glob("date=*/*.parquet"))
    again = ArchiveSink(settings, root, group_id=group, flush_every_s=60.0, flush_every_events=1000)
    run_to_idle(again, idle_s=1.0)
    assert sorted(root.glob("date=*/*.parquet")) == files
    assert multiset(read_range(root, None, None)) == multiset(events)


def test_a_second_sink_of_the_same_group_is_refused(archived, tmp_path) -> None:
    settings, _, _, _, _ = archived
    first = ArchiveSink(settings, tmp_path, group_id="solo")
    try:
        with pytest.raises(RuntimeError, match="another archive sink of group 'solo' is running on"):
            ArchiveSink(settings, tmp_path, group_id="solo")
    finally:
        first.close()


def test_trainer_full_trains_on_the_archive(archived, tmp_path) -> None:
    _, events, root, _, _ = archived
    day_two_clicks = [e for e in events if isinstance(e, Click) and day_of(e.ts_ms) == DAY2]
    dataset = load_day(root, DAY2)
    assert len(dataset.clicks) == len(day_two_clicks) > 100
    assert sorted(dataset.clicks.ts_ms.tolist()) == sorted(c.ts_ms for c in day_two_clicks)
    settings = FullSettings(
        archive_dir=root, models_dir=tmp_path / "models", day=DAY2.isoformat(), recall_k=20, progress=False
    )
    result = run_full(settings, ModelConfig(dim=16, id_dim=16, hidden=(32,)), TrainConfig(batch_size=128))
    assert result.exit_code == EXIT_PROMOTED, result.message
    assert Registry(tmp_path / "models").current() == result.version_id


def test_publish_is_idempotent_after_a_crash_between_link_and_unlink(tmp_path) -> None:
    root = tmp_path / "archive"
    clicks = [Click("u1", "i1", "r1", WORLD.start_ms + 5), Click("u2", "i2", "r2", WORLD.start_ms + 9)]
    writer = ArchiveWriter(root)
    writer.write(clicks)
    staged = writer.stage(tmp_path / "staging")
    assert writer.buffered == 0 and [(s.day, s.kind, s.rows) for s in staged] == [(DAY1, "click", 2)]
    assert days(root) == []  # staged files are invisible until published
    day_dir = root / "date=2024-01-01"
    day_dir.mkdir(parents=True)
    # What a crash right after the link() and before the unlink() of the temporary name leaves behind.
    os.link(staged[0].path, day_dir / "click-000001.parquet")
    assert publish(root, staged[0]) == day_dir / "click-000001.parquet"  # found, not linked a second time
    assert not staged[0].path.exists()
    assert publish(root, staged[0]) is None  # gone: it was published before
    assert sorted(p.name for p in day_dir.iterdir()) == ["click-000001.parquet"]
    assert list(read_day(root, DAY1)) == clicks


def test_a_flush_cut_short_after_its_commit_point_is_completed_on_restart(kafka_settings, tmp_path, monkeypatch):
    events = world_events()
    produce(kafka_settings, events)
    root, group = tmp_path / "archive", f"archive-{uuid.uuid4().hex[:8]}"
    published = []

    def failing_publish(archive_root: Path, staged: StagedFile) -> Path | None:
        # The disk fails on the third file: inside a flush of several files (impressions, clicks, items, users),
        # after the state file already holds the flush's offsets.
        published.append(staged.kind)
        if len(published) == 3:
            raise OSError(errno.EIO, "simulated I/O error while publishing")
        return publish(archive_root, staged)

    monkeypatch.setattr(archive_sink, "publish", failing_publish)
    with pytest.raises(OSError, match="simulated I/O error"):
        run_to_idle(ArchiveSink(kafka_settings, root, group_id=group, flush_every_events=1000))
    monkeypatch.undo()
    before = sum(1 for _ in read_range(root, None, None))
    assert 0 < before < len(events)

    run_to_idle(ArchiveSink(kafka_settings, root, group_id=group, flush_every_events=1000))
    # The cut flush's remaining files were published from the staging area, once; the rest read again.
    assert multiset(read_range(root, None, None)) == multiset(events)


def sink_command(settings: KafkaSettings, root: Path, group: str, idle: float | None) -> list[str]:
    args = [
        "--bootstrap", settings.bootstrap_servers,
        "--topic-prefix", settings.topic_prefix,
        "--archive", str(root),
        "--group", group,
        "--flush-every-events", "150",
        "--flush-every-s", "0.5",
    ]  # fmt: skip
    if idle is not None:
        args += ["--exit-when-idle", str(idle)]
    return [sys.executable, "-c", f"from streaming.archive_sink import main; raise SystemExit(main({args!r}))"]


def test_sigkill_at_random_points_loses_nothing_and_duplicates_nothing(kafka_settings, tmp_path) -> None:
    events = world_events()
    produce(kafka_settings, events)
    root, group = tmp_path / "archive", f"archive-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(20261123)
    progress = []
    for _ in range(4):
        if progress and progress[-1] == len(events):
            break  # a life finished the stream before its kill
        before = len(list(root.glob("date=*/*.parquet")))
        process = subprocess.Popen(sink_command(kafka_settings, root, group, None), cwd=REPO, env=env)
        # Kill at a random moment once this life is publishing files (start-up time varies with machine load).
        deadline = time.monotonic() + 60
        while len(list(root.glob("date=*/*.parquet"))) <= before and time.monotonic() < deadline:
            assert process.poll() is None, "the sink exited by itself"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        progress.append(sum(1 for _ in read_range(root, None, None)))
    subprocess.run(sink_command(kafka_settings, root, group, 1.5), cwd=REPO, env=env, check=True, timeout=120)

    mid_stream = [p for p in progress if 0 < p < len(events)]
    assert len(mid_stream) >= 2, f"kills did not land mid-stream often enough: {progress} of {len(events)}"
    assert multiset(read_range(root, None, None)) == multiset(events)
    assert not list(root.glob("date=*/.*.tmp"))  # staged files live outside the partitions
