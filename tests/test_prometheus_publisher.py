"""A real Prometheus server scraping a real publisher process: freshness and alerts, end to end.

Prometheus (Debian's ``prometheus`` package) runs on a loopback port with a 1 s scrape and
evaluation interval and the repository's unchanged ``deploy/prometheus/alerts.yml``: no ``for:``
is rewritten, because FreshtowerPublisherStalled scales with the publisher's own
``freshtower_publish_interval_seconds`` (3 intervals, floor 10 s, ``for: 15s``), so a 1 s publisher
fires in about 25 s.

"Publishing stops" is tested in the two ways it happens, each with the alert that owns it:

- The process keeps running and serving /metrics, but every publish cycle fails: the publisher
  runs with ``python -m publisher run --source`` over :class:`FaultableSource`, synthetic
  learner output that raises while a fault file exists (the learner's state unreachable). The
  real publish loop counts the failures and stops advancing its last-success gauge;
  FreshtowerPublisherStalled goes pending, then firing, and clears once the fault is removed.
- The process dies (``python -m publisher simulate``, then SIGKILL): Prometheus marks the target
  down, its series go stale so FreshtowerPublisherStalled stays quiet, FreshtowerTargetDown and
  FreshtowerPublisherAbsent go pending (their ``for: 1m`` is left to the promtool unit tests),
  and the data's age keeps growing through ``last_over_time`` (FreshtowerDataStale's input). A
  restart on the same store continues the version numbers and clears the alerts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_server import PrometheusServer, free_port, poll

from publisher.settings import PublisherSettings
from publisher.source import Changes, MemorySource, RandomWalk

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
JOB = "freshtower-publisher"
FAULT_FILE_ENV = "FRESHTOWER_TEST_FAULT_FILE"
FRESHNESS = f'time() - freshtower_published_watermark_timestamp_seconds{{job="{JOB}"}}'


class FaultableSource:
    """Synthetic learner output (random-walking users, event time = now) that fails while ``fault_file`` exists."""

    def __init__(self, fault_file: Path) -> None:
        self.fault_file = fault_file
        self.memory = MemorySource(model_version="prometheus-test")
        walk = RandomWalk(self.memory, users=200, items=50, dim=8, seed=0)
        # Runs for the life of the process: the publisher's SIGTERM handling ends the process.
        threading.Thread(target=walk.run, args=(threading.Event(), 200.0), daemon=True).start()

    def changes_since(self, cursor: str) -> Changes:
        if self.fault_file.exists():
            raise ConnectionError(f"learner state unreachable (fault file {self.fault_file} exists)")
        return self.memory.changes_since(cursor)


def faultable_source(settings: PublisherSettings) -> FaultableSource:
    """The ``--source`` factory: ``python -m publisher run --source test_prometheus_publisher:faultable_source``."""
    return FaultableSource(Path(os.environ[FAULT_FILE_ENV]))


class PublisherProcess:
    """``python -m publisher <args>`` publishing every second, its /metrics on a free loopback port."""

    def __init__(
        self, args: list[str], store: Path, log: Path, env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.log = log
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FRESHTOWER_")}
        environ.update(env or {})
        environ["FRESHTOWER_METRICS_ADDR"] = "127.0.0.1"
        environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
        cmd = [sys.executable, "-m", "publisher", *args[:1], "--store", str(store), "--interval", "1"]
        cmd += ["--metrics-port", str(self.port), "--index", "none", *args[1:]]
        with log.open("ab") as out:
            self.process = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout_s: float = 30.0) -> None:
        def serving() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"publisher exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.target}/metrics", timeout=2) as response:
                    return b"freshtower_published_version" in response.read()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        poll(serving, timeout_s, f"the publisher's /metrics on {self.target}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture
def processes() -> Iterator[list[PublisherProcess]]:
    """Publisher processes a test starts; each is stopped at the end."""
    started: list[PublisherProcess] = []
    yield started
    for process in started:
        process.stop()


def value(prom: PrometheusServer, promql: str) -> float | None:
    """The single value ``promql`` returns now, or ``None`` while it returns nothing."""
    samples = prom.query(promql)
    assert len(samples) <= 1, f"{promql}: expected at most one series, got {samples}"
    return samples[0].value if samples else None


def freshness(prom: PrometheusServer) -> float:
    """``time() - freshtower_published_watermark_timestamp_seconds`` now: the published data's age in seconds."""
    age = value(prom, FRESHNESS)
    assert age is not None, "no freshness gauge scraped"
    return age


def alert_state(prom: PrometheusServer, name: str) -> str | None:
    """``"pending"``, ``"firing"`` or ``None`` (inactive) for the publisher's alert ``name``."""
    states = [a.state for a in prom.alerts() if a.name == name and a.labels.get("job") == JOB]
    assert len(states) <= 1, f"{name}: expected one publisher alert, got {states}"
    return states[0] if states else None


