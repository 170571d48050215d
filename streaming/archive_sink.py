"""The archive sink: every event topic -> daily Parquet partitions for the nightly job, each record exactly once.

A plain kafka-python group member (auto-commit off) reads impressions, clicks, items and users, validates
every record with :func:`streaming.consumer.check_record` (bad records go to the dead-letter topic with
their reason, as :class:`streaming.consumer.EventConsumer` does), buffers the events and writes them with
:class:`streaming.archive.ArchiveWriter`, one file per (day, type) per flush.

Exactly-once files. One flush writes several files and must become durable all-or-nothing together with
the offsets it covers; a marker inside each file could not say "every file of this flush is there", so the
sink keeps a small state file, ``<archive>/_sink/<group>/state.json``, as the source of truth:

1. the flush's dead letters are acknowledged by Kafka;
2. the buffer is *staged*: synced Parquet files under temporary names in ``<archive>/_sink/<group>/staging``,
   where no reader looks;
3. ``state.json`` is replaced atomically by one holding the new offsets and the staged files: the commit point;
4. each staged file is published (hard-linked to its final name in its day's partition, then unlinked);
5. the offsets are committed to the consumer group, for lag monitoring and tools.

On start the sink publishes the staged files listed in ``state.json`` (publishing is idempotent, so a flush
cut short after step 3 is completed), deletes any other staged file (a flush cut short before step 3: its
records were never counted), and seeks each assigned partition to the offset in ``state.json``; a record
below it is skipped. So a record is in the archive if and only if its offset is below its partition's offset
in ``state.json``, and a SIGKILL at any point loses nothing and duplicates nothing. Dead letters are
at-least-once (a crash between 1 and 3 sends them again), as in :mod:`streaming.consumer`.

One sink per (archive, group): a lock file refuses a second one. Between a crash and the restart a reader may
see part of a flush (the files published before the crash); the restart completes it, never duplicates it.

    python -m streaming.archive_sink --archive data/archive [--group G] [--exit-when-idle S]
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge

from streaming.archive import ArchiveWriter, StagedFile, publish
from streaming.consumer import DeadLetterWriter, check_record, subscribe
from streaming.events import Event, InvalidEvent, Limits
from streaming.lifecycle import ProcessGuard, RetryBudget, run_main, setup_logging
from streaming.settings import KafkaSettings, load_settings
from streaming.topics import EVENT_TOPICS

__all__ = ["ArchiveSink", "SinkMetrics", "main"]

logger = logging.getLogger(__name__)

_GROUP_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_STATE_VERSION = 1


class SinkMetrics:
    """The sink's Prometheus metrics on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.archived = Counter(
            "freshtower_archive_events_total", "Events made durable in the archive", ["type"], registry=r
        )
        self.skipped = Counter(
            "freshtower_archive_skipped_total", "Records read again after a restart and skipped (archived)", registry=r
        )
        self.dead_letters = Counter(
            "freshtower_dead_letters_total", "Records sent to the dead-letter topic", ["topic"], registry=r
        )
        self.flushed = Gauge(
            "freshtower_archive_flush_timestamp_seconds", "Wall-clock time of the last durable flush", registry=r
        )
        self.watermark = Gauge(
            "freshtower_archive_watermark_timestamp_seconds", "Newest event time made durable", registry=r
        )
        self.kafka_errors = Counter(
            "freshtower_kafka_errors_total", "Failed Kafka client calls, by error", ["error"], registry=r
        )

    def count_kafka_error(self, exc: BaseException) -> None:
        self.kafka_errors.labels(type(exc).__name__).inc()


