"""The event archive: daily Parquet partitions that the streaming side writes and ``trainer full`` reads.

Layout::

    <root>/date=YYYY-MM-DD/<type>-<seq>.parquet

``date`` is the UTC date of the event's ``ts_ms``; ``type`` is the event type (``impression``,
``click``, ``item``, ``user``), one Parquet schema per type; ``seq`` is a zero-padded sequence
number per (day, type). Every file is written under a temporary name that readers never match
(it starts with ``.`` and ends in ``.tmp``), synced, and then linked to its final name, so a crash
leaves at worst a stray temporary file, never a half-written ``.parquet`` that a reader picks up.
Linking (rather than renaming) refuses to overwrite, so two writers on the same day never clobber
each other's files: the loser takes the next sequence number.

Writers that must make several files visible together with something else (the archive sink: files and
the Kafka offsets they cover) use two steps: :meth:`ArchiveWriter.stage` writes synced files under temporary
names in a directory of their choosing, and :func:`publish` gives each its final name. ``publish`` is
idempotent, so a step interrupted by a crash can simply be repeated.

Readers yield events in event-time order. Within one millisecond, catalogue and profile records
come before impressions and clicks (so a click never precedes the record of the item it names).

Compaction (:func:`compact_day`, ``python -m streaming compact-archive``). A sink flushing every minute writes
1,440 files per (day, type), and the nightly job reads every item and profile file ever written, so closed days
are merged into one file per run of sequence numbers: ``<type>-<first>-<last>.parquet`` holds the events of
``<type>-<first>`` .. ``<type>-<last>`` in the order readers saw them. It is linked under its final name before
the files it replaces are removed, and readers ignore any file whose sequence numbers a range file covers, so a
reader sees the old files or the new one, never both, and a crash between the two steps leaves only ignored
leftovers (the next compaction removes them). A reader that listed the old files just before they went lists
again. A file that still has a second link (a sink's staged name: a publish in progress, or cut short by a crash
and completed on restart) is never merged, so the sink's idempotent :func:`publish` keeps finding it.
"""

from __future__ import annotations

import datetime as dt
import errno
import heapq
import logging
import os
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from streaming.events import Click, Event, Impression, Item, UserProfile

__all__ = [
    "ArchiveFile",
    "ArchiveWriter",
    "Compaction",
    "StagedFile",
    "compact_day",
    "day_of",
    "days",
    "fsync_dir",
    "publish",
    "read_events",
    "read_day",
    "read_range",
    "visible_files",
    "write_events",
]

logger = logging.getLogger(__name__)

_MS_PER_DAY = 86_400_000
_READ_ATTEMPTS = 5
_FILE_RE = re.compile(r"^(impression|click|item|user)-(\d+)(?:-(\d+))?\.parquet$")
_DAY_RE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")

# Ties in ts_ms: state records (item, user) first, then impressions, then clicks.
_RANK = {"item": 0, "user": 1, "impression": 2, "click": 3}

_SCHEMAS: dict[str, pa.Schema] = {
    "impression": pa.schema(
        [
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("request_id", pa.string()),
            ("position", pa.int64()),
            ("ts_ms", pa.int64()),
        ]
    ),
    "click": pa.schema(
        [("user_id", pa.string()), ("item_id", pa.string()), ("request_id", pa.string()), ("ts_ms", pa.int64())]
    ),
    "item": pa.schema(
        [
            ("item_id", pa.string()),
            ("category", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("stats", pa.map_(pa.string(), pa.float64())),
            ("created_ms", pa.int64()),
            ("ts_ms", pa.int64()),
        ]
    ),
    "user": pa.schema(
        [
            ("user_id", pa.string()),
            ("discrete", pa.map_(pa.string(), pa.string())),
            ("multi", pa.map_(pa.string(), pa.list_(pa.string()))),
            ("numeric", pa.map_(pa.string(), pa.float64())),
            ("ts_ms", pa.int64()),
        ]
    ),
}


def day_of(ts_ms: int) -> dt.date:
    """The UTC date of an event time in ms; the partition an event with this time belongs to."""
    return dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.UTC).date()


