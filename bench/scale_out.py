"""Scale-out: events/s with 1 and 2 worker processes, and the item path's delay with 2 workers running.

A real broker (``deploy/kafka/kafka.sh`` on free ports, as the other benches; 4 partitions per topic), a synthetic
world (:mod:`streaming.sources.synthetic`, as ``bench/stream_throughput.py`` sizes it) whose day one gives the
vocabularies of an untrained model version registered with the default ``ModelConfig`` (dim 32, id_dim 32,
embedding_dim 16, one hidden layer of 128: the same as stream_throughput's dim-32 model), and day two the stream.
Every worker is a real ``python -m streaming worker`` process with the worker's default settings (batch 64,
checkpoint every 0.5 s with fsync, session timeout 15 s), torch on one thread (``OMP_NUM_THREADS=1``).

**Throughput (backlog).** Day two is produced into fresh topics before any worker starts. Then, each with its own
consumer group and state directories:

* ``1 local``: one plain worker (``user_state = "local"``, item rows trained in the process): the reference;
* ``1 changelog``: one worker with ``--user-state changelog --own-items`` (each checkpoint one Kafka transaction
  of user-state changelog records, item gradients and the group's offsets; the item-owner role in the same
  process, group ``<G>-item-owner``);
* ``2 changelog``: two such processes in one group, started together.

``1 local`` and ``1 changelog`` read the same topics (the local worker writes nothing to ``user-state``,
``item-grads`` or ``item-rows``, so the changelog worker restores nothing); ``2 changelog`` reads its own copy of
the stream under another topic prefix, so that it does not restore the first changelog run's state.

Every 0.5 s a sampler reads the group's committed offsets on ``users``, ``impressions`` and ``clicks`` (the
admin API: offsets a transaction commits count once it has committed) against the topics' end offsets, and
each process's ``VmHWM`` (peak RSS) from ``/proc``. Per point: the **steady rate**, committed events / s between
the first sample at or past 10% of the stream and the first at or past 90% (and, with 2 workers, not before
the group is ``Stable`` with both members), which leaves out start-up (torch import, model load, group join,
restores) and the tail; the **wall time** from starting the processes to every event committed; for the
changelog points, when the item owners had committed every gradient the workers sent. The catalogue
(``items``, read whole by every worker) is not in the count. The workers are then stopped with SIGTERM and
print their summary (checkpoints, examples).

**Item path delay with 2 workers running.** Per rate of ``--live-rates``: two changelog workers (``--own-items``) on
fresh topics, the group ``Stable`` with both members (and the owner group too), then the first ``--live-s`` seconds'
worth of the stream produced at that steady rate (flushed every 100 events, as ``tests/test_scale_out.py`` does),
which they keep up with. Meanwhile, every ``--probe-ms``, a probe gradient of a fresh item id (``probe-<n>``,
2 uses: admitted at once; header ``model`` = the version), sent to ``item-grads`` and stamped when the broker
acknowledges it; a ``read_committed`` reader of every ``item-rows`` partition stamps when the probe's row is first
returned to it (``bench/item_path_latency.py``'s ``Point``; the reader stands for every worker, as each worker's
mirror follows the same committed records). Delay = seen - acknowledged: p50/p90/p99/max. A worker's own
gradients wait for its next checkpoint's transaction before they are sent, up to one checkpoint interval,
so a gradient computed in a worker is in every worker's rows within (interval + that delay). The workers'
checkpoint cadence as kept (each worker's log: first partitions held -> SIGTERM, over its checkpoints) and the
group's lag during the live stream are reported.

Writes ``bench/results/scale-out.json``, ``scale-out.md`` and ``scale-out.png``.

    .venv/bin/python bench/scale_out.py [--events 350000] [--live-rates 1000,2000] [--live-s 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
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

from item_path_latency import DIM, VERSION, Point  # noqa: E402  (bench/ is the script's directory)
from stream_throughput import DAY_MS, EVENTS_PER_REQUEST, broker  # noqa: E402

from streaming.settings import KafkaSettings  # noqa: E402

PARTITIONS = 4
COUNTED = ("users", "impressions", "clicks")  # the group's topics (the catalogue is read outside the group)


# ---------------------------------------------------------------------------------------------- set-up
def prepare(args: argparse.Namespace, workdir: Path) -> tuple[Path, list[tuple], dict]:
    """World -> the model registered from day one -> day two encoded once as (topic, key, value, ts_ms) records."""
    from streaming.events import encode, event_key
    from streaming.sources.synthetic import SyntheticWorld, WorldConfig
    from streaming.topics import EVENT_TOPICS
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
    dataset = Dataset.from_events(day_one)
    encoder = FeatureEncoder.fit(dataset)
    model_config = ModelConfig()
    if model_config.id_dim != DIM:
        raise RuntimeError(f"the probes' gradients are {DIM}-d, the default model's id_dim is {model_config.id_dim}")
    model = TwoTowerModel(encoder, model_config)
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
    records = [(EVENT_TOPICS[type(e)], event_key(e), encode(e), e.ts_ms) for e in stream]
    by_type: dict[str, int] = {}
    for topic, *_ in records:
        by_type[topic] = by_type.get(topic, 0) + 1
    info = {
        "world": dict(config.__dict__),
        "day_one_events": len(day_one),
        "stream_events": len(records),
        "stream_by_topic": by_type,
        "model": model_config.to_dict(),
        "vocab": {"users": len(encoder.user_vocab), "items": len(encoder.item_vocab)},
        "prepare_s": round(time.perf_counter() - t0, 1),
    }
    return registry.root, records, info


def make_topics(boot: str, prefix: str) -> KafkaSettings:
    """The event topics and the scale-out topics of ``prefix``, with the bench's partition count."""
    from streaming.topics import SCALE_OUT_TOPICS, ensure_topics

    kafka = KafkaSettings(bootstrap_servers=boot, topic_prefix=prefix, partitions=PARTITIONS)
    ensure_topics(kafka)
    ensure_topics(kafka, names=SCALE_OUT_TOPICS)
    return kafka


