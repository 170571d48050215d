"""One run of the main job: a dataset replayed through the real system, every scored click ranked under every arm.

For each step of the plan (:mod:`prequential.timeline`):

1. a nightly run first when the step starts a new night (``trainer full --source kafka`` on the days since
   the last one; ALS is refitted then too);
2. :meth:`~prequential.system.System.settle`: the worker has learnt everything produced so far under the
   current version, the publisher has published it, serving has loaded it;
3. score: every click of the step, under every arm, from that state (test) — checked against the versions'
   data cutoffs and the served watermark, which must all lie before the step's first event;
4. produce the step into Kafka (then train).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from prequential.arms import ALSArm, ModelArm, PopularityArm, filtered
from prequential.observed import Observed
from prequential.system import System, SystemSettings
from prequential.timeline import DAY_MS, Plan, clicks_of, day_start_ms, iso_day, plan_steps
from streaming.events import Click, Event
from trainer.artifact import ModelVersion, load_version
from trainer.registry import Registry

__all__ = ["ARMS", "RunSettings", "RunResult", "run"]

logger = logging.getLogger(__name__)

ARMS = ("full_incremental", "nightly_fresh", "nightly_only", "popularity", "popularity_recent", "als")
RECENT_HALF_LIFE_DAYS = 3.0  # as trainer eval's popularity_recent


class Dishonest(AssertionError):
    """A click was about to be scored by a model or a publish that had already learnt from it."""


@dataclass(frozen=True)
class RunSettings:
    """One run. ``first_cut``/``score_from``: time quantiles of the clicks, rounded down to UTC midnights."""

    dataset: str = "ml100k"
    seed: int = 0
    first_cut: float = 0.5
    score_from: float = 0.7
    end: float = 1.0
    step_clicks: int = 500
    night_every_days: int = 7
    k: tuple[int, ...] = (20, 50)
    last_n: int = 20
    system: SystemSettings = field(default_factory=SystemSettings)


@dataclass
class RunResult:
    rows: list[dict]
    steps: list[dict]
    nights: list[dict]
    seconds: float
    events: int


def _midnight_at_quantile(events: list[Event], q: float) -> int:
    ts = np.array([e.ts_ms for e in events if isinstance(e, Click)], dtype=np.int64)
    return day_start_ms(int(np.quantile(ts, q)))


def run(
    settings: RunSettings,
    events: list[Event],
    root: Path,
    *,
    on_step: Callable[[dict], None] | None = None,
) -> RunResult:
    """Replay ``events`` (sorted) through a fresh :class:`System` under ``root``; see the module docstring."""
    started = time.monotonic()
    first_day = day_start_ms(min(e.ts_ms for e in events if isinstance(e, Click)))
    first_cut = max(first_day + DAY_MS, _midnight_at_quantile(events, settings.first_cut))  # a whole day at least
    score_from = max(first_cut, _midnight_at_quantile(events, settings.score_from))
    end_ms = None if settings.end >= 1.0 else _midnight_at_quantile(events, settings.end)
    plan = plan_steps(
        events,
        first_cut_ms=first_cut,
        score_from_ms=score_from,
        step_clicks=settings.step_clicks,
        night_every_days=settings.night_every_days,
        end_ms=end_ms,
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps(_describe(plan, events), indent=1) + "\n")
    observed = Observed(settings.last_n)
    arms = {
        "nightly_fresh": ModelArm("nightly_fresh", fresh_history=True),
        "nightly_only": ModelArm("nightly_only", fresh_history=False),
        "popularity": PopularityArm("popularity"),
        "popularity_recent": PopularityArm("popularity_recent", RECENT_HALF_LIFE_DAYS),
        "als": ALSArm("als", seed=settings.seed),
    }
    rows: list[dict] = []
    steps: list[dict] = []
    nights: list[dict] = []
    k_max = max(settings.k)
    with System(root, settings.system) as system:
        system.start_broker()
        _write_seed(system, settings.seed)
        bootstrap = events[: plan.bootstrap_end]
        system.produce(bootstrap)
        observed.add(bootstrap)
        nights.append(_night(system, first_cut, (first_cut - first_day) // DAY_MS, "bootstrap"))
        if nights[-1]["exit_code"] != 0:
            raise RuntimeError(f"the first full model was not promoted: {nights[-1]}")
        version = _current(system)
        for arm in ("nightly_fresh", "nightly_only"):
            arms[arm].use(version)  # type: ignore[attr-defined]
        arms["als"].refit(observed)  # type: ignore[attr-defined]
        system.start_processes()
        for n, step in enumerate(plan.steps):
            if step.night_ms is not None:
                nights.append(_night(system, step.night_ms, settings.night_every_days, f"step {n}"))
                current = _current(system)
                if current.version_id != version.version_id:
                    version = current
                    for arm in ("nightly_fresh", "nightly_only"):
                        arms[arm].use(version)  # type: ignore[attr-defined]
                    if settings.system.new_worker_each_night:
                        system.restart_fresh()
                arms["als"].refit(observed)  # type: ignore[attr-defined]
            t0 = time.monotonic()
            served = system.settle(version.version_id)
            settle_s = time.monotonic() - t0
            chunk = events[step.lo : step.hi]
            record = {
                "step": n,
                "from_ms": chunk[0].ts_ms,
                "to_ms": chunk[-1].ts_ms,
                "events": len(chunk),
                "clicks": step.clicks,
                "scored": step.scored,
                "night": step.night_ms is not None,
                "model_version": version.version_id,
                "model_cutoff_ms": version.data_cutoff_ms,
                "served_model": served["model_version"],
                "served_publish_version": int(served["publish_version"]),
                "served_watermark_ms": int(served["watermark_ms"]),
                "settle_s": round(settle_s, 3),
            }
            if step.scored:
                _check_honest(record, version)
                t1 = time.monotonic()
                rows += _score(system, arms, observed, events, step, n, version, k_max)
                record["score_s"] = round(time.monotonic() - t1, 3)
            t2 = time.monotonic()
            system.produce(chunk)
            observed.add(chunk)
            record["produce_s"] = round(time.monotonic() - t2, 3)
            steps.append(record)
            if on_step is not None:
                on_step({**record, "rows": rows, "steps_total": len(plan.steps)})
    return RunResult(rows, steps, nights, time.monotonic() - started, plan.steps[-1].hi if plan.steps else 0)


def _write_seed(system: System, seed: int) -> None:
    """The run's seed for model initialisation and the nightly shuffle (the worker seeds by batch number)."""
    with system.config.open("a") as f:
        f.write(f"\n[model]\nseed = {seed}\n\n[train]\nseed = {seed}\n")


