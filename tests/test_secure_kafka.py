"""kafka-python against a real SASL_SSL listener: mutual TLS, then PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.

What kafka-python 3.0.12 does when it is refused (measured here): producer, consumer and admin client
all connect eagerly in their constructors, and every refusal — a wrong password, no client
certificate, plaintext to the TLS port — ends the same way: the constructor raises
``kafka.errors.KafkaTimeoutError("Unable to bootstrap from <servers>")`` once ``bootstrap_timeout_ms``
(default 30 s) has run out, after retrying with backoff. The cause reaches only the logs
(``SaslAuthenticationFailedError`` or a plain "socket disconnected", ``SSLV3_ALERT_BAD_CERTIFICATE``),
so these tests read the broker's log to see that the refusal was the one intended.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaTimeoutError

from tests.secure_kafka import MECHANISMS, SecureKafka

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

# A refused client gives up after this long; generous enough for a loaded machine to still connect.
REFUSED_BOOTSTRAP_MS = 2000
WAIT_S = 30.0


def client_config(secure: SecureKafka, mechanism: str, **overrides: Any) -> dict[str, Any]:
    username, password = secure.users[mechanism]
    config: dict[str, Any] = {
        "bootstrap_servers": secure.bootstrap,
        "security_protocol": "SASL_SSL",
        "ssl_cafile": str(secure.ca_file),
        "ssl_certfile": str(secure.client_cert),
        "ssl_keyfile": str(secure.client_key),
        "ssl_check_hostname": True,
        "sasl_mechanism": mechanism,
        "sasl_plain_username": username,
        "sasl_plain_password": password,
        "request_timeout_ms": 10_000,
        "bootstrap_timeout_ms": 10_000,
    }
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def count_lines(log: Path, text: str) -> int:
    return sum(text in line for line in log.read_text(errors="replace").splitlines())


def wait_for_more_lines(log: Path, text: str, before: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while count_lines(log, text) <= before:
        assert time.monotonic() < deadline, f"the broker never logged {text!r} in {log}"
        time.sleep(0.1)


def assert_refused(config: dict[str, Any]) -> float:
    """The producer constructor gives up with KafkaTimeoutError after bootstrap_timeout_ms; returns seconds taken."""
    start = time.monotonic()
    with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):
        KafkaProducer(**config)
    elapsed = time.monotonic() - start
    assert REFUSED_BOOTSTRAP_MS / 1000 - 0.1 <= elapsed < REFUSED_BOOTSTRAP_MS / 1000 + 5.0
    return elapsed


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_records_round_trip_over_sasl_ssl(secure_kafka: SecureKafka, mechanism: str) -> None:
    topic = f"secure-{mechanism.lower()}-{uuid.uuid4().hex[:8]}"
    config = client_config(secure_kafka, mechanism)
    admin = KafkaAdminClient(**config)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()

    records = [(b"k0", bytes(range(256))), (b"k1", b""), (b"k2", "h\u00e9llo".encode()), (None, b"\x00\xff" * 1000)]
    producer = KafkaProducer(**config, max_block_ms=10_000)
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value).get(timeout=WAIT_S)
    finally:
        producer.close(timeout=10)

    consumer = KafkaConsumer(
        topic,
        **config,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    received: list[tuple[bytes | None, bytes]] = []
    try:
        deadline = time.monotonic() + WAIT_S
        while len(received) < len(records):
            assert time.monotonic() < deadline, f"consumed {len(received)} of {len(records)} records"
            for batch in consumer.poll(timeout_ms=500).values():
                received.extend((r.key, r.value) for r in batch)
    finally:
        consumer.close()
    assert received == records


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_wrong_password_fails_in_the_constructor(secure_kafka: SecureKafka, mechanism: str) -> None:
    # The broker names the failure; PLAIN and SCRAM word it differently.
    if mechanism == "PLAIN":
        text = "Invalid username or password"
    else:
        text = f"invalid credentials with SASL mechanism {mechanism}"
    before = count_lines(secure_kafka.server_log, text)
    config = client_config(
        secure_kafka, mechanism, sasl_plain_password="not-the-password", bootstrap_timeout_ms=REFUSED_BOOTSTRAP_MS
    )
    assert_refused(config)
    wait_for_more_lines(secure_kafka.server_log, text, before)


def test_client_without_certificate_is_refused(secure_kafka: SecureKafka, caplog: pytest.LogCaptureFixture) -> None:
    text = "(SSL handshake failed)"
    before = count_lines(secure_kafka.server_log, text)
    config = client_config(
        secure_kafka, "PLAIN", ssl_certfile=None, ssl_keyfile=None, bootstrap_timeout_ms=REFUSED_BOOTSTRAP_MS
    )
    # kafka.net by name: the processes' logging set-up (run in-process by other tests) silences it.
    with caplog.at_level(logging.WARNING, logger="kafka"), caplog.at_level(logging.WARNING, logger="kafka.net"):
        assert_refused(config)
    assert any("BAD_CERTIFICATE" in r.getMessage() for r in caplog.records), "the client never saw the TLS alert"
    wait_for_more_lines(secure_kafka.server_log, text, before)


def test_plaintext_to_the_sasl_ssl_port_fails(secure_kafka: SecureKafka) -> None:
    config = {
        "bootstrap_servers": secure_kafka.bootstrap,
        "security_protocol": "PLAINTEXT",
        "request_timeout_ms": 10_000,
        "bootstrap_timeout_ms": REFUSED_BOOTSTRAP_MS,
    }
    assert_refused(config)
    # The broker's other listener still speaks plaintext: the refusal was the port's, not the broker's.
    admin = KafkaAdminClient(**{**config, "bootstrap_servers": secure_kafka.plaintext_bootstrap})
    admin.close()
