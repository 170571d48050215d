"""Nightly runs over many days with and without ID expiry: table rows, artifact size, gate recall, run time.

A synthetic world (:mod:`streaming.sources.synthetic`; user activity is skewed, so many users click only now and
then, and new items arrive every day) is archived, then ``python -m trainer full`` runs once per day in two
registries side by side: one keeps every id (the default), one expires ids after ``--ttl-days`` of inactivity
(:mod:`trainer.expiry`). Each night is the real job: one day, one epoch, warm start from that registry's current
version, the gate against it on the day's held-back end (Recall@50), promotion.

Per night and variant the script records the user- and item-ID rows of the new version, the ids expired, the
gate's held-back Recall@50 of the candidate, the size of ``weights.pt`` + ``optimizer.pt`` and the run's wall
time. The held-back slice is the same for both variants, so their recalls compare directly.

Writes ``bench/results/nightly_expiry.json`` and ``.png``.

    .venv/bin/python bench/nightly_expiry.py [--days 10] [--ttl-days 2] [--users 20000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from streaming.archive import ArchiveWriter  # noqa: E402
from streaming.sources.synthetic import SyntheticWorld, WorldConfig  # noqa: E402
from trainer.artifact import OPTIMIZER, WEIGHTS  # noqa: E402
from trainer.full import FullSettings, run_full  # noqa: E402
from trainer.model import ModelConfig  # noqa: E402
from trainer.registry import Registry  # noqa: E402
from trainer.train import TrainConfig  # noqa: E402

RECALL = "recall@50"


def night(archive: Path, models: Path, day: dt.date, ttl: float | None, train: TrainConfig) -> dict:
    settings = FullSettings(
        archive_dir=archive, models_dir=models, day=day.isoformat(), id_ttl_days=ttl, progress=False
    )
    started = time.perf_counter()
    result = run_full(settings, ModelConfig(), train)
    seconds = time.perf_counter() - started
    path = Registry(models).path(result.version_id)
    manifest = json.loads((path / "manifest.json").read_text())
    ids = manifest["metrics"]["ids"]
    return {
        "day": day.isoformat(),
        "promoted": result.promoted,
        "user_rows": ids["rows"]["user"],
        "item_rows": ids["rows"]["item"],
        "expired_users": ids["expired"]["user"],
        "expired_items": ids["expired"]["item"],
        "holdout_recall@50": manifest["metrics"]["holdout"].get(RECALL),
        "weights_and_optimizer_mb": sum((path / f).stat().st_size for f in (WEIGHTS, OPTIMIZER)) / 2**20,
        "seconds": seconds,
    }


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, style in (("keep", "-"), ("ttl", "--")):
        nights = report["variants"][name]
        x = range(1, len(nights) + 1)
        label = "keep every id" if name == "keep" else f"expire after {report['config']['ttl_days']:g} days"
        ax1.plot(x, [n["user_rows"] for n in nights], "o" + style, label=f"user rows, {label}")
        ax1.plot(x, [n["item_rows"] for n in nights], "s" + style, label=f"item rows, {label}")
        ax2.plot(x, [n["weights_and_optimizer_mb"] for n in nights], "o" + style, label=label)
        ax3.plot(x, [n["holdout_recall@50"] for n in nights], "o" + style, label=label)
    ax1.set_title("ID rows of each night's version")
    ax2.set_title("weights.pt + optimizer.pt (MB)")
    ax3.set_title("gate: held-back Recall@50 of the candidate")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("night")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--ttl-days", type=float, default=2.0)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--requests-per-day", type=float, default=8_000.0)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.time()
    world = WorldConfig(
        seed=args.seed,
        n_users=args.users,
        n_items=args.items,
        days=float(args.days),
        requests_per_day=args.requests_per_day,
    )
    train = TrainConfig()
    report: dict = {
        "benchmark": "nightly_expiry",
        "config": {"world": asdict(world), "ttl_days": args.ttl_days, "train": asdict(train), "gate": RECALL},
        "variants": {"keep": [], "ttl": []},
    }
    with tempfile.TemporaryDirectory(prefix="freshtower-expiry-") as tmp:
        root = Path(tmp)
        with ArchiveWriter(root / "archive") as writer:
            writer.write(tqdm(SyntheticWorld(world).events(), desc="world", unit="ev", mininterval=2))
        start = dt.datetime.fromtimestamp(world.start_ms / 1000, tz=dt.UTC).date()
        days = [start + dt.timedelta(days=k) for k in range(args.days)]
        for day in tqdm(days, desc="nights", unit="night"):
            for name, ttl in (("keep", None), ("ttl", args.ttl_days)):
                row = night(root / "archive", root / name, day, ttl, train)
                report["variants"][name].append(row)
                tqdm.write(
                    f"{day} {name:>4}: {row['user_rows']:>6} user / {row['item_rows']:>5} item rows, "
                    f"expired {row['expired_users']:>5} / {row['expired_items']:>4}, "
                    f"{RECALL} {row['holdout_recall@50']:.4f}, {row['weights_and_optimizer_mb']:.1f} MB, "
                    f"{row['seconds']:.1f} s{'' if row['promoted'] else ' (refused)'}"
                )
    keep, ttl = report["variants"]["keep"][-1], report["variants"]["ttl"][-1]
    both = [(k["holdout_recall@50"], t["holdout_recall@50"]) for k, t in zip(*report["variants"].values(), strict=True)]
    report["summary"] = {
        "last_night_user_rows_ratio": ttl["user_rows"] / keep["user_rows"],
        "last_night_item_rows_ratio": ttl["item_rows"] / keep["item_rows"],
        "last_night_size_ratio": ttl["weights_and_optimizer_mb"] / keep["weights_and_optimizer_mb"],
        "mean_recall@50_keep": sum(k for k, _ in both) / len(both),
        "mean_recall@50_ttl": sum(t for _, t in both) / len(both),
        "mean_seconds_keep": sum(n["seconds"] for n in report["variants"]["keep"]) / len(both),
        "mean_seconds_ttl": sum(n["seconds"] for n in report["variants"]["ttl"]) / len(both),
    }
    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    report["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["total_runtime_s"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nightly_expiry.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(report, args.out / "nightly_expiry.png")
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {args.out / 'nightly_expiry.json'} and .png in {report['total_runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
