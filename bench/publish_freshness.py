"""Event -> visible-in-KV freshness of the publisher, for several publish intervals.

For each interval a real :class:`~publisher.publish.Publisher` writes a real RocksDB store every
``interval`` seconds while a generator thread updates random users at ``--rate`` events per second
(each update is one event, stamped with the wall-clock time it entered the source). A reader in
*another process* opens a secondary instance and polls it every ``--poll-ms``; it records the wall
time at which each version (and so each row in it: rows and meta are one batch) first became
readable, with the version's cursor. An event's freshness is the time its row was first readable
in the reader process minus the event time: waiting for the next publish + the publish itself +
the reader's catch-up. The learner's own delay (event in Kafka -> row in its state) is not part
of this measurement.

Defaults: intervals 1 s, 10 s, 60 s with 15 s, 40 s and 120 s of events (so 15, 4 and 2 publish
cycles: the 60 s figure rests on two cycles, enough for the uniform wait it is dominated by, not
for a tail estimate), about three minutes in all. Writes ``bench/results/publish_freshness.json``
and ``.png``.

    .venv/bin/python bench/publish_freshness.py [--intervals 1,10,60] [--durations 15,40,120]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from publisher.publish import Publisher
from publisher.settings import PublisherSettings
from publisher.source import MemorySource
from publisher.store import RocksSecondary, RocksStore

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("bench.publish_freshness")


def reader_main(path: str, stop_file: str, poll_s: float) -> None:
    """In the reader process: print ``version cursor created_ms first_seen_time`` for each newly readable version."""
    with RocksSecondary(path) as store:
        print("ready", flush=True)
        last = -1
        while not os.path.exists(stop_file):
            with store.reader() as view:
                meta = view.meta()
                if meta is not None and meta.version != last:
                    seen = time.time()
                    # Read a row of the version too: what a serving request would do.
                    view.user("u0")
                    last = meta.version
                    print(f"{meta.version} {meta.cursor} {meta.created_ms} {seen:.6f}", flush=True)
            time.sleep(poll_s)


def run_interval(interval: float, duration: float, args: argparse.Namespace, workdir: Path) -> dict:
    from tqdm import tqdm

    path = workdir / f"store-{interval:g}s"
    source = MemorySource(model_version="bench")
    rng = np.random.default_rng(args.seed)
    vectors = rng.standard_normal((args.users, args.dim)).astype(np.float32)
    for u in range(args.users):
        source.put_user(f"u{u}", vectors[u])
    settings = PublisherSettings(store_path=path, interval_s=interval, index_kind="none")
    store = RocksStore(path, sync=settings.sync_writes)
    publisher = Publisher(store, source, settings)
    publisher.publish_once()  # the initial state, before the clock starts

    stop_file = workdir / f"stop-{interval:g}"
    reader = subprocess.Popen(
        [sys.executable, __file__, "--reader", str(path), str(stop_file), str(args.poll_ms / 1000)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None
    if reader.stdout.readline().strip() != "ready":
        raise RuntimeError("the reader process did not start")
    seen: list[tuple[int, str, float, float]] = []  # version, cursor, publish started, first readable

    def collect() -> None:
        for line in reader.stdout:
            version, cursor, created_ms, at = line.split()
            seen.append((int(version), cursor, int(created_ms) / 1000, float(at)))

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()

    events: list[tuple[int, float]] = []  # (source sequence, event time)
    stop_events, stop_publisher = threading.Event(), threading.Event()

    def generate() -> None:
        gen = np.random.default_rng(args.seed + 1)
        next_at = time.time()
        while not stop_events.is_set():
            next_at += gen.exponential(1.0 / args.rate)
            delay = next_at - time.time()
            if delay > 0 and stop_events.wait(delay):
                break
            u = int(gen.integers(0, args.users))
            vectors[u] = vectors[u] + 0.05 * gen.standard_normal(args.dim).astype(np.float32)
            now = time.time()
            seq = source.put_user(f"u{u}", vectors[u], event_ms=int(now * 1000))
            events.append((seq, now))

    runner = threading.Thread(target=publisher.run, args=(stop_publisher,))
    generator = threading.Thread(target=generate)
    t_start = time.monotonic()
    runner.start()
    generator.start()
    # Stop the events just before a publish is due (duration is a multiple of the interval), so the
    # last ones are published by that cycle rather than one interval later.
    for second in tqdm(range(int(duration)), desc=f"interval {interval:g} s", unit="s", leave=False):
        time.sleep(max(0.0, t_start + min(second + 1, duration - 0.25) - time.monotonic()))
    stop_events.set()
    generator.join()
    last_seq = events[-1][0]
    deadline = time.time() + interval + 30
    while time.time() < deadline and not any(source.cursor_sequence(c) >= last_seq for _, c, _, _ in seen):
        time.sleep(0.05)
    stop_publisher.set()
    runner.join()
    stop_file.touch()
    reader.wait(timeout=30)
    collector.join(timeout=5)
    store.close()

    versions = sorted((source.cursor_sequence(c), at) for _, c, _, at in seen)
    # Publish start (meta.created_ms) -> readable in the other process: the part that is not waiting.
    write_lag = np.array([at - created for v, _, created, at in seen if v > 1])
    seqs = np.array([s for s, _ in versions])
    times = np.array([t for _, t in versions])
    fresh = []
    for seq, at in events:
        k = int(np.searchsorted(seqs, seq))  # first version whose cursor covers the event
        if k < len(seqs):
            fresh.append(times[k] - at)
    fresh_arr = np.array(fresh)
    durations = publisher.registry.get_sample_value("freshtower_publish_duration_seconds_sum") or 0.0
    count = publisher.registry.get_sample_value("freshtower_publish_duration_seconds_count") or 1.0
    return {
        "interval_s": interval,
        "events_duration_s": duration,
        "events": len(events),
        "events_measured": len(fresh),
        "versions_seen": len(seen),
        "p50_s": float(np.percentile(fresh_arr, 50)),
        "p90_s": float(np.percentile(fresh_arr, 90)),
        "p99_s": float(np.percentile(fresh_arr, 99)),
        "max_s": float(fresh_arr.max()),
        "mean_s": float(fresh_arr.mean()),
        "mean_publish_s": durations / count,
        "publish_to_readable_p50_s": float(np.percentile(write_lag, 50)),
        "publish_to_readable_p99_s": float(np.percentile(write_lag, 99)),
        "_samples": fresh_arr,
    }


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        x = np.sort(r["_samples"])
        y = np.arange(1, len(x) + 1) / len(x)
        label = f"interval {r['interval_s']:g} s: p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s"
        ax.plot(x, y, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("event -> readable in another process's KV view (s)")
    ax.set_ylabel("fraction of events")
    ax.set_title("Publish freshness (RocksDB primary -> secondary reader)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--reader":
        reader_main(argv[1], argv[2], float(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--intervals", default="1,10,60")
    parser.add_argument("--durations", default="15,40,120", help="seconds of events per interval")
    parser.add_argument("--rate", type=float, default=50.0, help="events per second")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--poll-ms", type=float, default=5.0, help="reader poll period")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    intervals = [float(x) for x in args.intervals.split(",")]
    durations = [float(x) for x in args.durations.split(",")]
    if len(intervals) != len(durations):
        parser.error(f"{len(intervals)} intervals but {len(durations)} durations")
    if any(d < i or d % i for i, d in zip(intervals, durations, strict=True)):
        parser.error(f"each duration must be a multiple of its interval: {durations} for {intervals}")

    results = []
    with tempfile.TemporaryDirectory(prefix="freshtower-bench-") as tmp:
        for interval, duration in zip(intervals, durations, strict=True):
            r = run_interval(interval, duration, args, Path(tmp))
            results.append(r)
            print(
                f"interval {interval:>4g} s: {r['events_measured']} events over {r['versions_seen']} versions, "
                f"freshness p50 {r['p50_s']:.3f} s, p99 {r['p99_s']:.3f} s (max {r['max_s']:.3f} s); "
                f"publish -> readable p50 {1000 * r['publish_to_readable_p50_s']:.1f} ms",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "publish_freshness",
        "what": "event time -> first readable through a RocksDB secondary in another process",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
    }
    (args.out / "publish_freshness.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "publish_freshness.png")
    print(f"wrote {args.out / 'publish_freshness.json'} and {args.out / 'publish_freshness.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
