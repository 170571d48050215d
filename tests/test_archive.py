"""The event archive: round trips, time order, day partitions, and what a crash leaves behind."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from streaming.archive import ArchiveWriter, day_of, days, read_day, read_range
from streaming.events import Click, Impression, Item, UserProfile

DAY1 = 1_700_006_400_000  # 2023-11-15T00:00:00Z
DAY2 = DAY1 + 86_400_000  # 2023-11-16T00:00:00Z
REPO = Path(__file__).resolve().parents[1]


def _sample() -> list:
    return [
        Item("i1", "books", ("sci-fi", "space"), {"price": 9.5, "pages": 300.0}, created_ms=DAY1 - 5, ts_ms=DAY1 + 10),
        Item("i2", "music", (), {}, created_ms=DAY1, ts_ms=DAY1 + 10),
        UserProfile("u1", {"city": "Oslo", "gender": "f"}, {"topics": ("jazz", "go")}, {"age": 31.0}, ts_ms=DAY1 + 5),
        UserProfile("u2", ts_ms=DAY1 + 7),
        Impression("u1", "i1", "r1", 0, DAY1 + 20),
        Impression("u1", "i2", "r1", 1, DAY1 + 20),
        Click("u1", "i1", "r1", DAY1 + 30),
        Click("u2", "i2", "r2", DAY2 + 1),
        Impression("u2", "i2", "r2", 3, DAY2 + 0),
    ]


def test_day_of_is_the_utc_date() -> None:
    assert day_of(DAY1) == dt.date(2023, 11, 15)
    assert day_of(DAY2 - 1) == dt.date(2023, 11, 15)
    assert day_of(DAY2) == dt.date(2023, 11, 16)


def test_round_trip_all_four_types_in_time_order(tmp_path: Path) -> None:
    events = _sample()
    with ArchiveWriter(tmp_path) as writer:
        writer.write(events)
        assert writer.buffered == len(events)
    assert days(tmp_path) == [dt.date(2023, 11, 15), dt.date(2023, 11, 16)]
    # One file per (day, type): day 1 has all four types, day 2 an impression and a click.
    assert sorted(p.name for p in (tmp_path / "date=2023-11-15").iterdir()) == [
        "click-000001.parquet",
        "impression-000001.parquet",
        "item-000001.parquet",
        "user-000001.parquet",
    ]
    day1 = list(read_day(tmp_path, "2023-11-15"))
    # Time order; at ts DAY1+10 the two items keep their written order; at DAY1+20 both impressions.
    assert day1 == [events[2], events[3], events[0], events[1], events[4], events[5], events[6]]
    assert list(read_day(tmp_path, dt.date(2023, 11, 16))) == [events[8], events[7]]
    assert list(read_range(tmp_path, None, None)) == day1 + [events[8], events[7]]
    # Half-open range [DAY1+10, DAY2+1): drops the profiles before it and the click at DAY2+1.
    assert list(read_range(tmp_path, DAY1 + 10, DAY2 + 1)) == [
        events[0],
        events[1],
        events[4],
        events[5],
        events[6],
        events[8],
    ]
    assert list(read_day(tmp_path, "2023-11-15", types={"click"})) == [events[6]]


def test_ties_put_state_records_before_behaviour(tmp_path: Path) -> None:
    # A click and the item it names arrive in the same millisecond, the click flushed first.
    item = Item("i9", "c", (), {}, created_ms=DAY1, ts_ms=DAY1 + 1)
    click = Click("u1", "i9", "r", DAY1 + 1)
    writer = ArchiveWriter(tmp_path)
    writer.write([click])
    writer.flush()
    writer.write([item])
    writer.flush()
    assert list(read_day(tmp_path, "2023-11-15")) == [item, click]


def test_flushes_append_new_files_and_auto_flush(tmp_path: Path) -> None:
    writer = ArchiveWriter(tmp_path, max_buffered=3)
    clicks = [Click(f"u{i}", "i", f"r{i}", DAY1 + 100 - i) for i in range(7)]
    writer.write(clicks)  # 3 + 3 flushed by themselves, 1 left buffered
    assert writer.buffered == 1
    assert writer.flush() == [tmp_path / "date=2023-11-15" / "click-000003.parquet"]
    # Three files, each sorted inside; the merged read is in time order over all of them.
    assert list(read_day(tmp_path, "2023-11-15")) == sorted(clicks, key=lambda c: c.ts_ms)
    # A second writer on the same directory continues the sequence instead of overwriting.
    other = ArchiveWriter(tmp_path)
    other.write([Click("u", "i", "r", DAY1)])
    assert other.flush() == [tmp_path / "date=2023-11-15" / "click-000004.parquet"]


def test_leftover_temporary_file_is_ignored(tmp_path: Path) -> None:
    with ArchiveWriter(tmp_path) as writer:
        writer.write([Click("u1", "i1", "r1", DAY1)])
    day_dir = tmp_path / "date=2023-11-15"
    # What a writer killed mid-write leaves: a truncated file under its temporary name.
    complete = (day_dir / "click-000001.parquet").read_bytes()
    (day_dir / ".click-deadbeef.parquet.tmp").write_bytes(complete[: len(complete) // 2])
    # A day that holds nothing but a temporary file is not a day.
    (tmp_path / "date=2023-11-16").mkdir()
    (tmp_path / "date=2023-11-16" / ".click-0123.parquet.tmp").write_bytes(b"PAR1")
    assert days(tmp_path) == [dt.date(2023, 11, 15)]
    assert list(read_range(tmp_path, None, None)) == [Click("u1", "i1", "r1", DAY1)]


def test_sigkill_during_writes_leaves_only_complete_files(tmp_path: Path) -> None:
    # A child flushes 2,000 clicks per file in a loop; killed at an arbitrary point, every file a
    # reader sees must be whole, so the total is a multiple of 2,000.
    script = textwrap.dedent(
        f"""
        from streaming.archive import ArchiveWriter
        from streaming.events import Click
        w = ArchiveWriter({str(tmp_path)!r})
        n = 0
        while True:
            w.write(Click(f"u{{j}}", f"i{{j % 50}}", f"r{{n}}", {DAY1} + n * 2000 + j) for j in range(2000))
            w.flush()
            n += 1
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("date=*/click-*.parquet"))) < 3:
            assert child.poll() is None, "writer process exited early"
            assert time.monotonic() < deadline, "writer produced no files within 30 s"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    files = list(tmp_path.glob("date=*/click-*.parquet"))
    events = list(read_range(tmp_path, None, None))
    assert len(events) == 2000 * len(files)
    assert [e.ts_ms for e in events] == sorted(e.ts_ms for e in events)


def test_unknown_type_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expected an Impression, Click, Item or UserProfile, got str"):
        ArchiveWriter(tmp_path).write(["not an event"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="unknown event type"):
        list(read_day(tmp_path, "2023-11-15", types={"clicks"}))
