"""The item path's delay: a gradient sent to ``item-grads`` -> its row committed in ``item-rows``, seen by a worker.

A real broker (``deploy/kafka/kafka.sh`` on free ports, as the other benches), an untrained model version
registered from a small synthetic world's first day (as ``tests/worker_fixtures.py``; dim 32), and, per grid
point, K real item owners (``python -m streaming item-owner``, one process each, their own consumer group, fresh
``item-grads``/``item-rows`` topics of 4 partitions). Per point:

* **load**: a child process sends gradient records of the world's known items at ``--rates`` records/s for
  ``--load-s`` seconds, as workers' batches would: every ``--tick-ms`` one batch of distinct items (uniform over
  the vocabulary, 1-3 uses, a dim-32 gradient), then ``flush()``, as a worker does at a checkpoint;
* **probes**: every ``--probe-ms`` the bench sends one gradient of a fresh item id (``probe-<n>``, 2 uses: admitted
  at once, so the owner writes its row in the step that applies it) and stamps it when the send's future
  completes (the broker has it);
* **mirror**: a ``read_committed`` consumer (no group, every ``item-rows`` partition assigned, as a worker's
  :class:`~streaming.item_rows.RowsMirror` would follow the topic) stamps the first time the probe's row
  (``t:item:probe-<n>``) is returned to it. Delay = seen - acknowledged. The mirror stands for every worker: each
  follows the same committed records, so a row one reader sees is committed for all of them.

A sampler polls the owner group's committed offsets on ``item-grads`` and the topic's end offsets every 0.5 s:
applied gradient records/s during the load, the lag when the load stops and how long the owners took to drain it.
The owners exit ``--exit-when-idle`` seconds after the last gradient and print their ``OwnerStats`` as JSON:
steps (one Kafka transaction each), gradient records and rows sent, hence records per step and steps/s.

Each probe's delay is also split at the row record's timestamp (CreateTime, set by the owner's ``send()`` of the
row inside the step that applied the probe): acknowledged -> row sent (the owner's poll, the records ahead of it,
the apply) and row sent -> seen (the step's other rows, its offsets and commit, the markers, the reader's fetch).
When the owners do not keep up, the first part grows with the backlog for as long as the load lasts: those
points say what the owners' capacity is, not a delay that would settle.

Two more points: a probes-only baseline with 1 owner (``--baseline-s``), the path's delay with nothing else in it;
and one point rerun with its owners under cProfile (``--profile``, default 1 owner at 10,000/s): the cumulative
time of the step's parts (poll, apply, row sends, the transaction calls) and the top functions by own time go
into the JSON (cProfile slows the Python code down: its rates are not results, its shares are).

Before the load starts a keep-alive sends one gradient per partition every 0.5 s, so that no owner sees its
partitions idle for ``--exit-when-idle`` seconds while the group forms.

Writes ``bench/results/item_path_latency.json`` and ``.png``.

    .venv/bin/python bench/item_path_latency.py [--owners 1,2] [--rates 2000,5000,10000] [--load-s 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from stream_throughput import broker  # noqa: E402  (bench/ is the script's directory)

from streaming.item_rows import MODEL_HEADER, ROW_PREFIX, Gradient, encode_gradient, partition_of  # noqa: E402
from streaming.settings import KafkaSettings  # noqa: E402

DIM = 32
PARTITIONS = 4
PROBE_PREFIX = "probe-"
VERSION = "v1"


# ---------------------------------------------------------------------------------------------- set-up
def register(workdir: Path, seed: int, items: int) -> tuple[Path, list[str]]:
    """An untrained dim-32 model version whose vocabularies come from a synthetic world's first day."""
    from streaming.sources.synthetic import SyntheticWorld, WorldConfig
    from trainer.artifact import make_version, save_version
    from trainer.dataset import Dataset
    from trainer.features import FeatureEncoder
    from trainer.model import ModelConfig, TwoTowerModel
    from trainer.registry import Registry

    config = WorldConfig(seed=seed, n_users=2000, n_items=items, days=1.0, requests_per_day=8000)
    day_one = list(SyntheticWorld(config).events())
    dataset = Dataset.from_events(day_one)
    encoder = FeatureEncoder.fit(dataset)
    model = TwoTowerModel(encoder, ModelConfig(dim=DIM, id_dim=DIM, embedding_dim=16, hidden=(64,)))
    cutoff = int(dataset.clicks.ts_ms.max())
    version = make_version(
        model,
        encoder,
        dataset.items,
        version_id=VERSION,
        parent=None,
        data_range=(0, cutoff + 1),
        data_cutoff_ms=cutoff,
    )
    registry = Registry(workdir / "models")
    with registry.new_version(VERSION) as staging:
        save_version(staging, version)
    registry.promote(VERSION)
    return registry.root, list(encoder.item_vocab.tokens)


