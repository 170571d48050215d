"""Catalogue records and profiles read through a bounded cache over the worker's RocksDB state."""

from __future__ import annotations

from pathlib import Path

import pytest

from streaming.events import Item, UserProfile
from streaming.records import RecordStore
from streaming.state import StateStore


def _profile(k: int, city: str = "x") -> UserProfile:
    return UserProfile(f"u{k}", {"city": f"{city}{k}"}, {}, {"age": float(k)}, ts_ms=1000 + k)


def test_bounded_cache_reads_staged_and_durable_records(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state", sync=False)
    profiles = RecordStore(state, b"prof:", UserProfile, capacity=10)
    for k in range(100):
        profiles.put(f"u{k}", _profile(k))
    assert profiles.cached == 10
    # Evicted before any checkpoint: read back from the staged batch.
    assert profiles["u0"] == _profile(0) and profiles.get("u57") == _profile(57)
    assert profiles.get("nobody") is None and "nobody" not in profiles and "u3" in profiles
    assert len(profiles) == 100 and list(profiles)[:3] == ["u0", "u1", "u10"]
    profiles.put("u0", _profile(0, city="y"))  # an update replaces the cached and the staged record
    assert profiles["u0"].discrete == {"city": "y0"}
    state.checkpoint({}, {})
    assert all(profiles[f"u{k}"] == _profile(k) for k in range(1, 100))
    assert profiles.cached == 10
    state.close()
    # A restart reads the durable records; nothing was loaded up front.
    state = StateStore(tmp_path / "state", sync=False)
    again = RecordStore(state, b"prof:", UserProfile, capacity=10)
    assert again.cached == 0 and again["u0"].discrete == {"city": "y0"} and len(again) == 100
    # Another prefix, another type: no mix-up.
    items = RecordStore(state, b"cat:", Item, capacity=10)
    assert len(items) == 0 and items.get("u1") is None
    state.close()


def test_discarded_writes_leave_the_cache_too(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state", sync=False)
    profiles = RecordStore(state, b"prof:", UserProfile, capacity=10)
    profiles.put("u1", _profile(1))
    state.checkpoint({}, {})
    profiles.put("u1", _profile(1, city="staged"))
    profiles.put("u2", _profile(2))
    assert profiles["u1"].discrete == {"city": "staged1"}
    state.discard()  # the staged batch is gone: so are its records, cached or not
    assert profiles["u1"] == _profile(1) and "u2" not in profiles
    with pytest.raises(ValueError, match="capacity"):
        RecordStore(state, b"prof:", UserProfile, capacity=0)
    state.close()
