"""The model a nightly run (:mod:`trainer.full`) starts from: the current version's weights grown with the new
ids, the rows of expired ids dropped, and its optimizer and frequency state carried over (step 3 of the
:mod:`trainer.full` docstring)."""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch

from trainer.artifact import ArtifactError, ModelVersion, load_id_activity, load_training_state
from trainer.dataset import Dataset
from trainer.expiry import IdActivity
from trainer.features import FeatureEncoder
from trainer.frequency import FrequencyEstimator
from trainer.full_settings import DAY_MS, FullSettings
from trainer.model import ModelConfig, TwoTowerModel
from trainer.train import TrainConfig
from trainer.warm_state import TrainingState

__all__ = ["batch_ratio", "carry_state", "expire_ids", "warm_start"]

logger = logging.getLogger(__name__)


def warm_start(
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


def expire_ids(
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


def carry_state(
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
