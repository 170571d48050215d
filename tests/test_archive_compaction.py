"""Archive compaction: a closed day's files merged per type without changing what readers read, safely while
readers read and while a staged publish still links a file."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path

import pytest

from streaming.__main__ import main
from streaming.archive import ArchiveWriter, StagedFile, compact_day, publish, read_day
from streaming.events import Click, Impression, Item

DAY1 = 1_700_006_400_000  # 2023-11-15T00:00:00Z
DAY2 = DAY1 + 86_400_000
D1 = "2023-11-15"


def _names(root: Path, day: str = D1) -> list[str]:
    return sorted(p.name for p in (root / f"date={day}").iterdir())


def _flushes(root: Path, n: int, start: int = 0) -> None:
    """``n`` flushes of one click and one impression each; flushes k and k+1 share a time, so files tie."""
    writer = ArchiveWriter(root)
    for k in range(start, start + n):
        ts = DAY1 + 1000 * (k // 2)
        writer.write([Click(f"u{k}", "i1", f"r{k}", ts), Impression(f"u{k}", "i1", f"r{k}", k, ts)])
        writer.flush()


def test_compaction_leaves_the_read_unchanged(tmp_path: Path) -> None:
    _flushes(tmp_path, 5)
    with ArchiveWriter(tmp_path) as writer:
        writer.write([Item("i1", "c", (), {}, DAY1, DAY1 + 1000), Click("u9", "i1", "r9", DAY2)])
    before = list(read_day(tmp_path, D1))
    result = compact_day(tmp_path, D1)
    assert (result.files_before, result.files_after, result.rows_merged) == (11, 3, 10)
    # Clicks 1-5 and impressions 1-5 merged; the lone item file has nothing to merge with.
    assert _names(tmp_path) == [
        "click-000001-000005.parquet",
        "impression-000001-000005.parquet",
        "item-000001.parquet",  # sequence numbers are per type
    ]
    # The same events in the same order, ties between files included (u0 before u1 at the same time).
    assert list(read_day(tmp_path, D1)) == before
    assert [e.user_id for e in before if isinstance(e, Click)][:2] == ["u0", "u1"]
    assert _names(tmp_path, "2023-11-16") == ["click-000001.parquet"]  # another day: untouched
    again = compact_day(tmp_path, D1)
    assert (again.files_before, again.files_after, again.rows_merged) == (3, 3, 0)


def test_new_files_follow_the_range_and_compact_again(tmp_path: Path) -> None:
    _flushes(tmp_path, 3)
    compact_day(tmp_path, D1, types={"click"})
    _flushes(tmp_path, 1, start=3)  # a late event for a compacted day
    clicks = [n for n in _names(tmp_path) if n.startswith("click")]
    assert clicks == ["click-000001-000003.parquet", "click-000004.parquet"]
    before = list(read_day(tmp_path, D1))
    assert len(before) == 8
    compact_day(tmp_path, D1)
    assert _names(tmp_path) == ["click-000001-000004.parquet", "impression-000001-000004.parquet"]
    assert list(read_day(tmp_path, D1)) == before


def test_a_compaction_cut_short_reads_each_event_once_and_is_finished_later(tmp_path: Path) -> None:
    _flushes(tmp_path, 3)
    before = list(read_day(tmp_path, D1))
    day = tmp_path / f"date={D1}"
    originals = {p.name: p.read_bytes() for p in day.glob("click-*.parquet")}
    compact_day(tmp_path, D1, types={"click"})
    for name, data in originals.items():  # the state a crash after the link, before the removals, leaves
        (day / name).write_bytes(data)
    assert len(list(day.glob("click-*.parquet"))) == 4
    assert list(read_day(tmp_path, D1)) == before  # the range file covers them: nothing twice
    result = compact_day(tmp_path, D1, types={"click"})
    assert result.leftovers_removed == 3
    assert [n for n in _names(tmp_path) if n.startswith("click")] == ["click-000001-000003.parquet"]


def test_a_file_a_staged_name_still_links_is_left_alone(tmp_path: Path) -> None:
    _flushes(tmp_path, 4)
    day = tmp_path / f"date={D1}"
    # A sink that linked click 3 and crashed before removing its staged name: the restart will publish it
    # again, which must find the same final name.
    staged = tmp_path / ".click-staged.parquet.tmp"
    os.link(day / "click-000003.parquet", staged)
    before = list(read_day(tmp_path, D1))
    result = compact_day(tmp_path, D1, types={"click"})
    assert result.skipped_linked == 1
    assert [n for n in _names(tmp_path) if n.startswith("click")] == [
        "click-000001-000002.parquet",
        "click-000003.parquet",
        "click-000004.parquet",  # a run of one: nothing to merge it with
    ]
    assert publish(tmp_path, StagedFile(staged, dt.date(2023, 11, 15), "click", 1)) == day / "click-000003.parquet"
    assert not staged.exists()
    assert list(read_day(tmp_path, D1)) == before
    compact_day(tmp_path, D1, types={"click"})
    assert [n for n in _names(tmp_path) if n.startswith("click")] == ["click-000001-000004.parquet"]
    assert list(read_day(tmp_path, D1)) == before


def test_readers_during_compactions_see_every_event_once(tmp_path: Path) -> None:
    """A writer adds files and compacts the day over and over while a reader reads it in a loop: every read is
    in time order, holds no event twice and loses none that was written before it began."""
    stop = threading.Event()
    written = [0]  # clicks whose files were complete before a read began
    failures: list[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            floor = written[0]
            try:
                events = list(read_day(tmp_path, D1, types={"click"}))
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(repr(exc))
                return
            ids = [e.request_id for e in events]
            if (
                len(set(ids)) != len(ids)
                or len(ids) < floor
                or [e.ts_ms for e in events] != sorted(e.ts_ms for e in events)
            ):
                failures.append(f"read {len(ids)} events ({len(set(ids))} distinct), at least {floor} expected")
                return
            reads[0] += 1

    writer = ArchiveWriter(tmp_path)
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_ in range(30):
            for k in range(5):
                n = 5 * round_ + k
                writer.write([Click(f"u{n}", "i1", f"r{n}", DAY1 + n)])
                writer.flush()
                written[0] = n + 1
            compact_day(tmp_path, D1)
            if failures:
                break
    finally:
        stop.set()
        thread.join()
    assert not failures, failures
    assert reads[0] > 0
    assert _names(tmp_path) == ["click-000001-000150.parquet"]
    assert len(list(read_day(tmp_path, D1))) == 150


def test_cli_compacts_days_before_the_given_date(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _flushes(tmp_path, 3)
    with ArchiveWriter(tmp_path) as writer:
        writer.write([Click("u", "i", "r1", DAY2)])
    with ArchiveWriter(tmp_path) as writer:
        writer.write([Click("u", "i", "r2", DAY2 + 1)])
    assert main(["compact-archive", "--archive", str(tmp_path), "--before", "2023-11-16"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["day"], r["files_before"], r["files_after"]) for r in lines] == [(D1, 6, 2)]
    assert _names(tmp_path, "2023-11-16") == ["click-000001.parquet", "click-000002.parquet"]
    with pytest.raises(SystemExit) as exc:
        main(["compact-archive", "--archive", str(tmp_path), "--before", "yesterday"])
    assert exc.value.code == 2
