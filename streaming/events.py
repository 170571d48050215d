"""Event contracts: the four record types that flow through Kafka, their encoding and validation.

Every record is a JSON object with a schema version ``v`` and a ``type``. Impressions, clicks and
user profiles are keyed by ``user_id`` so that all state of one user lives on one partition (and so
in one streaming worker); catalogue records are keyed by ``item_id`` (the items topic is compacted,
so the latest record per item survives).

Times are integer milliseconds since the Unix epoch (``ts_ms``), the unit Kafka uses for record
timestamps. A record that fails :func:`decode` raises :class:`InvalidEvent` whose ``reason`` says
what was expected and what arrived; the consumer sends such records to the dead-letter topic.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

__all__ = [
    "SCHEMA_VERSION",
    "Click",
    "Event",
    "Impression",
    "InvalidEvent",
    "Item",
    "Limits",
    "UserProfile",
    "decode",
    "encode",
    "event_key",
]

SCHEMA_VERSION = 1

logger = logging.getLogger(__name__)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class InvalidEvent(ValueError):
    """A record that does not satisfy its contract. ``reason`` is a one-line explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Bounds applied by :func:`decode`; a record outside them is invalid.

    ``max_future_ms``: how far past the wall clock an event time may lie (clock skew between
    clients). ``now_ms``: the wall clock to compare with; ``None`` reads :func:`time.time`.
    """

    max_bytes: int = 16 * 1024
    max_id_chars: int = 256
    max_list_len: int = 256
    max_future_ms: int = 24 * 3600 * 1000
    now_ms: int | None = None


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Impression:
    """An item shown to a user in the slate of one request, at a 0-based position."""

    TYPE: ClassVar[str] = "impression"
    user_id: str
    item_id: str
    request_id: str
    position: int
    ts_ms: int


@dataclass(frozen=True, slots=True)
class Click:
    """A click on an item shown in request ``request_id``; the retrieval positive."""

    TYPE: ClassVar[str] = "click"
    user_id: str
    item_id: str
    request_id: str
    ts_ms: int


@dataclass(frozen=True, slots=True)
class Item:
    """A catalogue record: the item tower's features. ``created_ms`` is when the item appeared."""

    TYPE: ClassVar[str] = "item"
    item_id: str
    category: str
    tags: tuple[str, ...]
    stats: dict[str, float]
    created_ms: int
    ts_ms: int


@dataclass(frozen=True, slots=True)
class UserProfile:
    """A user profile record: the user tower's non-behavioural features.

    ``discrete``: single-valued categorical features (city, gender, ...);
    ``multi``: multi-valued categorical features (interest topics, ...);
    ``numeric``: continuous features (age, account age in days, ...).
    """

    TYPE: ClassVar[str] = "user"
    user_id: str
    discrete: dict[str, str] = field(default_factory=dict)
    multi: dict[str, tuple[str, ...]] = field(default_factory=dict)
    numeric: dict[str, float] = field(default_factory=dict)
    ts_ms: int = 0


Event = Impression | Click | Item | UserProfile
_TYPES: dict[str, type] = {c.TYPE: c for c in (Impression, Click, Item, UserProfile)}


def event_key(event: Event) -> bytes:
    """The Kafka key: ``item_id`` for catalogue records, ``user_id`` for everything else."""
    return (event.item_id if isinstance(event, Item) else event.user_id).encode()


def encode(event: Event) -> bytes:
    """Serialise an event as compact UTF-8 JSON with its schema version and type."""
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "type": event.TYPE}
    body.update(asdict(event))
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def decode(raw: bytes | None, limits: Limits = DEFAULT_LIMITS) -> Event:
    """Parse and validate one record. Raises :class:`InvalidEvent` with the reason, and nothing else.

    A record that trips an unforeseen error in the parser is invalid too (reason ``internal error: ...``): a
    consumer dead-letters it and goes on, where an escaped exception would stop it on the same record at every
    restart."""
    try:
        return _decode(raw, limits)
    except InvalidEvent:
        raise
    except Exception as exc:
        logger.exception("decoding a record failed unexpectedly; it is treated as invalid")
        raise InvalidEvent(f"internal error: {type(exc).__name__}: {exc}") from exc