def start_owner(
    boot: str, prefix: str, group: str, models: Path, workdir: Path, name: str, idle_s: float, profile: Path | None
):
    under = [sys.executable] if profile is None else [sys.executable, "-m", "cProfile", "-o", str(profile)]
    command = [
        *under, "-m", "streaming", "item-owner", "--bootstrap", boot, "--topic-prefix", prefix,
        "--models", str(models), "--state-dir", str(workdir / f"state-{name}"), "--group", group,
        "--instance-id", name, "--session-timeout-ms", "6000", "--exit-when-idle", str(idle_s), "--metrics-port", "0",
    ]  # fmt: skip
    out = open(workdir / f"{name}.out", "w")  # noqa: SIM115 (closed with the process)
    err = open(workdir / f"{name}.log", "w")  # noqa: SIM115
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)


def owned(workdir: Path, name: str) -> int:
    """Partitions the owner last logged owning (its restore is done by then); -1 before the first such line."""
    path = workdir / f"{name}.log"
    lines = (
        [line for line in path.read_text().splitlines() if "owning item partitions" in line] if path.exists() else []
    )
    if not lines:
        return -1
    inside = lines[-1].split("[", 1)[1].split("]", 1)[0].strip()
    return inside.count(",") + 1 if inside else 0


# ---------------------------------------------------------------------------------------------- the load (a child)
def run_load(args: argparse.Namespace) -> dict:
    """In a child process: ``rate`` gradient records/s for ``load_s`` seconds, one flushed batch per tick."""
    from kafka import KafkaProducer

    kafka = KafkaSettings(bootstrap_servers=args.bootstrap, topic_prefix=args.topic_prefix)
    topic = kafka.topic("item-grads")
    items = json.loads(Path(args.items_file).read_text())
    keys = [i.encode() for i in items]
    rng = np.random.default_rng(args.seed)
    # A pool of encoded gradients (the ts_ms inside is the load's start: the owner only uses it for expiry).
    now_ms = int(time.time() * 1000)
    pool = [
        encode_gradient(Gradient("", now_ms, int(rng.integers(1, 4)), rng.normal(0, 0.01, DIM).astype(np.float32)))
        for _ in range(4096)
    ]
    header = [(MODEL_HEADER, VERSION.encode())]
    producer = KafkaProducer(**kafka.producer_config(), client_id="bench-load", linger_ms=5)
    tick = args.tick_ms / 1000
    per_tick = max(1, round(args.rate * tick))
    sent, late, flush_s = 0, 0, []
    start = time.time()
    next_tick = start
    k = 0
    while time.time() - start < args.load_s:
        for idx in rng.choice(len(keys), size=min(per_tick, len(keys)), replace=False):
            producer.send(topic, key=keys[idx], value=pool[k & 4095], headers=header)
            k += 1
        t0 = time.time()
        producer.flush()
        flush_s.append(time.time() - t0)
        sent += min(per_tick, len(keys))
        next_tick += tick
        pause = next_tick - time.time()
        if pause > 0:
            time.sleep(pause)
        else:
            late += 1
    end = time.time()
    producer.close()
    return {
        "sent": sent,
        "start": start,
        "end": end,
        "rate_target": args.rate,
        "rate_achieved": sent / (end - start),
        "ticks": len(flush_s),
        "ticks_late": late,
        "records_per_tick": per_tick,
        "flush_p50_ms": 1000 * float(np.percentile(flush_s, 50)),
        "flush_p99_ms": 1000 * float(np.percentile(flush_s, 99)),
    }


