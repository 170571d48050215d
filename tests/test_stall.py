"""Long-running processes stalled for real: a stopped broker, a record batch the client cannot read, a stuck call.

Whatever a process is doing, SIGTERM ends it within 10 s with its last checkpoint intact; a batch it cannot read
ends it with exit 69 and a clear log line instead of a silent spin (kafka-python 3.0 loops for good inside
``poll()`` after a batch it cannot decompress, ignoring SIGTERM, which is what users met with snappy before the
codec libraries were installed). The unreadable batch is made real: kcat writes zstd batches, and the process
runs with the zstd library hidden from it (a ``sitecustomize`` on its path), as on a host without it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from kafka.errors import Cancelled, KafkaConnectionError

from publisher.store import RocksStore
from streaming.archive import days, read_events, visible_files
from streaming.events import Click
from streaming.lifecycle import EXIT_STALLED, _drop_cancelled
from streaming.settings import KafkaSettings
from streaming.topics import ensure_topics
from tests.conftest import Broker, free_port
from tests.test_codecs import kcat_produce
from tests.worker_fixtures import produce, read_state, register_model, split_world, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 10.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Broker:
    """A broker of this module's own: the tests stop and restart it."""
    b = Broker(free_port(), free_port(), tmp_path_factory.mktemp("stall-kafka"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def world():
    _, day_one, day_two = split_world()
    return day_one, day_two[:4000]


def metric(port: int, name: str) -> float:
    """Sum of a metric's samples on a process's /metrics (0 while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)


def sample(port: int, series: str) -> float:
    """One labelled sample (``name{label="value"}``) of a process's /metrics (0 while absent)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.rsplit(" ", 1)[0] == series)


def start(args: list[str], settings: KafkaSettings, log: Path, **env: str) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHTOWER_")}
    full_env.update(
        FRESHTOWER_KAFKA_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
        FRESHTOWER_KAFKA_TOPIC_PREFIX=settings.topic_prefix,
        FRESHTOWER_CHECKPOINT_INTERVAL_S="0.5",
        **env,
    )
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def terminate(process: subprocess.Popen, log: Path) -> tuple[int, float]:
    """SIGTERM; the exit code and how long it took (fails past STOP_WITHIN_S)."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(
            f"{process.args[2:4]} ignored SIGTERM for {STOP_WITHIN_S} s:\n{log.read_text()[-3000:]}"
        ) from None
    return code, time.monotonic() - sent


def finish(process: subprocess.Popen, timeout_s: float, log: Path) -> int:
    """The exit code of a process expected to end by itself; killed (and the test failed) if it does not."""
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(
            f"{process.args[2:4]} did not end within {timeout_s} s:\n{log.read_text()[-3000:]}"
        ) from None


def archived(root: Path) -> list:
    return [e for day in days(root) for f in visible_files(root, day) for e in read_events(f.path, f.kind)]


def test_sigterm_ends_every_process_within_10s_while_the_broker_is_down(broker, world, tmp_path):
    day_one, day_two = world
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap, topic_prefix=f"down-{uuid.uuid4().hex[:6]}.")
    ensure_topics(settings)
    produce(settings, day_two)
    models, state, archive = tmp_path / "models", tmp_path / "state", tmp_path / "archive"
    register_model(models, day_one)
    clicks = sum(isinstance(e, Click) for e in day_two)
    ports = {name: free_port() for name in ("worker", "archive", "publisher")}
    logs = {name: tmp_path / f"{name}.log" for name in ("worker", "archive", "publisher", "replica")}
    exits: dict[str, int] = {}
    processes = {
        "worker": start(
            ["-m", "streaming", "worker", "--models", str(models), "--state-dir", str(state), "--batch-size", "32",
             "--metrics-port", str(ports["worker"])], settings, logs["worker"]),
        "archive": start(
            ["-m", "streaming", "archive", "--archive", str(archive), "--flush-every-s", "0.5",
             "--metrics-port", str(ports["archive"])], settings, logs["archive"]),
        "publisher": start(
            ["-m", "publisher", "run", "--source", "worker", "--worker-state", str(state), "--models", str(models),
             "--store", str(tmp_path / "kv"), "--interval", "1", "--index", "none", "--fanout",
             "--metrics-port", str(ports["publisher"])], settings, logs["publisher"]),
        "replica": start(
            ["-m", "publisher", "replica", "--store", str(tmp_path / "replica")], settings, logs["replica"]),
    }  # fmt: skip
    try:
        wait_for(lambda: metric(ports["worker"], "freshtower_examples_trained_total") == clicks, 120, "the worker")
        wait_for(lambda: metric(ports["archive"], "freshtower_archive_events_total") == len(day_two), 60, "the sink")
        # A fanned-out version with users in it (the first publish may come before the worker's first click,
        # with items only: the worker checkpoints every 0.5 s).
        pub = ports["publisher"]
        wait_for(lambda: sample(pub, 'freshtower_published_rows_total{kind="user"}') > 0, 60, "users published")
        wait_for(
            lambda: metric(pub, "freshtower_fanout_version") >= metric(pub, "freshtower_published_version") >= 1,
            60,
            "the version with users fanned out",
        )
        broker.stop()
        # The outage itself is what is tested: the processes poll, reconnect and publish against a broker that is
        # gone for a few seconds before the signal (there is no event to wait for; that is the point).
        time.sleep(4)
        for name, process in processes.items():
            code, took = terminate(process, logs[name])
            # 0: it finished its cycle and checkpointed; 143: it was inside a blocking client call (the publisher
            # waiting on its fan-out transaction) and its guard ended it after the grace period. Either way the
            # last checkpoint on disk is intact, which is checked below.
            assert code in (0, 128 + signal.SIGTERM), f"{name} exited {code}:\n{logs[name].read_text()[-3000:]}"
            assert took < STOP_WITHIN_S
            exits[name] = code
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        broker.start()
    # The worker, the sink and the replica poll with timeouts and stop cleanly.
    assert exits["worker"] == exits["archive"] == exits["replica"] == 0, exits
    # The checkpoints: everything applied, archived and replicated before the outage is there.
    saved = read_state(state)
    assert saved["meta"]["examples"] == clicks
    assert sum(saved["offsets"].values()) == len(day_two)
    assert len(archived(archive)) == len(day_two)
    with RocksStore(tmp_path / "replica") as replica, replica.reader() as view:
        assert view.version() >= 1 and len(view.user_ids()) > 0


def test_an_unreadable_batch_ends_worker_and_sink_with_69_and_a_restart_with_the_codec_applies_it_once(
    broker, world, tmp_path
):
    day_one, day_two = world
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap, topic_prefix=f"bad-{uuid.uuid4().hex[:6]}.")
    ensure_topics(settings)
    cut = len(day_two) // 2
    models, state, archive = tmp_path / "models", tmp_path / "state", tmp_path / "archive"
    register_model(models, day_one)
    hide_zstd = tmp_path / "no-zstd"
    hide_zstd.mkdir()
    (hide_zstd / "sitecustomize.py").write_text('import sys\nsys.modules["zstandard"] = None  # as if not installed\n')
    worker_args = ["-m", "streaming", "worker", "--models", str(models), "--state-dir", str(state),
                   "--batch-size", "32", "--metrics-port", "0", "--exit-when-idle", "2"]  # fmt: skip
    sink_args = ["-m", "streaming", "archive", "--archive", str(archive), "--flush-every-s", "0.5",
                 "--exit-when-idle", "3"]  # fmt: skip
    logs = {name: tmp_path / f"{name}.log" for name in ("worker", "archive")}
    blind = {"PYTHONPATH": f"{hide_zstd}{os.pathsep}{REPO}"}

    # The first half, uncompressed: the processes without zstd apply and archive it and exit when idle.
    produce(settings, day_two[:cut])
    for name, args in (("worker", worker_args), ("archive", sink_args)):
        process = start(args, settings, logs[name], **blind)
        assert finish(process, 180, logs[name]) == 0, logs[name].read_text()[-3000:]
    # The second half in zstd batches, which they cannot read: a clear error and exit 69, not a spin.
    kcat_produce(settings, day_two[cut:], "zstd")
    for name, args in (("worker", worker_args), ("archive", sink_args)):
        code = finish(start(args, settings, logs[name], **blind), 120, logs[name])
        log = logs[name].read_text()
        assert code == EXIT_STALLED, log[-3000:]
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "UnsupportedCodecError" in errors[0] and "zstd" in errors[0], log[-3000:]

    # Checkpoints intact: exactly the first half, nothing of the unreadable batches counted as done.
    saved = read_state(state)
    assert sum(saved["offsets"].values()) == cut
    assert saved["meta"]["examples"] == sum(isinstance(e, Click) for e in day_two[:cut])
    assert len(archived(archive)) == cut

    # The same processes with the codec: everything applied and archived exactly once.
    for name, args in (("worker", worker_args), ("archive", sink_args)):
        assert finish(start(args, settings, logs[name]), 180, logs[name]) == 0, logs[name].read_text()[-3000:]
    saved = read_state(state)
    assert saved["meta"]["examples"] == sum(isinstance(e, Click) for e in day_two)
    assert sum(saved["offsets"].values()) == len(day_two)
    assert len(archived(archive)) == len(day_two)


def test_the_clients_own_cancel_at_close_is_not_logged_as_an_error_and_a_real_metadata_failure_is() -> None:
    def record(exc: Exception) -> logging.LogRecord:
        return logging.LogRecord("kafka.cluster", logging.ERROR, "cluster.py", 175, "Metadata refresh: failed %s",
                                 (exc,), None)  # fmt: skip

    assert not _drop_cancelled(record(Cancelled()))
    assert _drop_cancelled(record(KafkaConnectionError("broker gone")))


GUARDED = """
import logging, sys, threading, time
from streaming.lifecycle import ProcessGuard, setup_logging
setup_logging()
guard = ProcessGuard("stuck", grace_s=float(sys.argv[1]), stall_s=float(sys.argv[2])).install()
print("ready", flush=True)
guard.beat()
threading.Event().wait()  # a call that never returns and ignores the stop event, like a spinning client
"""


@pytest.mark.parametrize(
    ("grace_s", "stall_s", "signal_", "expected"), [(2.0, 0.0, True, 128 + 15), (5.0, 2.0, False, 69)]
)
def test_a_process_stuck_in_a_call_is_ended_by_its_guard(tmp_path, grace_s, stall_s, signal_, expected):
    """SIGTERM arms a forced exit after the grace period; without a signal the watchdog ends a loop that stopped."""
    process = subprocess.Popen(
        [sys.executable, "-c", GUARDED, str(grace_s), str(stall_s)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "ready"
    started = time.monotonic()
    if signal_:
        process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=STOP_WITHIN_S)
    took = time.monotonic() - started
    err = process.stderr.read()
    assert code == expected, err
    assert (grace_s if signal_ else stall_s) - 0.5 < took < STOP_WITHIN_S
    assert ("did not stop within" if signal_ else "made no progress") in err
    if not signal_:
        assert "stuck at" in err and "wait" in err  # where the main thread was
