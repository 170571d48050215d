"""Snapshots of the catalogue and profiles: the same state as reading every record, from far fewer files."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import pytest

from streaming.archive import ArchiveWriter, compact_day, read_range
from streaming.archive_state import SNAPSHOTS, read_state, snapshots
from streaming.events import Click, Item, UserProfile

DAY_MS = 86_400_000
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
DAYS = [dt.date(2024, 1, d) for d in range(1, 5)]


def _item(n: int, ts: int, price: float) -> Item:
    return Item(f"i{n}", f"c{n % 2}", ("t",), {"price": price}, T0, ts)


def _full_read(root: Path, day: dt.date) -> dict[str, object]:
    """What reading every record gives: the newest per id, the later one on a tie (Dataset.from_events' rule)."""
    end = T0 + (day - DAYS[0]).days * DAY_MS + DAY_MS
    latest: dict[str, object] = {}
    for record in read_range(root, None, end, types={"item", "user"}):
        key = ("i:" + record.item_id) if isinstance(record, Item) else ("u:" + record.user_id)
        if key not in latest or latest[key].ts_ms <= record.ts_ms:
            latest[key] = record
    return latest


def _state(records: list) -> dict[str, object]:
    return {(("i:" + r.item_id) if isinstance(r, Item) else ("u:" + r.user_id)): r for r in records}


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    """Four days; every day updates some items (price = day) and profiles, over several flushes; day 2 has two
    records of i1 with the same time in different files (the later file must win)."""
    root = tmp_path / "archive"
    writer = ArchiveWriter(root)
    for d in range(4):
        start = T0 + d * DAY_MS
        writer.write([_item(n, start + 1000 * n, float(d)) for n in range(d, d + 4)])
        writer.flush()
        writer.write([UserProfile(f"u{k}", {"city": f"x{d}"}, {}, {}, start + 500 + k) for k in range(d, d + 3)])
        writer.write([Click(f"u{d}", "i1", f"r{d}", start + 7000)])
        writer.flush()
        if d == 1:
            writer.write([_item(1, start + 1000, 99.0)])  # same time as the first flush's i1: this one wins
            writer.flush()
    return root


def test_each_day_matches_a_full_read(archive: Path) -> None:
    for day in DAYS:
        assert _state(read_state(archive, day)) == _full_read(archive, day), day
    assert snapshots(archive) == DAYS[1:]  # the newest 3 kept
    assert _state(read_state(archive, DAYS[1]))["i:i1"].stats == {"price": 99.0}  # the tie went to the later file


def test_covered_files_are_not_read_again(archive: Path, caplog: pytest.LogCaptureFixture) -> None:
    expected = _full_read(archive, DAYS[3])
    read_state(archive, DAYS[2])
    # Garbage in every file the day-3 snapshot covers: a read that opened any of them would fail.
    for path in archive.glob("date=2024-01-0[123]/*.parquet"):
        path.write_bytes(b"not parquet")
    with caplog.at_level(logging.INFO, logger="streaming.archive_state"):
        assert _state(read_state(archive, DAYS[3])) == expected
    assert "from snapshot 2024-01-03 and 2 archive files" in caplog.text  # day 4's item and user files


def test_late_records_and_compaction_after_the_snapshot(archive: Path) -> None:
    read_state(archive, DAYS[2])
    with ArchiveWriter(archive) as writer:  # late: day 1 gets a newer i0 and a new user after the snapshot
        writer.write([_item(0, T0 + 80_000_000, 7.0), UserProfile("late", {}, {}, {}, T0 + 5)])
    compact_day(archive, DAYS[0])  # merges the covered files of day 1 with the late one
    compact_day(archive, DAYS[1])  # only covered files: still covered as one range
    for day in DAYS[2:]:
        state = _state(read_state(archive, day))
        assert state == _full_read(archive, day)
        assert state["i:i0"].stats == {"price": 7.0} and "u:late" in state


def test_an_older_day_never_uses_a_newer_snapshot(archive: Path) -> None:
    read_state(archive, DAYS[3])
    assert _state(read_state(archive, DAYS[0], write=False)) == _full_read(archive, DAYS[0])
    assert snapshots(archive) == [DAYS[3]]


def test_damaged_or_half_written_snapshots_cost_only_a_full_read(
    archive: Path, caplog: pytest.LogCaptureFixture
) -> None:
    read_state(archive, DAYS[1])
    (archive / SNAPSHOTS / "date=2024-01-02" / "item.parquet").write_bytes(b"garbage")
    half = archive / SNAPSHOTS / ".tmp-0123"  # what a crash in the middle of a snapshot write leaves
    half.mkdir()
    (half / "item.parquet").write_bytes(b"PAR1")
    with caplog.at_level(logging.WARNING, logger="streaming.archive_state"):
        assert _state(read_state(archive, DAYS[2])) == _full_read(archive, DAYS[2])
    assert "unreadable" in caplog.text
    assert not half.exists()
    shutil.rmtree(archive / SNAPSHOTS / "date=2024-01-02")  # not even the directory: a full read
    assert _state(read_state(archive, DAYS[1])) == _full_read(archive, DAYS[1])
