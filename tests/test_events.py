"""Event contracts: encoding round trips and one precise reason per kind of bad record."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from streaming import events
from streaming.events import (
    SCHEMA_VERSION,
    Click,
    Impression,
    InvalidEvent,
    Item,
    Limits,
    UserProfile,
    decode,
    encode,
    event_key,
)

NOW = 1_700_000_000_000
LIMITS = Limits(now_ms=NOW)

GOOD = [
    Impression("u1", "i9", "r1", 3, NOW - 1000),
    Click("u1", "i9", "r1", NOW - 500),
    Item("i9", "jazz", ("live", "piano"), {"price": 9.5, "plays": 120.0}, NOW - 86_400_000, NOW - 10),
    UserProfile("u1", {"city": "oslo"}, {"topics": ("jazz", "rock")}, {"age": 31.0}, NOW - 5),
]


@pytest.mark.parametrize("event", GOOD, ids=lambda e: e.TYPE)
def test_round_trip(event):
    assert decode(encode(event), LIMITS) == event


def test_escaped_surrogate_pairs_are_characters():
    # "\ud83d\ude00" is one character (an emoji) written as a UTF-16 pair: valid, unlike a lone half.
    raw = _click(user_id="u\U0001f600")
    assert b"\\ud83d\\ude00" in raw
    assert decode(raw, LIMITS).user_id == "u\U0001f600"


def test_encoding_is_versioned_json():
    body = json.loads(encode(GOOD[1]))
    assert body == {
        "v": SCHEMA_VERSION,
        "type": "click",
        "user_id": "u1",
        "item_id": "i9",
        "request_id": "r1",
        "ts_ms": NOW - 500,
    }


def test_keys_place_user_state_on_user_partitions():
    assert [event_key(e) for e in GOOD] == [b"u1", b"u1", b"i9", b"u1"]


def _click(**changes):
    body = {"v": 1, "type": "click", "user_id": "u1", "item_id": "i9", "request_id": "r1", "ts_ms": NOW}
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (None, "empty record"),
        (_click(v=2), "unknown schema version 2"),
        (_click(v=...), "unknown schema version None"),
        (_click(v=True), "unknown schema version True"),
        (_click(v=1.0), "unknown schema version 1.0"),
        (_click(type="purchase"), "unknown event type 'purchase'"),
        (_click(type=["click"]), "unknown event type ['click']"),
        (_click(type={"click": 1}), "unknown event type {'click': 1}"),
        (_click(user_id=...), "click: missing field 'user_id'"),
        (_click(user_id=17), "click.user_id: expected a non-empty string"),
        (_click(user_id=""), "click.user_id: expected a non-empty string"),
        (_click(ts_ms="yesterday"), "click.ts_ms: expected an integer time in ms since the epoch, got str"),
        (_click(ts_ms=1.5e12), "click.ts_ms: expected an integer time in ms since the epoch, got float"),
        (_click(ts_ms=True), "click.ts_ms: expected an integer time in ms since the epoch, got bool"),
        (_click(ts_ms=-5), "click.ts_ms: negative timestamp -5"),
        (_click(ts_ms=NOW + 48 * 3_600_000), "click.ts_ms: timestamp 1700172800000 is 48.0 h in the future"),
        (_click(extra="x"), "click: unknown field(s) ['extra']"),
        (_click(user_id="u\ud800"), "lone UTF-16 surrogate"),
        (_click(request_id="\udfff"), "lone UTF-16 surrogate"),
        (_click(item_id="x" * 300), "click.item_id: expected a non-empty string of at most 256 chars"),
        (_click(request_id="r" * 20_000), "payload is 20"),
    ],
)
def test_invalid_records_say_why(raw, reason):
    with pytest.raises(InvalidEvent) as info:
        decode(raw, LIMITS)
    assert reason in info.value.reason


def test_nested_feature_errors_name_the_field():
    item = json.loads(encode(GOOD[2]))
    item["stats"]["price"] = "cheap"
    with pytest.raises(InvalidEvent, match=r"item.stats.price: expected a finite number, got str 'cheap'"):
        decode(json.dumps(item).encode(), LIMITS)
    item["stats"]["price"] = float("nan")
    with pytest.raises(InvalidEvent, match=r"item.stats.price: expected a finite number"):
        decode(json.dumps(item).encode(), LIMITS)
    impression = json.loads(encode(GOOD[0]))
    impression["position"] = -1
    with pytest.raises(InvalidEvent, match=r"impression.position: expected an integer >= 0, got int -1"):
        decode(json.dumps(impression).encode(), LIMITS)
    user = json.loads(encode(GOOD[3]))
    user["multi"]["topics"] = "jazz"
    with pytest.raises(InvalidEvent, match=r"user.multi.topics: expected a list of at most 256 strings, got str"):
        decode(json.dumps(user).encode(), LIMITS)


ODD_VALUES = [
    None,
    0,
    -1,
    1.5,
    10**30,
    2**63,
    1e308,
    "",
    "\u0000",
    "\ud800",
    "é" * 300,
    [],
    {},
    [1, "a"],
    {"a": [1]},
    True,
    [[[]]],
]


def _paths(obj: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in children:
        yield from _paths(value, (*path, key))


def _mutate(body: Any, path: tuple, rng: random.Random) -> Any:
    """``body`` with the value at ``path`` replaced by an odd one, or deleted."""
    if not path:
        return json.loads(json.dumps(rng.choice(ODD_VALUES)))
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[path[-1]]
    else:
        parent[path[-1]] = json.loads(json.dumps(rng.choice(ODD_VALUES)))
    return body


def test_mutated_records_decode_or_say_why():
    # Whatever a producer writes, decode returns a valid event or raises InvalidEvent with a reason: any other
    # exception would escape the dead-letter path and stop the worker (a list as "type" once did).
    rng = random.Random(0)
    outcomes = {"valid": 0, "invalid": 0}
    for event in GOOD:
        good = json.loads(encode(event))
        paths = list(_paths(good))
        for _ in range(1500):
            body = json.loads(json.dumps(good))
            for _ in range(rng.randint(1, 3)):
                path = rng.choice(paths)
                try:
                    body = _mutate(body, path, rng)
                except (KeyError, IndexError, TypeError):  # the path went away with an earlier mutation
                    pass
            raw = json.dumps(body).encode()
            flipped = bytearray(raw)
            flipped[rng.randrange(len(raw))] = rng.randrange(256)
            for record in (raw, bytes(flipped), raw[: rng.randrange(len(raw))]):
                try:
                    decoded = decode(record, LIMITS)
                except InvalidEvent as exc:
                    assert exc.reason and not exc.reason.startswith("internal error")  # foreseen, said precisely
                    outcomes["invalid"] += 1
                else:
                    assert decode(encode(decoded), LIMITS) == decoded
                    outcomes["valid"] += 1
    assert outcomes["valid"] > 100 and outcomes["invalid"] > 10_000  # both paths were exercised


def test_an_unforeseen_parser_error_is_an_invalid_record(monkeypatch, caplog):
    # A bug in a parser must not escape decode: the consumer would stop on the same record at every restart.
    def broken(fields):
        raise KeyError("boom")

    monkeypatch.setitem(events._PARSERS, "click", broken)
    with pytest.raises(InvalidEvent, match=r"^internal error: KeyError: 'boom'$"):
        decode(_click(), LIMITS)
    assert "treated as invalid" in caplog.text
