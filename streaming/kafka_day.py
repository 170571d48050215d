"""One day (or several) of events read back from Kafka by timestamp: what ``trainer full --source kafka`` trains on.

The event archive (:mod:`streaming.archive`) is the nightly job's usual source. Where the topics' retention
covers the day, the job can read it from Kafka instead, with no archive sink running:

- **clicks and impressions**: in each partition, from the first record timed at or after the day's start
  (Kafka's ListOffsets by timestamp; the record time is the event time) to the first record timed at or
  after the day's end plus ``lateness_ms``, or to the partition's end when there is none yet. Records whose
  event time falls outside the day are dropped. A record of the day that reached its partition after one
  timed ``lateness_ms`` past midnight is missed; the archive keeps such stragglers, so the archive is the
  source to prefer when events arrive very late.
- **items and user profiles** (compacted topics): every record there, keeping for each id the newest one
  timed before the day's end, i.e. the catalogue and the profiles as of then (:func:`as_of`). Compaction
  may already have replaced an item's record of that time by a newer one; the oldest record still there
  then stands in for it, provided the item was created before the day's end. A profile is never taken
  from after the day.

``days`` > 1 reads the ``days`` UTC days ending with the day as one range: ``[start of the first, end of the
last)`` for the clicks and impressions, the items and profiles as of the last day's end.

A day that retention has begun to delete is refused (:class:`DayTruncated`): when a partition of clicks or
impressions has lost records (its log starts past offset 0) and its oldest record left is later than the
day's start, records of the day may be gone, and training on the rest would skew the model silently.

Records that fail the checks of the worker and the archive sink (:func:`streaming.consumer.check_record`;
those already went to the dead-letter topic) are skipped and counted, so both sources hold the same events.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from streaming.consumer import check_record
from streaming.events import Event, InvalidEvent, Item, Limits, UserProfile
from streaming.settings import KafkaSettings

__all__ = ["DayTruncated", "KafkaDay", "ReadStats", "as_of", "iter_day", "read_day"]

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
BEHAVIOUR = ("clicks", "impressions")
STATE = ("items", "users")


class DayTruncated(ValueError):
    """Retention has deleted records of the day from the topics: read it from the archive instead."""


@dataclass(frozen=True)
class KafkaDay:
    """The day's clicks and impressions, the items and profiles as of its end, and what was left out."""

    events: list[Event]
    records: int  # records read from the topics
    skipped: Counter[str] = field(default_factory=Counter)  # invalid records, by topic name
    outside: int = 0  # clicks and impressions read that belong to another day


def _day_bounds(day: dt.date, days: int = 1) -> tuple[int, int]:
    """``[start, end)`` in epoch milliseconds of the ``days`` UTC days ending with ``day``."""
    end = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000) + DAY_MS
    return end - days * DAY_MS, end


def as_of(records: Iterable[Item | UserProfile], end_ms: int) -> list[Item | UserProfile]:
    """The newest record of every id timed before ``end_ms`` (a later one of equal time wins, as in the archive);
    for an item with none, its oldest later record if the item was created before ``end_ms``."""
    before: dict[tuple[str, str], Item | UserProfile] = {}
    after: dict[str, Item] = {}
    for record in records:
        ident = (record.TYPE, record.item_id if isinstance(record, Item) else record.user_id)
        if record.ts_ms < end_ms:
            current = before.get(ident)
            if current is None or current.ts_ms <= record.ts_ms:
                before[ident] = record
        elif isinstance(record, Item) and record.created_ms < end_ms:
            first = after.get(record.item_id)
            if first is None or record.ts_ms < first.ts_ms:
                after[record.item_id] = record
    stand_ins = [item for item_id, item in after.items() if ("item", item_id) not in before]
    if stand_ins:
        logger.info(
            "%d items have no record before the day's end left (compacted): a later one stands in", len(stand_ins)
        )
    return [*before.values(), *stand_ins]


def _partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise ValueError(f"topic {topic} does not exist (or has no partitions) on the broker")
    return [TopicPartition(topic, p) for p in sorted(partitions)]


def _offset_at(consumer: KafkaConsumer, tps: list[TopicPartition], ts_ms: int, ends: dict) -> dict:
    """Per partition, the first offset timed at or after ``ts_ms``, or the end when there is none."""
    found = consumer.offsets_for_times({tp: ts_ms for tp in tps})
    return {tp: found[tp].offset if found.get(tp) is not None else ends[tp] for tp in tps}


def _check_retained(consumer: KafkaConsumer, tps: list[TopicPartition], start_ms: int, ends: dict) -> None:
    """Raise :class:`DayTruncated` when a partition lost records and keeps none from before ``start_ms``."""
    begin = consumer.beginning_offsets(tps)
    oldest = consumer.offsets_for_times({tp: 0 for tp in tps})
    lost = []
    for tp in tps:
        if begin[tp] == 0:
            continue  # nothing ever deleted
        kept = oldest.get(tp)
        if kept is None and ends[tp] > 0:
            lost.append(f"{tp.topic}-{tp.partition}: every record deleted (log start {begin[tp]})")
        elif kept is not None and kept.timestamp > start_ms:
            lost.append(f"{tp.topic}-{tp.partition}: oldest record left at {kept.timestamp} ms (offset {kept.offset})")
    if lost:
        raise DayTruncated(
            f"retention has deleted records that may belong to the day starting at {start_ms} ms; "
            f"read the day from the archive instead: {'; '.join(lost)}"
        )


