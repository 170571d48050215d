"""The worker's logQ estimate across daily model switches: counting the replay again against counting it once.

MovieLens-100K replayed by its timestamps in batches of ``--batch`` clicks. Each day, ``--lag-hours`` after
midnight, a nightly version with its cutoff at midnight is switched in, and the worker replays the clicks since the
cutoff. ``once`` is the worker's estimate now (the replay is learnt, not counted: the same as a worker that never
switched); ``twice`` counts the replayed batches into the estimate again, as the worker did before. Reported: the
difference of ``log p_j`` between them at every click (all items, and items first seen in the last 7 days), and
the steps each counted.

    .venv/bin/python bench/worker_logq_switch.py [--data data/ml-100k] [--batch 64] [--lag-hours 6]

Writes ``bench/results/worker_logq_switch.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from streaming.learner import LearnerSettings
from streaming.sources.movielens import MovieLens100K
from trainer.frequency import FrequencyEstimator

DAY_S = 86_400


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/ml-100k")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lag-hours", type=float, default=6.0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    ratings = MovieLens100K(args.data).ratings()
    items = np.array([f"i{i}" for i in ratings["item_id"].tolist()])
    ts = ratings["ts"].astype(np.int64)
    s = LearnerSettings()

    def estimator() -> FrequencyEstimator:
        return FrequencyEstimator(
            s.frequency_buckets, s.frequency_hashes, s.frequency_alpha, 0, from_second_sighting=True
        )

    once, twice = estimator(), estimator()
    first_seen: dict[str, int] = {}
    diffs: dict[str, list[float]] = {"all": [], "new (< 7 days)": []}
    switched = ts[0] // DAY_S
    switches = 0
    for start in range(0, len(items), args.batch):
        end = min(start + args.batch, len(items))
        day = ts[end - 1] // DAY_S
        if day > switched and ts[end - 1] >= day * DAY_S + args.lag_hours * 3600:
            switched, switches = day, switches + 1
            for r in range(int(np.searchsorted(ts, day * DAY_S, side="right")), start, args.batch):
                twice.update(list(items[r : min(r + args.batch, start)]))  # the replay, counted again
        batch = list(items[start:end])
        for item in batch:
            first_seen.setdefault(item, int(ts[start]))
        once.update(batch)
        twice.update(batch)
        diff = np.log(twice.probability(batch)) - np.log(once.probability(batch))
        new = np.array([ts[start] - first_seen[i] < 7 * DAY_S for i in batch])
        diffs["all"].extend(diff.tolist())
        diffs["new (< 7 days)"].extend(diff[new].tolist())
    print(
        f"batch {args.batch}, {switches} switches replaying {args.lag_hours} h; steps: once {once.step}, twice {twice.step}"
    )
    report: dict = {
        "benchmark": "worker_logq_switch",
        "what": "|log p_j| difference between counting a model switch's replay again and counting it once",
        "batch": args.batch,
        "lag_hours": args.lag_hours,
        "switches": switches,
        "steps": {"once": int(once.step), "twice": int(twice.step)},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "clicks": {},
    }
    for name, values in diffs.items():
        d = np.abs(np.array(values))
        print(
            f"{name}: {len(d)} clicks, |log p twice - log p once| mean {d.mean():.3f}, p90 {np.quantile(d, 0.9):.3f}, "
            f"max {d.max():.2f}, share > 0.1: {np.mean(d > 0.1):.3f}"
        )
        report["clicks"][name] = {
            "n": len(d),
            "mean": round(float(d.mean()), 4),
            "p90": round(float(np.quantile(d, 0.9)), 4),
            "max": round(float(d.max()), 3),
            "share_over_0.1": round(float(np.mean(d > 0.1)), 4),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "worker_logq_switch.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out / 'worker_logq_switch.json'}")


if __name__ == "__main__":
    main()
