"""The project's processes through a SASL_SSL listener (mutual TLS + SASL), and what a refused one does.

The worker, the archive sink and the publisher's fan-out with its replica each reach the secured broker with
the settings a deployment would give them in ``[kafka]``; each uses another SASL mechanism. A wrong password,
a missing client certificate or the wrong CA ends a process with one clear error line and exit code 77,
at once rather than after a retry storm, and the password never reaches the log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from streaming.archive import days, read_events, visible_files
from streaming.archive_sink import ArchiveSink
from streaming.events import Click, encode
from streaming.lifecycle import EXIT_AUTH
from streaming.settings import KafkaSettings
from streaming.topics import ensure_topics
from streaming.worker import Worker, WorkerSettings
from tests.secure_kafka import SecureKafka
from tests.test_codecs import assert_fanout_round_trip
from tests.worker_fixtures import produce, register_model, run_to_idle, split_world
from trainer.artifact import load_version

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def secure_settings(secure: SecureKafka, mechanism: str, prefix: str, **overrides) -> KafkaSettings:
    username, password = secure.users[mechanism]
    fields = {
        "bootstrap_servers": secure.bootstrap,
        "topic_prefix": prefix,
        "security_protocol": "SASL_SSL",
        "ssl_cafile": secure.ca_file,
        "ssl_certfile": secure.client_cert,
        "ssl_keyfile": secure.client_key,
        "sasl_mechanism": mechanism,
        "sasl_username": username,
        "sasl_password": password,
        **overrides,
    }
    return KafkaSettings(**fields)


def test_worker_archive_sink_and_fanout_work_through_sasl_ssl(secure_kafka, tmp_path):
    prefix = f"sec-{uuid.uuid4().hex[:6]}."
    world, day_one, day_two = split_world()
    day_two = day_two[:3000]
    producer_settings = secure_settings(secure_kafka, "SCRAM-SHA-512", prefix, compression="zstd")
    assert secure_kafka.users["SCRAM-SHA-512"][1] not in repr(producer_settings)  # settings may be logged
    ensure_topics(producer_settings)
    produce(producer_settings, day_two)

    registry = register_model(tmp_path / "models", day_one)
    worker = Worker(
        secure_settings(secure_kafka, "SCRAM-SHA-512", prefix),
        WorkerSettings(state_dir=tmp_path / "state", group_id=f"w-{uuid.uuid4().hex[:6]}", batch_size=64, sync=False),
        load_version(registry.path("v1")),
    )
    run_to_idle(worker)
    assert worker.learner.examples == sum(isinstance(e, Click) for e in day_two)
    worker.close()

    sink = ArchiveSink(
        secure_settings(secure_kafka, "SCRAM-SHA-256", prefix),
        tmp_path / "archive",
        group_id=f"a-{uuid.uuid4().hex[:6]}",
        flush_every_s=0.5,
    )
    run_to_idle(sink)
    archived = [
        e for day in days(tmp_path / "archive") for f in visible_files(tmp_path / "archive", day)
        for e in read_events(f.path, f.kind)
    ]  # fmt: skip
    assert sorted(encode(e) for e in archived) == sorted(encode(e) for e in day_two)

    # The password from a file, as a mounted secret would give it.
    secret = tmp_path / "kafka-password"
    secret.write_text(secure_kafka.users["PLAIN"][1] + "\n")
    fan_settings = secure_settings(secure_kafka, "PLAIN", prefix, sasl_password="", sasl_password_file=secret)
    assert_fanout_round_trip(fan_settings, tmp_path, rows=50)


def _env(secure: SecureKafka, prefix: str, **kafka: str) -> dict[str, str]:
    username, password = secure.users["SCRAM-SHA-256"]
    fields = {
        "BOOTSTRAP_SERVERS": secure.bootstrap,
        "TOPIC_PREFIX": prefix,
        "SECURITY_PROTOCOL": "SASL_SSL",
        "SSL_CAFILE": str(secure.ca_file),
        "SSL_CERTFILE": str(secure.client_cert),
        "SSL_KEYFILE": str(secure.client_key),
        "SASL_MECHANISM": "SCRAM-SHA-256",
        "SASL_USERNAME": username,
        "SASL_PASSWORD": password,
        **kafka,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHTOWER_")}
    env.update({f"FRESHTOWER_KAFKA_{k}": v for k, v in fields.items() if v is not None})
    return env


@pytest.mark.parametrize(
    ("case", "fields", "says"),
    [
        ("wrong password", {"SASL_PASSWORD": "not-the-password-31c7"}, "refused this client"),
        ("no client certificate", {"SSL_CERTFILE": "", "SSL_KEYFILE": ""}, "TLS with"),
        ("another CA", {"SSL_CAFILE": "<other-ca>"}, "TLS with"),
    ],
)
def test_a_refused_process_exits_77_at_once_with_one_clear_error(secure_kafka, tmp_path, case, fields, says):
    if fields.get("SSL_CAFILE") == "<other-ca>":
        other = tmp_path / "other-ca"
        subprocess.run([str(REPO / "deploy/kafka/kafka.sh"), "certs", "--dir", str(other)], check=True, timeout=60)
        fields = {"SSL_CAFILE": str(other / "ca.pem")}
    env = _env(secure_kafka, f"ref-{uuid.uuid4().hex[:6]}.", **fields)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "streaming", "archive", "--archive", str(tmp_path / "archive")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    took = time.monotonic() - started
    log = done.stdout + done.stderr
    assert done.returncode == EXIT_AUTH, log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and says in errors[0], log
    assert "Traceback" not in log
    assert secure_kafka.users["SCRAM-SHA-256"][1] not in log and "not-the-password" not in log
    assert took < 45, f"{case}: refused after {took:.0f} s"