def _day_start_ms(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def _day_dir(root: Path, day: dt.date) -> Path:
    return root / f"date={day.isoformat()}"


def _to_table(kind: str, events: list[Event]) -> pa.Table:
    events = sorted(events, key=lambda e: e.ts_ms)
    if kind == "impression":
        cols = {
            "user_id": [e.user_id for e in events],
            "item_id": [e.item_id for e in events],
            "request_id": [e.request_id for e in events],
            "position": [e.position for e in events],
            "ts_ms": [e.ts_ms for e in events],
        }
    elif kind == "click":
        cols = {
            "user_id": [e.user_id for e in events],
            "item_id": [e.item_id for e in events],
            "request_id": [e.request_id for e in events],
            "ts_ms": [e.ts_ms for e in events],
        }
    elif kind == "item":
        cols = {
            "item_id": [e.item_id for e in events],
            "category": [e.category for e in events],
            "tags": [list(e.tags) for e in events],
            "stats": [list(e.stats.items()) for e in events],
            "created_ms": [e.created_ms for e in events],
            "ts_ms": [e.ts_ms for e in events],
        }
    else:
        cols = {
            "user_id": [e.user_id for e in events],
            "discrete": [list(e.discrete.items()) for e in events],
            "multi": [[(k, list(v)) for k, v in e.multi.items()] for e in events],
            "numeric": [list(e.numeric.items()) for e in events],
            "ts_ms": [e.ts_ms for e in events],
        }
    return pa.Table.from_pydict(cols, schema=_SCHEMAS[kind])


def _from_batch(kind: str, batch: pa.RecordBatch) -> Iterator[Event]:
    c = {name: batch.column(name).to_pylist() for name in batch.schema.names}
    n = batch.num_rows
    if kind == "impression":
        for i in range(n):
            yield Impression(c["user_id"][i], c["item_id"][i], c["request_id"][i], c["position"][i], c["ts_ms"][i])
    elif kind == "click":
        for i in range(n):
            yield Click(c["user_id"][i], c["item_id"][i], c["request_id"][i], c["ts_ms"][i])
    elif kind == "item":
        for i in range(n):
            yield Item(
                item_id=c["item_id"][i],
                category=c["category"][i],
                tags=tuple(c["tags"][i]),
                stats=dict(c["stats"][i]),
                created_ms=c["created_ms"][i],
                ts_ms=c["ts_ms"][i],
            )
    else:
        for i in range(n):
            yield UserProfile(
                user_id=c["user_id"][i],
                discrete=dict(c["discrete"][i]),
                multi={k: tuple(v) for k, v in c["multi"][i]},
                numeric=dict(c["numeric"][i]),
                ts_ms=c["ts_ms"][i],
            )


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry itself is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StagedFile:
    """A complete, synced Parquet file of one (day, type) under a temporary name that readers never match."""

    path: Path
    day: dt.date
    kind: str
    rows: int


def _stage(directory: Path, day: dt.date, kind: str, table: pa.Table) -> StagedFile:
    tmp = directory / f".{kind}-{uuid.uuid4().hex}.parquet.tmp"
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return StagedFile(tmp, day, kind, table.num_rows)


def publish(root: str | Path, staged: StagedFile) -> Path | None:
    """Give ``staged`` its final name in its day's partition under ``root``; returns that name.

    Idempotent, for recovery after a crash part-way through: a staged file that already has a final name
    (the crash came between the link and the removal of the temporary name) returns that name, and one that
    is gone was published before (its temporary name is removed last), so ``None`` is returned.
    The staged file must be on the same filesystem as ``root`` (it is hard-linked).
    """
    try:
        stat = os.stat(staged.path)
    except FileNotFoundError:
        return None
    return _publish(Path(root), staged, stat)


def _publish(root: Path, staged: StagedFile, stat: os.stat_result) -> Path:
    directory = _day_dir(root, staged.day)
    directory.mkdir(parents=True, exist_ok=True)
    final = _linked_name(directory, staged.kind, stat) if stat.st_nlink > 1 else None
    if final is None:
        final = _link(staged.path, directory, staged.kind)
    fsync_dir(directory)
    staged.path.unlink(missing_ok=True)
    logger.debug("archived %d %s events to %s", staged.rows, staged.kind, final)
    return final


def _linked_name(directory: Path, kind: str, stat: os.stat_result) -> Path | None:
    for path in directory.iterdir():
        m = _FILE_RE.match(path.name)
        if m and m.group(1) == kind:
            try:
                other = path.stat()
            except FileNotFoundError:  # removed by a compaction since the listing
                continue
            if (other.st_ino, other.st_dev) == (stat.st_ino, stat.st_dev):
                return path
    return None


def _link(tmp: Path, directory: Path, kind: str) -> Path:
    seq = _next_seq(directory, kind)
    while True:
        final = directory / f"{kind}-{seq:06d}.parquet"
        try:
            # link() fails if ``final`` exists, so a concurrent writer's file is never replaced.
            os.link(tmp, final)
            return final
        except FileExistsError:
            seq += 1
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # Filesystems without hard links: rename is still atomic, just not exclusive.
            os.replace(tmp, final)
            return final


class ArchiveWriter:
    """Buffers events and writes them as daily Parquet partitions under ``root``.

    ``write`` buffers (and flushes by itself once ``max_buffered`` events are waiting); ``flush``
    writes one file per (day, type) in the buffer, atomically. Use as a context manager to flush
    on exit. Not thread-safe; one writer per thread or process.
    """

    def __init__(self, root: str | Path, *, max_buffered: int = 100_000) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self.root = Path(root)
        self.max_buffered = max_buffered
        self._buffer: dict[tuple[dt.date, str], list[Event]] = defaultdict(list)
        self._count = 0

    @property
    def buffered(self) -> int:
        """Events written but not yet flushed."""
        return self._count

    def write(self, events: Iterable[Event]) -> None:
        for event in events:
            kind = getattr(event, "TYPE", None)
            if kind not in _SCHEMAS:
                raise TypeError(f"expected an Impression, Click, Item or UserProfile, got {type(event).__name__}")
            self._buffer[(day_of(event.ts_ms), kind)].append(event)
            self._count += 1
            if self._count >= self.max_buffered:
                self.flush()

    def flush(self) -> list[Path]:
        """Write every buffered event; returns the files written (final names)."""
        written = []
        for key in sorted(self._buffer):
            day, kind = key
            directory = _day_dir(self.root, day)
            directory.mkdir(parents=True, exist_ok=True)
            staged = _stage(directory, day, kind, _to_table(kind, self._buffer[key]))
            try:
                written.append(_publish(self.root, staged, os.stat(staged.path)))
            finally:
                staged.path.unlink(missing_ok=True)
            # Dropped only once on disk: after a failed write, a retry writes the rest, nothing twice.
            self._count -= len(self._buffer.pop(key))
        return written

    def stage(self, directory: str | Path) -> list[StagedFile]:
        """Write every buffered event to synced temporary files in ``directory`` and empty the buffer.

        Nothing is visible to readers until each file is passed to :func:`publish`. ``directory`` must be on
        the filesystem of the archive root.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        staged = []
        for key in sorted(self._buffer):
            day, kind = key
            staged.append(_stage(directory, day, kind, _to_table(kind, self._buffer[key])))
            self._count -= len(self._buffer.pop(key))
        if staged:
            fsync_dir(directory)
        return staged

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.flush()


def _next_seq(directory: Path, kind: str) -> int:
    return max((f.last for f in _all_files(directory, frozenset({kind}))), default=0) + 1


@dataclass(frozen=True)
class ArchiveFile:
    """A complete archive file: one sequence number (``first == last``) or a compacted range of them."""

    kind: str
    first: int
    last: int
    path: Path

    def covers(self, other: ArchiveFile) -> bool:
        return (
            self.kind == other.kind
            and self.first <= other.first
            and other.last <= self.last
            and (self.first, self.last) != (other.first, other.last)
        )


def _all_files(directory: Path, types: frozenset[str] | None) -> list[ArchiveFile]:
    """Every complete file in ``directory`` (of ``types``), covered ones included, by (type, first, last)."""
    if not directory.is_dir():
        return []
    out = []
    for path in directory.iterdir():
        m = _FILE_RE.match(path.name)
        if m and (types is None or m.group(1) in types):
            first = int(m.group(2))
            out.append(ArchiveFile(m.group(1), first, int(m.group(3) or first), path))
    return sorted(out, key=lambda f: (f.kind, f.first, f.last))


def _visible(files: list[ArchiveFile]) -> list[ArchiveFile]:
    """The files readers read: those no compacted range covers (a range file's originals, left by a crash or
    being removed right now, are not read twice)."""
    ranges = [f for f in files if f.last > f.first]
    return [f for f in files if not any(r.covers(f) for r in ranges)]


def _complete_files(directory: Path, types: frozenset[str] | None) -> list[tuple[str, Path]]:
    return [(f.kind, f.path) for f in _visible(_all_files(directory, types))]


def visible_files(root: str | Path, day: dt.date, types: Iterable[str] | None = None) -> list[ArchiveFile]:
    """The files of ``day`` a reader reads (no range covers them), by (type, first sequence number)."""
    return _visible(_all_files(_day_dir(Path(root), day), _check_types(types)))


def read_events(path: str | Path, kind: str) -> list[Event]:
    """The events of one archive-format Parquet file of type ``kind``, in the file's order."""
    table = pq.read_table(path, schema=_SCHEMAS[kind])
    return [event for batch in table.to_batches(max_chunksize=8192) for event in _from_batch(kind, batch)]


def write_events(path: str | Path, kind: str, events: list[Event]) -> None:
    """Write ``events`` of type ``kind`` (sorted by time) as a synced archive-format Parquet file at ``path``."""
    pq.write_table(_to_table(kind, events), path)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def days(root: str | Path) -> list[dt.date]:
    """The days that hold at least one complete file, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for path in root.iterdir():
        m = _DAY_RE.match(path.name)
        if m and _complete_files(path, None):
            out.append(dt.date.fromisoformat(m.group(1)))
    return sorted(out)


def _check_types(types: Iterable[str] | None) -> frozenset[str] | None:
    if types is None:
        return None
    chosen = frozenset(types)
    unknown = chosen - set(_SCHEMAS)
    if unknown:
        raise ValueError(f"unknown event type(s) {sorted(unknown)}; expected some of {sorted(_SCHEMAS)}")
    return chosen


def _read_table(kind: str, path: Path) -> pa.Table:
    """A file's events sorted by time (a stable sort: ties keep their order in the file)."""
    table = pq.read_table(path, schema=_SCHEMAS[kind])
    if table.num_rows and not _is_sorted(table):
        table = table.sort_by("ts_ms")
    return table


def _table_events(kind: str, table: pa.Table, seq: int) -> Iterator[tuple[int, int, int, Event]]:
    rank = _RANK[kind]
    for batch in table.to_batches(max_chunksize=8192):
        for event in _from_batch(kind, batch):
            yield event.ts_ms, rank, seq, event


def _is_sorted(table: pa.Table) -> bool:
    ts = table.column("ts_ms").to_numpy()
    return bool((ts[1:] >= ts[:-1]).all())


def read_day(root: str | Path, day: dt.date | str, *, types: Iterable[str] | None = None) -> Iterator[Event]:
    """Events of one UTC day in time order; ``types`` limits the event types read (e.g. ``{"click"}``)."""
    if isinstance(day, str):
        day = dt.date.fromisoformat(day)
    directory, chosen = _day_dir(Path(root), day), _check_types(types)
    # Every file is read before the first event is yielded (the merge below needs each file's first event
    # anyway), so a compaction that removes a listed file is met here, where listing again is safe.
    for attempt in range(_READ_ATTEMPTS):
        files = _complete_files(directory, chosen)
        try:
            tables = [(kind, _read_table(kind, path)) for kind, path in files]
            break
        except FileNotFoundError:
            if attempt == _READ_ATTEMPTS - 1:
                raise
            logger.debug("%s: a file went while reading (compacted); listing again", directory)
    # Each file is sorted by time; a k-way merge keeps the whole day in order without sorting it in Python.
    streams = [_table_events(kind, table, i) for i, (kind, table) in enumerate(tables)]
    for _, _, _, event in heapq.merge(*streams, key=lambda t: (t[0], t[1], t[2])):
        yield event


def read_range(
    root: str | Path, start_ms: int | None, end_ms: int | None, *, types: Iterable[str] | None = None
) -> Iterator[Event]:
    """Events with ``start_ms <= ts_ms < end_ms`` in time order (``None``: unbounded on that side)."""
    chosen = _check_types(types)
    for day in days(root):
        day_start = _day_start_ms(day)
        if start_ms is not None and day_start + _MS_PER_DAY <= start_ms:
            continue
        if end_ms is not None and day_start >= end_ms:
            break
        for event in read_day(root, day, types=chosen):
            if (start_ms is None or event.ts_ms >= start_ms) and (end_ms is None or event.ts_ms < end_ms):
                yield event


# --------------------------------------------------------------------------------------------------- compaction
@dataclass(frozen=True)
class Compaction:
    """What :func:`compact_day` did: files read by readers before and after, rows merged, files left alone
    because a staged link still pointed at them, and covered leftovers of an earlier compaction removed."""

    day: dt.date
    files_before: int
    files_after: int
    rows_merged: int
    skipped_linked: int
    leftovers_removed: int


def compact_day(root: str | Path, day: dt.date | str, *, types: Iterable[str] | None = None) -> Compaction:
    """Merge each run of consecutive files of ``day`` (per type) into one range file; see the module docstring.

    Safe while readers read and while a sink writes (its new files take sequence numbers after every range);
    meant for closed days (``python -m streaming compact-archive`` compacts days before today). Idempotent.
    """
    if isinstance(day, str):
        day = dt.date.fromisoformat(day)
    directory = _day_dir(Path(root), day)
    chosen = _check_types(types)
    files = _all_files(directory, chosen)
    visible = _visible(files)
    stale = [f for f in files if f not in visible]  # covered leftovers of a compaction cut short
    merged: list[ArchiveFile] = []
    rows = skipped = 0
    for kind in sorted({f.kind for f in visible}):
        run: list[ArchiveFile] = []
        for f in [*(f for f in visible if f.kind == kind), None]:
            if f is not None and os.stat(f.path).st_nlink == 1:
                run.append(f)
                continue
            if f is not None:
                skipped += 1  # a staged name still links it: the sink may be publishing it; it ends the run
            if len(run) > 1:
                rows += _merge(directory, day, kind, run)
                merged += run
            run = []
    for f in stale + merged:
        f.path.unlink(missing_ok=True)
    if stale or merged:
        fsync_dir(directory)
    after = len(_visible(_all_files(directory, chosen)))
    if merged:
        logger.info("compacted %s: %d files -> %d (%d rows)", directory, len(visible), after, rows)
    return Compaction(day, len(visible), after, rows, skipped, len(stale))


def _merge(directory: Path, day: dt.date, kind: str, run: list[ArchiveFile]) -> int:
    """Write the events of ``run`` (consecutive files of one type) as one range file; returns its rows."""
    # Concatenated in sequence order, then stably sorted by time: the order of read_day's merge by (time, seq).
    table = pa.concat_tables([pq.read_table(f.path, schema=_SCHEMAS[kind]) for f in run])
    if table.num_rows and not _is_sorted(table):
        table = table.sort_by("ts_ms")
    staged = _stage(directory, day, kind, table)
    final = directory / f"{kind}-{run[0].first:06d}-{run[-1].last:06d}.parquet"
    try:
        os.link(staged.path, final)
    except FileExistsError:
        pass  # a concurrent compaction of the same run linked it first: the same rows
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        os.replace(staged.path, final)  # no hard links here: rename is atomic too
    finally:
        staged.path.unlink(missing_ok=True)
    fsync_dir(directory)
    return table.num_rows