def produce(boot: str, prefix: str, records: list[tuple], desc: str, rate: float | None = None, sent=None) -> dict:
    """The records into ``prefix``'s topics (created first, with the scale-out topics), in order, acknowledged.

    ``rate``: events/s, flushed every 100 events (a live stream); ``None``: as fast as the broker takes them."""
    from kafka import KafkaProducer
    from tqdm import tqdm

    kafka = make_topics(boot, prefix)
    producer = KafkaProducer(
        **kafka.producer_config(),
        acks="all",
        linger_ms=20,
        batch_size=512 * 1024,
        max_in_flight_requests_per_connection=1,  # a user's events stay in order
        client_id=f"bench-{desc}",
    )
    topics = {name: kafka.topic(name) for name in {r[0] for r in records}}
    start = time.monotonic()
    bar = tqdm(total=len(records), desc=desc, unit="ev", mininterval=0.5, leave=False, disable=rate is not None)
    for k in range(0, len(records), 100):
        chunk = records[k : k + 100]
        for topic, key, value, ts in chunk:
            producer.send(topics[topic], key=key, value=value, timestamp_ms=ts)
        if rate is not None:
            producer.flush()
            if sent is not None:
                sent[0] = k + len(chunk)
            time.sleep(max(0.0, start + (k + len(chunk)) / rate - time.monotonic()))
        bar.update(len(chunk))
    producer.flush()
    seconds = time.monotonic() - start
    producer.close()
    bar.close()
    return {"events": len(records), "seconds": round(seconds, 2), "events_per_s": len(records) / seconds}


def start_worker(boot: str, prefix: str, group: str, models: Path, workdir: Path, name: str, changelog: bool):
    command = [
        sys.executable, "-m", "streaming", "worker", "--bootstrap", boot, "--topic-prefix", prefix,
        "--models", str(models), "--state-dir", str(workdir / f"state-{name}"), "--group", group,
        "--metrics-port", "0", "--instance-id", name,
    ]  # fmt: skip
    if changelog:
        command += ["--user-state", "changelog", "--own-items"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = open(workdir / f"{name}.out", "w")  # noqa: SIM115 (closed with the process)
    err = open(workdir / f"{name}.log", "w")  # noqa: SIM115
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)


def stop(processes: list, workdir: Path, names: list[str]) -> tuple[list, list]:
    """SIGTERM each, wait; their exit codes and the summary each printed (``None`` when it printed none)."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(60))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait(30))
    summaries = []
    for n in names:
        lines = [line for line in (workdir / f"{n}.out").read_text().splitlines() if line.startswith("{")]
        summaries.append(json.loads(lines[-1]) if lines else None)
    return codes, summaries


def vm_hwm_mb(pid: int) -> float | None:
    """A live process's peak resident set so far (``VmHWM``), MB; ``None`` once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, every thread) a live process has used; ``None`` once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, every core (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


def cpu_use(cpu: list, i: int, j: int, names: list[str]) -> dict:
    """From the CPU samples ``i`` to ``j``: each process's cores used on average, the workers' sum, and how many of
    the machine's cores were busy with anything (the broker, the bench, other work on the machine included)."""
    (t0, p0, b0, _), (t1, p1, b1, _) = cpu[i], cpu[j]
    if t1 <= t0:
        return {}
    per = {n: round((b - a) / (t1 - t0), 3) for n, a, b in zip(names, p0, p1, strict=True) if a is not None and b}
    return {
        "processes_cores": per,
        "workers_cores": round(sum(per.values()), 3),
        "machine_busy_cores": round((b1 - b0) / (t1 - t0), 3),
    }


