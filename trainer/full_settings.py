"""The settings, outcome and exit codes of ``python -m trainer full`` (:mod:`trainer.full`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.settings import SettingsError
from trainer.gate import GateConfig, GateDecision
from trainer.train import TrainStats

__all__ = [
    "DAY_MS",
    "EXIT_BUSY",
    "EXIT_NO_DATA",
    "EXIT_PROMOTED",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "SOURCES",
    "FullResult",
    "FullSettings",
]

EXIT_PROMOTED = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_NO_DATA = 4
EXIT_BUSY = 5
DAY_MS = 86_400_000
SOURCES = ("archive", "kafka")


@dataclass(frozen=True)
class FullSettings:
    """Settings of one nightly run (section ``[full]``, variables ``FRESHTOWER_<FIELD>``).

    ``day``: ``YYYY-MM-DD`` or None for the newest archived day before today (UTC; from Kafka: yesterday).
    ``days``: train on the ``days`` UTC days ending with ``day`` (at least 1). ``gate_margin`` /
    ``gate_margin_mode``: see :mod:`trainer.gate`. ``keep_versions``: versions kept on disk besides the
    current one, its parent and the rollback target. ``carry_optimizer`` / ``carry_frequency``: warm-start
    the Adam moments / the logQ frequency estimate from the current version (:mod:`trainer.full`, step 3).
    ``id_ttl_days``: expire the rows of ids inactive for that many days (at least 1: an id trained on the day is
    never dropped); None keeps every id forever. ``source``: ``archive`` (``archive_dir``) or ``kafka`` (the
    topics of the ``[kafka]`` settings, by timestamp; ``kafka_lateness_s``: how long after midnight, in
    event time, a record of the day may still arrive; see :mod:`streaming.kafka_day`). ``pushgateway``:
    ``host:port`` of a Prometheus Pushgateway that the run reports its start and outcome to
    (:mod:`trainer.monitor`); None reports nothing. ``pushgateway_instance``: the ``instance`` label of its series
    (default: the models directory's absolute path), one group per deployment on a shared gateway.
    """

    archive_dir: Path = Path("data/archive")
    models_dir: Path = Path("artifacts/models")
    day: str | None = None
    days: int = 1
    nproc: int = 1
    holdout_fraction: float = 0.1
    recall_k: int = 50
    gate_margin: float = 0.01
    gate_margin_mode: str = "absolute"
    promote: bool = True
    keep_versions: int = 5
    carry_optimizer: bool = True
    carry_frequency: bool = True
    id_ttl_days: float | None = None
    source: str = "archive"
    kafka_lateness_s: float = 3600.0
    pushgateway: str | None = None
    pushgateway_instance: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.days < 1:
            raise SettingsError(f"days must be >= 1, got {self.days}")
        if self.nproc < 1:
            raise SettingsError(f"nproc must be >= 1, got {self.nproc}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise SettingsError(f"holdout_fraction must lie in (0, 1), got {self.holdout_fraction}")
        if self.source not in SOURCES:
            raise SettingsError(f"source must be one of {SOURCES}, got {self.source!r}")
        if not self.kafka_lateness_s >= 0.0:
            raise SettingsError(f"kafka_lateness_s must be >= 0, got {self.kafka_lateness_s}")
        if self.id_ttl_days is not None and not self.id_ttl_days >= 1.0:
            raise SettingsError(f"id_ttl_days must be >= 1 (days) or unset, got {self.id_ttl_days}")
        if self.day is not None:
            try:
                dt.date.fromisoformat(self.day)
            except ValueError:
                raise SettingsError(f"day must be YYYY-MM-DD, got {self.day!r}") from None
        try:
            GateConfig(self.recall_k, self.gate_margin, self.gate_margin_mode)  # type: ignore[arg-type]
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    @property
    def gate(self) -> GateConfig:
        return GateConfig(self.recall_k, self.gate_margin, self.gate_margin_mode)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FullResult:
    """What a run did: the version written (None when there was no data), the gate's decision, the exit code and
    the outcome reported to Prometheus (:data:`trainer.monitor.OUTCOMES`)."""

    exit_code: int
    outcome: str  # one of trainer.monitor.OUTCOMES, or "busy" (not reported)
    version_id: str | None = None
    parent: str | None = None
    promoted: bool = False
    decision: GateDecision | None = None
    stats: TrainStats | None = None
    data_cutoff_ms: int | None = None
    ids: dict[str, Any] | None = None  # the expiry summary (manifest metrics "ids")
    message: str = ""

    def report(self, recall_k: int) -> dict[str, Any]:
        """What :meth:`trainer.monitor.NightlyMonitor.end` pushes besides the outcome."""
        details: dict[str, Any] = {}
        if self.stats is not None:
            details |= {"examples": self.stats.examples, "mean_loss": self.stats.mean_loss}
        if self.data_cutoff_ms is not None:
            details["data_cutoff_ms"] = self.data_cutoff_ms
        if self.decision is not None:
            details |= {
                "recall_k": recall_k,
                "candidate": self.decision.candidate_metrics,
                "current": self.decision.current_metrics,
            }
        if self.ids is not None:
            details |= {"id_rows": self.ids["rows"], "expired": self.ids["expired"]}
        return details
