"""A real Prometheus server for tests: started on a free loopback port, queried over its HTTP API.

It scrapes the given targets every second and evaluates the repository's ``alerts.yml`` every
second, so a test sees a scrape or an alert transition within a second or two. Its TSDB lives in a
temporary directory that :meth:`PrometheusServer.stop` removes. Prometheus is Debian's
``prometheus`` package (``/usr/bin/prometheus``); without it the helper raises with the command
that installs it, so a test fails rather than skips.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "ALERTS",
    "Alert",
    "PrometheusServer",
    "Sample",
    "find_binary",
    "free_port",
    "poll",
]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
INSTALL_HINT = "install Debian's package: apt-get install -y --no-install-recommends prometheus"

T = TypeVar("T")


def find_binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; raises with the install command when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"'{name}' is not on PATH; the Prometheus tests need it: {INSTALL_HINT}")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Call ``check`` until it returns something other than ``None``/``False``; raise after ``timeout_s``.

    ``what`` names the awaited condition in the error, with the last value seen.
    """
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = check()
        if last is not None and last is not False:
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}; last seen: {last!r}")
        time.sleep(interval_s)


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector: its labels (``__name__`` included when kept) and value."""

    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Alert:
    """An alert as ``/api/v1/alerts`` reports it; ``state`` is ``"pending"`` or ``"firing"``."""

    name: str
    state: str
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float


class PrometheusServer:
    """A Prometheus process scraping ``targets`` (``{job_name: ["host:port", ...]}``) every second.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``rule_files`` defaults to the
    repository's alerts.yml, evaluated every ``evaluation_interval_s``.
    """

    def __init__(
        self,
        targets: Mapping[str, Sequence[str]],
        *,
        rule_files: Sequence[Path] = (ALERTS,),
        scrape_interval_s: int = 1,
        evaluation_interval_s: int = 1,
        port: int | None = None,
    ) -> None:
        self.targets = {job: list(hosts) for job, hosts in targets.items()}
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.scrape_interval_s = scrape_interval_s
        self.evaluation_interval_s = evaluation_interval_s
        self.port = port or free_port()
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        """The configuration file's content. JSON is valid YAML, so it is written with :mod:`json`."""
        interval = f"{self.scrape_interval_s}s"
        return {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": f"{self.evaluation_interval_s}s",
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in self.targets.items()
            ],
        }

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the server and wait until ``/-/ready`` answers 200."""
        binary = find_binary("prometheus")
        self._workdir = Path(tempfile.mkdtemp(prefix="freshtower-prometheus-"))
        config = self._workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2))
        log = (self._workdir / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={self._workdir / 'tsdb'}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            poll(self._ready, timeout_s, f"Prometheus at {self.url} to be ready")
        except BaseException:
            self.stop()
            raise
        logger.info("Prometheus %s ready at %s", self.version(), self.url)

    def _ready(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"Prometheus exited with {self._process.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 10 s) and remove its directory."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's own log, for error messages."""
        if self._workdir is None:
            return ""
        path = self._workdir / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"GET {path} {params}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
        if body.get("status") != "success":
            raise RuntimeError(f"GET {path} {params}: expected status 'success', got {body}")
        return body["data"]

    def version(self) -> str:
        return self._get("/api/v1/status/buildinfo")["version"]

    def query(self, promql: str) -> list[Sample]:
        """Evaluate ``promql`` now; an instant vector becomes samples, a scalar one unlabelled sample."""
        data = self._get("/api/v1/query", query=promql)
        if data["resultType"] == "vector":
            return [Sample(dict(item["metric"]), float(item["value"][1])) for item in data["result"]]
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        raise ValueError(f"query {promql!r}: expected an instant vector or scalar, got {data['resultType']}")

    def alerts(self) -> list[Alert]:
        """Every pending or firing alert."""
        return [
            Alert(
                name=a["labels"]["alertname"],
                state=a["state"],
                labels=dict(a["labels"]),
                annotations=dict(a["annotations"]),
                value=float(a["value"]),
            )
            for a in self._get("/api/v1/alerts")["alerts"]
        ]

    def target_health(self) -> dict[str, str]:
        """``{"job/instance": "up" | "down" | "unknown"}`` for every configured target."""
        return {
            f"{t['labels']['job']}/{t['labels']['instance']}": t["health"]
            for t in self._get("/api/v1/targets", state="active")["activeTargets"]
        }
