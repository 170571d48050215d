"""The events of a run in time order, and how they are cut into a warm-up, nights and scored steps.

A run replays one dataset through Kafka:

- **bootstrap** ``[start, first_cut)``: the first full model (version 1) is trained on it; the worker starts
  at its cutoff and learns what follows online, so that when scoring begins it is a *steady-state* worker
  (one that has run for days and switched versions), not a new one.
- **warm-up** ``[first_cut, score_from)``: replayed through the whole system unscored; the nightly job runs on
  its schedule here too, so the version serving at ``score_from`` is a nightly one with its worker behind it.
- **scored** ``[score_from, end]``: cut into steps of about ``step_clicks`` clicks. Every click of a step is
  scored under every arm from what the system held *before the step was produced*, then the step is produced
  and the system catches up (test, then train).

Nights fall on UTC midnights every ``night_every_days`` days (counted from the first cut); a step never
spans one, so a nightly job only ever sees whole days before it and nothing after.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from streaming.events import Click, Event

__all__ = ["DAY_MS", "Plan", "Step", "day_start_ms", "plan_steps"]

DAY_MS = 86_400_000


def day_start_ms(ts_ms: int) -> int:
    """The UTC midnight at or before ``ts_ms``."""
    return ts_ms - ts_ms % DAY_MS


def iso_day(ts_ms: int) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).date().isoformat()


@dataclass(frozen=True)
class Step:
    """Events ``[lo, hi)`` of the timeline; ``night_ms`` is set when a nightly run at that midnight comes first
    (it trains on the days before it); ``scored`` tells whether the step's clicks are scored."""

    lo: int
    hi: int
    clicks: int
    night_ms: int | None
    scored: bool


@dataclass(frozen=True)
class Plan:
    first_cut_ms: int  # version 1 is trained on the days before this midnight
    score_from_ms: int  # the first scored step starts at this midnight
    bootstrap_end: int  # index of the first event at or after first_cut_ms
    steps: tuple[Step, ...]

    @property
    def nights(self) -> list[int]:
        return [s.night_ms for s in self.steps if s.night_ms is not None]


def _first_index_at(events: Sequence[Event], ts_ms: int) -> int:
    lo, hi = 0, len(events)
    while lo < hi:
        mid = (lo + hi) // 2
        if events[mid].ts_ms < ts_ms:
            lo = mid + 1
        else:
            hi = mid
    return lo


def plan_steps(
    events: Sequence[Event],
    *,
    first_cut_ms: int,
    score_from_ms: int,
    step_clicks: int,
    night_every_days: int,
    end_ms: int | None = None,
) -> Plan:
    """Cut ``events`` (sorted by ``ts_ms``) into the bootstrap and steps (see the module docstring).

    ``first_cut_ms`` and ``score_from_ms`` are UTC midnights with ``first_cut_ms <= score_from_ms``; events at or
    after ``end_ms`` are left out.
    """
    if first_cut_ms % DAY_MS or score_from_ms % DAY_MS:
        raise ValueError("first_cut_ms and score_from_ms must be UTC midnights")
    if not first_cut_ms <= score_from_ms:
        raise ValueError(f"expected first_cut_ms <= score_from_ms, got {first_cut_ms} and {score_from_ms}")
    if step_clicks < 1 or night_every_days < 1:
        raise ValueError(f"expected step_clicks >= 1 and night_every_days >= 1, got {step_clicks}, {night_every_days}")
    if any(b.ts_ms < a.ts_ms for a, b in zip(events, events[1:], strict=False)):
        raise ValueError("events must be sorted by ts_ms")
    stop = len(events) if end_ms is None else _first_index_at(events, end_ms)
    start = _first_index_at(events, first_cut_ms)
    steps: list[Step] = []
    next_night = first_cut_ms + night_every_days * DAY_MS
    i = start
    while i < stop:
        night = None
        if events[i].ts_ms >= next_night:
            while events[i].ts_ms >= next_night + night_every_days * DAY_MS:
                next_night += night_every_days * DAY_MS  # a gap in the data: one run for the days it spans
            night, next_night = next_night, next_night + night_every_days * DAY_MS
        scored = events[i].ts_ms >= score_from_ms
        limit = min(stop, _first_index_at(events, next_night))
        if not scored:
            limit = min(limit, _first_index_at(events, score_from_ms))
        j, clicks = i, 0
        while j < limit and (clicks < step_clicks or not scored):
            clicks += isinstance(events[j], Click)
            j += 1
        # A step ends after a click, but takes the events stamped with that same millisecond along.
        while j < limit and events[j].ts_ms == events[j - 1].ts_ms:
            clicks += isinstance(events[j], Click)
            j += 1
        steps.append(Step(i, j, clicks, night, scored))
        i = j
    return Plan(first_cut_ms, score_from_ms, start, tuple(steps))


def clicks_of(events: Sequence[Event], step: Step) -> Iterator[Click]:
    for event in events[step.lo : step.hi]:
        if isinstance(event, Click):
            yield event
