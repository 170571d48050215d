"""``trainer eval --test-fractions ... --seeds ...``: the command-line side of the rolling-origin evaluation.

Plain (:mod:`trainer.rolling`), with ``--tune`` (every model's setting chosen on a validation window before each cut,
:mod:`trainer.tuning`), and with ``--world-seeds`` on the synthetic data set (one generated world per seed, pooled
and reported per world, :mod:`trainer.worlds`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from trainer.rolling import run_rolling, write_reports
from trainer.tuning import QUICK_GRID, Tuner, TuningGrid, settings_markdown
from trainer.worlds import pool_worlds, worlds_markdown

__all__ = ["make_tuner", "run_rolling_command"]

logger = logging.getLogger(__name__)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def make_tuner(config: Any, grid: TuningGrid) -> Tuner:
    """A :class:`~trainer.tuning.Tuner` for ``config``'s models; the two-tower model is built as ``trainer eval``
    builds it (its default model and training settings with the run's seed), only its epochs come from the grid."""

    def make_two_tower(seed: int, epochs: int) -> Any:
        from trainer.model import ModelConfig
        from trainer.retriever import TwoTowerRetriever
        from trainer.train import TrainConfig

        return TwoTowerRetriever(ModelConfig(seed=seed), TrainConfig(seed=seed), epochs=epochs, name="two_tower")

    return Tuner(config.models, grid, make_two_tower=make_two_tower)


def run_rolling_command(args: argparse.Namespace, config: Any, json_path: Path, md_path: Path, png_path: Path) -> int:
    """Run the rolling evaluation the arguments ask for and write its reports."""
    from trainer.evaluate import build_dataset, build_models

    fractions = _floats(args.test_fractions) if args.test_fractions else [config.ml100k_test_fraction]
    seeds = _ints(args.seeds) if args.seeds else [config.seed]
    worlds = _ints(args.world_seeds) if getattr(args, "world_seeds", None) else None
    if worlds is not None and config.dataset != "synthetic":
        raise SystemExit("--world-seeds applies to --dataset synthetic only")
    tune = bool(getattr(args, "tune", False))
    grid = QUICK_GRID if config.quick else TuningGrid()

    def one(world_config: Any, per_user: list | None) -> dict[str, Any]:
        dataset, source = build_dataset(world_config)
        return run_rolling(
            dataset,
            lambda seed: build_models(dataclasses.replace(config, seed=seed)),
            fractions,
            seeds,
            resamples=args.bootstrap_resamples,
            source=source,
            tuner=make_tuner(config, grid) if tune else None,
            per_user=per_user,
        )

    if worlds is None:
        report = one(config, None)
    else:
        reports, per_user = {}, {}
        for world in worlds:
            logger.info("world seed %d", world)
            per_user[world] = []
            reports[world] = one(dataclasses.replace(config, seed=world), per_user[world])
        report = pool_worlds(reports, per_user, resamples=args.bootstrap_resamples)
    report = {"dataset": config.dataset, "quick": config.quick, "tuned": tune, **report}
    if tune:
        report["tuning_grid"] = dataclasses.asdict(grid)
    extra = ""
    if worlds is not None:
        extra += worlds_markdown(report)
        if tune:
            for w, world in report["worlds"].items():
                extra += "\n" + settings_markdown(world).replace("## Settings", f"## World seed {w}: settings", 1)
    elif tune:
        extra += settings_markdown(report)
    command = shlex.join(["python", "-m", "trainer", *sys.argv[1:]])
    print(write_reports(report, json_path, md_path, png_path, command, extra=extra))
    logger.info("wrote %s, %s, %s", json_path, md_path, png_path)
    return 0
