"""The catalogue and the user profiles as of a day's end, without reading every record ever archived.

The nightly job needs every item and every user as they were at the end of the day it trains on: the newest
``item`` / ``user`` record of each id with an event time before then. The archive keeps every record it was
sent, so reading them all grows with every day kept. A **snapshot** holds the answer for one day, one record
per id, together with the archive files it was made from::

    <root>/_snapshots/date=YYYY-MM-DD/item.parquet    newest item record per id, event time before the day's end
                                     /user.parquet    the same for user profiles
                                     /covered.json    {"YYYY-MM-DD": {"item": [[first, last], ...], ...}, ...}

``covered.json`` lists, per archived day and type, the sequence numbers whose files went in (merged into
intervals). :func:`read_state` for day ``D`` starts from the newest snapshot dated ``D`` or earlier and adds
every visible file of the days up to ``D`` that it does not cover: the days after the snapshot, and any file
written into an older day after it was made (a late record) or that covers more than it (a compaction
merging an uncovered file with covered ones; reading covered records again changes nothing, as the newest
record of an id wins). Ties in event time go to the record read later, as in a full read, where the later
file wins. The result is exactly what reading every record would give, which ``tests/test_archive_state.py``
checks against a full read.

Each call writes the snapshot of ``D`` (atomically: a complete directory renamed into place) and keeps the
newest ``keep`` snapshots.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from streaming.archive import ArchiveFile, days, fsync_dir, read_events, visible_files, write_events
from streaming.events import Item, UserProfile

__all__ = ["SNAPSHOTS", "read_state", "snapshots"]

logger = logging.getLogger(__name__)

SNAPSHOTS = "_snapshots"
_KINDS = ("item", "user")
_COVERED = "covered.json"


def _ident(record: Item | UserProfile) -> str:
    return record.item_id if isinstance(record, Item) else record.user_id


def _intervals(seqs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Sorted, merged ``[first, last]`` intervals of the given ones (adjacent ones joined)."""
    out: list[list[int]] = []
    for first, last in sorted(seqs):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return out


def _covered(intervals: list[list[int]], f: ArchiveFile) -> bool:
    return any(first <= f.first and f.last <= last for first, last in intervals)


def snapshots(root: str | Path) -> list[dt.date]:
    """The days that have a complete snapshot, oldest first."""
    directory = Path(root) / SNAPSHOTS
    if not directory.is_dir():
        return []
    out = []
    for path in directory.iterdir():
        if path.name.startswith("date=") and (path / _COVERED).is_file():
            try:
                out.append(dt.date.fromisoformat(path.name[5:]))
            except ValueError:
                continue
    return sorted(out)


def _load(root: Path, day: dt.date) -> tuple[dict[str, dict[str, Item | UserProfile]], dict[str, dict[str, list]]]:
    directory = root / SNAPSHOTS / f"date={day.isoformat()}"
    covered = json.loads((directory / _COVERED).read_text(encoding="utf-8"))
    latest = {kind: {_ident(r): r for r in read_events(directory / f"{kind}.parquet", kind)} for kind in _KINDS}
    return latest, covered  # type: ignore[return-value]


def read_state(root: str | Path, day: dt.date, *, write: bool = True, keep: int = 3) -> list[Item | UserProfile]:
    """The newest item and user record of every id with an event time before the end of ``day``.

    ``write``: store the snapshot of ``day`` for the next call (and prune to the newest ``keep``).
    """
    root = Path(root)
    base = max((d for d in snapshots(root) if d <= day), default=None)
    latest: dict[str, dict[str, Item | UserProfile]] = {kind: {} for kind in _KINDS}
    covered: dict[str, dict[str, list]] = {}
    if base is not None:
        try:
            latest, covered = _load(root, base)
        except (OSError, ValueError, KeyError) as exc:  # a damaged snapshot costs a full read, nothing else
            logger.warning("snapshot %s unreadable (%s); reading every record", base, exc)
            latest, covered, base = {kind: {} for kind in _KINDS}, {}, None
    read_files = 0
    seqs: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for d in (d for d in days(root) if d <= day):
        old = covered.get(d.isoformat(), {})
        for f in visible_files(root, d, _KINDS):
            seqs.setdefault(d.isoformat(), {}).setdefault(f.kind, []).append((f.first, f.last))
            if _covered(old.get(f.kind, []), f):
                continue
            read_files += 1
            table = latest[f.kind]
            for record in read_events(f.path, f.kind):
                current = table.get(_ident(record))
                if current is None or current.ts_ms <= record.ts_ms:  # type: ignore[union-attr]
                    table[_ident(record)] = record
    logger.info(
        "state as of %s: %d items, %d users from snapshot %s and %d archive files",
        day,
        len(latest["item"]),
        len(latest["user"]),
        base,
        read_files,
    )
    if write:
        coverage = {d: {k: _intervals(v) for k, v in kinds.items()} for d, kinds in seqs.items()}
        _write(root, day, latest, coverage)
        _prune(root, keep)
    return [*latest["item"].values(), *latest["user"].values()]


def _write(root: Path, day: dt.date, latest: dict, coverage: dict) -> None:
    directory = root / SNAPSHOTS
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for kind in _KINDS:
            write_events(tmp / f"{kind}.parquet", kind, list(latest[kind].values()))
        with open(tmp / _COVERED, "w", encoding="utf-8") as fh:
            json.dump(coverage, fh)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        final = directory / f"date={day.isoformat()}"
        if final.exists():  # a rerun of the same day: the new snapshot covers at least as much
            stale = directory / f".old-{uuid.uuid4().hex}"
            os.rename(final, stale)
            os.rename(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prune(root: Path, keep: int) -> None:
    directory = root / SNAPSHOTS
    for day in snapshots(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(directory / f"date={day.isoformat()}", ignore_errors=True)
    for leftover in directory.glob(".tmp-*"):  # a snapshot write cut short by a crash
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in directory.glob(".old-*"):
        shutil.rmtree(leftover, ignore_errors=True)
