"""The ``full`` command of ``python -m trainer``: its flags, and the settings they make for :func:`trainer.full.run_full`."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from streaming.settings import KafkaSettings, SettingsError, load_settings
from trainer.full_settings import EXIT_USAGE, SOURCES, FullSettings
from trainer.model import ModelConfig
from trainer.train import TrainConfig

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    """The ``full`` command: returns the process exit code."""
    config = args.config or os.environ.get("FRESHTOWER_CONFIG")
    overrides = {
        "archive_dir": args.archive,
        "models_dir": args.models,
        "day": args.day,
        "days": args.days,
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
    from trainer.full import run_full  # here: trainer.full imports this module for its command line

    result = run_full(settings, model_config, train_config, kafka)
    print(result.message)
    return result.exit_code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``full`` on the ``python -m trainer`` command line."""
    from trainer import full  # the job's docstring is the command's description

    doc = full.__doc__ or ""
    p = subparsers.add_parser(
        "full",
        help="nightly full retrain: one day (or --days N), one epoch, warm start, gate, promote",
        description=doc.split("\n\n")[0] + "\n\n" + doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        choices=SOURCES,
        help="read the days from the event archive (default) or from the Kafka topics by timestamp",
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
    p.add_argument(
        "--days",
        type=int,
        metavar="N",
        help="train on the N UTC days ending with the day (default 1); the catalogue is taken as of the last day's end",
    )
    p.add_argument("--nproc", type=int, help="data-parallel worker processes (gloo, CPU; default 1)")
    p.add_argument("--config", help="TOML file with [full], [model] and [train] tables")
    p.add_argument("--holdout-fraction", type=float, help="newest share of the clicks held back for the gate (0.1)")
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
