"""The real processes of a deployment, started for one run, and the waits that keep the replay honest.

:class:`System` starts an Apache Kafka broker (``deploy/kafka/kafka.sh``, free loopback ports, its data under
the run directory), creates the topics, and runs the worker, the publisher and the retrieval service as
their own processes (``python -m streaming worker``, ``python -m publisher run``, ``python -m serving run``)
with one TOML settings file; the nightly job runs as ``python -m trainer full --source kafka`` at each
simulated midnight. Nothing is called in-process: what is measured is what a deployment runs.

After each step is produced, :meth:`System.settle` waits until the step has gone all the way through:

1. the worker's checkpoint (read as a RocksDB secondary) runs the current model version, is not replaying,
   has no unfinished mini-batch and has consumed every partition up to the offsets the producer reached;
2. the publisher's store holds a version made from that checkpoint or a later one (its cursor);
3. the retrieval service answers under that store version or a later one.

Only then is the next step scored, so every arm sees exactly the events before the step, and serving sees
them learnt, published and loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from publisher.store import RocksSecondary
from streaming.events import Event
from streaming.producer import EventProducer
from streaming.settings import KafkaSettings
from streaming.state import StateStore
from streaming.topics import EVENT_TOPICS, ensure_topics

__all__ = ["System", "SystemSettings", "Stalled", "free_port"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"


class Stalled(RuntimeError):
    """A process died, or the system did not catch up within the time allowed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class SystemSettings:
    """How the processes of a run are set up. ``learn``: the worker runs SGD (False: features only)."""

    publish_interval_s: float = 1.0
    checkpoint_interval_s: float = 0.25
    max_batch_delay_s: float = 0.25
    model_poll_s: float = 0.25
    learn: bool = True
    worker: tuple[tuple[str, object], ...] = ()  # more [worker] settings, e.g. (("lr", 0.2),)
    gate_margin: float | None = None  # the nightly gate's absolute margin (None: the job's default)
    new_worker_each_night: bool = False  # after each promotion: a new worker, store and serving (no steady state)
    settle_timeout_s: float = 300.0
    nightly_timeout_s: float = 600.0


