"""Fan-out through a real Kafka broker: replicas materialise whole versions, late ones catch up, restarts resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from publisher.fanout import Fanout, Replica
from publisher.publish import Publisher
from publisher.settings import PublisherSettings
from publisher.source import MemorySource
from publisher.store import MemoryStore, ReadOnlyStore, RocksStore

pytestmark = pytest.mark.kafka


def content(store: ReadOnlyStore) -> dict:
    """What a serving process would read: meta essentials and every row's value (row versions aside)."""
    with store.reader() as view:
        meta = view.meta()
        delta = view.changes_since(0)
    return {
        "meta": (meta.version, meta.watermark_ms, meta.model_version, meta.user_dim, meta.item_dim),
        "users": {k: (r.vector.tolist(), r.last_n, r.removed) for k, r in delta.users.items()},
        "items": {k: (r.vector.tolist(), r.removed) for k, r in delta.items.items()},
    }


def row_versions(store: ReadOnlyStore) -> dict:
    with store.reader() as view:
        delta = view.changes_since(0)
    return {
        **{f"u:{k}": r.version for k, r in delta.users.items()},
        **{f"i:{k}": r.version for k, r in delta.items.items()},
    }


def publisher(
    tmp_path: Path, source: MemorySource, fanout: Fanout | None, registry=None
) -> tuple[Publisher, RocksStore]:
    store = RocksStore(tmp_path / "primary")
    s = PublisherSettings(store_path=tmp_path / "primary", interval_s=1, index_kind="none", fanout=fanout is not None)
    return Publisher(store, source, s, fanout=fanout, registry=registry), store


def change(source: MemorySource, step: int) -> None:
    """Step k: users u0..u9 move to [k, i], item i<k> appears, and from step 3 on u<k> and i0 go away."""
    for i in range(10):
        source.put_user(f"u{i}", [step, i], [f"i{step}"], event_ms=step * 1000)
    source.put_item(f"i{step}", [1.0, step, 0.0], event_ms=step * 1000)
    if step >= 3:
        source.remove_user(f"u{step}", event_ms=step * 1000)
        source.remove_item("i0", event_ms=step * 1000)


def test_a_live_replica_and_a_late_replica_both_match_the_primary(kafka_settings, tmp_path):
    source = MemorySource(model_version="m1")
    fanout = Fanout(kafka_settings)
    registry = CollectorRegistry()
    pub, primary = publisher(tmp_path, source, fanout, registry)
    live = Replica(kafka_settings, RocksStore(tmp_path / "live"))
    try:
        change(source, 0)
        for step in range(1, 5):
            change(source, step)
            version = pub.publish_once().meta.version
            assert live.catch_up(timeout_s=30, min_version=version).version == version
            assert content(live.store) == content(primary)
            # Live, the replica applies the same versions, so even row versions agree.
            assert row_versions(live.store) == row_versions(primary)
        assert registry.get_sample_value("freshtower_fanout_version") == 4

        late = Replica(kafka_settings, MemoryStore())  # started after four versions
        assert late.catch_up(timeout_s=30, min_version=4).version == 4
        expected = content(primary)
        assert content(late.store) == expected
        # Hand-checked after step 4: u4 and i0 removed; u3 (removed at step 3) is back as [4, 3]; u9 = [4, 9].
        assert expected["users"]["u4"][2] and expected["items"]["i0"][1]
        assert expected["users"]["u3"] == ([4.0, 3.0], ("i4",), False)
        assert expected["users"]["u9"] == ([4.0, 9.0], ("i4",), False)
        assert expected["meta"] == (4, 4000, "m1", 2, 3)
        late.close()
    finally:
        live.close()
        fanout.close()
        primary.close()


def test_a_restarted_replica_resumes_after_its_last_version(kafka_settings, tmp_path):
    source = MemorySource()
    fanout = Fanout(kafka_settings)
    pub, primary = publisher(tmp_path, source, fanout)
    try:
        change(source, 1)
        pub.publish_once()
        with RocksStore(tmp_path / "replica") as local:
            replica = Replica(kafka_settings, local)
            replica.catch_up(timeout_s=30, min_version=1)
            replica.close()
        source.put_user("u1", [7.0, 7.0], event_ms=9000)
        pub.publish_once()
        with RocksStore(tmp_path / "replica") as local:
            with local.reader() as view:
                cursor = int(view.meta().cursor)
            replica = Replica(kafka_settings, local)
            # Version 1: 10 users + 1 item at offsets 0..10, its marker at 11; the cursor is the offset after it.
            assert cursor == 12
            applied = []
            while not applied:
                applied = replica.poll(timeout_s=1.0)
            assert [m.version for m in applied] == [2]  # version 1 is not read again
            assert content(local) == content(primary)
            with local.reader() as view:
                assert view.user("u1").vector.tolist() == [7.0, 7.0]
            replica.close()
    finally:
        fanout.close()
        primary.close()


def test_fanout_switched_on_later_sends_everything_the_store_holds(kafka_settings, tmp_path):
    # Versions 1-2 are written while fan-out is off (as when Kafka was down): the store's
    # progress marker stays at 0, so the first cycle with fan-out sends all of it as version 2.
    source = MemorySource()
    pub, primary = publisher(tmp_path, source, None)
    change(source, 1)
    pub.publish_once()
    change(source, 2)
    pub.publish_once()
    primary.close()

    fanout = Fanout(kafka_settings)
    pub, primary = publisher(tmp_path, source, fanout)
    try:
        assert pub.publish_once().meta is None  # nothing new to publish, but the fan-out catches up
        with primary.reader() as view:
            assert view.progress("fanout") == 2
        replica = Replica(kafka_settings, MemoryStore())
        assert replica.catch_up(timeout_s=30, min_version=2).version == 2
        assert content(replica.store) == content(primary)
        with replica.store.reader() as view:
            assert view.user("u1").vector.tolist() == [2.0, 1.0] and view.item("i1") is not None
            assert np.array_equal(view.item("i2").vector, np.array([1.0, 2.0, 0.0], np.float32))
        replica.close()
    finally:
        fanout.close()
        primary.close()
