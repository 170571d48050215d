"""A real Prometheus server for tests: started on a free loopback port, queried over its HTTP API; and a real
Pushgateway (:class:`Pushgateway`, Debian's ``prometheus-pushgateway``) for the nightly job's pushes.

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

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "ALERTS",
    "Alert",
    "PrometheusServer",
    "Pushgateway",
    "Sample",
    "find_binary",
    "free_port",
    "poll",
]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
INSTALL_HINT = "install Debian's packages: apt-get install -y --no-install-recommends prometheus prometheus-pushgateway"

T = TypeVar("T")
S = TypeVar("S", bound="_ServerProcess")


def find_binary(name: str, *aliases: str) -> str:
    """The path of ``prometheus``, ``promtool`` or the Pushgateway (``name`` or one of ``aliases``); raises with
    the install command when it is missing."""
    for candidate in (name, *aliases):
        path = shutil.which(candidate)
        if path is not None:
            return path
    raise FileNotFoundError(f"'{name}' is not on PATH; the Prometheus tests need it: {INSTALL_HINT}")


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


class _ServerProcess:
    """A Prometheus-project server on a free loopback port, in a temporary directory; a context manager."""

    NAME = ""

    def __init__(self, port: int | None) -> None:
        self.port = port or free_port()
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """``host:port``, as a scrape target or a ``--pushgateway`` value."""
        return f"127.0.0.1:{self.port}"

    def argv(self, workdir: Path) -> list[str]:
        """The command line, given the run's directory."""
        raise NotImplementedError

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the server and wait until ``/-/ready`` answers 200."""
        self._workdir = Path(tempfile.mkdtemp(prefix=f"freshtower-{self.NAME.lower()}-"))
        argv = self.argv(self._workdir)
        log = (self._workdir / "server.log").open("wb")
        self._process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            poll(self._ready, timeout_s, f"{self.NAME} at {self.url} to be ready")
        except BaseException:
            self.stop()
            raise
        logger.info("%s ready at %s", self.NAME, self.url)

    def _ready(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"{self.NAME} exited with {self._process.returncode}:\n{self.log_tail()}")
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

    def __enter__(self: S) -> S:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's own log, for error messages."""
        if self._workdir is None:
            return ""
        path = self._workdir / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


class Pushgateway(_ServerProcess):
    """A Pushgateway process (no persistence file: it forgets everything when stopped)."""

    NAME = "Pushgateway"

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)

    def argv(self, workdir: Path) -> list[str]:
        binary = find_binary("pushgateway", "prometheus-pushgateway")
        # Debian's build persists to /var/lib/prometheus by default: an empty file name keeps it in memory.
        return [binary, f"--web.listen-address={self.address}", "--persistence.file=", "--log.level=warn"]

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample the gateway exposes: ``{(name, frozenset(labels)): value}``."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, *, instance: str | None = None, **labels: str) -> float | None:
        """The value of one pushed sample of job freshtower-full in the group ``instance``, or None.

        ``instance`` None: the gateway's only group of that job (an error when there are several)."""
        found = {
            dict(key)["instance"]: value
            for (sample, key), value in self.metrics().items()
            if sample == name
            and dict(key).get("job") == "freshtower-full"
            and {k: v for k, v in key if k not in ("job", "instance")} == labels
            and (instance is None or dict(key)["instance"] == instance)
        }
        assert len(found) <= 1, f"{name} pushed by several instances: {sorted(found)}; name one"
        return next(iter(found.values()), None)


class PrometheusServer(_ServerProcess):
    """A Prometheus process scraping ``targets`` (``{job_name: ["host:port", ...]}``) every second.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``rule_files`` defaults to the
    repository's alerts.yml, evaluated every ``evaluation_interval_s``. The jobs in ``honor_labels`` keep the
    job and instance labels of the scraped series (a Pushgateway's).
    """

    NAME = "Prometheus"

    def __init__(
        self,
        targets: Mapping[str, Sequence[str]],
        *,
        rule_files: Sequence[Path] = (ALERTS,),
        scrape_interval_s: int = 1,
        evaluation_interval_s: int = 1,
        port: int | None = None,
        honor_labels: Sequence[str] = (),
    ) -> None:
        super().__init__(port)
        self.targets = {job: list(hosts) for job, hosts in targets.items()}
        self.honor_labels = set(honor_labels)
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.scrape_interval_s = scrape_interval_s
        self.evaluation_interval_s = evaluation_interval_s

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
                {"job_name": job, "honor_labels": job in self.honor_labels, "static_configs": [{"targets": hosts}]}
                for job, hosts in self.targets.items()
            ],
        }

    def argv(self, workdir: Path) -> list[str]:
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2))
        return [
            find_binary("prometheus"),
            f"--config.file={config}",
            f"--web.listen-address={self.address}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            "--log.level=warn",
        ]

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