def _key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArchiveSink:
    """Consumes every event topic into ``archive_dir``; ``run`` until ``stop`` is set (or the stream stays idle).

    ``flush_every_s`` / ``flush_every_events``: a flush happens when either is reached (and on the way out).
    Each flush adds one file per (day, type) it holds, so the period sets the number of files per day.
    """

    def __init__(
        self,
        kafka_settings: KafkaSettings,
        archive_dir: str | Path,
        group_id: str = "freshtower-archive",
        flush_every_s: float = 60.0,
        flush_every_events: int = 100_000,
        *,
        metrics: SinkMetrics | None = None,
        session_timeout_ms: int = 15_000,
        retry_s: float = 120.0,
    ) -> None:
        if not _GROUP_RE.match(group_id):
            raise ValueError(
                f"group_id must be 1-200 characters of [A-Za-z0-9._-] (it names a folder), got {group_id!r}"
            )
        if flush_every_s <= 0 or flush_every_events < 1:
            raise ValueError(
                f"flush_every_s must be > 0 and flush_every_events >= 1, got {flush_every_s}, {flush_every_events}"
            )
        self.kafka = kafka_settings
        self.root = Path(archive_dir)
        self.group_id = group_id
        self.flush_every_s = flush_every_s
        self.flush_every_events = flush_every_events
        self.metrics = metrics or SinkMetrics()
        self._poll_budget = RetryBudget("poll of the event topics", retry_s, on_failure=self.metrics.count_kafka_error)
        self._dir = self.root / "_sink" / group_id
        self._staging = self._dir / "staging"
        self._state_path = self._dir / "state.json"
        self._staging.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire_lock()
        self._closed = False
        self._failed: BaseException | None = None
        self._limits = Limits(max_bytes=kafka_settings.max_record_bytes, max_future_ms=kafka_settings.max_future_ms)
        # The writer never flushes by itself: every file must go through stage -> state -> publish.
        self._writer = ArchiveWriter(self.root, max_buffered=1 << 62)
        self._polled: dict[str, int] = {}  # read since the last flush: "topic:partition" -> next offset
        self._types: dict[str, int] = {}  # events per type in the buffer
        self._newest_ms = 0
        self.flushes = 0
        self._last_flush = time.monotonic()
        self._last_record = time.monotonic()
        try:
            self._offsets: dict[str, int] = self._recover()  # durable: "topic:partition" -> next offset to archive
            self._consumer = KafkaConsumer(
                **kafka_settings.client_config(),
                group_id=group_id,
                # Static membership (KIP-345): a restarted sink takes its partitions back at once.
                group_instance_id=self._member_id(),
                session_timeout_ms=session_timeout_ms,
                client_id="freshtower-archive",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                # Larger than the validation limit: an oversized record must reach the dead-letter topic.
                max_partition_fetch_bytes=max(1 << 20, 4 * kafka_settings.max_record_bytes),
                reconnect_backoff_max_ms=2000,
            )
            self._dlq = DeadLetterWriter(kafka_settings, group_id, "freshtower-archive-dlq")
            topics = [kafka_settings.topic(name) for name in EVENT_TOPICS.values()]
            subscribe(self._consumer, topics, self._on_assigned, self._on_revoked)
        except BaseException:
            if hasattr(self, "_consumer"):
                self._consumer.close()
            os.close(self._lock)
            raise

    # ------------------------------------------------------------------ start-up
    def _acquire_lock(self) -> int:
        path = self._dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"another archive sink of group {self.group_id!r} is running on {self.root} ({path} is locked)"
            ) from None
        return fd

    def _member_id(self) -> str:
        digest = hashlib.sha256(f"{self.root.resolve()}\0{self.group_id}".encode()).hexdigest()[:12]
        return f"{socket.gethostname()}-archive-{digest}"

    def _recover(self) -> dict[str, int]:
        """Finish a flush that reached its commit point, drop one that did not; return the durable offsets."""
        if not self._state_path.exists():
            state: dict[str, Any] = {"offsets": {}, "pending": []}
        else:
            state = json.loads(self._state_path.read_text(encoding="utf-8"))
            if state.get("version") != _STATE_VERSION:
                raise RuntimeError(
                    f"{self._state_path}: expected state version {_STATE_VERSION}, found {state.get('version')!r}"
                )
        pending = {entry["file"] for entry in state["pending"]}
        completed = 0
        for entry in state["pending"]:
            staged = StagedFile(
                self._staging / entry["file"], dt.date.fromisoformat(entry["day"]), entry["kind"], entry["rows"]
            )
            if publish(self.root, staged) is not None:
                completed += 1
        strays = [p for p in self._staging.iterdir() if p.name not in pending]
        for path in strays:
            path.unlink()
        if completed or strays:
            logger.info("recovery: published %d staged files, removed %d uncommitted ones", completed, len(strays))
        return {k: int(v) for k, v in state["offsets"].items()}

    # ------------------------------------------------------------------ partitions
    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            stored = self._offsets.get(_key(tp.topic, tp.partition))
            if stored is not None:
                self._consumer.seek(tp, stored)  # the archive, not the group, says what is archived
        self._last_record = time.monotonic()
        logger.info("assigned %s", sorted(_key(tp.topic, tp.partition) for tp in assigned))

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked and not self._closed:
            # Before another member may read these partitions. No group commit from inside the rebalance: the
            # state file is what a restarted or new owner of this archive seeks to.
            self.flush(commit_group=False)

    # ------------------------------------------------------------------ records
    def _handle(self, record: ConsumerRecord) -> None:
        key = _key(record.topic, record.partition)
        if record.offset < self._polled.get(key, self._offsets.get(key, -1)):
            self.metrics.skipped.inc()  # archived before a crash, read again
            return
        self._polled[key] = record.offset + 1
        try:
            event = check_record(record.topic, record.key, record.value, self.kafka, self._limits)
        except InvalidEvent as exc:
            self._dead_letter(record, exc.reason)
            return
        except Exception as exc:  # a bug in validation must not stop the archive; keep the record
            logger.exception("unexpected error decoding %s[%d]@%d", record.topic, record.partition, record.offset)
            self._dead_letter(record, f"internal error while decoding: {type(exc).__name__}: {exc}")
            return
        self._buffer(event)

    def _buffer(self, event: Event) -> None:
        self._writer.write([event])
        self._types[event.TYPE] = self._types.get(event.TYPE, 0) + 1
        self._newest_ms = max(self._newest_ms, event.ts_ms)

    def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        self._dlq.send(record, reason)
        self.metrics.dead_letters.labels(record.topic).inc()

    # ------------------------------------------------------------------ flush
    def flush(self, *, commit_group: bool = True) -> int:
        """Make every buffered event durable in the archive with the offsets it covers; returns the events written.

        A failed flush (a dead letter Kafka refused, a disk error) leaves the sink unusable: its buffer may be
        half staged, so only a restart, which recovers from the state file, may go on.
        """
        if self._failed is not None:
            raise RuntimeError(f"an earlier flush failed ({self._failed!r}); restart the sink to recover")
        if not self._polled:
            return 0
        try:
            written, files = self._flush()
        except BaseException as exc:
            self._failed = exc
            raise
        if commit_group:
            self._commit_group(self._offsets)
        logger.info("flush %d: %d events in %d files", self.flushes, written, files)
        return written

    def _flush(self) -> tuple[int, int]:
        self._dlq.confirm()  # raises the send error: nothing below happens, the records are read again
        offsets = {**self._offsets, **self._polled}
        staged = self._writer.stage(self._staging)
        state = {
            "version": _STATE_VERSION,
            "group_id": self.group_id,
            "offsets": offsets,
            "pending": [
                {"file": s.path.name, "day": s.day.isoformat(), "kind": s.kind, "rows": s.rows} for s in staged
            ],
        }
        _write_json_atomic(self._state_path, state)  # the commit point
        for s in staged:
            publish(self.root, s)
        self._offsets, self._polled = offsets, {}
        for kind, n in self._types.items():
            self.metrics.archived.labels(kind).inc(n)
        self._types = {}
        self.flushes += 1
        self._last_flush = time.monotonic()
        self.metrics.flushed.set(time.time())
        if self._newest_ms:
            self.metrics.watermark.set(self._newest_ms / 1000)
        return sum(s.rows for s in staged), len(staged)

    def _commit_group(self, offsets: dict[str, int]) -> None:
        commit = {}
        for tp in self._consumer.assignment():
            offset = offsets.get(_key(tp.topic, tp.partition))
            if offset is not None:
                commit[tp] = OffsetAndMetadata(offset, "", -1)
        if not commit:
            return
        try:
            self._consumer.commit(commit)
        except KafkaError as exc:  # e.g. a rebalance: state.json already holds the truth
            logger.info("group offset commit skipped: %s", exc)

    # ------------------------------------------------------------------ loop
    def run(
        self,
        stop: threading.Event,
        *,
        exit_when_idle_s: float | None = None,
        beat: Callable[[], None] | None = None,
    ) -> None:
        """Poll, buffer and flush until ``stop`` is set or, with ``exit_when_idle_s``, no record came for that long.

        ``beat`` is called every cycle (a :class:`~streaming.lifecycle.ProcessGuard`'s watchdog). Kafka errors that
        outlast the retry budget or cannot be retried raise :class:`~streaming.lifecycle.KafkaStalled`."""
        try:
            while not stop.is_set():
                if beat is not None:
                    beat()
                try:
                    batches = self._consumer.poll(timeout_ms=200, max_records=5000)
                except KafkaError as exc:  # retried within the budget; a batch it cannot read raises KafkaStalled
                    self._poll_budget.failed(exc)
                    time.sleep(0.5)
                    continue
                self._poll_budget.ok()
                if not batches and not self._consumer.assignment():
                    stop.wait(0.2)  # a poll without partitions returns at once: do not spin while unassigned
                now = time.monotonic()
                for records in batches.values():
                    for record in records:
                        self._handle(record)
                        if self._writer.buffered >= self.flush_every_events:
                            self.flush()
                    if records:
                        self._last_record = now
                if self._polled and now - self._last_flush >= self.flush_every_s:
                    self.flush()
                if (
                    exit_when_idle_s is not None
                    and self._consumer.assignment()
                    and now - self._last_record >= exit_when_idle_s
                ):
                    break
            self.flush()
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for closer in (lambda: self._consumer.close(timeout_ms=2000), self._dlq.close):
            try:
                closer()
            except Exception:  # closing after a broker outage may fail; the state file already holds the truth
                logger.debug("close failed", exc_info=True)
        os.close(self._lock)

    def offsets(self) -> dict[str, int]:
        """The durable offsets: ``{"topic:partition": next offset to archive}``."""
        return dict(self._offsets)