# ---------------------------------------------------------------------------------------------- one grid point
class Point:
    """Probes, the mirror and the offsets sampler of one grid point (threads of the bench process)."""

    def __init__(self, boot: str, prefix: str, group: str, probe_ms: float) -> None:
        from kafka import KafkaConsumer, KafkaProducer, TopicPartition
        from kafka.admin import KafkaAdminClient

        self.kafka = KafkaSettings(bootstrap_servers=boot, topic_prefix=prefix)
        self.group = group
        self.probe_s = probe_ms / 1000
        self.grads = self.kafka.topic("item-grads")
        self.rows = self.kafka.topic("item-rows")
        self.stop_probes = threading.Event()
        self.stop_all = threading.Event()
        self.sent: dict[str, tuple[float, float]] = {}  # probe id -> (before send, acknowledged), monotonic
        self.seen: dict[str, float] = {}
        # The split of each delay: the row record's timestamp (CreateTime: the owner's send() of the row, inside
        # the step that applied the probe) against the wall times of the acknowledgement and of the first read.
        self.acked_wall: dict[str, float] = {}
        self.seen_wall: dict[str, float] = {}
        self.row_ms: dict[str, int] = {}
        self.mirror_records = 0
        self.samples: list[tuple[float, int, int]] = []  # (wall time, committed, end offsets), summed
        self._producer = KafkaProducer(**self.kafka.producer_config(), client_id="bench-probe", linger_ms=0)
        self._mirror = KafkaConsumer(
            group_id=None, isolation_level="read_committed", client_id="bench-mirror", **self.kafka.client_config()
        )
        tps = [TopicPartition(self.rows, p) for p in range(PARTITIONS)]
        self._mirror.assign(tps)
        self._mirror.seek_to_beginning(*tps)  # fresh topic: the beginning is its end
        self._ends = KafkaConsumer(group_id=None, client_id="bench-ends", **self.kafka.client_config())
        self._grad_tps = [TopicPartition(self.grads, p) for p in range(PARTITIONS)]
        self._admin = KafkaAdminClient(client_id="bench-admin", **self.kafka.client_config())
        self._threads = [
            threading.Thread(target=self._probe_loop, daemon=True),
            threading.Thread(target=self._mirror_loop, daemon=True),
            threading.Thread(target=self._sample_loop, daemon=True),
        ]
        self.probing = threading.Event()

    def send(self, item: str) -> tuple[float, float]:
        """Send one gradient of ``item``; (monotonic, wall) time of the broker's acknowledgement, stamped in the
        producer's I/O thread as the response is handled (the caller may be scheduled later on a busy machine)."""
        ts = int(time.time() * 1000)
        value = encode_gradient(Gradient(item, ts, 2, np.full(DIM, 0.01, dtype=np.float32)))
        stamp: list[tuple[float, float]] = []
        acked = threading.Event()

        def on_ack(_metadata) -> None:
            stamp.append((time.monotonic(), time.time()))
            acked.set()

        future = self._producer.send(self.grads, key=item.encode(), value=value, headers=[(MODEL_HEADER, b"v1")])
        future.add_callback(on_ack)
        future.get(timeout=30)
        acked.wait(5)
        return stamp[0] if stamp else (time.monotonic(), time.time())

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _probe_loop(self) -> None:
        n = 0
        nxt = time.monotonic()
        while not self.stop_probes.is_set():
            if self.probing.is_set():
                item = f"{PROBE_PREFIX}{n}"
                before = time.monotonic()
                acked, self.acked_wall[item] = self.send(item)
                self.sent[item] = (before, acked)
                n += 1
            nxt += self.probe_s
            time.sleep(max(0.0, nxt - time.monotonic()))

    def _mirror_loop(self) -> None:
        prefix = ROW_PREFIX + PROBE_PREFIX.encode()
        while not self.stop_all.is_set():
            for batch in self._mirror.poll(timeout_ms=100).values():
                now, wall = time.monotonic(), time.time()
                self.mirror_records += len(batch)
                for r in batch:
                    if r.key.startswith(prefix) and r.value is not None:
                        item = r.key[len(ROW_PREFIX) :].decode()
                        if item not in self.seen:
                            self.seen[item] = now
                            self.seen_wall[item] = wall
                            self.row_ms[item] = r.timestamp

    def progress(self) -> tuple[int, int]:
        """(gradient records the owner group has committed, records in item-grads), over every partition."""
        offsets = self._admin.list_group_offsets(self.group).get(self.group, {})
        committed = sum(o.offset for tp, o in offsets.items() if tp.topic == self.grads and o.offset > 0)
        return committed, sum(self._ends.end_offsets(self._grad_tps).values())

    def _sample_loop(self) -> None:
        while not self.stop_all.is_set():
            try:
                committed, end = self.progress()
                self.samples.append((time.time(), committed, end))
            except Exception:  # a sample more or less: the next one is 0.5 s away
                pass
            self.stop_all.wait(0.5)

    def close(self) -> None:
        self.stop_probes.set()
        self.stop_all.set()
        for t in self._threads:
            t.join(10)
        self._producer.close()
        self._mirror.close()
        self._ends.close()
        self._admin.close()


