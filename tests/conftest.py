"""Shared fixtures. The Kafka broker is real: Apache Kafka started from deploy/kafka/kafka.sh."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streaming.settings import KafkaSettings
from streaming.topics import ensure_topics
from tests.secure_kafka import secure_kafka  # noqa: F401  (the SASL_SSL broker fixture)

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Broker:
    """A broker process run by kafka.sh; tests may stop and restart it (fault injection)."""

    port: int
    controller_port: int
    data_dir: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, cmd: str) -> None:
        args = [str(KAFKA_SH), cmd, "--port", str(self.port), "--controller-port", str(self.controller_port)]
        subprocess.run([*args, "--data-dir", str(self.data_dir)], check=True, timeout=300)

    def start(self) -> None:
        self._run("start")

    def stop(self) -> None:
        self._run("stop")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a running broker: ``KAFKA_BOOTSTRAP_SERVERS`` if set, else one started for the session."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    broker = Broker(free_port(), free_port(), tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> KafkaSettings:
    """Settings with a fresh topic prefix per test, its topics created."""
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=f"test-{uuid.uuid4().hex[:10]}.")
    ensure_topics(settings)
    return settings
