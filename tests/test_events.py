"""Event contracts: encoding round trips and one precise reason per kind of bad record."""

from __future__ import annotations

import json

import pytest

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
        (_click(type="purchase"), "unknown event type 'purchase'"),
        (_click(user_id=...), "click: missing field 'user_id'"),
        (_click(user_id=17), "click.user_id: expected a non-empty string"),
        (_click(user_id=""), "click.user_id: expected a non-empty string"),
        (_click(ts_ms="yesterday"), "click.ts_ms: expected an integer time in ms since the epoch, got str"),
        (_click(ts_ms=1.5e12), "click.ts_ms: expected an integer time in ms since the epoch, got float"),
        (_click(ts_ms=True), "click.ts_ms: expected an integer time in ms since the epoch, got bool"),
        (_click(ts_ms=-5), "click.ts_ms: negative timestamp -5"),
        (_click(ts_ms=NOW + 48 * 3_600_000), "click.ts_ms: timestamp 1700172800000 is 48.0 h in the future"),
        (_click(extra="x"), "click: unknown field(s) ['extra']"),
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
