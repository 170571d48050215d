"""How long the nightly job takes to read its day: from the event archive, and from Kafka by timestamp.

A synthetic world of ``--days`` days is produced to a real broker (``deploy/kafka/kafka.sh`` on free loopback
ports) and written to an archive. For the day before the last (so that Kafka holds records an hour past its
end, as it would at night), in one run:

* ``archive``: what ``trainer full`` reads by default: the catalogue and profiles from the previous night's
  snapshot plus the archive files it lacks, and the day's clicks and impressions (``trainer.full.load_day``,
  the snapshot of the day itself not written);
* ``kafka``: ``trainer full --source kafka`` (``trainer.full.load_kafka_day``): the day's partitions by
  timestamp and the compacted catalogue and profile topics from their beginning;

each ``--repeats`` times (best kept); the two datasets are checked to be equal.

Writes ``bench/results/kafka_day_read.json``.

    .venv/bin/python bench/kafka_day_read.py [--days 3] [--users 20000] [--items 20000] [--requests-per-day 30000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from streaming import archive, archive_state  # noqa: E402
from streaming.archive import ArchiveWriter  # noqa: E402
from streaming.producer import EventProducer  # noqa: E402
from streaming.settings import KafkaSettings  # noqa: E402
from streaming.sources.synthetic import SyntheticWorld, WorldConfig  # noqa: E402
from streaming.topics import ensure_topics  # noqa: E402
from trainer.dataset import Dataset  # noqa: E402
from trainer.full import load_kafka_day  # noqa: E402

KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(dataset: Dataset) -> tuple:
    clicks = sorted(
        zip(dataset.clicks.user.tolist(), dataset.clicks.item.tolist(), dataset.clicks.ts_ms.tolist(), strict=True)
    )
    return clicks, dict(dataset.exposures), dataset.items, dataset.users


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--requests-per-day", type=float, default=30_000.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.days < 2:
        parser.error("--days must be >= 2 (the day read is the one before the last)")
    started = time.time()
    world = WorldConfig(
        seed=7, n_users=args.users, n_items=args.items, days=float(args.days), requests_per_day=args.requests_per_day
    )
    day = dt.date(2024, 1, 1) + dt.timedelta(days=args.days - 2)
    with tempfile.TemporaryDirectory(prefix="freshtower-kafkaday-") as tmp:
        ports = [str(free_port()), str(free_port())]
        broker = [str(KAFKA_SH), "--port", ports[0], "--controller-port", ports[1], "--data-dir", f"{tmp}/kafka"]
        subprocess.run([broker[0], "start", *broker[1:]], check=True, timeout=300)
        try:
            settings = KafkaSettings(
                bootstrap_servers=f"127.0.0.1:{ports[0]}", topic_prefix=f"b-{uuid.uuid4().hex[:6]}."
            )
            ensure_topics(settings)
            root = Path(tmp) / "archive"
            events = 0
            stream = iter(SyntheticWorld(world).events())
            with (
                EventProducer(settings) as producer,
                ArchiveWriter(root) as writer,
                tqdm(desc="produce + archive", unit="event", unit_scale=True) as bar,
            ):
                while chunk := list(itertools.islice(stream, 50_000)):
                    producer.send_all(chunk)
                    writer.write(chunk)
                    events += len(chunk)
                    bar.update(len(chunk))
            archive_state.read_state(root, day - dt.timedelta(days=1))  # the previous night's snapshot

            def from_archive() -> Dataset:
                state = archive_state.read_state(root, day, write=False)
                behaviour = archive.read_day(root, day, types={"click", "impression"})
                return Dataset.from_events(itertools.chain(state, behaviour))

            readers = {"archive": from_archive, "kafka": lambda: load_kafka_day(settings, day, 3600.0)}
            timings: dict[str, float] = {}
            datasets: dict[str, Dataset] = {}
            for name, read in readers.items():
                best = float("inf")
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    datasets[name] = read()
                    best = min(best, time.perf_counter() - t)
                timings[name] = best
                print(f"{name:>8}: {best:.2f} s")
        finally:
            subprocess.run([broker[0], "stop", *broker[1:]], check=False, timeout=300)
    if summary(datasets["archive"]) != summary(datasets["kafka"]):
        raise SystemExit("the day read from Kafka differs from the archived day")
    d = datasets["kafka"]
    behaviour = len(d.clicks) + sum(d.exposures.values())
    report = {
        "benchmark": "kafka_day_read",
        "config": vars(args) | {"out": str(args.out)},
        "day": day.isoformat(),
        "events_produced": events,
        "day_events": {"clicks": len(d.clicks), "impressions": sum(d.exposures.values())},
        "ids": {"items": len(d.items), "users": len(d.users)},
        "seconds": timings,
        "day_events_per_s": {name: behaviour / s for name, s in timings.items()},
        "kafka_over_archive": timings["kafka"] / timings["archive"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_runtime_s": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kafka_day_read.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"day {day}: {behaviour:,} clicks and impressions, {len(d.items):,} items, {len(d.users):,} profiles; "
        f"archive {timings['archive']:.2f} s, Kafka {timings['kafka']:.2f} s "
        f"(x{report['kafka_over_archive']:.2f}); wrote {args.out / 'kafka_day_read.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
