"""``python -m trainer full``: the nightly full retrain (DESIGN.md "Updating the model", seeds 000/001/003).

1. Read one day of clicks from the event archive (default: the newest archived day before today, UTC, i.e.
   yesterday when the archive is current), with the catalogue and user profiles as of that day's end (the
   newest item and profile record of every id up to then: the catalogue topics are compacted, so old items
   are not re-sent daily; :mod:`streaming.archive_state` keeps a snapshot so that not every record ever
   archived is read each night). ``--source kafka`` reads the day from the Kafka topics by timestamp
   instead (:mod:`streaming.kafka_day`; default day: yesterday, UTC), for deployments whose topic retention
   covers the day and that run no archive sink. A default day that the current version has already learnt
   (its ``data_range``) is not trained again: the run ends with no data (exit code 4).
2. Hold back the newest ``holdout_fraction`` of the day's clicks (by time) for the gate.
3. Warm-start from the current version: its encoder extended with the new ids (old rows keep their index),
   its weights for known rows, new rows starting at the default row; or a fresh model when there is none.
   The optimizer's state (Adam moments and step) and the logQ frequency estimate carry over too, when the
   current version has them (:class:`trainer.warm_state.TrainingState`): embedding tables that grew keep the
   moments of their old rows, new rows start at zero. ``carry_optimizer = false`` (``--fresh-optimizer``)
   resets the moments, e.g. after changing the learning rate a lot; ``carry_frequency = false``
   (``--fresh-frequency``) restarts the estimate of ``p_j``. A parameter whose shape changed otherwise, or a
   frequency state built with other hash settings, starts fresh with a warning.
   With ``id_ttl_days`` (``--id-ttl-days``), ids without activity (a click; for items also an impression or
   a catalogue record) in that many days lose their rows here (:mod:`trainer.expiry`): the tables stop
   growing without bound, and an id that comes back starts again from the default row.
4. Train ONE shuffled epoch on the rest, all parameters (``--nproc N``: data-parallel, :mod:`trainer.distributed`).
5. Write a new version with its optimizer and frequency state (parent = current; data cutoff = the newest
   click trained on, from which the online learner replays), run the gate (:mod:`trainer.gate`) and promote
   it, or keep the current version and say why.

Exit codes: 0 the candidate passed the gate (and was promoted unless ``--no-promote``); 1 an unexpected error
(with its traceback); 2 bad arguments or settings; 3 the gate refused the candidate (it is kept as a
non-current version for inspection) or training diverged (a NaN loss; no version is written); 4 no data
(no archived day, a day with fewer than 2 clicks, or a day retention has begun to delete from Kafka); 5 another
run holds the models directory (one run at a time: it does nothing and reports nothing). A candidate that passed
the gate is not promoted when the current version changed during the run (a promotion or rollback by hand,
exit code 3). With ``--pushgateway`` the run reports its start and outcome to Prometheus (:mod:`trainer.monitor`; the
``freshtower-nightly`` alerts).

Settings (:class:`FullSettings`) come from defaults, the ``[full]`` table of the TOML file (``--config`` or
``FRESHTOWER_CONFIG``), ``FRESHTOWER_<FIELD>`` environment variables and the flags, in that order. The TOML
``[model]`` table configures a fresh model (a warm start keeps its parent's architecture) and ``[train]``
the epoch (:class:`trainer.train.TrainConfig`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import fcntl
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streaming import archive, archive_state, kafka_day
from streaming.settings import KafkaSettings, SettingsError, load_settings
from trainer.artifact import (
    ArtifactError,
    ModelVersion,
    load_id_activity,
    load_training_state,
    load_version,
    make_version,
    new_version_id,
    read_manifest,
    save_version,
)
from trainer.dataset import Dataset
from trainer.expiry import IdActivity
from trainer.features import FeatureEncoder
from trainer.frequency import FrequencyEstimator
from trainer.gate import GateConfig, GateDecision, decide, holdout_split
from trainer.model import ModelConfig, TwoTowerModel
from trainer.monitor import NightlyMonitor
from trainer.registry import CurrentChanged, Registry, RegistryError
from trainer.train import TrainConfig, TrainStats, make_estimator, make_optimizer, train_epoch
from trainer.warm_state import TrainingState

__all__ = [
    "EXIT_BUSY",
    "EXIT_NO_DATA",
    "EXIT_PROMOTED",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "FullResult",
    "FullSettings",
    "add_parser",
    "batch_ratio",
    "load_day",
    "pick_day",
    "run",
    "run_full",
]

logger = logging.getLogger(__name__)

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

    ``day``: ``YYYY-MM-DD`` or None for the newest archived day before today (UTC). ``gate_margin`` /
    ``gate_margin_mode``: see :mod:`trainer.gate`. ``keep_versions``: versions kept on disk besides the
    current one, its parent and the rollback target. ``carry_optimizer`` / ``carry_frequency``: warm-start
    the Adam moments / the logQ frequency estimate from the current version (the module docstring, step 3).
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


def pick_day(root: Path, requested: str | None, today: dt.date | None = None) -> dt.date | None:
    """The day to train on: ``requested`` if archived, else the newest archived day before ``today`` (UTC)."""
    available = archive.days(root)
    if requested is not None:
        day = dt.date.fromisoformat(requested)
        return day if day in available else None
    today = today or dt.datetime.now(dt.UTC).date()
    before = [d for d in available if d < today]
    return before[-1] if before else None


def _day_start_ms(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def _trained_until(registry: Registry, version_id: str | None) -> int | None:
    """The end of the data ``version_id`` was trained on (its manifest's ``data_range``), or None."""
    if version_id is None:
        return None
    try:
        return int(read_manifest(registry.path(version_id))["data_range"]["end_ms"])
    except (ArtifactError, RegistryError, KeyError, TypeError, ValueError) as exc:
        logger.warning("current version %s: no readable data range (%s)", version_id, exc)
        return None


def _yesterday(requested: str | None) -> dt.date:
    """The day to read from Kafka: ``requested``, else yesterday (UTC)."""
    if requested is not None:
        return dt.date.fromisoformat(requested)
    return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


def load_kafka_day(kafka: KafkaSettings, day: dt.date, lateness_s: float) -> Dataset:
    """The day's clicks and impressions, with the items and profiles as of its end, from the Kafka topics."""
    # Streamed: impressions become per-item counts as they are read, so the day is never held whole.
    return Dataset.from_events(kafka_day.iter_day(kafka, day, lateness_ms=int(lateness_s * 1000)))


def load_day(root: Path, day: dt.date) -> Dataset:
    """The day's clicks and impressions, with the newest record of every item and profile up to the day's end
    (from the newest snapshot and the archive files it lacks)."""
    state = archive_state.read_state(root, day)
    behaviour = archive.read_day(root, day, types={"click", "impression"})
    return Dataset.from_events(itertools.chain(state, behaviour))


def _warm_start(
    parent: ModelVersion | None, train: Dataset, model_config: ModelConfig
) -> tuple[TwoTowerModel, FeatureEncoder]:
    if parent is None:
        encoder = FeatureEncoder.fit(train, last_n=model_config.last_n)
        logger.info("no current version: fresh model %s", model_config)
        return TwoTowerModel(encoder, model_config), encoder
    if parent.model_config != model_config:
        logger.info("warm start keeps the parent's model config %s (configured: %s)", parent.model_config, model_config)
    encoder = parent.encoder.extend(train)
    # A copy: the parent object stays the current version that the gate compares against.
    model = copy.deepcopy(parent.model).resize(encoder)
    logger.info("warm start from %s: %s", parent.version_id, encoder.describe())
    return model, encoder


def _parent_activity(parent: ModelVersion) -> IdActivity:
    """The parent's id activity, or every id active at its data cutoff when it has none that fits."""
    activity = None
    if parent.path is not None:
        try:
            activity = load_id_activity(parent.path)
        except ArtifactError as exc:
            logger.warning("parent %s: unreadable id activity (%s)", parent.version_id, exc)
    if activity is not None and not activity.fits(parent.encoder):
        logger.warning("parent %s: id activity does not fit its vocabularies", parent.version_id)
        activity = None
    if activity is None:
        logger.info("parent %s: every id taken as active at its data cutoff", parent.version_id)
        activity = IdActivity.uniform(parent.encoder, parent.data_cutoff_ms)
    return activity


def _expire_ids(
    model: TwoTowerModel,
    encoder: FeatureEncoder,
    parent: ModelVersion | None,
    train: Dataset,
    day_end_ms: int,
    ttl_days: float | None,
) -> tuple[FeatureEncoder, IdActivity, dict[str, np.ndarray], dict[str, Any]]:
    """Bring the id activity up to ``train`` and, with a TTL, drop the rows of ids inactive since ``day_end_ms -
    ttl``; returns the encoder, the activity, the parameters' row maps (for the optimizer state) and a summary."""
    start = _parent_activity(parent) if parent is not None else IdActivity.uniform(encoder, 0)
    activity = start.extended(encoder).observed(encoder, train)
    rows: dict[str, np.ndarray] = {}
    expired = {"user": 0, "item": 0}  # rows the parent had, dropped now
    skipped = {"user": 0, "item": 0}  # ids new to this night and already inactive (an old catalogue record)
    if ttl_days is not None:
        keep = activity.live(day_end_ms - int(ttl_days * DAY_MS))
        inherited = {"user": len(start.user), "item": len(start.item)}
        expired = {tower: int((~mask[: inherited[tower]]).sum()) for tower, mask in keep.items()}
        skipped = {tower: int((~mask[inherited[tower] :]).sum()) for tower, mask in keep.items()}
        if any(expired.values()) or any(skipped.values()):
            encoder, rows = encoder.retain_ids(keep)
            model.take_id_rows(encoder, rows)
            activity = activity.taken(rows)
            logger.info(
                "expired %d user and %d item ids inactive for %g days: %s",
                expired["user"],
                expired["item"],
                ttl_days,
                encoder.describe(),
            )
    summary = {
        "ttl_days": ttl_days,
        "expired": expired,
        "inactive_new": skipped,
        "rows": {"user": len(encoder.user_vocab), "item": len(encoder.item_vocab)},
    }
    param_rows = {name: rows[vocab] for name, vocab in model.id_row_tables().items() if vocab in rows}
    return encoder, activity, param_rows, summary


def batch_ratio(parent_manifest: dict[str, Any], train_config: TrainConfig, nproc: int) -> float:
    """How many times larger each process's batch is now than in the run that made the parent (1 when unknown):
    :mod:`trainer.distributed` gives each of ``nproc`` processes ``batch_size // nproc`` examples per step."""
    parent_train = (parent_manifest.get("config") or {}).get("train") or {}
    parent_nproc = int((parent_manifest.get("metrics") or {}).get("nproc", 1) or 1)
    if "batch_size" not in parent_train:
        return 1.0
    old = max(1, int(parent_train["batch_size"]) // parent_nproc)
    new = max(1, train_config.batch_size // nproc)
    return new / old


def _carry_state(
    parent: ModelVersion | None,
    settings: FullSettings,
    model: TwoTowerModel,
    optimizer: torch.optim.Optimizer,
    estimator: FrequencyEstimator,
    rows: dict[str, np.ndarray],
    train_config: TrainConfig,
) -> None:
    """Restore the parent's optimizer and frequency state, as far as settings allow, into fresh ones; ``rows``:
    the tables compacted by expiry (parameter name -> old row of each new row)."""
    if parent is None or parent.path is None:
        return
    state = TrainingState()
    if settings.carry_optimizer or settings.carry_frequency:
        try:
            state = load_training_state(parent.path)
        except ArtifactError as exc:
            # The weights are what a warm start needs; a damaged optional file costs only the moments.
            logger.warning("parent %s: unreadable training state, starting it fresh: %s", parent.version_id, exc)
    if not settings.carry_optimizer:
        logger.info("carry_optimizer is off: fresh optimizer state")
    elif state.optimizer is None:
        logger.info("parent %s holds no optimizer state: starting it fresh", parent.version_id)
    else:
        state.take_rows(rows).restore_optimizer(model, optimizer)
    if not settings.carry_frequency:
        logger.info("carry_frequency is off: the frequency estimate starts fresh")
    elif state.frequency is None:
        logger.info("parent %s holds no frequency state: the estimate starts fresh", parent.version_id)
    elif state.restore_estimator(estimator):
        logger.info("frequency estimate continues from step %d of %s", estimator.step, parent.version_id)
        ratio = batch_ratio(parent.manifest, train_config, settings.nproc)
        if ratio != 1.0:
            # Another --nproc or batch size: each process's batches hold ratio times as many examples now.
            estimator.rescale_batch(ratio)
            logger.info("frequency estimate rescaled to batches %g times the parent's", ratio)


@contextlib.contextmanager
def _exclusive(models_dir: Path) -> Iterator[bool]:
    """Hold ``<models_dir>/.full.lock`` for the run; yields False when another run holds it."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".full.lock", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def run_full(
    settings: FullSettings,
    model_config: ModelConfig,
    train_config: TrainConfig,
    kafka: KafkaSettings | None = None,
) -> FullResult:
    """One nightly run (see the module docstring); returns what happened, never raises for a refusal.

    ``kafka``: where the topics are, for ``source = "kafka"`` (default settings when None). One run at a time
    per models directory: a second one returns ``busy`` (exit code 5) at once and reports nothing, so it cannot
    disturb the running one's metrics. With ``settings.pushgateway`` the run reports its start and its end,
    an exception included (reported as ``error``, then raised).
    """
    with _exclusive(settings.models_dir) as ours:
        if not ours:
            holder = (settings.models_dir / ".full.lock").read_text().strip() or "?"
            msg = f"another trainer full (pid {holder}) is running on {settings.models_dir}; this one does nothing"
            logger.error(msg)
            return FullResult(EXIT_BUSY, "busy", message=msg)
        monitor = None
        if settings.pushgateway:
            instance = settings.pushgateway_instance or str(settings.models_dir.resolve())
            monitor = NightlyMonitor(settings.pushgateway, instance=instance)
            monitor.start()
        try:
            result = _night(settings, model_config, train_config, kafka)
        except BaseException:
            # Reported, then raised as it was: the traceback says what went wrong (exit code 1).
            if monitor is not None:
                monitor.end("error")
            raise
        if monitor is not None:
            monitor.end(result.outcome, **result.report(settings.recall_k))
        return result


def _night(
    settings: FullSettings, model_config: ModelConfig, train_config: TrainConfig, kafka: KafkaSettings | None
) -> FullResult:
    if settings.source == "kafka":
        day = _yesterday(settings.day)
    else:
        archived = pick_day(settings.archive_dir, settings.day)
        if archived is None:
            msg = f"no archived day {settings.day or 'before today'} under {settings.archive_dir}"
            logger.error(msg)
            return FullResult(EXIT_NO_DATA, "no_data", message=msg)
        day = archived
    registry = Registry(settings.models_dir, keep=settings.keep_versions)
    current_id = registry.current()
    trained_until = _trained_until(registry, current_id)
    if settings.day is None and trained_until is not None and trained_until >= _day_start_ms(day) + DAY_MS:
        # The day picked by default is one the current version has learnt already: training it again would
        # count it twice. Usually the archive has nothing newer because the sink stopped (FreshtowerArchiveBehind).
        where = "the newest archived day before today" if settings.source == "archive" else "yesterday"
        msg = (
            f"nothing new: {where} is {day}, and the current version {current_id} was trained on data up to "
            f"{dt.datetime.fromtimestamp(trained_until / 1000, dt.UTC):%Y-%m-%d %H:%M} UTC; is the archive sink "
            f"running? (--day {day} trains on it again anyway)"
        )
        logger.error(msg)
        return FullResult(EXIT_NO_DATA, "no_data", message=msg)
    if settings.source == "kafka":
        try:
            dataset = load_kafka_day(kafka or KafkaSettings(), day, settings.kafka_lateness_s)
        except kafka_day.DayTruncated as exc:
            msg = f"day {day} is no longer whole in Kafka: {exc}"
            logger.error(msg)
            return FullResult(EXIT_NO_DATA, "no_data", message=msg)
    else:
        dataset = load_day(settings.archive_dir, day)
    logger.info(
        "day %s: %d clicks, %d items, %d users", day, len(dataset.clicks), len(dataset.items), len(dataset.users)
    )
    if len(dataset.clicks) < 2:
        msg = f"day {day} has {len(dataset.clicks)} clicks; expected at least 2"
        logger.error(msg)
        return FullResult(EXIT_NO_DATA, "no_data", message=msg)
    try:
        split = holdout_split(dataset, settings.holdout_fraction)
        train = split.train
    except ValueError as exc:
        logger.warning("no held-back slice (%s); training on the whole day", exc)
        split, train = None, dataset

    parent = load_version(registry.path(current_id)) if current_id else None
    if trained_until is not None and trained_until > _day_start_ms(day):
        logger.warning(
            "current version %s was trained on data up to %d, after day %s began", current_id, trained_until, day
        )
    model, encoder = _warm_start(parent, train, parent.model_config if parent else model_config)
    encoder, activity, rows, ids = _expire_ids(
        model, encoder, parent, train, _day_start_ms(day) + DAY_MS, settings.id_ttl_days
    )
    # Built after the resize and expiry: the optimizer holds the new tables, not the parent's.
    optimizer, estimator = make_optimizer(model, train_config), make_estimator(train_config)
    _carry_state(parent, settings, model, optimizer, estimator, rows, train_config)

    try:
        if settings.nproc > 1:
            from trainer.distributed import train_distributed

            stats = train_distributed(
                model,
                encoder,
                train,
                train_config,
                nproc=settings.nproc,
                progress=settings.progress,
                optimizer=optimizer,
                estimator=estimator,
            )
        else:
            stats = train_epoch(
                model,
                encoder,
                train,
                train_config,
                progress=settings.progress,
                optimizer=optimizer,
                estimator=estimator,
            )
    except FloatingPointError as exc:
        # A NaN/inf loss: nothing finite to gate, so no version is written.
        msg = f"training diverged ({exc}); {current_id} stays current"
        logger.error(msg)
        return FullResult(EXIT_REFUSED, "diverged", parent=current_id, message=msg)

    version_id = new_version_id()
    data_cutoff_ms = int(train.clicks.ts_ms.max())
    candidate = make_version(
        model,
        encoder,
        dataset.items,
        version_id=version_id,
        parent=current_id,
        data_range=(_day_start_ms(day), _day_start_ms(day) + DAY_MS),
        data_cutoff_ms=data_cutoff_ms,
        train_config=train_config,
        metrics={
            "train": dataclasses.asdict(stats),
            "day": day.isoformat(),
            "source": settings.source,
            "nproc": settings.nproc,
            "ids": ids,
        },
    )
    decision = decide(candidate, parent, split, settings.gate)
    with registry.new_version(version_id) as directory:
        save_version(
            directory,
            candidate,
            metrics={"holdout": decision.candidate_metrics, "gate": decision.to_dict()},
            training_state=TrainingState.capture(model, optimizer, estimator),
            id_activity=activity,
        )
    for reason in decision.reasons:
        logger.info("gate: %s", reason)
    result: dict[str, Any] = {
        "version_id": version_id,
        "parent": current_id,
        "decision": decision,
        "stats": stats,
        "data_cutoff_ms": data_cutoff_ms,
        "ids": ids,
    }
    if not decision.accepted:
        msg = f"gate refused {version_id}; {current_id} stays current: " + "; ".join(decision.reasons)
        logger.warning(msg)
        return FullResult(EXIT_REFUSED, "refused", message=msg, **result)
    if not settings.promote:
        msg = f"{version_id} passed the gate; not promoted (--no-promote)"
        logger.info(msg)
        return FullResult(EXIT_PROMOTED, "passed", message=msg, **result)
    try:
        registry.promote(version_id, reason="; ".join(decision.reasons), expect_current=current_id)
    except CurrentChanged as exc:
        # A promotion or rollback by hand while this run trained: the candidate was gated against (and grown
        # from) a version that is no longer current, and a person chose otherwise. Keep theirs.
        msg = f"{version_id} passed the gate but is not promoted: {exc} (changed by hand during the run)"
        logger.warning(msg)
        return FullResult(EXIT_REFUSED, "superseded", message=msg, **result)
    registry.prune()
    msg = f"promoted {version_id} (parent {current_id})"
    logger.info(msg)
    return FullResult(EXIT_PROMOTED, "promoted", promoted=True, message=msg, **result)


def run(args: argparse.Namespace) -> int:
    """The ``full`` command: returns the process exit code."""
    config = args.config or os.environ.get("FRESHTOWER_CONFIG")
    overrides = {
        "archive_dir": args.archive,
        "models_dir": args.models,
        "day": args.day,
        "nproc": args.nproc,
        "holdout_fraction": args.holdout_fraction,
        "recall_k": args.recall_k,
        "gate_margin": args.margin,
        "gate_margin_mode": args.margin_mode,
        "keep_versions": args.keep,
        "carry_optimizer": False if args.fresh_optimizer else None,
        "carry_frequency": False if args.fresh_frequency else None,
        "id_ttl_days": args.id_ttl_days,
        "source": args.source,
        "kafka_lateness_s": args.kafka_lateness,
        "pushgateway": args.pushgateway,
        "pushgateway_instance": args.pushgateway_instance,
        "promote": False if args.no_promote else None,
        "progress": False if args.no_progress else None,
    }
    try:
        settings = load_settings(FullSettings, section="full", config=config, overrides=overrides)
        # Model and train tables come from the file only: their field names (seed, dim, lr) are too generic
        # to claim FRESHTOWER_* variables.
        model_config = load_settings(ModelConfig, section="model", config=config, environ={})
        train_config = load_settings(TrainConfig, section="train", config=config, environ={})
        kafka = load_settings(
            KafkaSettings,
            section="kafka",
            config=config,
            overrides={"bootstrap_servers": args.bootstrap, "topic_prefix": args.topic_prefix},
        )
    except (SettingsError, ValueError, TypeError, OSError) as exc:
        logger.error("bad settings: %s", exc)
        return EXIT_USAGE
    result = run_full(settings, model_config, train_config, kafka)
    print(result.message)
    return result.exit_code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``full`` on the ``python -m trainer`` command line."""
    doc = __doc__ or ""
    p = subparsers.add_parser(
        "full",
        help="nightly full retrain: one day, one epoch, warm start, gate, promote",
        description=doc.split("\n\n")[0] + "\n\n" + doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        choices=SOURCES,
        help="read the day from the event archive (default) or from the Kafka topics by timestamp",
    )
    p.add_argument("--archive", type=Path, help="event archive root (default data/archive)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers, for --source kafka (FRESHTOWER_BOOTSTRAP_SERVERS)")
    p.add_argument("--topic-prefix", help="prefix of every topic name, for --source kafka (default 'freshtower.')")
    p.add_argument(
        "--kafka-lateness",
        type=float,
        metavar="SECONDS",
        help="--source kafka: how long past midnight (event time) a record of the day may arrive (3600)",
    )
    p.add_argument("--models", type=Path, help="model registry root (default artifacts/models)")
    p.add_argument(
        "--day",
        help="UTC day to train on, YYYY-MM-DD (default: the newest archived day before today; from Kafka: yesterday)",
    )
    p.add_argument("--nproc", type=int, help="data-parallel worker processes (gloo, CPU; default 1)")
    p.add_argument("--config", help="TOML file with [full], [model] and [train] tables")
    p.add_argument(
        "--holdout-fraction", type=float, help="newest share of the day's clicks held back for the gate (0.1)"
    )
    p.add_argument("--recall-k", type=int, help="K of the gating Recall@K (50)")
    p.add_argument("--margin", type=float, help="how much worse than current the candidate may be (0.01)")
    p.add_argument("--margin-mode", choices=("absolute", "relative"), help="margin in recall points or as a share")
    p.add_argument("--keep", type=int, help="versions kept on disk besides current, parent, rollback target (5)")
    p.add_argument("--no-promote", action="store_true", help="write and gate the version, but do not promote it")
    p.add_argument("--fresh-optimizer", action="store_true", help="do not carry the parent's Adam moments over")
    p.add_argument("--fresh-frequency", action="store_true", help="do not carry the parent's logQ estimate over")
    p.add_argument(
        "--id-ttl-days",
        type=float,
        help="drop the rows of ids inactive for this many days (>= 1; default: keep every id)",
    )
    p.add_argument(
        "--pushgateway",
        metavar="HOST:PORT",
        help="Prometheus Pushgateway to report the run's start and outcome to (default: none)",
    )
    p.add_argument(
        "--pushgateway-instance",
        metavar="NAME",
        help="instance label of the pushed series, one per deployment (default: the models directory's path)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
