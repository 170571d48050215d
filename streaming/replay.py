"""Replaying an event source into Kafka at a chosen rate, with a progress bar."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from tqdm import tqdm

from streaming.events import Event
from streaming.producer import EventProducer

__all__ = ["ReplayStats", "replay"]

logger = logging.getLogger(__name__)


@dataclass
class ReplayStats:
    sent: int = 0
    seconds: float = 0.0
    by_type: Counter[str] = field(default_factory=Counter)
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def replay(
    events: Iterable[Event],
    producer: EventProducer,
    *,
    rate: float | None = None,
    total: int | None = None,
    progress: bool = True,
    description: str = "replay",
) -> ReplayStats:
    """Send ``events`` in order; ``rate`` events/s paces the stream (``None``: as fast as Kafka takes them).

    Pacing compares the number sent with the time elapsed, so short stalls are caught up rather
    than lost. The producer is flushed before returning: every counted event is acknowledged.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 events/s or None, got {rate}")
    stats = ReplayStats()
    start = time.monotonic()
    bar = tqdm(total=total, desc=description, unit="ev", disable=not progress, smoothing=0.1, mininterval=0.5)
    try:
        for event in events:
            if rate is not None:
                ahead = stats.sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            producer.send(event)
            stats.sent += 1
            stats.by_type[event.TYPE] += 1
            if stats.first_ts_ms is None:
                stats.first_ts_ms = event.ts_ms
            stats.last_ts_ms = event.ts_ms
            if stats.sent % 1000 == 0:
                bar.update(1000)
        producer.flush()
    finally:
        bar.update(stats.sent % 1000)
        bar.close()
    stats.seconds = time.monotonic() - start
    logger.info("%s: sent %d events in %.1f s (%.0f events/s)", description, stats.sent, stats.seconds, stats.rate)
    return stats
