"""``python -m trainer full``: the nightly full retrain (DESIGN.md "Updating the model", seeds 000/001/003).

1. Read one day of clicks from the event archive (default: the newest archived day before today, UTC, i.e.
   yesterday when the archive is current), with the catalogue and user profiles as of that day's end (the
   newest item and profile record of every id up to then: the catalogue topics are compacted, so old items
   are not re-sent daily; :mod:`streaming.archive_state` keeps a snapshot so that not every record ever
   archived is read each night). ``--source kafka`` reads the day from the Kafka topics by timestamp
   instead (:mod:`streaming.kafka_day`; default day: yesterday, UTC), for deployments whose topic retention
   covers the day and that run no archive sink. ``--days N`` reads the N UTC days ending with that day
   instead (:mod:`trainer.full_data`; archive days with nothing archived are skipped, the last one must be
   there), with the catalogue and profiles as of the last day's end; the version's ``data_range`` covers
   them all. A default day that the current version has already learnt (its ``data_range``) is not trained
   again: the run ends with no data (exit code 4).
2. Hold back the newest ``holdout_fraction`` of the clicks read (by time) for the gate.
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
(no archived day, fewer than 2 clicks, or days retention has begun to delete from Kafka); 5 another
run holds the models directory (one run at a time: it does nothing and reports nothing). A candidate that passed
the gate is not promoted when the current version changed during the run (a promotion or rollback by hand,
exit code 3). With ``--pushgateway`` the run reports its start and outcome to Prometheus (:mod:`trainer.monitor`; the
``freshtower-nightly`` alerts).

Settings (:class:`FullSettings`) come from defaults, the ``[full]`` table of the TOML file (``--config`` or
``FRESHTOWER_CONFIG``), ``FRESHTOWER_<FIELD>`` environment variables and the flags, in that order. The TOML
``[model]`` table configures a fresh model (a warm start keeps its parent's architecture) and ``[train]``
the epoch (:class:`trainer.train.TrainConfig`).

Modules: :mod:`trainer.full_settings` (settings, outcome, exit codes), :mod:`trainer.full_data` (the days and
their events), :mod:`trainer.full_warm` (warm start, expiry, carried state), :mod:`trainer.full_cli` (the
command line); this one runs the night.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streaming import kafka_day
from streaming.settings import KafkaSettings
from trainer.artifact import load_version, make_version, new_version_id, save_version
from trainer.full_cli import add_parser, run
from trainer.full_data import (
    day_range,
    describe_days,
    load_day,
    load_days,
    load_kafka_day,
    pick_day,
    trained_until,
    yesterday,
)
from trainer.full_settings import (
    DAY_MS,
    EXIT_BUSY,
    EXIT_NO_DATA,
    EXIT_PROMOTED,
    EXIT_REFUSED,
    EXIT_USAGE,
    SOURCES,
    FullResult,
    FullSettings,
)
from trainer.full_warm import batch_ratio, carry_state, expire_ids, warm_start
from trainer.gate import decide, holdout_split
from trainer.model import ModelConfig
from trainer.monitor import NightlyMonitor
from trainer.registry import CurrentChanged, Registry
from trainer.train import TrainConfig, make_estimator, make_optimizer, train_epoch
from trainer.warm_state import TrainingState

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
    "add_parser",
    "batch_ratio",
    "load_day",
    "load_days",
    "load_kafka_day",
    "pick_day",
    "run",
    "run_full",
]

logger = logging.getLogger(__name__)


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
        day = yesterday(settings.day)
    else:
        archived = pick_day(settings.archive_dir, settings.day)
        if archived is None:
            msg = f"no archived day {settings.day or 'before today'} under {settings.archive_dir}"
            logger.error(msg)
            return FullResult(EXIT_NO_DATA, "no_data", message=msg)
        day = archived
    start_ms, end_ms = day_range(day, settings.days)
    which = describe_days(day, settings.days)
    registry = Registry(settings.models_dir, keep=settings.keep_versions)
    current_id = registry.current()
    learnt_until = trained_until(registry, current_id)
    if settings.day is None and learnt_until is not None and learnt_until >= end_ms:
        # The day picked by default is one the current version has learnt already: training it again would
        # count it twice. Usually the archive has nothing newer because the sink stopped (FreshtowerArchiveBehind).
        where = "the newest archived day before today" if settings.source == "archive" else "yesterday"
        msg = (
            f"nothing new: {where} is {day}, and the current version {current_id} was trained on data up to "
            f"{dt.datetime.fromtimestamp(learnt_until / 1000, dt.UTC):%Y-%m-%d %H:%M} UTC; is the archive sink "
            f"running? (--day {day} trains on it again anyway)"
        )
        logger.error(msg)
        return FullResult(EXIT_NO_DATA, "no_data", message=msg)
    if settings.source == "kafka":
        try:
            dataset = load_kafka_day(kafka or KafkaSettings(), day, settings.kafka_lateness_s, settings.days)
        except kafka_day.DayTruncated as exc:
            msg = f"{which} no longer whole in Kafka: {exc}"
            logger.error(msg)
            return FullResult(EXIT_NO_DATA, "no_data", message=msg)
    else:
        dataset = load_days(settings.archive_dir, day, settings.days)
    logger.info("%s: %d clicks, %d items, %d users", which, len(dataset.clicks), len(dataset.items), len(dataset.users))
    if len(dataset.clicks) < 2:
        msg = f"{which}: {len(dataset.clicks)} clicks; expected at least 2"
        logger.error(msg)
        return FullResult(EXIT_NO_DATA, "no_data", message=msg)
    try:
        split = holdout_split(dataset, settings.holdout_fraction)
        train = split.train
    except ValueError as exc:
        logger.warning("no held-back slice (%s); training on every click", exc)
        split, train = None, dataset

    parent = load_version(registry.path(current_id)) if current_id else None
    if learnt_until is not None and learnt_until > start_ms:
        logger.warning(
            "current version %s was trained on data up to %d, after %s began", current_id, learnt_until, which
        )
    model, encoder = warm_start(parent, train, parent.model_config if parent else model_config)
    encoder, activity, rows, ids = expire_ids(model, encoder, parent, train, end_ms, settings.id_ttl_days)
    # Built after the resize and expiry: the optimizer holds the new tables, not the parent's.
    optimizer, estimator = make_optimizer(model, train_config), make_estimator(train_config)
    carry_state(parent, settings, model, optimizer, estimator, rows, train_config)

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
        data_range=(start_ms, end_ms),
        data_cutoff_ms=data_cutoff_ms,
        train_config=train_config,
        metrics={
            "train": dataclasses.asdict(stats),
            "day": day.isoformat(),
            "days": settings.days,
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
