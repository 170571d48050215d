"""Sustained throughput of the streaming worker: Kafka -> decode -> merge -> examples -> SGD -> checkpoints.

The script starts its own broker with ``deploy/kafka/kafka.sh`` on free ports (or uses ``--bootstrap``),
builds a synthetic world (:mod:`streaming.sources.synthetic`), registers an untrained model version whose
vocabularies come from day one (as ``tests/worker_fixtures.py`` does; one version per embedding dim), produces
day two into fresh topics once, and then, for each grid point (batch size x embedding dim), runs a real
:class:`~streaming.worker.Worker` in a child process over the whole stream from the earliest offset (its own
consumer group and RocksDB state), until the stream is applied (``run(stop, exit_when_idle_s=...)``) or, to
keep the whole run near five minutes on a small shared machine, until ``--events-per-point`` events were applied
(default 100,000 of a 200,000-event stream; 0 runs each point over the whole stream).

What is measured, per grid point:

* ``window_s``: wall time from the first applied event to the last. Start-up (model load, RocksDB open, the
  consumer-group join and the first fetch: seconds of fixed cost) and the idle tail that ``exit_when_idle_s``
  waits through are excluded: they say nothing about how fast the worker keeps up with a stream. Everything
  a live worker does per event is inside the window: fetch, decode and validation, the event-time merge, the
  join, SGD steps and the periodic synchronous checkpoints (every 2 s, fsync on).
* ``events_per_s`` = events applied / window; ``examples_per_s`` = clicks trained by SGD inside the window /
  window (the last partial batch, trained after the stream goes idle, is outside it).
* SGD step time p50/p99, timed around ``IncrementalLearner.learn_batch`` through the worker's ``metrics``
  argument (the same spot that feeds ``freshtower_sgd_step_seconds``, whose buckets are too coarse for a p99).
* ``peak_rss_mb``: the child process's peak resident set (``VmHWM``), one process per grid point.

Before the grid, kafka-python alone reads the same topics from offset 0 with the worker's fetch settings, three
times: records only (``raw``), with ``json.loads`` of each value, and with the worker's decoding and validation
(``check_record``). Each grid point reports its rate as a ratio of the raw one (``ratio_to_raw_consume``): measured
in the same run on the same broker, the ratio is steadier than either rate on a shared machine.

One more run (``--profile``, default batch 256 x dim 32, ``--profile-events`` 30,000 events) is made under
cProfile; its top functions by own time and by cumulative time go into the JSON (cProfile slows Python code
down, so its rate is not a result; the shares are what matter).

One more run (``--crc-compare``, default batch 256 x dim 32) repeats a grid point with kafka-python's pure-Python
CRC-32C in place of the ``crc32c`` C extension the project installs (kafka-python verifies the checksum of every
record batch it fetches and picks the C version when it can import it): the ratio of the two rates, measured in
the same run, is what the extension buys.
Torch runs with one thread (the worker is one thread; the machine is shared).

Writes ``bench/results/stream_throughput.json`` and ``.png``.

    .venv/bin/python bench/stream_throughput.py [--events 250000] [--batch-sizes 64,256,1024] [--dims 32,64]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from streaming.metrics import WorkerMetrics  # noqa: E402

KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
DAY_MS = 86_400_000
# Events per request of the synthetic world at these settings (a slate of 10 impressions + ~1.3 clicks),
# used to size the world so that day two holds about --events events.
EVENTS_PER_REQUEST = 11.3

logger = logging.getLogger("bench.stream_throughput")


# ---------------------------------------------------------------------------------------------- instrumentation
class _Clock:
    """Stands in for a labelled Prometheus counter child: counts and stamps the first and last increment."""

    def __init__(self, child, owner: _EventClock) -> None:
        self._child = child
        self._owner = owner

    def inc(self, amount: float = 1.0) -> None:
        self._child.inc(amount)
        now = time.perf_counter()
        if self._owner.first is None:
            self._owner.first = now
        self._owner.last = now
        self._owner.count += 1
        if self._owner._stop_after is not None and self._owner.count >= self._owner._stop_after:
            self._owner._stop.set()


class _EventClock:
    """Wraps ``freshtower_events_consumed_total``: the worker increments it once per applied event.

    Sets ``stop`` once ``stop_after`` events were applied (the worker finishes its current slice and exits).
    """

    def __init__(self, counter, stop: threading.Event, stop_after: int | None) -> None:
        self._counter = counter
        self._children: dict[tuple, _Clock] = {}
        self._stop = stop
        self._stop_after = stop_after
        self.first: float | None = None
        self.last: float | None = None
        self.count = 0

    def labels(self, *values: str) -> _Clock:
        clock = self._children.get(values)
        if clock is None:
            clock = self._children[values] = _Clock(self._counter.labels(*values), self)
        return clock


class _StepTimer:
    """Wraps ``freshtower_sgd_step_seconds``: records every step's duration and when it ended."""

    def __init__(self, histogram) -> None:
        self._histogram = histogram
        self.durations: list[float] = []
        self.ends: list[float] = []

    @contextlib.contextmanager
    def time(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self._histogram.observe(end - start)
            self.durations.append(end - start)
            self.ends.append(end)


class BenchMetrics(WorkerMetrics):
    """The worker's metrics with the event counter and the SGD histogram timed at full resolution."""

    def __init__(self, stop: threading.Event, stop_after: int | None) -> None:
        super().__init__()
        self.events = _EventClock(self.events, stop, stop_after)
        self.sgd_seconds = _StepTimer(self.sgd_seconds)


# ---------------------------------------------------------------------------------------------- one grid point
def run_point(args: argparse.Namespace) -> dict:
    """In a child process: one worker over the whole stream; prints nothing, returns the measurements."""
    import torch

    from streaming.settings import KafkaSettings
    from streaming.worker import Worker, WorkerSettings
    from trainer.artifact import load_version
    from trainer.registry import Registry

    torch.set_num_threads(1)
    crc = _crc_implementation(python=args.python_crc)
    kafka = KafkaSettings(bootstrap_servers=args.bootstrap, topic_prefix=args.topic_prefix)
    registry = Registry(args.models)
    version = load_version(registry.path(registry.current()))
    settings = WorkerSettings(
        state_dir=Path(args.state_dir),
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
        batch_size=args.batch_size,
        metrics_port=0,
    )
    stop = threading.Event()
    metrics = BenchMetrics(stop, args.max_events or None)
    worker = Worker(kafka, settings, version, metrics=metrics)
    safety = threading.Timer(args.timeout, stop.set)
    safety.start()
    profiler = cProfile.Profile() if args.profile_out else None
    started = time.perf_counter()
    try:
        if profiler is not None:
            profiler.enable()
        worker.run(stop, exit_when_idle_s=args.exit_when_idle)
    finally:
        if profiler is not None:
            profiler.disable()
        safety.cancel()
    ended = time.perf_counter()
    clock, steps = metrics.events, metrics.sgd_seconds
    if clock.first is None or clock.last is None:
        raise RuntimeError("the worker applied no events")
    window = clock.last - clock.first
    durations = np.asarray(steps.durations)
    ends = np.asarray(steps.ends)
    in_window = int(np.searchsorted(ends, clock.last, side="right"))
    examples_in_window = min(in_window * args.batch_size, worker.learner.examples)
    summary = worker.summary()
    result = {
        "batch_size": args.batch_size,
        "dim": args.dim,
        "crc32c": crc,
        "events_applied": clock.count,
        "examples": worker.learner.examples,
        "sgd_steps": len(durations),
        "window_s": window,
        "startup_s": clock.first - started,
        "tail_s": ended - clock.last,
        "events_per_s": clock.count / window,
        "examples_per_s": examples_in_window / window,
        "sgd_step_p50_ms": 1000 * float(np.percentile(durations, 50)),
        "sgd_step_p99_ms": 1000 * float(np.percentile(durations, 99)),
        "sgd_step_mean_ms": 1000 * float(durations.mean()),
        "sgd_share_of_window": float(durations[:in_window].sum()) / window,
        "checkpoints": summary["checkpoints"],
        "user_rows": summary["user_rows"],
        "item_rows": summary["item_rows"],
        "peak_rss_mb": _peak_rss_mb(),
    }
    if profiler is not None:
        result["profile"] = _hot_spots(profiler, args.profile_out, top=args.profile_top)
    return result


def _crc_implementation(python: bool) -> str:
    """Which CRC-32C kafka-python verifies fetched batches with; ``python`` forces its pure-Python one."""
    import kafka.record.default_records as records
    from kafka.record import util
    from kafka.record._crc32c import crc as crc32c_python

    if python:
        records.calc_crc32c = crc32c_python  # bound by name at import: the only call site
        return "python"
    return "python" if util.crc32c_c is None else "c"


def _peak_rss_mb() -> float:
    """This process's peak resident set. Not ``ru_maxrss``: Linux carries that over ``exec`` from the parent,
    so a child would report the parent's peak (here the parent holds the whole world in memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hot_spots(profiler: cProfile.Profile, out: str, top: int) -> dict:
    profiler.dump_stats(out)
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]

    def rows(key: str) -> list[dict]:
        entries = []
        for (filename, line, name), (_, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
            short = filename.replace(str(REPO) + "/", "")
            if "site-packages/" in short:
                short = short.split("site-packages/", 1)[1]
            entries.append(
                {
                    "function": f"{short}:{line}({name})",
                    "calls": nc,
                    "own_s": round(tt, 3),
                    "cumulative_s": round(ct, 3),
                    "own_share": round(tt / total, 4),
                }
            )
        entries.sort(key=lambda e: e["own_s" if key == "own" else "cumulative_s"], reverse=True)
        return entries[:top]

    return {"total_s": round(total, 3), "by_own_time": rows("own"), "by_cumulative_time": rows("cumulative")}


# ---------------------------------------------------------------------------------------------- the parent
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def broker(bootstrap: str | None, workdir: Path) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    port, cport = _free_port(), _free_port()
    common = ["--port", str(port), "--controller-port", str(cport), "--data-dir", str(workdir / "kafka")]
    subprocess.run([str(KAFKA_SH), "start", *common], check=True, timeout=300)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(KAFKA_SH), "stop", *common], check=False, timeout=120)


def prepare(args: argparse.Namespace, bootstrap: str, workdir: Path) -> dict:
    """World -> one registered model per dim -> day two produced into fresh topics. Returns what was made."""
    from streaming.producer import EventProducer
    from streaming.replay import replay
    from streaming.settings import KafkaSettings
    from streaming.sources.synthetic import SyntheticWorld, WorldConfig
    from streaming.topics import ensure_topics
    from trainer.artifact import make_version, save_version
    from trainer.dataset import Dataset
    from trainer.features import FeatureEncoder
    from trainer.model import ModelConfig, TwoTowerModel
    from trainer.registry import Registry

    config = WorldConfig(
        seed=args.seed,
        n_users=args.users,
        n_items=args.items,
        days=2.0,
        requests_per_day=args.events / EVENTS_PER_REQUEST,
        new_items_per_day=args.items / 20,
    )
    t0 = time.perf_counter()
    events = list(SyntheticWorld(config).events())
    cut = config.start_ms + DAY_MS
    day_one = [e for e in events if e.ts_ms < cut]
    stream = [e for e in events if e.ts_ms >= cut]
    del events
    print(f"world: {len(day_one):,} day-one events, {len(stream):,} in the stream ({time.perf_counter() - t0:.1f} s)")

    dataset = Dataset.from_events(day_one)
    encoder = FeatureEncoder.fit(dataset)
    cutoff = int(dataset.clicks.ts_ms.max())
    models = {}
    for dim in args.dims:
        model_config = ModelConfig(dim=dim, id_dim=dim, embedding_dim=16, hidden=(128,))
        model = TwoTowerModel(encoder, model_config)
        registry = Registry(workdir / f"models-{dim}")
        version = make_version(
            model,
            encoder,
            dataset.items,
            version_id="v1",
            parent=None,
            data_range=(0, cutoff + 1),
            data_cutoff_ms=cutoff,
        )
        with registry.new_version("v1") as staging:
            save_version(staging, version)
        registry.promote("v1")
        models[dim] = {"path": str(registry.root), "config": model_config.to_dict()}

    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"bench-{uuid.uuid4().hex[:8]}.")
    ensure_topics(kafka)
    with EventProducer(kafka) as producer:
        sent = replay(stream, producer, total=len(stream), description="produce")
    by_type = dict(sent.by_type)
    print(f"produced {sent.sent:,} events {by_type} at {sent.rate:,.0f} events/s")
    return {
        "world": {k: v for k, v in config.__dict__.items()},
        "topic_prefix": kafka.topic_prefix,
        "partitions": kafka.partitions,
        "stream_events": sent.sent,
        "stream_by_type": by_type,
        "produce_events_per_s": sent.rate,
        "models": models,
        "vocab": {"users": len(encoder.user_vocab), "items": len(encoder.item_vocab)},
    }


def raw_consume(bootstrap: str, prefix: str, expected: int, stage: str) -> dict:
    """The client alone over the same topics: every partition of the four event topics from offset 0, with the
    worker's fetch settings, until ``expected`` records came. ``stage``: ``raw`` (records only), ``json``
    (+ ``json.loads`` of each value) or ``validate`` (+ the worker's decode and validation, ``check_record``)."""
    from kafka import KafkaConsumer, TopicPartition

    from streaming.consumer import check_record
    from streaming.events import Limits
    from streaming.settings import KafkaSettings

    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix)
    limits = Limits(max_bytes=kafka.max_record_bytes, max_future_ms=1 << 62)
    consumer = KafkaConsumer(
        **kafka.client_config(),
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=max(1 << 20, 4 * kafka.max_record_bytes),
        fetch_max_bytes=8 << 20,
    )
    tps = [TopicPartition(kafka.topic(t), p) for t in ("items", "users", "impressions", "clicks") for p in range(4)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    n, first, last = 0, None, None
    deadline = time.monotonic() + 300
    while n < expected and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500, max_records=1 << 30).values():
            if first is None:
                first = time.perf_counter()
            for record in records:
                if stage == "json":
                    json.loads(record.value)
                elif stage == "validate":
                    check_record(record.topic, record.key, record.value, kafka, limits)
            n += len(records)
        last = time.perf_counter()
    consumer.close()
    if n < expected or first is None:
        raise RuntimeError(f"raw consume ({stage}) read {n} of {expected} records")
    return {"stage": stage, "records": n, "seconds": round(last - first, 3), "records_per_s": n / (last - first)}


def child(
    args: argparse.Namespace,
    bootstrap: str,
    prepared: dict,
    batch: int,
    dim: int,
    workdir: Path,
    profile: bool,
    python_crc: bool = False,
):
    name = f"b{batch}-d{dim}{'-profile' if profile else ''}{'-pycrc' if python_crc else ''}"
    out = workdir / f"{name}.json"
    cmd = [
        sys.executable,
        __file__,
        "--point",
        "--bootstrap",
        bootstrap,
        "--topic-prefix",
        prepared["topic_prefix"],
        "--models",
        prepared["models"][dim]["path"],
        "--state-dir",
        str(workdir / f"state-{name}"),
        "--batch-size",
        str(batch),
        "--dim",
        str(dim),
        "--exit-when-idle",
        str(args.exit_when_idle),
        "--timeout",
        str(args.timeout),
        "--result",
        str(out),
        "--max-events",
        str(args.profile_events if profile else args.events_per_point),
    ]
    if profile:
        cmd += ["--profile-out", str(workdir / f"{name}.prof"), "--profile-top", str(args.profile_top)]
    if python_crc:
        cmd.append("--python-crc")
    subprocess.run(cmd, check=True, timeout=args.timeout + 120)
    return json.loads(out.read_text())


def plot(results: list[dict], prepared: dict, out: Path, raw: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["dim"] for r in results})
    batches = sorted({r["batch_size"] for r in results})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / len(dims)
    x = np.arange(len(batches))
    for k, dim in enumerate(dims):
        rows = {r["batch_size"]: r for r in results if r["dim"] == dim}
        rate = [rows[b]["events_per_s"] if b in rows else 0 for b in batches]
        bars = ax1.bar(x + (k - (len(dims) - 1) / 2) * width, rate, width, label=f"dim {dim}")
        ax1.bar_label(bars, labels=[f"{v:,.0f}" for v in rate], fontsize=8)
        p50 = [rows[b]["sgd_step_p50_ms"] for b in batches if b in rows]
        p99 = [rows[b]["sgd_step_p99_ms"] for b in batches if b in rows]
        ax2.plot([b for b in batches if b in rows], p50, "o-", label=f"dim {dim} p50")
        ax2.plot([b for b in batches if b in rows], p99, "s--", label=f"dim {dim} p99")
    if raw:
        styles = {"raw": ("k", "-"), "json": ("0.4", "--"), "validate": ("0.6", ":")}
        for stage, (color, style) in styles.items():
            rate = raw[stage]["records_per_s"]
            label = f"kafka-python alone ({stage}): {rate:,.0f}/s"
            ax1.axhline(rate, color=color, linestyle=style, linewidth=1, label=label)
        ax1.axhline(50_000, color="tab:red", linestyle="-.", linewidth=1, label="target: 50,000/s")
    ax1.set_xticks(x, [str(b) for b in batches])
    ax1.set_xlabel("batch size (clicks per SGD step)")
    ax1.set_ylabel("events applied per second (sustained)")
    applied = int(np.mean([r["events_applied"] for r in results]))
    ax1.set_title(
        f"Kafka -> SGD: ~{applied:,} of {prepared['stream_events']:,} events per run, "
        f"{prepared['partitions']} partitions",
        fontsize=10,
    )
    ax1.legend(loc="upper left", fontsize=7)
    ax1.grid(True, axis="y", alpha=0.3)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(batches, [str(b) for b in batches])
    ax2.set_yscale("log")
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("SGD step (ms)")
    ax2.set_title("IncrementalLearner.learn_batch time")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--events", type=int, default=200_000, help="approximate size of the stream (day two)")
    parser.add_argument(
        "--events-per-point", type=int, default=100_000, help="events each grid point applies (0: the whole stream)"
    )
    parser.add_argument("--profile-events", type=int, default=30_000, help="events the profiled run applies")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--batch-sizes", default="64,256,1024")
    parser.add_argument("--dims", default="32,64", help="embedding dims (model dim = id_dim)")
    parser.add_argument("--profile", default="256x32", help="BATCHxDIM run under cProfile ('' to skip)")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument(
        "--crc-compare",
        default="256x32",
        help="BATCHxDIM rerun with kafka-python's pure-Python CRC-32C, for the ratio ('' to skip)",
    )
    parser.add_argument("--exit-when-idle", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="per grid point")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    # A grid point, in its own process (internal).
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--topic-prefix", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    parser.add_argument("--max-events", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--python-crc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.point:
        Path(args.result).write_text(json.dumps(run_point(args)))
        return 0

    from tqdm import tqdm

    args.dims = [int(d) for d in args.dims.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    grid = [(b, d) for d in args.dims for b in batches]
    profile = tuple(int(v) for v in args.profile.split("x")) if args.profile else None
    if profile is not None and profile[1] not in args.dims:
        parser.error(f"--profile dim {profile[1]} is not among --dims {args.dims}")
    crc_point = tuple(int(v) for v in args.crc_compare.split("x")) if args.crc_compare else None
    if crc_point is not None and crc_point not in grid:
        parser.error(f"--crc-compare {args.crc_compare} is not a grid point")
    started = time.time()
    load_at_start = os.getloadavg()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="freshtower-bench-") as tmp, broker(args.bootstrap, Path(tmp)) as boot:
        workdir = Path(tmp)
        prepared = prepare(args, boot, workdir)
        raw = {}
        for stage in ("raw", "json", "validate"):
            raw[stage] = raw_consume(boot, prepared["topic_prefix"], prepared["stream_events"], stage)
            print(f"kafka-python alone ({stage}): {raw[stage]['records_per_s']:,.0f} records/s", flush=True)
        bar = tqdm(grid, desc="grid", unit="run")
        for batch, dim in bar:
            bar.set_postfix_str(f"batch {batch} dim {dim}")
            r = child(args, boot, prepared, batch, dim, workdir, profile=False)
            r["ratio_to_raw_consume"] = r["events_per_s"] / raw["raw"]["records_per_s"]
            results.append(r)
            tqdm.write(
                f"batch {batch:>5} dim {dim:>3}: {r['events_per_s']:>8,.0f} events/s, "
                f"{r['examples_per_s']:>7,.0f} clicks/s, SGD p50 {r['sgd_step_p50_ms']:.1f} ms "
                f"p99 {r['sgd_step_p99_ms']:.1f} ms, RSS {r['peak_rss_mb']:.0f} MB, window {r['window_s']:.1f} s, "
                f"x{r['ratio_to_raw_consume']:.2f} of the raw consume rate"
            )
        crc = None
        if crc_point is not None:
            print(f"batch {crc_point[0]} dim {crc_point[1]} again with the pure-Python CRC-32C ...", flush=True)
            slow = child(args, boot, prepared, *crc_point, workdir, profile=False, python_crc=True)
            fast = next(r for r in results if (r["batch_size"], r["dim"]) == crc_point)
            crc = {
                "batch_size": crc_point[0],
                "dim": crc_point[1],
                "c_events_per_s": fast["events_per_s"],
                "python_events_per_s": slow["events_per_s"],
                "speedup": fast["events_per_s"] / slow["events_per_s"],
                "python_run": slow,
            }
            print(
                f"  C {crc['c_events_per_s']:,.0f} vs Python {crc['python_events_per_s']:,.0f} events/s: "
                f"x{crc['speedup']:.2f}"
            )
        profiled = None
        if profile is not None:
            print(f"profiling batch {profile[0]} dim {profile[1]} under cProfile ...", flush=True)
            profiled = child(args, boot, prepared, profile[0], profile[1], workdir, profile=True)
            for row in profiled["profile"]["by_own_time"][:12]:
                print(f"  {row['own_s']:>7.2f} s own {100 * row['own_share']:>5.1f}%  {row['function']}")
    args.out.mkdir(parents=True, exist_ok=True)
    prepared_out = {k: v for k, v in prepared.items() if k != "models"}
    prepared_out["models"] = {str(d): m["config"] for d, m in prepared["models"].items()}
    report = {
        "benchmark": "stream_throughput",
        "what": "sustained events/s from Kafka through incremental SGD (one worker process, all partitions)",
        "window": "first applied event -> last applied event; start-up and the idle tail excluded",
        "config": {
            "events_requested": args.events,
            "events_per_point": args.events_per_point or "whole stream",
            "profile_events": args.profile_events,
            "batch_sizes": batches,
            "dims": args.dims,
            "torch_threads": 1,
            "worker_defaults": "checkpoint every 2 s with fsync, expire every 50 batches, logQ on, last-N 20",
            "exit_when_idle_s": args.exit_when_idle,
            "seed": args.seed,
        },
        "stream": prepared_out,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
            "broker": "same machine" if not args.bootstrap else args.bootstrap,
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_runtime_s": round(time.time() - started, 1),
        "raw_consume": raw,
        "results": results,
        "crc32c_compare": crc,
        "profile": profiled,
    }
    (args.out / "stream_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, prepared, args.out / "stream_throughput.png", raw)
    print(
        f"wrote {args.out / 'stream_throughput.json'} and {args.out / 'stream_throughput.png'} "
        f"in {report['total_runtime_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