def _read(consumer: KafkaConsumer, ranges: dict[TopicPartition, tuple[int, int]], timeout_s: float) -> Iterator:
    """Every record of each partition's ``[start, stop)`` offset range; raises when no progress for ``timeout_s``."""
    active = {tp: stop for tp, (start, stop) in ranges.items() if start < stop}
    consumer.assign(list(active))
    for tp in active:
        consumer.seek(tp, ranges[tp][0])
    deadline = time.monotonic() + timeout_s
    while active:
        batch: dict[TopicPartition, list[ConsumerRecord]] = consumer.poll(timeout_ms=500, max_records=20_000)
        for tp, records in batch.items():
            stop = active.get(tp)
            for record in records:
                if stop is None or record.offset >= stop:
                    break
                yield record
        progressed = bool(batch)
        for tp in list(active):
            # A compacted partition has gaps: the position, not the last offset seen, says when it is done.
            if consumer.position(tp) >= active[tp]:
                consumer.pause(tp)
                del active[tp]
                progressed = True
        if progressed:
            deadline = time.monotonic() + timeout_s
        elif time.monotonic() > deadline:
            left = {f"{tp.topic}-{tp.partition}": (consumer.position(tp), stop) for tp, stop in active.items()}
            raise TimeoutError(f"no records for {timeout_s:.0f} s while reading (position, stop) {left}")


@dataclass
class ReadStats:
    """What :func:`iter_day` read, filled in as it goes."""

    records: int = 0  # records read from the topics
    skipped: Counter[str] = field(default_factory=Counter)  # invalid records, by topic name
    outside: int = 0  # clicks and impressions read that belong to another day
    kept: int = 0  # events yielded


def iter_day(
    settings: KafkaSettings,
    day: dt.date,
    *,
    lateness_ms: int = 3_600_000,
    timeout_s: float = 60.0,
    stats: ReadStats | None = None,
    days: int = 1,
) -> Iterator[Event]:
    """The events of ``day`` (UTC) from the topics of ``settings`` (see the module docstring), streamed: first the
    items and profiles as of the day's end (one record per id, held in memory to pick it), then the clicks and
    impressions one at a time, so that a large day is never held whole. ``days``: the ``days`` days ending with
    ``day`` instead, as one range. ``stats`` is filled in as it goes. Raises :class:`DayTruncated` before
    yielding anything when retention has begun to delete the range."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    stats = stats if stats is not None else ReadStats()
    start_ms, end_ms = _day_bounds(day, days)
    limits = Limits(max_bytes=settings.max_record_bytes, max_future_ms=1 << 62)  # old events are not skewed
    consumer = KafkaConsumer(
        **settings.client_config(),
        group_id=None,
        enable_auto_commit=False,
        client_id="freshtower-full",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )

    def valid(records: Iterable[ConsumerRecord]) -> Iterator[Event]:
        for record in records:
            stats.records += 1
            try:
                yield check_record(record.topic, record.key, record.value, settings, limits)
            except InvalidEvent:
                stats.skipped[record.topic] += 1

    try:
        behaviour: dict[TopicPartition, tuple[int, int]] = {}
        for name in BEHAVIOUR:
            tps = _partitions(consumer, settings.topic(name))
            ends = consumer.end_offsets(tps)
            _check_retained(consumer, tps, start_ms, ends)
            first = _offset_at(consumer, tps, start_ms, ends)
            stop = _offset_at(consumer, tps, end_ms + lateness_ms, ends)
            behaviour |= {tp: (first[tp], stop[tp]) for tp in tps}
        state: dict[TopicPartition, tuple[int, int]] = {}
        for name in STATE:
            tps = _partitions(consumer, settings.topic(name))
            begin, ends = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
            state |= {tp: (begin[tp], ends[tp]) for tp in tps}
        records = [e for e in valid(_read(consumer, state, timeout_s)) if isinstance(e, Item | UserProfile)]
        for record in as_of(records, end_ms):
            stats.kept += 1
            yield record
        del records
        for event in valid(_read(consumer, behaviour, timeout_s)):
            if start_ms <= event.ts_ms < end_ms:
                stats.kept += 1
                yield event
            else:
                stats.outside += 1
    finally:
        consumer.close()
    if stats.skipped:
        logger.warning("skipped invalid records (already dead-lettered by the worker): %s", dict(stats.skipped))
    logger.info(
        "%s from Kafka: %d records read, %d events kept, %d of other days",
        f"day {day}" if days == 1 else f"{days} days to {day}",
        stats.records,
        stats.kept,
        stats.outside,
    )


def read_day(
    settings: KafkaSettings,
    day: dt.date,
    *,
    lateness_ms: int = 3_600_000,
    timeout_s: float = 60.0,
    days: int = 1,
) -> KafkaDay:
    """:func:`iter_day` as a list, with what was left out."""
    stats = ReadStats()
    events = list(iter_day(settings, day, lateness_ms=lateness_ms, timeout_s=timeout_s, stats=stats, days=days))
    return KafkaDay(events, stats.records, stats.skipped, stats.outside)
