"""What ``python -m trainer full`` trains on: the days it picks and their events, from the archive or Kafka.

A run trains on ``days`` consecutive UTC days ending with its chosen day (the last one): the clicks and
impressions of the whole range, with the catalogue and user profiles as of the last day's end.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from pathlib import Path

from streaming import archive, archive_state, kafka_day
from streaming.settings import KafkaSettings
from trainer.artifact import ArtifactError, read_manifest
from trainer.dataset import Dataset
from trainer.full_settings import DAY_MS
from trainer.registry import Registry, RegistryError

__all__ = [
    "day_range",
    "day_start_ms",
    "describe_days",
    "load_day",
    "load_days",
    "load_kafka_day",
    "pick_day",
    "trained_until",
    "yesterday",
]

logger = logging.getLogger(__name__)


def pick_day(root: Path, requested: str | None, today: dt.date | None = None) -> dt.date | None:
    """The day to train on: ``requested`` if archived, else the newest archived day before ``today`` (UTC)."""
    available = archive.days(root)
    if requested is not None:
        day = dt.date.fromisoformat(requested)
        return day if day in available else None
    today = today or dt.datetime.now(dt.UTC).date()
    before = [d for d in available if d < today]
    return before[-1] if before else None


def yesterday(requested: str | None) -> dt.date:
    """The day to read from Kafka: ``requested``, else yesterday (UTC)."""
    if requested is not None:
        return dt.date.fromisoformat(requested)
    return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


def day_start_ms(day: dt.date) -> int:
    """Midnight (UTC) at the start of ``day``, in epoch milliseconds."""
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def day_range(last: dt.date, days: int = 1) -> tuple[int, int]:
    """``[start, end)`` in epoch milliseconds of the ``days`` UTC days ending with ``last``."""
    end = day_start_ms(last) + DAY_MS
    return end - days * DAY_MS, end


def describe_days(last: dt.date, days: int = 1) -> str:
    """``2024-01-03`` for one day, ``2024-01-02..2024-01-03`` for several."""
    if days == 1:
        return f"day {last.isoformat()}"
    return f"days {(last - dt.timedelta(days=days - 1)).isoformat()}..{last.isoformat()}"


def trained_until(registry: Registry, version_id: str | None) -> int | None:
    """The end of the data ``version_id`` was trained on (its manifest's ``data_range``), or None."""
    if version_id is None:
        return None
    try:
        return int(read_manifest(registry.path(version_id))["data_range"]["end_ms"])
    except (ArtifactError, RegistryError, KeyError, TypeError, ValueError) as exc:
        logger.warning("current version %s: no readable data range (%s)", version_id, exc)
        return None


def load_kafka_day(kafka: KafkaSettings, day: dt.date, lateness_s: float, days: int = 1) -> Dataset:
    """The clicks and impressions of the ``days`` days ending with ``day``, with the items and profiles as of
    its end, from the Kafka topics."""
    # Streamed: impressions become per-item counts as they are read, so the range is never held whole.
    return Dataset.from_events(kafka_day.iter_day(kafka, day, lateness_ms=int(lateness_s * 1000), days=days))


def load_days(root: Path, last: dt.date, days: int = 1) -> Dataset:
    """The clicks and impressions of the ``days`` days ending with ``last`` (days with nothing archived are
    skipped), with the newest record of every item and profile up to the end of ``last`` (from the newest
    snapshot and the archive files it lacks)."""
    state = archive_state.read_state(root, last)
    wanted = [last - dt.timedelta(days=k) for k in range(days - 1, -1, -1)]
    available = set(archive.days(root))
    missing = [d.isoformat() for d in wanted if d not in available]
    if missing:
        logger.warning("nothing archived on %s: skipped", ", ".join(missing))
    behaviour = (archive.read_day(root, d, types={"click", "impression"}) for d in wanted if d in available)
    return Dataset.from_events(itertools.chain(state, itertools.chain.from_iterable(behaviour)))


def load_day(root: Path, day: dt.date) -> Dataset:
    """The day's clicks and impressions, with the newest record of every item and profile up to the day's end."""
    return load_days(root, day, 1)
