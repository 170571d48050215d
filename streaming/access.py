"""Why a Kafka client could not bootstrap: the cluster is unreachable, or it refused this client.

kafka-python 3.0 reports every bootstrap failure the same way, ``KafkaTimeoutError("Unable to bootstrap from
...")`` after ``bootstrap_timeout_ms``, whether no broker listens, the TLS handshake failed or the SASL password
was wrong. Retrying a refusal only repeats it, and an operator needs to know which it was, so :func:`diagnose`
probes the first reachable bootstrap server with the same settings: a TCP connect, then (for SSL and SASL_SSL)
a TLS handshake with the configured CA, client certificate and hostname check. A connection the broker accepts
at the TCP and TLS level and then closes during the handshake is a refusal of the credentials or the protocol.
"""

from __future__ import annotations

import socket
import ssl

from streaming.lifecycle import KafkaAuthFailed, KafkaStalled
from streaming.settings import KafkaSettings

__all__ = ["diagnose", "is_bootstrap_failure"]


def is_bootstrap_failure(exc: BaseException) -> bool:
    """True for the error kafka-python raises when no bootstrap server could be used."""
    return type(exc).__name__ in ("KafkaTimeoutError", "NoBrokersAvailable") and "bootstrap" in str(exc).lower()


def _servers(settings: KafkaSettings) -> list[tuple[str, int]]:
    out = []
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        out.append((host.strip("[]") or "localhost", int(port or 9092)))
    return out


def _tls_context(settings: KafkaSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None)
    context.check_hostname = settings.ssl_check_hostname
    if settings.ssl_certfile is not None:
        context.load_cert_chain(str(settings.ssl_certfile), str(settings.ssl_keyfile))
    return context


def diagnose(settings: KafkaSettings, timeout_s: float = 5.0) -> KafkaAuthFailed | KafkaStalled:
    """The error to end the process with after a bootstrap failure (returned, not raised). Never logs secrets."""
    where = f"{settings.bootstrap_servers} ({settings.security_protocol}"
    where += (
        f", SASL {settings.sasl_mechanism} as {settings.sasl_username!r})"
        if "SASL" in settings.security_protocol
        else ")"
    )
    unreachable = []
    for host, port in _servers(settings):
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as exc:
            unreachable.append(f"{host}:{port}: {exc.strerror or exc}")
            continue
        with sock:
            if settings.security_protocol in ("SSL", "SASL_SSL"):
                try:
                    with _tls_context(settings).wrap_socket(sock, server_hostname=host) as tls:
                        # With mutual TLS 1.3 a refused client certificate shows only at the first read.
                        tls.settimeout(0.5)
                        try:
                            tls.recv(1)
                        except TimeoutError:
                            pass
                except ssl.SSLError as exc:
                    return KafkaAuthFailed(
                        f"TLS with {host}:{port} failed: {exc.reason or exc}; check ssl_cafile, ssl_certfile, "
                        "ssl_keyfile and ssl_check_hostname"
                    )
                except OSError as exc:
                    return KafkaAuthFailed(f"TLS with {host}:{port} failed: {exc}")
        if settings.security_protocol in ("PLAINTEXT", "SSL"):
            # Nothing to refuse but the protocol itself; a broker still starting looks the same, so retry.
            return KafkaStalled(
                f"Kafka at {where} accepted the connection but the Kafka handshake failed: a broker starting up, "
                "or a listener that expects another security_protocol"
            )
        return KafkaAuthFailed(
            f"Kafka at {where} accepted the connection and then refused this client: check the security protocol, "
            "the SASL mechanism, the user name and the password (FRESHTOWER_KAFKA_SASL_PASSWORD or sasl_password_file)"
        )
    return KafkaStalled(f"cannot reach Kafka at {where}: {'; '.join(unreachable)}")
