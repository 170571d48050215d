"""``python -m trainer eval``: the command line of the offline evaluation (:mod:`trainer.evaluate`).

One split by default; the rolling-origin evaluation with ``--test-fractions`` / ``--seeds`` / ``--tune`` /
``--world-seeds`` (:mod:`trainer.rolling_cli`); the sequential protocol with ``--protocol sequential``
(:mod:`trainer.sequential`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from trainer.evaluate import DEFAULT_MODELS, EvalConfig, build_models, evaluate_models, load_dataset
from trainer.report import _nan_to_none, markdown_table, plot_metrics

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    """The ``eval`` command: returns the process exit code."""
    config = EvalConfig(
        dataset=args.dataset,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        ablations=args.ablations,
        quick=args.quick,
        seed=args.seed,
        data_dir=Path(args.data_dir),
        ml100k_test_fraction=args.test_fraction,
        min_rating=args.min_rating,
        epochs=args.epochs,
        serving_prior=args.serving_prior,
        prior_half_life_days=args.prior_half_life,
    )
    sequential = args.protocol == "sequential"
    rolling = (
        args.test_fractions is not None or args.seeds is not None or args.world_seeds is not None or args.tune
    ) or sequential
    prefix = "sequential-" if sequential else "rolling-" if rolling else ""
    out_dir = Path("runs") / f"eval-{prefix}{config.dataset}"
    json_path = Path(args.json) if args.json else out_dir / "metrics.json"
    md_path = Path(args.markdown) if args.markdown else out_dir / "metrics.md"
    png_path = Path(args.plot) if args.plot else out_dir / "metrics.png"

    factories = build_models(config)  # fails fast on an unknown model name, before the data is built
    if sequential:
        if args.tune or args.world_seeds is not None:
            raise SystemExit("--protocol sequential takes neither --tune nor --world-seeds")
        from trainer.sequential_report import run_cli

        return run_cli(args, config, json_path, md_path, png_path)
    if rolling:
        return _run_rolling(args, config, json_path, md_path, png_path)
    split = load_dataset(config)
    results = evaluate_models(factories, split)

    table = markdown_table(results)
    print(table)
    report = {
        "dataset": config.dataset,
        "quick": config.quick,
        "seed": config.seed,
        "split": split.info,
        "models": results,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    # NaN (a metric with no user to average over, e.g. head recall when no test item is head) is not JSON: null.
    json_path.write_text(json.dumps(_nan_to_none(report), indent=2, allow_nan=False) + "\n")
    summary = ", ".join(f"{k}={v}" for k, v in split.info.items() if k != "source")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(f"# Offline evaluation: {config.dataset}\n\nSplit: {summary}\n\n{table}\n")
    plot_metrics(results, png_path, split.info["rule"])
    logger.info("wrote %s, %s, %s", json_path, md_path, png_path)
    return 0


def _run_rolling(args: argparse.Namespace, config: EvalConfig, json_path: Path, md_path: Path, png_path: Path) -> int:
    """``eval --test-fractions ... --seeds ...``: the rolling-origin evaluation (:mod:`trainer.rolling_cli`)."""
    from trainer.rolling_cli import run_rolling_command

    return run_rolling_command(args, config, json_path, md_path, png_path)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``eval`` on the ``python -m trainer`` command line."""
    p = subparsers.add_parser(
        "eval",
        help="offline Recall/NDCG of the two-tower retriever and its peers on a temporal split",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--dataset", choices=("synthetic", "ml100k"), default="synthetic")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated subset of %(default)s")
    p.add_argument(
        "--ablations", action="store_true", help="also evaluate two-tower variants (logQ, SSL, negatives, objectives)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a small synthetic world and short training (well under 2 minutes)"
    )
    p.add_argument("--json", help="metrics JSON (default runs/eval-<dataset>/metrics.json)")
    p.add_argument("--markdown", help="markdown table (default runs/eval-<dataset>/metrics.md)")
    p.add_argument("--plot", help="PNG bar plot (default runs/eval-<dataset>/metrics.png)")
    p.add_argument(
        "--data-dir", default="data", help="where MovieLens-100K is fetched and cached (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="two-tower training epochs (default: 2 with --quick, else 8 for ml100k and 5 for synthetic)",
    )
    p.add_argument(
        "--serving-prior",
        type=float,
        default=0.0,
        metavar="GAMMA",
        help="also report two_tower+prior, ranked by cos/tau + GAMMA * log(item click share) (bench/serving_prior.py)",
    )
    p.add_argument(
        "--prior-half-life",
        type=float,
        default=None,
        metavar="DAYS",
        help="with --serving-prior: weigh each click 2**(-age/DAYS) in the click share (default: unweighted)",
    )
    p.add_argument("--test-fraction", type=float, default=0.1, help="ml100k: share of the latest clicks held out")
    p.add_argument(
        "--test-fractions",
        default=None,
        metavar="F,F,...",
        help="rolling-origin evaluation (trainer/rolling.py): one cut per share of the latest clicks held out, "
        "warm and cold test users reported apart, 95%% bootstrap intervals over users",
    )
    p.add_argument(
        "--seeds", default=None, metavar="S,S,...", help="rolling-origin evaluation: model seeds, pooled per cut"
    )
    p.add_argument(
        "--bootstrap-resamples", type=int, default=1000, help="rolling-origin evaluation: user resamples per interval"
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="rolling-origin evaluation: choose every model's setting on a validation window before each cut "
        "(trainer/tuning.py); adds two_tower[no prior] and als+prior",
    )
    p.add_argument(
        "--world-seeds",
        default=None,
        metavar="W,W,...",
        help="rolling-origin evaluation on --dataset synthetic: one generated world per seed, pooled and per world",
    )
    p.add_argument(
        "--protocol",
        choices=("static", "sequential"),
        default="static",
        help="sequential (trainer/sequential.py): models frozen at each cut, every test click scored with the "
        "user's history up to it (HitRate@20/50); takes --test-fractions and --seeds",
    )
    p.add_argument(
        "--max-clicks",
        type=int,
        default=None,
        help="sequential: score a fixed random subset of this many clicks per cut",
    )
    p.add_argument("--min-rating", type=float, default=0.0, help="ml100k: ratings below this are not clicks")
    p.set_defaults(run=run)
