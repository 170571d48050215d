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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["KafkaSettings", "SettingsError", "load_settings"]

T = TypeVar("T")
ENV_PREFIX = "FRESHTOWER_"


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

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


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
