"""Freshness end to end on a live stream, in wall-clock time: a click produced -> learnt -> in the store -> served.

A real broker (``deploy/kafka/kafka.sh`` on free ports), an untrained model version registered from a small
synthetic world's first day, and the real processes, each in its own process with its default settings: the
worker, the publisher (``--interval`` 1 s, 10 s, 60 s in turn, each with a fresh worker state and store) and
serving. While they run, a producer sends a click every ``--every-s`` seconds, each by another user known to
the model, on an item that user has not clicked, stamped with the wall time right after the broker
acknowledged it. The bench follows every sampled click through three stages, polling every 50 ms:

* **learnt**: the worker's checkpoint (a RocksDB secondary of its state) holds the click in the user's last-N
  and the user's ID row has moved: SGD ran on it and the result is durable;
* **in the store**: the publisher's store (a RocksDB secondary, as a serving process reads it) holds the click
  in the user's published last-N and a moved ID row;
* **served**: a ``GET /recommend`` for that user answers under a publish version at or after the one that
  first held the click.

Each stage's latency is (first time seen) - (produce time); p50, p99 and max per interval go to
``bench/results/freshness_e2e.json`` with a plot. The worker trains a partial batch once it has read
everything and its oldest click has waited ``max_batch_delay_s`` (0.5 s), and checkpoints every 0.5 s; the
publisher publishes every interval; serving swaps in a new version within its 0.2 s refresh.

With ``--tuned CHECKPOINT_S,DELAY_S`` (default ``2,1``, the worker's defaults before they were lowered to 0.5 s
each) one more run repeats the first interval with those two settings, to show what they cost.

    .venv/bin/python bench/freshness_e2e.py [--intervals 1,10,60] [--durations 30,45,150] [--every-s 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from stream_throughput import _free_port as free_port  # noqa: E402  (bench/ is the script's directory)
from stream_throughput import broker  # noqa: E402

from publisher.store import RocksSecondary  # noqa: E402
from streaming.events import Click, Impression  # noqa: E402
from streaming.producer import EventProducer  # noqa: E402
from streaming.settings import KafkaSettings  # noqa: E402
from streaming.sources.synthetic import SyntheticWorld, WorldConfig  # noqa: E402
from streaming.state import StateStore  # noqa: E402
from streaming.topics import ensure_topics  # noqa: E402

STAGES = ("learnt", "store", "served")


def register_model(root: Path, seed: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """An untrained version whose vocabularies come from a small world's first day; returns each of its users'
    ID row in the version (what "moved" is measured against) and its items."""
    from trainer.artifact import make_version, save_version
    from trainer.dataset import Dataset
    from trainer.features import FeatureEncoder
    from trainer.model import ModelConfig, TwoTowerModel
    from trainer.registry import Registry

    config = WorldConfig(seed=seed, n_users=2000, n_items=1000, days=1.0, requests_per_day=20_000)
    events = list(SyntheticWorld(config).events())
    dataset = Dataset.from_events(events)
    encoder = FeatureEncoder.fit(dataset)
    model = TwoTowerModel(encoder, ModelConfig(dim=32, id_dim=32, embedding_dim=16, hidden=(64,)))
    cutoff = int(dataset.clicks.ts_ms.max())
    version = make_version(
        model, encoder, dataset.items, version_id="v1", parent=None, data_range=(0, cutoff + 1), data_cutoff_ms=cutoff
    )
    registry = Registry(root)
    with registry.new_version("v1") as staging:
        save_version(staging, version)
    registry.promote("v1")
    weight = model.user_tower.id_table.weight.detach().numpy()
    # Vocabulary index k (k >= 1) is row k of the table; row 0 is the default row.
    base = {user: weight[k].copy() for k, user in enumerate(encoder.user_vocab.tokens, start=1)}
    return base, list(encoder.item_vocab.tokens)


@dataclass
class Sample:
    user_id: str
    item_id: str
    produced: float
    seen: dict[str, float] = field(default_factory=dict)
    store_version: int | None = None


def moved(row: np.ndarray, base: np.ndarray) -> bool:
    """The ID row has been trained away from the version's own row."""
    return row.shape == base.shape and not np.allclose(row, base, rtol=0, atol=1e-7)


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def run_interval(
    bootstrap: str, models: Path, base: dict[str, np.ndarray], items: list[str], interval: float, duration: float,
    every_s: float, workdir: Path, rng: np.random.Generator, worker_env: dict[str, str],
) -> dict:  # fmt: skip
    """One publish interval: fresh topics, worker state and store; the sampled clicks' stage latencies."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"fresh-{uuid.uuid4().hex[:6]}.")
    ensure_topics(kafka)
    run = workdir / f"interval-{interval:g}-{uuid.uuid4().hex[:4]}"
    state, store, api = run / "worker", run / "kv", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHTOWER_")}
    env.update(FRESHTOWER_KAFKA_BOOTSTRAP_SERVERS=bootstrap, FRESHTOWER_KAFKA_TOPIC_PREFIX=kafka.topic_prefix)
    env.update(worker_env)
    run.mkdir(parents=True)
    processes = [
        start(["streaming", "worker", "--models", str(models), "--state-dir", str(state), "--metrics-port", "0"],
              env, run / "worker.log"),
    ]  # fmt: skip
    deadline = time.monotonic() + 120
    while not (state / "CURRENT").exists():  # serving reads profiles from the worker's state: it must exist first
        if time.monotonic() > deadline or processes[0].poll() is not None:
            raise RuntimeError(f"the worker did not start:\n{(run / 'worker.log').read_text()[-1500:]}")
        time.sleep(0.1)
    processes += [
        start(["publisher", "run", "--source", "worker", "--worker-state", str(state), "--models", str(models),
               "--store", str(store), "--interval", f"{interval:g}", "--index", "flat", "--metrics-port", "0"],
              env, run / "publisher.log"),
        start(["serving", "run", "--store", str(store), "--models", str(models), "--worker-state", str(state),
               "--port", str(api), "--metrics-port", "0"], env, run / "serving.log"),
    ]  # fmt: skip
    samples: list[Sample] = []
    users = sorted(base)
    try:
        with EventProducer(kafka) as producer:
            # A first click so that the worker checkpoints and the publisher makes the store serving waits for.
            warm = time.time()
            producer.send(Click(users[0], items[0], "warm", int(warm * 1000)))
            producer.flush()
            deadline = time.monotonic() + 120
            while get_json(f"http://127.0.0.1:{api}/readyz") is None:
                if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-1500:]}" for log in sorted(run.glob("*.log")))
                    raise RuntimeError(f"the processes did not get ready:\n{tails}")
                time.sleep(0.2)
            worker_view = StateStore(state, secondary=run / "worker-secondary")
            store_view = RocksSecondary(store, run / "kv-secondary")
            order = rng.permutation(len(users) - 1) + 1
            started = time.monotonic()
            next_click = started
            while True:
                now = time.monotonic()
                producing = now - started < duration
                if producing and now >= next_click and len(samples) < len(order):
                    user = users[order[len(samples)]]
                    item = items[int(rng.integers(len(items)))]
                    request = f"b{len(samples)}"
                    ts = int(time.time() * 1000)
                    producer.send(Impression(user, item, request, 0, ts - 1))
                    producer.send(Click(user, item, request, ts))
                    producer.flush()
                    samples.append(Sample(user, item, time.time()))
                    next_click += every_s
                pending = [s for s in samples if len(s.seen) < len(STAGES)]
                if not producing and (not pending or now - started > duration + 3 * interval + 30):
                    break
                worker_view.catch_up()
                seen_at = time.time()
                for s in pending:
                    if "learnt" not in s.seen:
                        last = worker_view.get(b"n:" + s.user_id.encode())
                        row = worker_view.get(b"t:user:" + s.user_id.encode())  # a 20-byte header, then the row
                        if (
                            last
                            and row
                            and json.loads(last)[-1:] == [s.item_id]
                            and moved(np.frombuffer(row, dtype=np.float32, offset=20), base[s.user_id])
                        ):
                            s.seen["learnt"] = seen_at
                with store_view.reader() as view:
                    version = view.version()
                    for s in pending:
                        if "store" not in s.seen:
                            published = view.user(s.user_id)
                            if (
                                published is not None
                                and published.last_n[-1:] == (s.item_id,)
                                and moved(published.vector, base[s.user_id])
                            ):
                                s.seen["store"], s.store_version = seen_at, version
                waiting = [s for s in pending if s.store_version is not None and "served" not in s.seen]
                if waiting:
                    answer = get_json(f"http://127.0.0.1:{api}/recommend?user_id={waiting[0].user_id}&k=20")
                    if answer is not None:
                        served_at, served_version = time.time(), int(answer["publish_version"])
                        for s in waiting:
                            if served_version >= s.store_version:
                                s.seen["served"] = served_at
                time.sleep(0.05)
            worker_view.close()
            store_view.close()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    out: dict = {"interval_s": interval, "duration_s": duration, "samples": len(samples), "stages": {}}
    for stage in STAGES:
        delays = np.array([s.seen[stage] - s.produced for s in samples if stage in s.seen])
        out["stages"][stage] = {
            "n": int(len(delays)),
            "missing": len(samples) - int(len(delays)),
            **(
                {
                    "p50_s": float(np.percentile(delays, 50)),
                    "p99_s": float(np.percentile(delays, 99)),
                    "max_s": float(delays.max()),
                    "delays_s": [round(float(d), 3) for d in delays],
                }
                if len(delays)
                else {}
            ),
        }
    return out


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        data = [result["stages"][s].get("delays_s", []) for s in STAGES]
        ax.boxplot(data, whis=(1, 99), showfliers=True)
        ax.set_xticks(range(1, len(STAGES) + 1), ["learnt +\ncheckpointed", "in the\nKV store", "served"])
        env = result.get("worker_env") or {}
        tuned = (
            f", checkpoint {env['FRESHTOWER_WORKER_CHECKPOINT_INTERVAL_S']} s, delay {env['FRESHTOWER_WORKER_MAX_BATCH_DELAY_S']} s"
            if env
            else ""
        )
        ax.set_title(f"publish every {result['interval_s']:g} s{tuned} ({result['samples']} clicks)", fontsize=10)
        ax.set_ylabel("seconds after the click was produced")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Freshness end to end on a live stream (box 25-75%, whiskers p1-p99)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--intervals", default="1,10,60", help="publish intervals in seconds")
    parser.add_argument("--durations", default="30,45,150", help="seconds of clicks per interval")
    parser.add_argument("--every-s", type=float, default=0.5, help="seconds between sampled clicks")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--tuned",
        default="2,1",
        help="CHECKPOINT_S,DELAY_S: one more run at the first interval with the worker checkpointing every CHECKPOINT_S "
        "and training a partial batch after DELAY_S ('' to skip)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    intervals = [float(v) for v in args.intervals.split(",")]
    durations = [float(v) for v in args.durations.split(",")]
    if len(intervals) != len(durations):
        parser.error("--intervals and --durations need as many values each")
    rng = np.random.default_rng(args.seed)
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="freshtower-fresh-") as tmp, broker(None, Path(tmp)) as bootstrap:
        base, items = register_model(Path(tmp) / "models", args.seed)
        runs = [(interval, duration, {}) for interval, duration in zip(intervals, durations, strict=True)]
        if args.tuned:
            checkpoint_s, delay_s = args.tuned.split(",")
            tuned = {
                "FRESHTOWER_WORKER_CHECKPOINT_INTERVAL_S": checkpoint_s,
                "FRESHTOWER_WORKER_MAX_BATCH_DELAY_S": delay_s,
            }
            runs.append((intervals[0], durations[0], tuned))
        for interval, duration, worker_env in runs:
            label = f", worker {worker_env}" if worker_env else ""
            print(f"publish interval {interval:g} s{label}: {duration:g} s of clicks ...", flush=True)
            result = run_interval(
                bootstrap, Path(tmp) / "models", base, items, interval, duration, args.every_s, Path(tmp), rng,
                worker_env,
            )  # fmt: skip
            result["worker_env"] = worker_env
            results.append(result)
            for stage in STAGES:
                r = result["stages"][stage]
                figures = f"p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, max {r['max_s']:.2f} s" if r["n"] else ""
                print(f"  {stage:>7}: {r['n']} of {result['samples']} {figures}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "freshness_e2e",
        "what": "wall time from a click produced to: learnt and checkpointed by the worker; in the KV store; served",
        "settings": "worker, publisher and serving defaults (max_batch_delay_s 0.5, checkpoint every 0.5 s, batch 256)",
        "every_s": args.every_s,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_runtime_s": round(time.time() - started, 1),
        "results": results,
    }
    (args.out / "freshness_e2e.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "freshness_e2e.png")
    print(f"wrote {args.out / 'freshness_e2e.json'} and .png in {report['total_runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