def _night(system: System, midnight_ms: int, days: int, when: str) -> dict:
    day = iso_day(midnight_ms - 1)
    t0 = time.monotonic()
    code, line = system.nightly(day, max(1, int(days)))
    outcome = {0: "promoted", 3: "refused", 4: "no data"}.get(code, f"failed ({code})")
    logger.info("nightly %s (%s, %d days): %s: %s", day, when, days, outcome, line)
    if code not in (0, 3, 4):
        raise RuntimeError(f"the nightly job failed with exit code {code}: {line} (see {system.logs / 'nightly.log'})")
    return {"day": day, "days": int(days), "exit_code": code, "outcome": outcome, "seconds": round(time.monotonic() - t0, 1),
            "midnight_ms": midnight_ms, "message": line}  # fmt: skip


def _current(system: System) -> ModelVersion:
    registry = Registry(system.models)
    current = registry.current()
    if current is None:
        raise RuntimeError(f"no current model version in {system.models}")
    return load_version(registry.path(current))


def _check_honest(record: dict, version: ModelVersion) -> None:
    """Nothing that serves a step may have learnt from it: every version's cutoff and the served watermark lie
    before the step's first event, and serving runs the version the in-process arms use."""
    first = record["from_ms"]
    if not version.data_cutoff_ms < first:
        raise Dishonest(f"step {record['step']}: model {version.version_id} was trained up to {version.data_cutoff_ms}")
    if not record["served_watermark_ms"] < first:
        raise Dishonest(
            f"step {record['step']}: the served publish has seen events up to {record['served_watermark_ms']}"
        )
    if record["served_model"] != version.version_id:
        raise Dishonest(f"step {record['step']}: serving runs {record['served_model']}, not {version.version_id}")


def _score(
    system: System,
    arms: dict,
    observed: Observed,
    events: list[Event],
    step,  # noqa: ANN001
    n: int,
    version: ModelVersion,
    k: int,
) -> list[dict]:
    clicks = list(clicks_of(events, step))
    users = sorted({c.user_id for c in clicks})
    lists: dict[str, dict[str, list[str]]] = {name: arm.top(users, k, observed) for name, arm in arms.items()}
    served: dict[str, list[str]] = {}
    for user in users:
        clicked = observed.clicked(user)
        answer = system.recommend(user, min(500, k + len(clicked)))
        if answer["model_version"] != version.version_id:
            raise Dishonest(f"serving switched versions during step {n}: {answer['model_version']}")
        served[user] = filtered([h["item_id"] for h in answer["items"]], clicked, k)
    lists["full_incremental"] = served
    head = observed.head_items()
    cutoff = version.data_cutoff_ms
    out = []
    for click in clicks:
        ranks = {}
        for name in ARMS:
            ranked = lists[name][click.user_id]
            ranks[name] = ranked.index(click.item_id) if click.item_id in ranked else -1
        out.append(
            {
                "user": click.user_id,
                "item": click.item_id,
                "ts_ms": click.ts_ms,
                "step": n,
                "new_user": observed.first_click_ms.get(click.user_id, click.ts_ms) > cutoff,
                "new_item": observed.first_seen_ms.get(click.item_id, click.ts_ms) > cutoff,
                "head_item": click.item_id in head,
                "ranks": ranks,
            }
        )
    return out


def _describe(plan: Plan, events: list[Event]) -> dict:
    def day(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()

    return {
        "first_cut": day(plan.first_cut_ms),
        "score_from": day(plan.score_from_ms),
        "bootstrap_events": plan.bootstrap_end,
        "steps": len(plan.steps),
        "scored_steps": sum(s.scored for s in plan.steps),
        "scored_clicks": sum(s.clicks for s in plan.steps if s.scored),
        "nights": [day(n) for n in plan.nights],
        "events": len(events),
    }


def result_json(result: RunResult, settings: RunSettings) -> dict:
    return {"settings": asdict(settings), "seconds": result.seconds, "steps": result.steps, "nights": result.nights}