class Group:
    """A consumer group's committed offsets against the end offsets of its topics, and its members."""

    def __init__(self, boot: str, prefix: str, group: str, topics: tuple[str, ...]) -> None:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.admin import KafkaAdminClient

        kafka = KafkaSettings(bootstrap_servers=boot, topic_prefix=prefix)
        self.group = group
        self.topics = {kafka.topic(t) for t in topics}
        self.tps = [TopicPartition(t, p) for t in sorted(self.topics) for p in range(PARTITIONS)]
        self._admin = KafkaAdminClient(client_id="bench-admin", **kafka.client_config())
        self._ends = KafkaConsumer(group_id=None, client_id="bench-ends", **kafka.client_config())
        self._kafka = kafka
        self._tail = None

    def committed(self) -> dict:
        offsets = self._admin.list_group_offsets(self.group).get(self.group, {})
        return {tp: o.offset for tp, o in offsets.items() if tp.topic in self.topics and o.offset > 0}

    def ends(self) -> dict:
        return self._ends.end_offsets(self.tps)

    def behind(self, timeout_s: float = 5.0) -> int | None:
        """Committed records at or past the group's committed offsets (read ``read_committed`` from there to the end:
        aborted records and transaction markers are not counted); ``None`` when the end was not reached in time."""
        from kafka import KafkaConsumer

        if self._tail is None:
            self._tail = KafkaConsumer(
                group_id=None, isolation_level="read_committed", client_id="bench-tail", **self._kafka.client_config()
            )
            self._tail.assign(self.tps)
        committed, ends = self.committed(), self.ends()
        for tp in self.tps:
            self._tail.seek(tp, committed.get(tp, 0))
        found = 0
        deadline = time.monotonic() + timeout_s
        while any(self._tail.position(tp) < ends[tp] for tp in self.tps):
            if time.monotonic() > deadline:
                return None
            found += sum(len(batch) for batch in self._tail.poll(timeout_ms=200).values())
        return found

    def members(self) -> int:
        """Members of the group while it is ``Stable`` (0 while it rebalances or before it exists)."""
        try:
            described = self._admin.describe_groups([self.group]).get(self.group)
        except Exception:  # noqa: BLE001 (a sample more or less)
            return 0
        if not described or described.get("group_state") != "Stable":
            return 0
        return len(described.get("members", ()))

    def close(self) -> None:
        self._admin.close()
        self._ends.close()
        if self._tail is not None:
            self._tail.close()


