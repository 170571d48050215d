"""The nightly run's Prometheus metrics, pushed to a Pushgateway (names fixed by deploy/prometheus/alerts.yml).

``python -m trainer full`` is a batch job: it is up for minutes a day, so Prometheus cannot scrape its outcome
from it. With ``--pushgateway HOST:PORT`` (``[full] pushgateway``, ``FRESHTOWER_PUSHGATEWAY``) the run pushes
twice to the group ``job="freshtower-full", instance=<the models directory's absolute path>`` (or
``--pushgateway-instance``), so nightly jobs of two deployments can share one gateway: when it starts (``running`` = 1 and the start time) and when it
ends, however it ends (``running`` = 0, the outcome, the duration and, for a trained candidate, what it
learnt and how the gate scored it). Prometheus scrapes the gateway (``honor_labels: true``) and the
``freshtower-nightly`` alerts watch the result:

- ``FreshtowerNightlyFailed``: the last run did not end with a version that passed the gate;
- ``FreshtowerNightlyStuck``: a run started hours ago and never reported its end (killed, or hung);
- ``FreshtowerNightlyMissed``: no run started for more than a day.

Each push replaces only the metrics it carries (``pushadd``, HTTP POST), so a run that finds no data keeps
the time of the last success and the last candidate's scores on the gateway. A gateway that cannot be
reached costs a warning, never the night's model.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.error
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

__all__ = ["JOB", "OUTCOMES", "NightlyMonitor", "end_registry", "start_registry"]

logger = logging.getLogger(__name__)

JOB = "freshtower-full"
# How a run ends (trainer.full.FullResult.outcome); the first two passed the gate. "superseded": it passed, but
# the current version changed by hand during the run, so it was not promoted. (A run refused for another run
# in progress, "busy", reports nothing.)
OUTCOMES = ("promoted", "passed", "refused", "superseded", "diverged", "no_data", "error")
SUCCESS = ("promoted", "passed")


def _running(registry: CollectorRegistry, value: int) -> None:
    Gauge("freshtower_full_running", "1 while a nightly run is in progress", registry=registry).set(value)


def start_registry(now_s: float) -> CollectorRegistry:
    """The metrics pushed when a run starts."""
    registry = CollectorRegistry()
    _running(registry, 1)
    Gauge(
        "freshtower_full_last_start_timestamp_seconds",
        "Wall-clock time the last nightly run started",
        registry=registry,
    ).set(now_s)
    return registry


def end_registry(
    outcome: str,
    *,
    started_s: float,
    now_s: float,
    examples: int | None = None,
    mean_loss: float | None = None,
    data_cutoff_ms: int | None = None,
    recall_k: int | None = None,
    candidate: Mapping[str, float] | None = None,
    current: Mapping[str, float] | None = None,
    id_rows: Mapping[str, int] | None = None,
    expired: Mapping[str, int] | None = None,
) -> CollectorRegistry:
    """The metrics pushed when a run ends: always its outcome and times; what the candidate learnt when one was
    trained (``examples``...); the held-back Recall@``recall_k`` of the candidate and the current version when
    the gate scored them; the time of this success when the outcome is one."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    r = CollectorRegistry()
    _running(r, 0)
    result = Gauge(
        "freshtower_full_outcome", "1 for how the last nightly run ended, 0 for the others", ["outcome"], registry=r
    )
    for name in OUTCOMES:
        result.labels(name).set(1 if name == outcome else 0)
    Gauge("freshtower_full_last_run_timestamp_seconds", "Wall-clock time the last nightly run ended", registry=r).set(
        now_s
    )
    Gauge("freshtower_full_duration_seconds", "How long the last nightly run took", registry=r).set(now_s - started_s)
    if outcome in SUCCESS:
        Gauge(
            "freshtower_full_last_success_timestamp_seconds",
            "Wall-clock time a nightly run last ended with a version that passed the gate",
            registry=r,
        ).set(now_s)
    if examples is not None:
        Gauge("freshtower_full_examples", "Clicks the last trained candidate learnt from", registry=r).set(examples)
    if mean_loss is not None:
        Gauge("freshtower_full_mean_loss", "Mean training loss of the last trained candidate's epoch", registry=r).set(
            mean_loss
        )
    if data_cutoff_ms is not None:
        Gauge(
            "freshtower_full_data_cutoff_timestamp_seconds",
            "Newest event time the last trained candidate learnt from",
            registry=r,
        ).set(data_cutoff_ms / 1000)
    if recall_k is not None and candidate is not None:
        recall = Gauge(
            "freshtower_full_holdout_recall",
            "Held-back Recall@K the gate measured for the last candidate and for the version current then",
            ["model", "k"],
            registry=r,
        )
        key = f"recall@{recall_k}"
        recall.labels("candidate", str(recall_k)).set(candidate.get(key, math.nan))
        if current is not None:
            recall.labels("current", str(recall_k)).set(current.get(key, math.nan))
    if id_rows is not None:
        rows = Gauge(
            "freshtower_full_id_rows", "ID-embedding rows of the last trained candidate", ["tower"], registry=r
        )
        for tower, n in id_rows.items():
            rows.labels(tower).set(n)
    if expired is not None:
        dropped = Gauge(
            "freshtower_full_expired_ids", "Ids the last trained candidate dropped as inactive", ["tower"], registry=r
        )
        for tower, n in expired.items():
            dropped.labels(tower).set(n)
    return r


class NightlyMonitor:
    """Pushes a run's start and end to the Pushgateway at ``gateway`` (``host:port`` or a URL), in the group of
    ``job`` and ``instance`` (one group per deployment: a push replaces the series of its own group only)."""

    def __init__(
        self,
        gateway: str,
        *,
        instance: str = "",
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        job: str = JOB,
    ) -> None:
        self.gateway = gateway
        self.instance = instance
        self.timeout_s = timeout_s
        self.clock = clock
        self.job = job
        self.started_s: float | None = None

    def start(self) -> bool:
        """Push ``running`` = 1 and the start time; returns whether the gateway took it."""
        self.started_s = self.clock()
        return self._push(start_registry(self.started_s))

    def end(self, outcome: str, **details: object) -> bool:
        """Push the outcome (:func:`end_registry` takes ``details``); returns whether the gateway took it."""
        now = self.clock()
        started = self.started_s if self.started_s is not None else now
        return self._push(end_registry(outcome, started_s=started, now_s=now, **details))  # type: ignore[arg-type]

    def _push(self, registry: CollectorRegistry) -> bool:
        try:
            pushadd_to_gateway(
                self.gateway,
                job=self.job,
                registry=registry,
                grouping_key={"instance": self.instance} if self.instance else None,
                timeout=self.timeout_s,
            )
        except (OSError, urllib.error.URLError, ValueError) as exc:
            # The model matters more than its report: log and go on.
            logger.warning("could not push metrics to the Pushgateway at %s: %s", self.gateway, exc)
            return False
        return True
