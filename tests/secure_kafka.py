"""A real broker with a SASL_SSL listener (mutual TLS, then PLAIN or SCRAM), for tests of secured clients.

``kafka.sh certs`` makes a throw-away CA, a broker certificate for 127.0.0.1/localhost and a client
certificate; ``kafka.sh start --sasl-ssl-port`` starts a broker of its own (apart from the session's
plaintext one) with one user per SASL mechanism.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["MECHANISMS", "SecureKafka", "secure_kafka"]

KAFKA_SH = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "kafka.sh"
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# Different names and passwords per mechanism, so a test cannot pass with another mechanism's user.
USERS = {
    "PLAIN": ("plain-user", "plain-pw-4d1c"),
    "SCRAM-SHA-256": ("scram256-user", "scram256-pw-9a7e"),
    "SCRAM-SHA-512": ("scram512-user", "scram512-pw-2f08"),
}


@dataclass(frozen=True)
class SecureKafka:
    """Where the secured broker listens and what a client needs to reach it."""

    bootstrap: str  # the SASL_SSL listener, host:port
    plaintext_bootstrap: str  # the same broker's PLAINTEXT listener (inter-broker; handy for set-up)
    ca_file: Path
    client_cert: Path
    client_key: Path
    users: dict[str, tuple[str, str]]  # SASL mechanism -> (username, password)
    server_log: Path  # the broker's log, to tell an authentication failure from other refusals


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kafka_sh(*args: str) -> None:
    subprocess.run([str(KAFKA_SH), *args], check=True, timeout=300)


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    """A broker with a SASL_SSL listener on 127.0.0.1, certificates made for this session, stopped at its end."""
    tls_dir = tmp_path_factory.mktemp("tls")
    data_dir = tmp_path_factory.mktemp("secure-kafka")
    _kafka_sh("certs", "--dir", str(tls_dir))
    port, controller_port, sasl_ssl_port = _free_port(), _free_port(), _free_port()
    plain = "{}:{}".format(*USERS["PLAIN"])
    scram = ",".join("{}:{}".format(*USERS[m]) for m in ("SCRAM-SHA-256", "SCRAM-SHA-512"))
    where = ["--port", str(port), "--controller-port", str(controller_port), "--data-dir", str(data_dir)]
    try:
        _kafka_sh(
            "start",
            *where,
            "--sasl-ssl-port",
            str(sasl_ssl_port),
            "--tls-dir",
            str(tls_dir),
            "--plain-users",
            plain,
            "--scram-users",
            scram,
        )
        yield SecureKafka(
            bootstrap=f"127.0.0.1:{sasl_ssl_port}",
            plaintext_bootstrap=f"127.0.0.1:{port}",
            ca_file=tls_dir / "ca.pem",
            client_cert=tls_dir / "client.pem",
            client_key=tls_dir / "client.key",
            users=dict(USERS),
            server_log=data_dir / "server.log",
        )
    finally:
        _kafka_sh("stop", "--data-dir", str(data_dir))
