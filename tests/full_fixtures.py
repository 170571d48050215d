"""Helpers shared by the nightly-retrain tests: the days, a small model and the run's settings."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from trainer.full import FullSettings
from trainer.model import ModelConfig

DAY1, DAY2 = dt.date(2024, 1, 1), dt.date(2024, 1, 2)
MODEL = ModelConfig(dim=16, id_dim=16, hidden=(64,))


def full_settings(archive: Path, models: Path, day: dt.date, **changes: object) -> FullSettings:
    """One night's settings: the given day, Recall@20 for the gate, no progress bar."""
    base = FullSettings(archive_dir=archive, models_dir=models, day=day.isoformat(), recall_k=20, progress=False)
    return dataclasses.replace(base, **changes)