def test_stalled_alert_fires_when_publishes_fail_and_clears_when_they_resume(
    tmp_path: Path, processes: list[PublisherProcess]
) -> None:
    fault = tmp_path / "fault"
    publisher = PublisherProcess(
        ["run", "--source", "test_prometheus_publisher:faultable_source"],
        store=tmp_path / "store",
        log=tmp_path / "publisher.log",
        env={FAULT_FILE_ENV: str(fault)},
    )
    processes.append(publisher)
    with PrometheusServer({JOB: [publisher.target]}) as prom:
        publisher.wait_serving()

        # Publishing: versions advance and the data is seconds old. The watermark is the event time
        # of the newest synthetic update (every 50 ms), published every 1 s and scraped every 1 s,
        # so its age as Prometheus computes it is at most about 2 s plus scheduling delays.
        first = poll(lambda: value(prom, "freshtower_published_version"), 30, "the first scraped version")
        poll(lambda: (value(prom, "freshtower_published_version") or 0) >= first + 3, 15, "three more versions")
        age = freshness(prom)
        assert 0.0 <= age < 5.0, f"freshness {age} s, expected 0 to 5 s"
        assert value(prom, "freshtower_publish_interval_seconds") == 1.0
        assert alert_state(prom, "FreshtowerPublisherStalled") is None
        assert alert_state(prom, "FreshtowerDataStale") is None

        # The source breaks: every cycle now raises inside the running publisher.
        fault.touch()
        broken_at = time.monotonic()
        poll(lambda: alert_state(prom, "FreshtowerPublisherStalled") == "pending", 30, "the stalled alert pending")
        pending_after = time.monotonic() - broken_at
        # The threshold is max(3 * 1 s, 10 s): the 10 s floor, less the up to ~1 s between the last
        # success and the fault, so pending cannot come before ~9 s (3 intervals alone would give 3 s).
        assert pending_after >= 8.0, f"pending after {pending_after:.1f} s, expected the 10 s floor"
        assert value(prom, f'up{{job="{JOB}"}}') == 1.0, "the publisher must still be scraped"
        assert (value(prom, "freshtower_publish_failures_total") or 0) >= 5

        poll(lambda: alert_state(prom, "FreshtowerPublisherStalled") == "firing", 30, "the stalled alert firing")
        firing_after = time.monotonic() - broken_at
        assert firing_after >= pending_after + 14.0, f"pending at {pending_after:.1f} s, firing at {firing_after:.1f} s"
        (alert,) = [a for a in prom.alerts() if a.name == "FreshtowerPublisherStalled"]
        assert alert.labels == {
            "alertname": "FreshtowerPublisherStalled",
            "job": JOB,
            "instance": publisher.target,
            "severity": "critical",
        }
        assert alert.value > 20.0  # seconds since the last success, at least 10 + 15 - 1
        assert alert.annotations["summary"].startswith(f"Publisher {publisher.target} has not published for ")
        # The freshness gauge ages with it, still far below FreshtowerDataStale's 10 minutes.
        assert freshness(prom) > 20.0
        assert alert_state(prom, "FreshtowerDataStale") is None

        # The source recovers: the next cycle publishes and the alert resolves.
        fault.unlink()
        poll(lambda: alert_state(prom, "FreshtowerPublisherStalled") is None, 20, "the stalled alert to resolve")
        assert 0.0 <= freshness(prom) < 5.0


def test_killed_publisher_is_reported_down_and_its_data_keeps_ageing(
    tmp_path: Path, processes: list[PublisherProcess]
) -> None:
    store, log = tmp_path / "store", tmp_path / "publisher.log"
    sim = ["simulate", "--users", "200", "--items", "50", "--dim", "8", "--updates-per-s", "200"]
    publisher = PublisherProcess(sim, store=store, log=log)
    processes.append(publisher)
    with PrometheusServer({JOB: [publisher.target]}) as prom:
        publisher.wait_serving()
        poll(lambda: (value(prom, "freshtower_published_version") or 0) >= 3, 30, "three scraped versions")
        assert 0.0 <= freshness(prom) < 5.0

        publisher.process.kill()  # SIGKILL: no chance to clean up
        publisher.process.wait(timeout=10)
        killed_at = time.monotonic()
        poll(lambda: value(prom, f'up{{job="{JOB}"}}') == 0.0, 15, "the target to be marked down")
        last_version = value(prom, f'last_over_time(freshtower_published_version{{job="{JOB}"}}[1h])')
        assert last_version is not None and last_version >= 3
        # The scrape failure ends the series (a stale marker), so the live-publisher alert is quiet
        # and the process-level alerts take over.
        assert value(prom, "freshtower_published_version") is None
        for name in ("FreshtowerTargetDown", "FreshtowerPublisherAbsent"):
            poll(lambda name=name: alert_state(prom, name) == "pending", 15, f"{name} pending")
        assert alert_state(prom, "FreshtowerPublisherStalled") is None
        # The published data keeps ageing although nobody reports it: what FreshtowerDataStale reads.
        data_age = f'time() - last_over_time(freshtower_published_watermark_timestamp_seconds{{job="{JOB}"}}[1h])'
        age = value(prom, data_age)
        elapsed = time.monotonic() - killed_at
        assert age is not None and age >= elapsed, f"data age {age} s, {elapsed:.1f} s after the kill"

        # A new process on the same store and port continues the versions; the alerts clear.
        restarted = PublisherProcess(sim, store=store, log=log, port=publisher.port)
        processes.append(restarted)
        restarted.wait_serving()
        poll(lambda: (value(prom, "freshtower_published_version") or 0) > last_version, 15, "a version after the kill")
        for name in ("FreshtowerTargetDown", "FreshtowerPublisherAbsent"):
            poll(lambda name=name: alert_state(prom, name) is None, 15, f"{name} to resolve")
        assert 0.0 <= freshness(prom) < 5.0
