"""Settings: one frozen object per process, read from ``FRESHTOWER_*`` variables and a TOML file.

Each process defines a frozen dataclass of its settings and builds it once with
:func:`load_settings`; the object is then passed down explicitly. Precedence, lowest first: the
dataclass defaults, the ``[section]`` table of the TOML file named by ``FRESHTOWER_CONFIG`` (or the
``config`` argument), ``FRESHTOWER_<FIELD>`` environment variables, ``FRESHTOWER_<SECTION>_<FIELD>``
variables, explicit ``overrides`` (command-line flags).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["KafkaSettings", "SettingsError", "load_settings"]

T = TypeVar("T")
ENV_PREFIX = "FRESHTOWER_"
COMPRESSION_CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class SettingsError(ValueError):
    """A setting has a value of the wrong type or an unknown name."""


@dataclass(frozen=True)
class KafkaSettings:
    """Where the event topics live and how records are bounded.

    Topic names are ``<topic_prefix><name>``. ``max_record_bytes`` and ``max_future_ms`` bound what
    :func:`streaming.events.decode` accepts; anything else goes to the dead-letter topic.
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "freshtower."
    partitions: int = 4
    replication_factor: int = 1
    retention_ms: int = -1
    max_record_bytes: int = 16 * 1024
    max_future_ms: int = 24 * 3600 * 1000
    # Producers compress their batches with this codec; consumers read every codec whatever it says.
    compression: str = "none"
    # How every client reaches the cluster: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    security_protocol: str = "PLAINTEXT"
    ssl_cafile: Path | None = None  # the CA that signed the brokers' certificates (default: the system's)
    ssl_certfile: Path | None = None  # client certificate (PEM) for mutual TLS
    ssl_keyfile: Path | None = None  # its private key (PEM)
    ssl_check_hostname: bool = True
    sasl_mechanism: str = "PLAIN"  # PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512
    sasl_username: str = ""
    # The password: FRESHTOWER_KAFKA_SASL_PASSWORD, or a file (a mounted secret) named by sasl_password_file.
    # Never part of the repr, so settings can be logged.
    sasl_password: str = field(default="", repr=False)
    sasl_password_file: Path | None = None

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSION_CODECS:
            raise SettingsError(f"kafka compression: expected one of {COMPRESSION_CODECS}, got {self.compression!r}")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise SettingsError(
                f"kafka security_protocol: expected one of {SECURITY_PROTOCOLS}, got {self.security_protocol!r}"
            )
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise SettingsError(
                    f"kafka sasl_mechanism: expected one of {SASL_MECHANISMS}, got {self.sasl_mechanism!r}"
                )
            if not self.sasl_username:
                raise SettingsError(f"kafka security_protocol {self.security_protocol} needs sasl_username")
            if not self.sasl_password and self.sasl_password_file is None:
                raise SettingsError(
                    f"kafka security_protocol {self.security_protocol} needs a password: FRESHTOWER_KAFKA_SASL_PASSWORD"
                    " or sasl_password_file"
                )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise SettingsError("kafka ssl_certfile and ssl_keyfile go together (mutual TLS needs both)")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_password_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise SettingsError(f"kafka {name}: {path} is not a readable file")

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def client_config(self) -> dict[str, Any]:
        """Keyword arguments that every Kafka client of the project takes: where the cluster is and how to reach it.

        The password is read here (from the setting or its file), each time a client is made, so a rotated
        secret file is picked up by the next client."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            config["ssl_check_hostname"] = self.ssl_check_hostname
            if self.ssl_cafile is not None:
                config["ssl_cafile"] = str(self.ssl_cafile)
            if self.ssl_certfile is not None:
                config["ssl_certfile"] = str(self.ssl_certfile)
                config["ssl_keyfile"] = str(self.ssl_keyfile)
        if self.security_protocol.startswith("SASL_"):
            password = self.sasl_password
            if self.sasl_password_file is not None:
                password = Path(self.sasl_password_file).read_text().strip()
            config["sasl_mechanism"] = self.sasl_mechanism
            config["sasl_plain_username"] = self.sasl_username
            config["sasl_plain_password"] = password
        return config

    def producer_config(self) -> dict[str, Any]:
        """:meth:`client_config` plus the batch codec producers use."""
        codec = None if self.compression == "none" else self.compression
        return {**self.client_config(), "compression_type": codec}


def _convert(name: str, raw: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("", "none", "null")):
            return None
        hint = args[0]
    if isinstance(raw, str):
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise SettingsError(f"setting '{name}': expected a boolean (true/false), got {raw!r}")
        if hint in (int, float):
            try:
                return hint(raw)
            except ValueError:
                raise SettingsError(f"setting '{name}': expected {hint.__name__}, got {raw!r}") from None
        if hint is Path:
            return Path(raw)
        if typing.get_origin(hint) is tuple:
            return tuple(
                _convert(name, part.strip(), typing.get_args(hint)[0]) for part in raw.split(",") if part.strip()
            )
        return raw
    if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if hint is Path and isinstance(raw, str | os.PathLike):
        return Path(raw)
    if typing.get_origin(hint) is tuple and isinstance(raw, list):
        return tuple(raw)
    expected = getattr(hint, "__name__", str(hint))
    if isinstance(hint, type) and not isinstance(raw, hint):
        raise SettingsError(f"setting '{name}': expected {expected}, got {type(raw).__name__} {raw!r}")
    return raw


def load_settings(
    cls: type[T],
    *,
    section: str,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> T:
    """Build the frozen settings ``cls`` from defaults, a TOML ``[section]``, the environment and overrides."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    config = config or env.get(ENV_PREFIX + "CONFIG")
    if config:
        with open(config, "rb") as fh:
            table = tomllib.load(fh).get(section, {})
        unknown = set(table) - fields
        if unknown:
            raise SettingsError(f"{config} [{section}]: unknown setting(s) {sorted(unknown)}; known: {sorted(fields)}")
        values.update(table)
    for name in fields:
        # FRESHTOWER_<SECTION>_<FIELD> wins over FRESHTOWER_<FIELD>: processes that share a machine (and a
        # field name such as metrics_port) can then be configured apart.
        for key in (ENV_PREFIX + name.upper(), f"{ENV_PREFIX}{section.upper()}_{name.upper()}"):
            if key in env:
                values[name] = env[key]
    for name, value in (overrides or {}).items():
        if value is not None:
            if name not in fields:
                raise SettingsError(f"unknown setting {name!r}; known: {sorted(fields)}")
            values[name] = value
    return cls(**{name: _convert(name, value, hints[name]) for name, value in values.items()})
