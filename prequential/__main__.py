"""``python -m prequential``: the main job (see the README).

    python -m prequential [--dataset ml100k|synthetic] [--seeds 0] [--out runs]

Replays a dataset through a real Kafka broker, worker, publisher, retrieval service and nightly job on a
simulated clock, scores every click of the scored period under each arm before anything has learnt from it,
and writes a report (markdown, PNG plots, per-event hits) under ``runs/<timestamp>/``. Ctrl-C stops every
process cleanly; a rerun starts in a new directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

from prequential.metrics import Scored, hit_rate
from prequential.report import write_report
from prequential.run import ARMS, RunSettings, result_json, run
from prequential.system import SystemSettings
from streaming.events import Event

logger = logging.getLogger("prequential")

# Per dataset: where version 1's data ends and scoring starts (click-time quantiles), steps and nights.
PRESETS = {
    "ml100k": dict(first_cut=0.5, score_from=0.7, step_clicks=500, night_every_days=7),
    "synthetic": dict(first_cut=0.25, score_from=0.5, step_clicks=400, night_every_days=1),
}


def load_events(dataset: str, seed: int, data_dir: Path) -> list[Event]:
    if dataset == "ml100k":
        from streaming.sources.movielens import MovieLens100K, fetch

        return list(MovieLens100K(fetch(data_dir)).events())
    from streaming.sources.synthetic import SyntheticWorld, WorldConfig

    config = WorldConfig(seed=seed, n_users=2000, n_items=2000, days=4.0, requests_per_day=4000, new_items_per_day=150)
    return sorted(SyntheticWorld(config).events(), key=lambda e: e.ts_ms)


def _worker_settings(parser: argparse.ArgumentParser, pairs: list[str]) -> tuple[tuple[str, object], ...]:
    from streaming.worker_settings import WorkerSettings

    known = {f.name for f in dataclasses.fields(WorkerSettings)}
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in known:
            parser.error(
                f"--worker {pair!r}: expected KEY=VALUE with KEY a worker setting ({', '.join(sorted(known))})"
            )
        try:
            value: object = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.append((key, value))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prequential",
        description=(__doc__ or "").split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=sorted(PRESETS), default="ml100k", help="data set (default ml100k)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, one run each (default 0)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="report directory root (default runs/)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where MovieLens-100K is fetched to")
    parser.add_argument("--step-clicks", type=int, help="clicks scored per step (the system catches up in between)")
    parser.add_argument("--night-every-days", type=int, help="simulated days between nightly runs")
    parser.add_argument("--first-cut", type=float, help="click-time quantile where version 1's data ends")
    parser.add_argument("--score-from", type=float, help="click-time quantile where scoring starts")
    parser.add_argument("--end", type=float, default=1.0, help="click-time quantile where the replay ends (1.0)")
    parser.add_argument("--publish-interval", type=float, default=1.0, help="publisher interval, seconds (1)")
    parser.add_argument("--no-learn", action="store_true", help="worker keeps features current but runs no SGD")
    parser.add_argument(
        "--new-worker-each-night",
        action="store_true",
        help="after each promotion, replace the worker (and its store and serving) by a new one: no steady state",
    )
    parser.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [worker] setting for this run, e.g. lr=0.2, batch_size=64, logq_weight=0.5 (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    preset = {**PRESETS[args.dataset]}
    for name in ("step_clicks", "night_every_days", "first_cut", "score_from"):
        if getattr(args, name) is not None:
            preset[name] = getattr(args, name)
    system = SystemSettings(
        publish_interval_s=args.publish_interval,
        learn=not args.no_learn,
        worker=_worker_settings(parser, args.worker),
        new_worker_each_night=args.new_worker_each_night,
    )
    out = args.out / f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{args.dataset}"
    out.mkdir(parents=True)

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    results = {}
    started = time.monotonic()
    try:
        for seed in seeds:
            settings = RunSettings(dataset=args.dataset, seed=seed, end=args.end, system=system, **preset)
            print(f"[seed {seed}] loading {args.dataset} ...", flush=True)
            events = load_events(args.dataset, seed, args.data_dir)
            bar = tqdm(desc=f"seed {seed}", unit="step", dynamic_ncols=True, mininterval=0.5)
            produced = [0, time.monotonic()]  # events produced, start

            def on_step(info: dict, bar: tqdm = bar, produced: list = produced) -> None:
                bar.total = info["steps_total"]
                rows = info["rows"]
                live = ""
                if rows:
                    scored = Scored.from_rows(rows, ARMS)
                    live = " ".join(f"{a[:12]}={hit_rate(scored, a, 20):.3f}" for a in ARMS[:3])
                produced[0] += info["events"]
                rate = produced[0] / max(time.monotonic() - produced[1], 1e-9)
                bar.set_postfix_str(
                    f"{dt.datetime.fromtimestamp(info['to_ms'] / 1000, dt.UTC):%Y-%m-%d} {rate:.0f} ev/s "
                    f"model={info['model_version'][-6:]} publish={info['served_publish_version']} "
                    f"fresh={info['settle_s']:.1f}s HR@20 {live}",
                    refresh=False,
                )
                bar.update(1)

            result = run(settings, events, out / f"seed-{seed}", on_step=on_step)
            bar.close()
            results[seed] = result
            (out / f"seed-{seed}" / "run.json").write_text(json.dumps(result_json(result, settings), indent=1) + "\n")
            (out / f"seed-{seed}" / "hits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.rows))
    except KeyboardInterrupt:
        print(f"\nstopped; every process was shut down. Partial output in {out}", file=sys.stderr)
        return 130
    command = "python -m prequential " + " ".join(argv if argv is not None else sys.argv[1:])
    report = write_report(out, args.dataset, results, dataclasses.asdict(system), time.monotonic() - started, command)
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