def _decode(raw: bytes | None, limits: Limits) -> Event:
    if raw is None:
        raise InvalidEvent("empty record: value is null")
    if len(raw) > limits.max_bytes:
        raise InvalidEvent(f"payload is {len(raw)} bytes, limit is {limits.max_bytes}")
    try:
        obj = json.loads(raw.decode("utf-8"))  # UTF-8 by contract (and without json's encoding sniffing per record)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidEvent(f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(obj).__name__}")
    if _SURROGATE_ESCAPE.search(raw):
        # JSON lets "\ud800" stand alone; Python then holds a string that UTF-8 (RocksDB keys, Parquet, the
        # re-encoded record) refuses. A proper pair ("\ud83d\ude00", an emoji) is fine.
        try:
            json.dumps(obj, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidEvent("a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)") from None
    version = obj.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:  # not True, 1.0 or "1"
        raise InvalidEvent(f"unknown schema version {version!r}; this reader understands v{SCHEMA_VERSION}")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _TYPES:  # a list or an object is unhashable: test the type first
        raise InvalidEvent(f"unknown event type {kind!r}; expected one of {sorted(_TYPES)}")
    return _PARSERS[kind](_Fields(obj, kind, limits))


class _Fields:
    """Typed accessors over one decoded JSON object; every failure names the field."""

    # Per event type, every key a record may carry: its fields, the schema version and the type (once, not per record).
    _ALLOWED = {kind: frozenset(cls.__dataclass_fields__) | {"v", "type"} for kind, cls in _TYPES.items()}

    def __init__(self, obj: dict[str, Any], kind: str, limits: Limits) -> None:
        self.obj, self.kind, self.limits = obj, kind, limits
        unknown = obj.keys() - self._ALLOWED[kind]
        if unknown:
            raise InvalidEvent(f"{kind}: unknown field(s) {sorted(unknown)}")

    def _get(self, name: str, default: Any = ...) -> Any:
        if name not in self.obj:
            if default is ...:
                raise InvalidEvent(f"{self.kind}: missing field '{name}'")
            return default
        return self.obj[name]

    def _fail(self, name: str, expected: str, value: Any) -> InvalidEvent:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return InvalidEvent(f"{self.kind}.{name}: expected {expected}, got {type(value).__name__} {shown}")

    def ident(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str) or not value or len(value) > self.limits.max_id_chars:
            raise self._fail(name, f"a non-empty string of at most {self.limits.max_id_chars} chars", value)
        return value

    def count(self, name: str) -> int:
        value = self._get(name)
        if type(value) is not int or value < 0:
            raise self._fail(name, "an integer >= 0", value)
        return value

    def timestamp(self, name: str, default: Any = ...) -> int:
        value = self._get(name, default)
        if type(value) is not int:
            raise self._fail(name, "an integer time in ms since the epoch", value)
        if value < 0:
            raise InvalidEvent(f"{self.kind}.{name}: negative timestamp {value}")
        now_ms = self.limits.now_ms if self.limits.now_ms is not None else int(time.time() * 1000)
        if value > now_ms + self.limits.max_future_ms:
            ahead_h = (value - now_ms) / 3_600_000
            raise InvalidEvent(
                f"{self.kind}.{name}: timestamp {value} is {ahead_h:.1f} h in the future "
                f"(allowed skew {self.limits.max_future_ms / 3_600_000:.1f} h)"
            )
        return value

    def strings(self, value: Any, name: str) -> tuple[str, ...]:
        if not isinstance(value, list) or len(value) > self.limits.max_list_len:
            raise self._fail(name, f"a list of at most {self.limits.max_list_len} strings", value)
        for v in value:
            if not isinstance(v, str) or not v or len(v) > self.limits.max_id_chars:
                raise self._fail(name, "a list of non-empty strings", value)
        return tuple(value)

    def mapping(self, name: str) -> dict[str, Any]:
        value = self._get(name, {})
        if not isinstance(value, dict) or len(value) > self.limits.max_list_len:
            raise self._fail(name, "a JSON object", value)
        return value

    def numbers(self, name: str) -> dict[str, float]:
        out = {}
        for key, v in self.mapping(name).items():
            if type(v) not in (int, float) or not math.isfinite(v):
                raise self._fail(f"{name}.{key}", "a finite number", v)
            out[key] = float(v)
        return out

    def labels(self, name: str) -> dict[str, str]:
        out = {}
        for key, v in self.mapping(name).items():
            if not isinstance(v, str) or not v:
                raise self._fail(f"{name}.{key}", "a non-empty string", v)
            out[key] = v
        return out

    def label_lists(self, name: str) -> dict[str, tuple[str, ...]]:
        return {key: self.strings(v, f"{name}.{key}") for key, v in self.mapping(name).items()}


def _impression(f: _Fields) -> Impression:
    return Impression(
        f.ident("user_id"), f.ident("item_id"), f.ident("request_id"), f.count("position"), f.timestamp("ts_ms")
    )


def _click(f: _Fields) -> Click:
    return Click(f.ident("user_id"), f.ident("item_id"), f.ident("request_id"), f.timestamp("ts_ms"))


def _item(f: _Fields) -> Item:
    return Item(
        item_id=f.ident("item_id"),
        category=f.ident("category"),
        tags=f.strings(f._get("tags"), "tags"),
        stats=f.numbers("stats"),
        created_ms=f.timestamp("created_ms"),
        ts_ms=f.timestamp("ts_ms"),
    )


def _user(f: _Fields) -> UserProfile:
    return UserProfile(
        user_id=f.ident("user_id"),
        discrete=f.labels("discrete"),
        multi=f.label_lists("multi"),
        numeric=f.numbers("numeric"),
        ts_ms=f.timestamp("ts_ms"),
    )


_PARSERS = {"impression": _impression, "click": _click, "item": _item, "user": _user}