class System:
    """Broker, topics, worker, publisher and serving for one run under ``root``."""

    def __init__(self, root: Path, settings: SystemSettings, *, prefix: str = "replay.") -> None:
        self.root = root
        self.settings = settings
        self.models = root / "models"
        self.state_dir = root / "worker"
        self.store_dir = root / "kv"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port, self.controller_port = free_port(), free_port()
        self.api_port = free_port()
        self.kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{self.port}", topic_prefix=prefix)
        self.config = root / "freshtower.toml"
        self._processes: dict[str, subprocess.Popen] = {}
        self._broker = False
        self._producer: EventProducer | None = None
        self._ends: dict[str, int] = {}
        self._worker_view: StateStore | None = None
        self._store_view: RocksSecondary | None = None

    # ------------------------------------------------------------------ lifecycle
    def _broker_args(self) -> list[str]:
        return [
            "--port",
            str(self.port),
            "--controller-port",
            str(self.controller_port),
            "--data-dir",
            str(self.root / "kafka"),
        ]

    def start_broker(self) -> None:
        subprocess.run(
            [str(KAFKA_SH), "start", *self._broker_args()], check=True, timeout=300, stdout=subprocess.DEVNULL
        )
        self._broker = True
        ensure_topics(self.kafka)
        self._producer = EventProducer(self.kafka)
        worker = {
            "checkpoint_interval_s": self.settings.checkpoint_interval_s,
            "max_batch_delay_s": self.settings.max_batch_delay_s,
            "model_poll_s": self.settings.model_poll_s,
            "learn": self.settings.learn,
            "sync": False,
        }
        worker.update(dict(self.settings.worker))
        lines = [
            "[kafka]",
            f'bootstrap_servers = "{self.kafka.bootstrap_servers}"',
            f'topic_prefix = "{self.kafka.topic_prefix}"',
        ]
        lines += ["", "[worker]"] + [f"{k} = {_toml(v)}" for k, v in worker.items()]
        lines += ["", "[serving]", "refresh_interval_s = 0.1"]
        if self.settings.gate_margin is not None:
            lines += ["", "[full]", f"gate_margin = {self.settings.gate_margin}"]
        self.config.write_text("\n".join(lines) + "\n")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHTOWER_")}
        env["FRESHTOWER_CONFIG"] = str(self.config)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        log = (self.logs / f"{name}.log").open("a")
        self._processes[name] = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the harness only; it stops the processes itself
        )  # fmt: skip

    def start_processes(self, group: str = "replay-worker") -> None:
        """Worker, then (once its state exists) publisher and serving."""
        self._spawn("worker", ["streaming", "worker", "--config", str(self.config), "--models", str(self.models),
                               "--state-dir", str(self.state_dir), "--group", group, "--metrics-port", "0"])  # fmt: skip
        self._wait(lambda: (self.state_dir / "CURRENT").exists(), 120, "the worker's state")
        self._spawn("publisher", ["publisher", "run", "--config", str(self.config), "--source", "worker",
                                  "--worker-state", str(self.state_dir), "--models", str(self.models),
                                  "--store", str(self.store_dir), "--interval", f"{self.settings.publish_interval_s:g}",
                                  "--index", "flat", "--metrics-port", "0"])  # fmt: skip
        self._spawn("serving", ["serving", "run", "--config", str(self.config), "--store", str(self.store_dir),
                                "--models", str(self.models), "--worker-state", str(self.state_dir),
                                "--port", str(self.api_port), "--metrics-port", "0", "--index", "flat"])  # fmt: skip

    def restart_fresh(self) -> None:
        """Stop the worker, publisher and serving, delete their state and store, and start them again: a new
        worker from the current version's cutoff (what a deployment gets by wiping the worker each night)."""
        self._stop_processes()
        for view in (self._worker_view, self._store_view):
            if view is not None:
                view.close()
        self._worker_view = self._store_view = None
        for path in (
            self.state_dir,
            self.store_dir,
            self.root / "kv-index",
            self.root / "worker-secondary",
            self.root / "kv-secondary",
        ):
            shutil.rmtree(path, ignore_errors=True)
        self.start_processes(group=f"replay-worker-{time.monotonic_ns()}")

    def _stop_processes(self) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self._processes.items():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within 15 s of SIGTERM; killing it", name)
                process.kill()
                process.wait()
        self._processes.clear()

    def stop(self) -> None:
        """SIGTERM every process, wait for it (SIGKILL after 15 s), then stop the broker."""
        for view in (self._worker_view, self._store_view):
            if view is not None:
                view.close()
        self._worker_view = self._store_view = None
        self._stop_processes()
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        if self._broker:
            subprocess.run(
                [str(KAFKA_SH), "stop", *self._broker_args()], check=False, timeout=120, stdout=subprocess.DEVNULL
            )
            self._broker = False

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ events
    def produce(self, events: Sequence[Event]) -> None:
        assert self._producer is not None
        for event in events:
            self._producer.send(event)
        self._producer.flush()

    def _end_offsets(self) -> dict[str, int]:
        """``{"topic:partition": end offset}`` of the topics the worker reads."""
        consumer = KafkaConsumer(**self.kafka.client_config(), group_id=None, enable_auto_commit=False)
        try:
            tps = []
            for name in EVENT_TOPICS.values():
                topic = self.kafka.topic(name)
                partitions = consumer.partitions_for_topic(topic) or set()
                tps += [TopicPartition(topic, p) for p in sorted(partitions)]
            return {f"{tp.topic}:{tp.partition}": offset for tp, offset in consumer.end_offsets(tps).items()}
        finally:
            consumer.close()

    # ------------------------------------------------------------------ nightly
    def nightly(self, day: str, days: int) -> tuple[int, str]:
        """``trainer full`` on the ``days`` UTC days ending with ``day`` from Kafka; (exit code, last log line)."""
        args = [sys.executable, "-m", "trainer", "full", "--config", str(self.config), "--source", "kafka",
                "--models", str(self.models), "--day", day, "--kafka-lateness", "0", "--no-progress"]  # fmt: skip
        if days > 1:
            args += ["--days", str(days)]
        with (self.logs / "nightly.log").open("a") as log:
            log.write(f"\n== trainer full --day {day} --days {days}\n")
            log.flush()
            done = subprocess.run(args, cwd=REPO, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=self.settings.nightly_timeout_s, start_new_session=True)  # fmt: skip
        tail = (self.logs / "nightly.log").read_text().strip().splitlines()[-1:]
        return done.returncode, tail[0] if tail else ""

    # ------------------------------------------------------------------ settling
    def check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text()[-2000:]
                raise Stalled(f"{name} exited with code {process.returncode}:\n{tail}")

    def _wait(self, condition, timeout_s: float, what: str, every_s: float = 0.02):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while True:
            result = condition()
            if result:
                return result
            self.check_alive()
            if time.monotonic() > deadline:
                raise Stalled(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(every_s)

    def worker_meta(self) -> tuple[dict, dict[str, int]]:
        if self._worker_view is None:
            self._worker_view = StateStore(self.state_dir, secondary=self.root / "worker-secondary")
        self._worker_view.catch_up()
        return self._worker_view.meta(), self._worker_view.offsets()

    def settle(self, model_version: str) -> dict:
        """Wait until everything produced is learnt by the worker under ``model_version``, published and served
        (the module docstring); returns the serving answer's meta (publish version, watermark, model)."""
        ends = self._end_offsets()

        def worker_done() -> dict | None:
            meta, offsets = self.worker_meta()
            caught_up = all(offsets.get(tp, 0) >= end for tp, end in ends.items())
            ready = (
                meta.get("model_version") == model_version
                and not meta.get("pending")
                and not meta.get("replay_until")
                and meta.get("replay_from_ms") is None
                and caught_up
            )
            return meta if ready else None

        meta = self._wait(worker_done, self.settings.settle_timeout_s, "the worker to learn what was produced")
        checkpoint, watermark, done_at = int(meta["checkpoints"]), int(meta.get("watermark_ms", 0)), time.monotonic()
        # The publisher writes no version when nothing changed since its cursor (an idle worker keeps
        # checkpointing): a store at the worker's watermark that two publish intervals did not move is whole.
        quiet_s = 2 * self.settings.publish_interval_s + 0.5

        def published() -> int | None:
            if self._store_view is None:
                if not (self.store_dir / "CURRENT").exists():
                    return None
                self._store_view = RocksSecondary(self.store_dir, self.root / "kv-secondary")
            with self._store_view.reader() as view:
                store_meta = view.meta()
            if store_meta is None or store_meta.model_version != model_version:
                return None
            seq = int(store_meta.cursor.split(":", 1)[0] or 0) if store_meta.cursor else 0
            if seq >= checkpoint:
                return store_meta.version
            quiet = store_meta.watermark_ms >= watermark and time.monotonic() - done_at > quiet_s
            return store_meta.version if quiet else None

        store_version = self._wait(published, self.settings.settle_timeout_s, "the publisher to publish it")

        def served() -> dict | None:
            answer = self.recommend_raw("prequential-probe", 1)
            return answer if answer is not None and int(answer["publish_version"]) >= store_version else None

        return self._wait(served, self.settings.settle_timeout_s, "serving to load it")

    # ------------------------------------------------------------------ serving
    def recommend_raw(self, user_id: str, k: int) -> dict | None:
        query = urllib.parse.urlencode({"user_id": user_id, "k": k} if user_id else {"k": k})
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/recommend?{query}", timeout=10) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def recommend(self, user_id: str, k: int) -> dict:
        answer = self.recommend_raw(user_id, k)
        if answer is None:
            self.check_alive()
            raise Stalled(f"serving did not answer /recommend for {user_id!r}")
        return answer


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)