# ---------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sink's own flags (the Kafka flags come from the caller's common parser)."""
    parser.add_argument(
        "--archive", type=Path, default=Path("data/archive"), help="archive root (default data/archive)"
    )
    parser.add_argument("--group", default="freshtower-archive", help="consumer group id (default freshtower-archive)")
    parser.add_argument("--flush-every-s", type=float, default=60.0, help="flush at least this often (default 60)")
    parser.add_argument(
        "--flush-every-events", type=int, default=100_000, help="flush once this many events wait (default 100000)"
    )
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on PORT (0: off)")
    parser.add_argument("--metrics-addr", default="127.0.0.1", help="address the /metrics server binds")
    parser.add_argument("--exit-when-idle", type=float, help="exit after this many seconds without a record")
    parser.add_argument(
        "--stall-timeout-s",
        type=float,
        default=300.0,
        help="exit (69) when the main loop has not come round for this long, stuck in a Kafka call (0: off)",
    )


def run_sink(args: argparse.Namespace, kafka: KafkaSettings) -> int:
    """Run the sink from parsed flags until SIGTERM/SIGINT (or idle); prints the durable offsets as JSON."""
    from prometheus_client import start_http_server

    from streaming.topics import ensure_topics

    ensure_topics(kafka)
    sink = ArchiveSink(
        kafka,
        args.archive,
        group_id=args.group,
        flush_every_s=args.flush_every_s,
        flush_every_events=args.flush_every_events,
    )
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_addr, registry=sink.metrics.registry)
    guard = ProcessGuard("archive sink", stall_s=args.stall_timeout_s).install()
    try:
        sink.run(guard.stop, exit_when_idle_s=args.exit_when_idle, beat=guard.beat)
    finally:
        guard.done()
    print(json.dumps({"flushes": sink.flushes, "offsets": sink.offsets()}, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streaming.archive_sink``: the sink on its own (``python -m streaming archive`` is the same)."""
    parser = argparse.ArgumentParser(prog="python -m streaming.archive_sink", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: FRESHTOWER_BOOTSTRAP_SERVERS)")
    parser.add_argument("--topic-prefix", help="prefix of every topic name (default: 'freshtower.')")
    parser.add_argument("--config", help="TOML settings file; its [kafka] table is read (also FRESHTOWER_CONFIG)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()

    def sink() -> int:
        kafka = load_settings(
            KafkaSettings,
            section="kafka",
            config=args.config,
            overrides={"bootstrap_servers": args.bootstrap, "topic_prefix": args.topic_prefix},
        )
        return run_sink(args, kafka)

    return run_main("archive sink", sink)


if __name__ == "__main__":
    sys.exit(main())