def run_point(
    args, boot: str, models: Path, items: list[str], workdir: Path, k: int, rate: int, load_s: float, bar, profile=False
) -> dict:
    """K owners, ``rate`` gradient records/s for ``load_s`` (0: probes only), probes all along the load."""
    from streaming.topics import ITEM_PATH_TOPICS, ensure_topics

    tag = f"k{k}-r{rate}{'-profile' if profile else ''}"
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    group = f"bench-owner-{tag}-{uuid.uuid4().hex[:6]}"
    kafka = KafkaSettings(bootstrap_servers=boot, topic_prefix=prefix, partitions=PARTITIONS)
    ensure_topics(kafka, names=ITEM_PATH_TOPICS)
    point = Point(boot, prefix, group, args.probe_ms)
    point.start()
    names = [f"{tag}-o{j}" for j in range(k)]
    t_start = time.time()
    profiles = {n: (workdir / f"{n}.prof" if profile else None) for n in names}
    owners = [start_owner(boot, prefix, group, models, workdir, n, args.exit_when_idle, profiles[n]) for n in names]
    # Keep-alive: one known item per partition every 0.5 s until every owner holds its share.
    per_partition = {}
    for item in items:
        per_partition.setdefault(partition_of(item, PARTITIONS), item)
    deadline = time.monotonic() + 120
    while not all(owned(workdir, n) == PARTITIONS // k for n in names):
        if time.monotonic() > deadline or any(o.poll() is not None for o in owners):
            raise RuntimeError(f"{tag}: owners did not take their partitions: {[owned(workdir, n) for n in names]}")
        for item in per_partition.values():
            point.send(item)
        bar.set_postfix_str(f"{tag}: owners joining, own {[owned(workdir, n) for n in names]}")
        time.sleep(0.5)
    ready_s = time.time() - t_start
    bar.set_postfix_str(f"{tag}: load {rate:,}/s")
    point.probing.set()
    load_out = workdir / f"{tag}-load.json"
    if rate:
        subprocess.run(
            [sys.executable, __file__, "--load", "--bootstrap", boot, "--topic-prefix", prefix, "--rate", str(rate),
             "--load-s", str(load_s), "--tick-ms", str(args.tick_ms), "--items-file", str(workdir / "items.json"),
             "--result", str(load_out), "--seed", str(args.seed + rate + k)],
            check=True, timeout=load_s + 120,
        )  # fmt: skip
    else:  # probes only: the path's delay with nothing else in it
        start = time.time()
        time.sleep(load_s)
        end = time.time()
        load_out.write_text(
            json.dumps({"sent": 0, "start": start, "end": end, "rate_target": 0, "rate_achieved": 0.0,
                        "ticks": 0, "ticks_late": 0, "records_per_tick": 0})
        )  # fmt: skip
    point.probing.clear()
    load_end_mono = time.monotonic()
    load_result = json.loads(load_out.read_text())
    bar.set_postfix_str(f"{tag}: draining")
    codes = []
    for o in owners:
        try:
            codes.append(o.wait(args.drain_timeout))
        except subprocess.TimeoutExpired:
            o.terminate()
            codes.append(o.wait(30))
    # Probes sent last may still be on their way to the mirror when the owners have exited.
    wait_until = time.monotonic() + 5
    while len(point.seen) < len(point.sent) and time.monotonic() < wait_until:
        time.sleep(0.1)
    point.close()
    stats = []
    for n in names:
        lines = [line for line in (workdir / f"{n}.out").read_text().splitlines() if line.startswith("{")]
        stats.append(json.loads(lines[-1]) if lines else None)
    result = summarize(tag, k, rate, point, load_result, stats, codes, ready_s, load_end_mono)
    result["load_average_after"] = os.getloadavg()
    if profile:
        result["profile"] = {n: hot_spots(path) for n, path in profiles.items() if path.exists()}
    return result


PROFILED = (
    r"item_owner.py:.*\(step\)",
    r"item_owner.py:.*\(_apply\)",
    r"kafka/consumer/group.py:.*\(poll\)",
    r"kafka/producer/kafka.py:.*\(send\)",
    r"\(begin_transaction\)",
    r"\(send_offsets_to_transaction\)",
    r"\(commit_transaction\)",
    r"item_rows.py:.*\(partition_of\)",
    r"item_rows.py:.*\(decode_gradient\)",
    r"item_rows.py:.*\(apply_gradient\)",
    r"tables.py:.*\(observe\)",
    r"tables.py:.*\(gather\)",
    r"tables.py:.*\(apply_gradients\)",
    r"tables.py:.*\(flush\)",
    r"state.py:.*\(staged\)",
    r"state.py:.*\(checkpoint\)",
)


def hot_spots(path: Path, top: int = 20) -> dict:
    """An owner's cProfile: the top functions by own time, and the cumulative time of the step's parts."""
    import pstats
    import re

    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    entries = []
    for (filename, line, name), (_, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        short = filename.replace(str(REPO) + "/", "").split("site-packages/")[-1]
        entries.append(
            {"function": f"{short}:{line}({name})", "calls": nc, "own_s": round(tt, 3), "cum_s": round(ct, 3)}
        )
    parts = {}
    for pattern in PROFILED:
        hits = [e for e in entries if re.search(pattern, e["function"])]
        if hits:
            best = max(hits, key=lambda e: e["cum_s"])
            parts[best["function"]] = {"calls": best["calls"], "cum_s": best["cum_s"]}
    entries.sort(key=lambda e: e["own_s"], reverse=True)
    return {"total_s": round(total, 3), "by_own_time": entries[:top], "parts": parts}


def summarize(tag, k, rate, point: Point, load: dict, stats: list, codes: list, ready_s: float, load_end_mono) -> dict:
    delays = np.asarray(
        sorted(1000 * (point.seen[i] - acked) for i, (_, acked) in point.sent.items() if i in point.seen)
    )
    send_ms = np.asarray([1000 * (acked - before) for before, acked in point.sent.values()])
    missing = sorted(set(point.sent) - set(point.seen))
    both = [i for i in point.sent if i in point.seen and i in point.acked_wall]
    to_row = np.asarray([point.row_ms[i] - 1000 * point.acked_wall[i] for i in both])
    to_reader = np.asarray([1000 * point.seen_wall[i] - point.row_ms[i] for i in both])

    def split(values: np.ndarray) -> dict | None:
        if not len(values):
            return None
        return {q: round(float(np.percentile(values, v)), 1) for q, v in (("p50", 50), ("p90", 90), ("p99", 99))}

    during = [i for i, (_, acked) in point.sent.items() if acked <= load_end_mono and i in point.seen]
    samples = np.asarray(point.samples, dtype=float)  # wall, committed, end

    def at(wall: float) -> tuple[float, float]:
        j = int(np.searchsorted(samples[:, 0], wall))
        j = min(max(j, 0), len(samples) - 1)
        return samples[j, 1], samples[j, 2]

    c0, _ = at(load["start"])
    c1, e1 = at(load["end"])
    drained = [s[0] for s in samples if s[0] >= load["end"] and s[1] >= s[2]]
    drain_s = (drained[0] - load["end"]) if drained else None
    steps = sum(s["steps"] for s in stats if s)
    gradients = sum(s["gradients"] for s in stats if s)
    rows_sent = sum(s["rows_sent"] for s in stats if s)
    busy_s = load["end"] - load["start"] + (drain_s or 0.0)
    pct = (lambda q: float(np.percentile(delays, q))) if len(delays) else (lambda q: None)
    return {
        "point": tag,
        "owners": k,
        "rate_target": rate,
        "load": load,
        "owners_ready_s": round(ready_s, 2),
        "probes_sent": len(point.sent),
        "probes_seen": len(delays),
        "probes_missing": missing[:20],
        "probe_send_ack_p50_ms": float(np.percentile(send_ms, 50)) if len(send_ms) else None,
        "delay_ms": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "max": float(delays.max()) if len(delays) else None,
            "mean": float(delays.mean()) if len(delays) else None,
        },
        "delays_ms": [round(float(d), 2) for d in delays],
        # acknowledged -> the owner sends the row (poll, queueing behind the records ahead, apply), and
        # row sent -> seen (the rest of the step: its other rows, offsets, commit, the markers, the reader's fetch).
        # From a record timestamp in whole ms: +-1 ms.
        "split_ms": {"ack_to_row_sent": split(to_row), "row_sent_to_seen": split(to_reader)},
        "probes_acked_during_load": len(during),
        "applied_per_s_during_load": (c1 - c0) / (load["end"] - load["start"]),
        "lag_at_load_end": int(e1 - c1),
        "drain_s": round(drain_s, 2) if drain_s is not None else None,
        # Kept up: less than one second of load still uncommitted when the load stopped.
        "kept_up": bool(e1 - c1 < max(rate, 100)),
        "owner_stats": stats,
        "owner_exit_codes": codes,
        "steps": steps,
        "gradients_applied": gradients,
        "rows_sent": rows_sent,
        "records_per_step": gradients / steps if steps else None,
        "rows_per_step": rows_sent / steps if steps else None,
        "steps_per_s": steps / busy_s if busy_s > 0 else None,
        "steps_per_s_per_owner": steps / busy_s / k if busy_s > 0 else None,
        "gradients_per_s_over_load_and_drain": gradients / busy_s if busy_s > 0 else None,
        "mirror_records": point.mirror_records,
        "offsets_samples": [[round(s[0] - load["start"], 2), int(s[1]), int(s[2])] for s in point.samples],
    }


# ---------------------------------------------------------------------------------------------- report
def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    rates = sorted({r["rate_target"] for r in results})
    colors = {rate: plt.get_cmap("viridis")(k / max(1, len(rates) - 1) * 0.85) for k, rate in enumerate(rates)}
    for r in results:
        style = {"color": colors[r["rate_target"]], "linestyle": "-" if r["owners"] == 1 else "--"}
        d = np.asarray(r["delays_ms"])
        if len(d):
            label = f"{r['owners']} owner{'s' if r['owners'] > 1 else ''}, {r['rate_target']:,}/s: p50 "
            label += f"{r['delay_ms']['p50']:.0f} ms, p99 {r['delay_ms']['p99']:.0f} ms"
            ax1.plot(d, np.arange(1, len(d) + 1) / len(d), label=label, **style)
        s = np.asarray(r["offsets_samples"], dtype=float)
        if len(s):
            ax2.plot(s[:, 0], s[:, 2] - s[:, 1], label=f"{r['owners']} owner(s), {r['rate_target']:,}/s", **style)
    ax1.set_xscale("log")
    ax1.set_xlim(left=1)
    ax1.set_xlabel("gradient acknowledged -> row seen by a read_committed reader (ms)")
    ax1.set_ylabel("fraction of probes")
    ax1.set_title("item-path delay (CDF)", fontsize=10)
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7, loc="lower right")
    ax2.set_xlabel("seconds since the load started")
    ax2.set_ylabel("gradient records not yet committed by the owners")
    ax2.set_title("owner lag on item-grads", fontsize=10)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--owners", default="1,2", help="owner processes per point")
    parser.add_argument("--rates", default="2000,5000,10000", help="gradient records/s of the load")
    parser.add_argument("--load-s", type=float, default=20.0, help="seconds of load per point")
    parser.add_argument("--tick-ms", type=float, default=50.0, help="one flushed batch of gradients per tick")
    parser.add_argument("--probe-ms", type=float, default=100.0, help="one probe gradient per this many ms")
    parser.add_argument("--baseline-s", type=float, default=10.0, help="a probes-only point with 1 owner (0: none)")
    parser.add_argument("--profile", default="1x10000", help="KxRATE point rerun with owners under cProfile ('': none)")
    parser.add_argument("--profile-load-s", type=float, default=10.0)
    parser.add_argument("--exit-when-idle", type=float, default=4.0, help="owners exit after this long idle")
    parser.add_argument("--drain-timeout", type=float, default=90.0, help="owners are stopped after this long")
    parser.add_argument("--items", type=int, default=3000, help="items of the synthetic world")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    # The load, in its own process (internal).
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--topic-prefix", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--items-file", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        Path(args.result).write_text(json.dumps(run_load(args)))
        return 0

    from tqdm import tqdm

    owners = [int(v) for v in args.owners.split(",")]
    rates = [int(v) for v in args.rates.split(",")]
    if any(PARTITIONS % k for k in owners):
        parser.error(f"owner counts must divide the {PARTITIONS} partitions")
    grid = [(k, r, args.load_s, False) for k in owners for r in rates]
    if args.baseline_s:
        grid.insert(0, (1, 0, args.baseline_s, False))
    if args.profile:
        k, r = (int(v) for v in args.profile.split("x"))
        grid.append((k, r, args.profile_load_s, True))
    started = time.time()
    load_at_start = os.getloadavg()
    results, profiled = [], None
    with tempfile.TemporaryDirectory(prefix="freshtower-bench-") as tmp, broker(args.bootstrap, Path(tmp)) as boot:
        workdir = Path(tmp)
        models, items = register(workdir, args.seed, args.items)
        (workdir / "items.json").write_text(json.dumps(items))
        print(f"model v1: dim {DIM}, {len(items):,} known items; broker {boot}", flush=True)
        bar = tqdm(grid, desc="points", unit="point")
        for k, rate, load_s, profile in bar:
            r = run_point(args, boot, models, items, workdir, k, rate, load_s, bar, profile=profile)
            if profile:
                profiled = r
                for name, prof in r["profile"].items():
                    tqdm.write(f"{name} under cProfile ({prof['total_s']:.1f} s profiled): " + ", ".join(
                        f"{f.split('(')[-1].rstrip(')')} {v['cum_s']:.1f} s/{v['calls']}" for f, v in prof["parts"].items()
                    ))  # fmt: skip
                continue
            results.append(r)
            d = r["delay_ms"]
            tqdm.write(
                f"{k} owner(s) {rate:>6,}/s (sent {r['load']['rate_achieved']:,.0f}/s): delay p50 {d['p50']:.0f} "
                f"p90 {d['p90']:.0f} p99 {d['p99']:.0f} max {d['max']:.0f} ms over {r['probes_seen']} probes; "
                f"applied {r['applied_per_s_during_load']:,.0f}/s, lag at end {r['lag_at_load_end']:,}, "
                f"drain {r['drain_s']} s; {r['steps']} steps, {r['records_per_step'] or 0:.0f} records/step, "
                f"{r['steps_per_s_per_owner'] or 0:.1f} steps/s per owner; split {r['split_ms']}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "item_path_latency",
        "what": "gradient acknowledged by the broker -> its row committed in item-rows and returned to a "
        "read_committed reader, under a steady gradient load, with K item-owner processes",
        "command": " ".join(["python bench/item_path_latency.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {
            "baseline_s": args.baseline_s,
            "profile": args.profile,
            "profile_load_s": args.profile_load_s,
            "owners": owners,
            "rates": rates,
            "load_s": args.load_s,
            "tick_ms": args.tick_ms,
            "probe_ms": args.probe_ms,
            "exit_when_idle_s": args.exit_when_idle,
            "partitions": PARTITIONS,
            "dim": DIM,
            "known_items": len(items),
            "owner_settings": "defaults (poll_ms 200, min_count 2, lr 0.05, transaction_timeout_ms 10000), "
            "session_timeout_ms 6000",
            "load": "uniform distinct known items per tick, uses 1-3, N(0, 0.01) dim-32 gradients, flush per tick, "
            "linger_ms 5",
            "probe": "fresh id, uses 2 (admitted at once), own producer with linger_ms 0; stamped when acked",
            "mirror": "KafkaConsumer read_committed, group_id None, all item-rows partitions assigned, "
            "kafka-python fetch defaults",
        },
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
        "results": results,
        "profiled_point": profiled,
    }
    (args.out / "item_path_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "item_path_latency.png")
    print(f"wrote {args.out / 'item_path_latency.json'} and .png in {report['total_runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