# ---------------------------------------------------------------------------------------------- throughput
def throughput_point(args, boot: str, prefix: str, models: Path, workdir: Path, tag: str, n: int, changelog: bool):
    """``n`` worker processes over the produced stream; the group's committed events sampled every 0.5 s."""
    from tqdm import tqdm

    group = f"bench-{tag}-{uuid.uuid4().hex[:6]}"
    events = Group(boot, prefix, group, COUNTED)
    owners = Group(boot, prefix, f"{group}-item-owner", ("item-grads",)) if changelog else None
    ends = events.ends()
    total = sum(ends.values())
    names = [f"{tag}-w{j}" for j in range(n)]
    load_before = os.getloadavg()
    started = time.time()
    processes = [start_worker(boot, prefix, group, models, workdir, name, changelog) for name in names]
    samples: list[tuple[float, int]] = []  # (seconds since the processes started, events committed)
    cpu: list[tuple[float, list, float, float]] = []  # (the same seconds, CPU s per process, machine busy, total)
    peak: dict[str, float] = {}
    stable_s = done_s = owners_done_s = None
    owners_lag_at_done = None
    bar = tqdm(total=total, desc=tag, unit="ev", leave=False, mininterval=0.5)
    try:
        deadline = time.monotonic() + args.point_timeout
        while time.monotonic() < deadline:
            now = time.time() - started
            try:
                committed = sum(events.committed().values())
            except Exception:  # noqa: BLE001 (a sample more or less: the next is 0.5 s away)
                committed = samples[-1][1] if samples else 0
            samples.append((round(now, 3), committed))
            cpu.append((now, [cpu_s(p.pid) for p in processes], *machine_cpu_s()))
            bar.update(committed - bar.n)
            for name, p in zip(names, processes, strict=True):
                hwm = vm_hwm_mb(p.pid)
                if hwm is not None:
                    peak[name] = hwm
            if stable_s is None and events.members() == n:
                stable_s = now
            if done_s is None and committed >= total:
                done_s = now
                if owners is None:
                    break
            if done_s is not None and owners is not None:
                behind = owners.behind()  # committed gradients past the owners' committed offsets
                owners_lag_at_done = behind if owners_lag_at_done is None else owners_lag_at_done
                if behind == 0:
                    owners_done_s = time.time() - started
                    break
                if now - done_s > 60:
                    break
            dead = [name for name, p in zip(names, processes, strict=True) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{tag}: {dead} exited early; see {workdir}/<name>.log")
            time.sleep(0.5)
    finally:
        bar.close()
        codes, summaries = stop(processes, workdir, names)
        events.close()
        if owners is not None:
            owners.close()
    if done_s is None:
        raise RuntimeError(
            f"{tag}: the group committed {samples[-1][1]:,} of {total:,} events in {args.point_timeout} s"
        )
    result = summarize_point(tag, n, changelog, total, samples, stable_s, done_s, owners_done_s, owners_lag_at_done,
                             peak, codes, summaries)  # fmt: skip
    i10, i90 = result.pop("window_index")
    result["load_average_before_after"] = [load_before, os.getloadavg()]
    result["cpu_in_window"] = cpu_use(cpu, i10, i90, names)
    used = result["cpu_in_window"].get("workers_cores")
    if used and result["steady_events_per_s"]:
        result["events_per_worker_cpu_s"] = result["steady_events_per_s"] / used
    return result


def summarize_point(tag, n, changelog, total, samples, stable_s, done_s, owners_done_s, owners_lag, peak, codes, sums):
    s = np.asarray(samples, dtype=float)
    first = s[s[:, 1] > 0]
    first_commit_s = float(first[0, 0]) if len(first) else None

    def reached(fraction: float, after: float = 0.0) -> int:
        return int(np.argmax((s[:, 1] >= fraction * total) & (s[:, 0] >= after)))

    after = stable_s if (n > 1 and stable_s is not None) else 0.0
    i10, i90 = reached(0.1, after), reached(0.9)
    if i90 <= i10:  # the group took its members after 90% of the stream: the window is whatever is left
        i10, i90 = reached(0.1), reached(0.9)
    window = float(s[i90, 0] - s[i10, 0])
    steady = float(s[i90, 1] - s[i10, 1]) / window if window > 0 else None
    return {
        "point": tag,
        "workers": n,
        "mode": "changelog + --own-items" if changelog else "local (default)",
        "events": total,
        "steady_events_per_s": steady,
        "steady_window_s": [float(s[i10, 0]), float(s[i90, 0])],
        "window_index": (i10, i90),
        "first_commit_s": first_commit_s,
        "group_stable_s": stable_s,
        "all_committed_s": done_s,
        "events_per_s_start_to_end": total / done_s,
        "events_per_s_first_commit_to_end": total / (done_s - first_commit_s) if first_commit_s else None,
        "owners_all_committed_s": owners_done_s,
        "owner_lag_when_events_done": owners_lag,
        "peak_rss_mb": peak,
        "exit_codes": codes,
        "summaries": sums,
        "checkpoints": [x["checkpoints"] for x in sums if x],
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------- live: item path
def live_point(args, boot: str, models: Path, records: list[tuple], workdir: Path, rate: float) -> dict:
    """Two changelog workers, a live stream of ``rate`` events/s, probes through the item path."""
    from tqdm import tqdm

    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    tag = f"live{rate:.0f}"
    group = f"bench-{tag}-{uuid.uuid4().hex[:6]}"
    live = records[: int(rate * args.live_s)]
    # Topics first (empty): the workers start at the stream's end, which is its beginning.
    make_topics(boot, prefix)
    cumulative = np.cumsum([r[0] in COUNTED for r in live])  # group-counted events among the first k+1 records
    counted = int(cumulative[-1])
    events = Group(boot, prefix, group, COUNTED)
    owners = Group(boot, prefix, f"{group}-item-owner", ("item-grads",))
    names = [f"{tag}-w{j}" for j in range(2)]
    started = time.time()
    processes = [start_worker(boot, prefix, group, models, workdir, name, changelog=True) for name in names]
    point = None
    lag_samples: list[tuple[float, int, int]] = []  # (s since the live stream started, committed, produced)
    peak: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 180
        while not (events.members() == 2 and owners.members() == 2):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError(f"{tag}: the workers did not form their groups; see {workdir}/<name>.log")
            time.sleep(0.5)
        ready_s = time.time() - started
        point = Point(boot, prefix, owners.group, args.probe_ms)
        point.start()
        sent = [0]
        result: dict = {}
        producer = threading.Thread(
            target=lambda: result.update(produce(boot, prefix, live, tag, rate=rate, sent=sent)),
            daemon=True,
        )
        live_start = time.time()
        cpu = [(live_start, [cpu_s(p.pid) for p in processes], *machine_cpu_s())]
        load_before = os.getloadavg()
        producer.start()
        point.probing.set()
        bar = tqdm(total=counted, desc=f"live {rate:,.0f}/s, 2 workers", unit="ev", leave=False, mininterval=0.5)
        while producer.is_alive():
            try:
                committed = sum(events.committed().values())
                produced = int(cumulative[sent[0] - 1]) if sent[0] else 0
                lag_samples.append((round(time.time() - live_start, 3), committed, produced))
                bar.update(committed - bar.n)
            except Exception:  # noqa: BLE001
                pass
            for name, p in zip(names, processes, strict=True):
                hwm = vm_hwm_mb(p.pid)
                if hwm is not None:
                    peak[name] = hwm
            if any(p.poll() is not None for p in processes):
                raise RuntimeError(f"{tag}: a worker exited; see {workdir}/<name>.log")
            time.sleep(0.5)
        point.probing.clear()
        live_end = time.time()
        cpu.append((live_end, [cpu_s(p.pid) for p in processes], *machine_cpu_s()))
        load_after = os.getloadavg()
        # The group catches up with the last events; the probes still in flight reach the reader.
        catch_up_s = None
        until = time.monotonic() + 60
        while time.monotonic() < until:
            committed = sum(events.committed().values())
            lag_samples.append((round(time.time() - live_start, 3), committed, counted))
            bar.update(committed - bar.n)
            if committed >= counted and len(point.seen) >= len(point.sent):
                catch_up_s = time.time() - live_end
                break
            time.sleep(0.5)
        bar.close()
    finally:
        if point is not None:
            point.close()
        term_s = time.time() - started
        codes, summaries = stop(processes, workdir, names)
        events.close()
        owners.close()
    cadence_s = [
        checkpoint_cadence(workdir / f"{n}.log", s and s["checkpoints"]) for n, s in zip(names, summaries, strict=True)
    ]
    out = summarize_live(args, rate, point, result, lag_samples, ready_s, term_s, catch_up_s, cadence_s, peak, codes,
                         summaries)  # fmt: skip
    out["cpu_during_stream"] = cpu_use(cpu, 0, 1, names)
    out["load_average_before_after"] = [load_before, load_after]
    return out


def checkpoint_cadence(log: Path, checkpoints: int | None) -> float | None:
    """Seconds per checkpoint a changelog worker kept: its log's first "holding the user state" line (it checkpoints
    from then on) to its "received SIGTERM" line, over its checkpoints but the last (made as it stops)."""
    import datetime as dt

    def stamp(line: str) -> float:
        return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    lines = log.read_text().splitlines() if log.exists() else []
    held = [stamp(line) for line in lines if "holding the user state of partitions" in line]
    term = [stamp(line) for line in lines if "received SIGTERM" in line]
    if not held or not term or not checkpoints or checkpoints < 2:
        return None
    return (term[-1] - held[0]) / (checkpoints - 1)


def summarize_live(args, rate, point, produced, lag_samples, ready_s, term_s, catch_up_s, cadence_s, peak, codes,
                   summaries):  # fmt: skip
    delays = np.asarray(
        sorted(1000 * (point.seen[i] - acked) for i, (_, acked) in point.sent.items() if i in point.seen)
    )
    both = [i for i in point.sent if i in point.seen and i in point.acked_wall]
    to_row = np.asarray([point.row_ms[i] - 1000 * point.acked_wall[i] for i in both])
    to_reader = np.asarray([1000 * point.seen_wall[i] - point.row_ms[i] for i in both])

    def pct(values: np.ndarray) -> dict | None:
        if not len(values):
            return None
        out = {q: round(float(np.percentile(values, v)), 1) for q, v in (("p50", 50), ("p90", 90), ("p99", 99))}
        out["max"] = round(float(values.max()), 1)
        return out

    lag = np.asarray([s[2] - s[1] for s in lag_samples], dtype=float) if lag_samples else np.zeros(1)
    checkpoints = [s["checkpoints"] for s in summaries if s]
    interval = float(os.environ.get("FRESHTOWER_CHECKPOINT_INTERVAL_S", 0.5))
    delay = pct(delays)
    cadences = [c for c in cadence_s if c is not None]
    cadence = max(cadences) if cadences else interval
    return {
        "workers": 2,
        "mode": "changelog + --own-items",
        "live_rate": rate,
        "live_s": args.live_s,
        "produced": produced,
        "groups_ready_s": round(ready_s, 2),
        "probes_sent": len(point.sent),
        "probes_seen": len(delays),
        "probes_missing": sorted(set(point.sent) - set(point.seen))[:20],
        "delay_ms": delay,
        "delays_ms": [round(float(d), 2) for d in delays],
        "split_ms": {"ack_to_row_sent": pct(to_row), "row_sent_to_seen": pct(to_reader)},
        "group_lag_events": {"max": int(lag.max()), "p50": float(np.percentile(lag, 50))},
        "catch_up_after_stream_s": round(catch_up_s, 2) if catch_up_s is not None else None,
        "checkpoint_interval_s_setting": interval,
        "checkpoints": checkpoints,
        "groups_ready_to_sigterm_s": round(term_s - ready_s, 1),
        # The cadence each worker kept: from the first time its log says it holds partitions (it checkpoints from
        # then on, every interval whether or not anything changed) to its SIGTERM, over its checkpoints but the one
        # it makes as it stops.
        "checkpoint_interval_s_measured": [round(c, 3) for c in cadences],
        "bound_ms": {q: round(1000 * interval + delay[q], 1) for q in ("p50", "p99", "max")} if delay else None,
        # The same with the slower worker's measured cadence in place of the setting.
        "bound_ms_measured_interval": {q: round(1000 * cadence + delay[q], 1) for q in ("p50", "p99", "max")}
        if delay
        else None,
        "peak_rss_mb": peak,
        "exit_codes": codes,
        "summaries": summaries,
        "lag_samples": lag_samples,
    }


# ---------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    res, lives = report["throughput"], report["item_path"]
    base = next((r for r in res if r["point"] == "1-local"), None)
    one = next((r for r in res if r["point"] == "1-changelog"), None)
    lines = [
        "# Scale-out: events/s with 1 and 2 worker processes, and the item path's delay",
        "",
        f"`{report['command']}` on {report['machine']['cpus']} cores (load average "
        f"{report['machine']['load_average_at_start'][0]:.1f} at the start, "
        f"{report['machine']['load_average_at_end'][0]:.1f} at the end), {report['date']}, "
        f"{report['total_runtime_s']:.0f} s. Stream: {report['stream']['stream_events']:,} events (day two of the "
        f"synthetic world), {PARTITIONS} partitions, the broker on the same machine; model: the default "
        "`ModelConfig` (dim 32, id_dim 32). Workers: default settings (batch 64, checkpoint every 0.5 s with fsync), "
        "one torch thread each.",
        "",
        "## Throughput (the stream already in Kafka)",
        "",
        "| workers | mode | steady events/s | × 1 local | × 1 changelog | cores used: workers / machine | "
        "events per worker CPU-s | all committed after | first commit after | owners done after | "
        "peak RSS per process | load average before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        rate = r["steady_events_per_s"] or 0.0
        vs_base = f"{rate / base['steady_events_per_s']:.2f}" if base and base["steady_events_per_s"] else "-"
        vs_one = f"{rate / one['steady_events_per_s']:.2f}" if one and one["steady_events_per_s"] else "-"
        owners = f"{r['owners_all_committed_s']:.1f} s" if r["owners_all_committed_s"] else "-"
        rss = ", ".join(f"{v:,.0f}" for v in r["peak_rss_mb"].values()) + " MB"
        cpu = r.get("cpu_in_window") or {}
        cores = f"{cpu.get('workers_cores', 0):.2f} / {cpu.get('machine_busy_cores', 0):.2f}" if cpu else "-"
        per_cpu = f"{r['events_per_worker_cpu_s']:,.0f}" if r.get("events_per_worker_cpu_s") else "-"
        load = r["load_average_before_after"]
        lines.append(
            f"| {r['workers']} | {r['mode']} | {rate:,.0f} | {vs_base} | {vs_one} | {cores} | {per_cpu} | "
            f"{r['all_committed_s']:.1f} s | {r['first_commit_s']:.1f} s | {owners} | {rss} | "
            f"{load[0][0]:.1f} / {load[1][0]:.1f} |"
        )
    lines += [
        "",
        "Steady events/s: events the group committed between the samples at 10% and 90% of the stream (with 2 "
        "workers, from the group `Stable` with both), every 0.5 s. Times: from starting the processes. Cores used, "
        "in the same window: the worker processes' CPU time (every thread: the owner role, the Kafka clients) per "
        "second, and the machine's busy CPU time per second (the broker, the bench and any other work included). "
        "Load average: the 1-minute figure as the point started and ended.",
        "",
        "## The item path's delay with 2 workers running",
        "",
    ]
    if not lives:
        lines.append("Not run (`--live-rates ''`).")
    else:
        lines += [
            "| live stream | probes | delay p50 / p90 / p99 / max | ack -> row sent p50 / p99 | "
            "row sent -> seen p50 / p99 | group lag p50 / max | checkpoint interval: setting / kept | "
            "bound p50 / p99 (interval kept + delay) | cores used: workers / machine | load average before / after |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for live in lives:
            d, b = live["delay_ms"], live["bound_ms_measured_interval"]
            if not d:
                lines.append(f"| {live['live_rate']:,.0f} events/s | no probe seen | | | | | | | | |")
                continue
            to_row, to_seen = live["split_ms"]["ack_to_row_sent"], live["split_ms"]["row_sent_to_seen"]
            cpu, load = live.get("cpu_during_stream") or {}, live["load_average_before_after"]
            lines.append(
                f"| {live['live_rate']:,.0f} events/s for {live['live_s']:.0f} s | {live['probes_seen']} of "
                f"{live['probes_sent']} | {d['p50']:.0f} / {d['p90']:.0f} / {d['p99']:.0f} / {d['max']:.0f} ms | "
                f"{to_row['p50']:.0f} / {to_row['p99']:.0f} ms | {to_seen['p50']:.0f} / {to_seen['p99']:.0f} ms | "
                f"{live['group_lag_events']['p50']:,.0f} / {live['group_lag_events']['max']:,} events | "
                f"{live['checkpoint_interval_s_setting']:.1f} s / "
                f"{', '.join(f'{v:.2f}' for v in live['checkpoint_interval_s_measured'])} s | "
                f"{b['p50']:,.0f} / {b['p99']:,.0f} ms | {cpu.get('workers_cores', 0):.2f} / "
                f"{cpu.get('machine_busy_cores', 0):.2f} | {load[0][0]:.1f} / {load[1][0]:.1f} |"
            )
        lines += [
            "",
            "Delay: a probe gradient acknowledged by the broker -> its row returned to a `read_committed` reader of "
            "`item-rows` (which stands for every worker). Interval kept: seconds per checkpoint from a worker's first "
            "partitions to its SIGTERM (its log); the bound uses the slower worker's. Group lag: events produced but not yet committed, sampled every 0.5 s; the "
            "committed offsets move once a checkpoint, so about rate × interval of it is the checkpoint cadence.",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for r in report["throughput"]:
        s = np.asarray(r["samples"], dtype=float)
        rate = r["steady_events_per_s"] or 0.0
        ax1.plot(s[:, 0], s[:, 1], label=f"{r['workers']} × {r['mode']}: {rate:,.0f} events/s steady")
    ax1.set_xlabel("seconds since the worker processes started")
    ax1.set_ylabel("events the group has committed")
    ax1.set_title("backlog: committed events over time", fontsize=10)
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=7, loc="lower right")
    for live in report["item_path"] or []:
        d = np.asarray(live["delays_ms"])
        if len(d):
            label = f"live {live['live_rate']:,.0f} events/s: p50 {live['delay_ms']['p50']:.0f} ms, "
            label += f"p99 {live['delay_ms']['p99']:.0f} ms"
            ax2.plot(d, np.arange(1, len(d) + 1) / len(d), label=label)
    if report["item_path"]:
        ax2.axvline(1000 * report["item_path"][0]["checkpoint_interval_s_setting"], color="0.5", linestyle="--",
                    linewidth=1, label="checkpoint interval setting (a worker's own gradients wait up to it)")  # fmt: skip
    ax2.set_xscale("log")
    ax2.set_xlabel("gradient acknowledged -> row seen by a read_committed reader (ms)")
    ax2.set_ylabel("fraction of probes")
    ax2.set_title("item path delay, 2 changelog workers on a live stream", fontsize=10)
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--events", type=int, default=350_000, help="approximate size of the stream (day two)")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--points", default="1-local,1-changelog,2-changelog", help="throughput points to run")
    parser.add_argument("--point-timeout", type=float, default=300.0, help="seconds a throughput point may take")
    parser.add_argument("--live-rates", default="1000,2000", help="events/s of each live point ('': no live part)")
    parser.add_argument("--live-s", type=float, default=30.0, help="seconds of live stream")
    parser.add_argument("--probe-ms", type=float, default=100.0, help="one probe gradient per this many ms")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--workdir", type=Path, help="keep the broker's data, states and worker logs here")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    points = [p.strip() for p in args.points.split(",") if p.strip()]
    for p in points:
        if p not in ("1-local", "1-changelog", "2-changelog"):
            parser.error(f"unknown point {p!r}")
    started = time.time()
    load_at_start = os.getloadavg()
    throughput: list[dict] = []
    lives: list[dict] = []
    live_rates = [float(v) for v in args.live_rates.split(",") if v.strip()]
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(str(args.workdir))
        if args.workdir is not None
        else tempfile.TemporaryDirectory(prefix="freshtower-bench-") as tmp,
        broker(args.bootstrap, Path(tmp)) as boot,
    ):
        workdir = Path(tmp)
        models, records, info = prepare(args, workdir)
        print(f"broker {boot}; stream {info['stream_events']:,} events {info['stream_by_topic']}, "
              f"model v1 (default ModelConfig, vocab {info['vocab']}), {info['prepare_s']} s", flush=True)  # fmt: skip
        # One copy of the stream for 1 local and 1 changelog (fresh groups), another for 2 changelog.
        prefixes = {p: f"bench-{uuid.uuid4().hex[:8]}." for p in ("shared", "two")}
        produced = {}
        for key, needed in (("shared", {"1-local", "1-changelog"}), ("two", {"2-changelog"})):
            if needed & set(points):
                produced[key] = produce(boot, prefixes[key], records, f"produce ({key})")
                print(f"produced {produced[key]['events']:,} events at {produced[key]['events_per_s']:,.0f}/s")
        bar = tqdm(points + [f"live {r:.0f}/s" for r in live_rates], desc="points", unit="point")
        for tag in bar:
            bar.set_postfix_str(tag)
            if tag.startswith("live"):
                rate = live_rates[len(lives)]
                live = live_point(args, boot, models, records, workdir, rate)
                lives.append(live)
                d = live["delay_ms"] or {}
                tqdm.write(
                    f"live, 2 workers, {rate:,.0f} events/s: item path delay p50 {d.get('p50')} p90 "
                    f"{d.get('p90')} p99 {d.get('p99')} max {d.get('max')} ms over {live['probes_seen']} of "
                    f"{live['probes_sent']} probes; group lag max {live['group_lag_events']['max']:,} events; "
                    f"checkpoints every {live['checkpoint_interval_s_measured']} s (setting "
                    f"{live['checkpoint_interval_s_setting']} s); bound (interval kept + delay) "
                    f"{live['bound_ms_measured_interval']} ms; cores {live['cpu_during_stream']}"
                )
                continue
            n, mode = int(tag[0]), tag[2:]
            prefix = prefixes["two" if n == 2 else "shared"]
            r = throughput_point(args, boot, prefix, models, workdir, tag, n, mode == "changelog")
            throughput.append(r)
            tqdm.write(
                f"{tag}: steady {r['steady_events_per_s'] or 0:,.0f} events/s over "
                f"{r['steady_window_s'][0]:.1f}-{r['steady_window_s'][1]:.1f} s; all {r['events']:,} committed at "
                f"{r['all_committed_s']:.1f} s (first commit {r['first_commit_s']:.1f} s, group stable "
                f"{r['group_stable_s']} s, owners done {r['owners_all_committed_s']} s); checkpoints "
                f"{r['checkpoints']}; peak RSS {', '.join(f'{v:,.0f}' for v in r['peak_rss_mb'].values())} MB; "
                f"cores in the window {r['cpu_in_window']}"
            )
    rates = {r["point"]: r["steady_events_per_s"] for r in throughput}
    ratios = {}
    if rates.get("2-changelog") and rates.get("1-changelog"):
        ratios["2_changelog_over_1_changelog"] = rates["2-changelog"] / rates["1-changelog"]
    if rates.get("1-changelog") and rates.get("1-local"):
        ratios["1_changelog_over_1_local"] = rates["1-changelog"] / rates["1-local"]
    if rates.get("2-changelog") and rates.get("1-local"):
        ratios["2_changelog_over_1_local"] = rates["2-changelog"] / rates["1-local"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "scale_out",
        "what": "events/s the group commits with 1 plain worker, 1 and 2 changelog-mode workers (--own-items) over "
        "a stream already in Kafka; and, with 2 such workers on a live stream, gradient acknowledged -> its row "
        "committed in item-rows and returned to a read_committed reader",
        "command": " ".join(["python bench/scale_out.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {
            "events_requested": args.events,
            "partitions": PARTITIONS,
            "points": points,
            "live_rates": live_rates,
            "live_s": args.live_s,
            "probe_ms": args.probe_ms,
            "worker_settings": "defaults (batch 64, checkpoint_interval_s 0.5 with fsync, session_timeout_ms "
            "15000), OMP_NUM_THREADS=1, --metrics-port 0",
            "probe": "fresh id, uses 2 (admitted at once), header model=v1, own producer with linger_ms 0; "
            "stamped when acked (bench/item_path_latency.py's Point)",
            "seed": args.seed,
        },
        "stream": info,
        "produced": produced,
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
        "throughput": throughput,
        "ratios": ratios,
        "item_path": lives,
    }
    (args.out / "scale-out.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "scale-out.md").write_text(markdown(report))
    plot(report, args.out / "scale-out.png")
    print(f"wrote {args.out / 'scale-out.json'}, .md and .png in {report['total_runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
