"""The store contract, run over every backend (in-memory and real RocksDB files), plus RocksDB specifics."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from publisher.records import Publish, PublishError, decode_item, decode_user, encode_item, encode_user
from publisher.store import MemoryStore, RocksSecondary, RocksStore, Store


@pytest.fixture(params=["memory", "rocks"])
def store(request, tmp_path):
    if request.param == "memory":
        s: Store = MemoryStore()
    else:
        # A change log of 2 versions, so changes_since further back takes the scan path.
        s = RocksStore(tmp_path / "db", changelog_versions=2)
    yield s
    s.close()


def vec(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


V1 = Publish(
    version=1,
    watermark_ms=1000,
    model_version="m1",
    cursor="c1",
    users={"a": (vec(1, 2), ("x", "y")), "b": (vec(0.5, -1), ())},
    items={"x": vec(1, 0, 0)},
    created_ms=5,
)
V2 = Publish(
    version=2,
    watermark_ms=2000,
    model_version="m1",
    cursor="c2",
    users={"a": (vec(3, 4), ("y",))},
    items={"y": vec(0, 1, 0)},
    removed_users=frozenset({"b"}),
    removed_items=frozenset({"x"}),
    created_ms=6,
)


def snapshot(store: Store) -> dict:
    """Everything observable through one view, for before/after comparisons."""
    with store.reader() as view:
        delta = view.changes_since(0)
        return {
            "meta": view.meta(),
            "users": {k: (r.version, r.vector.tolist(), r.last_n, r.removed) for k, r in delta.users.items()},
            "items": {k: (r.version, r.vector.tolist(), r.removed) for k, r in delta.items.items()},
        }


def test_row_bytes_are_the_documented_layout():
    # item: format 1, flags 0, version 2 (<Q), dim 2 (<H), then 1.0 and -0.5 as little-endian float32.
    expected = bytes([1, 0]) + struct.pack("<Q", 2) + struct.pack("<H", 2) + bytes.fromhex("0000803f000000bf")
    assert encode_item(2, vec(1.0, -0.5)) == expected
    # user: ... dim 1, last-N JSON '["i1","i2"]' is 11 bytes, 0.25 = 0x3e800000.
    tail = b'["i1","i2"]'
    expected = bytes([1, 0]) + struct.pack("<QHI", 3, 1, 11) + bytes.fromhex("0000803e") + tail
    assert encode_user(3, vec(0.25), ("i1", "i2")) == expected
    row = decode_user(expected)
    assert (row.version, row.vector.tolist(), row.last_n, row.removed) == (3, [0.25], ("i1", "i2"), False)
    # a removal: flags 1, dim 0, nothing after the header.
    gone = decode_item(encode_item(7, None))
    assert (gone.version, gone.vector.size, gone.removed) == (7, 0, True)


def test_empty_store_reads_as_version_zero(store):
    with store.reader() as view:
        assert view.meta() is None
        assert (view.version(), view.watermark_ms()) == (0, 0)
        assert view.user("a") is None and view.item("x") is None
        delta = view.changes_since(0)
        assert (delta.version, delta.users, delta.items) == (0, {}, {})
        assert view.progress("fanout") == 0


def test_a_version_reads_back_exactly(store):
    meta = store.apply(V1)
    assert meta.version == 1
    with store.reader() as view:
        m = view.meta()
        assert (m.version, m.watermark_ms, m.model_version, m.cursor, m.created_ms) == (1, 1000, "m1", "c1", 5)
        assert (m.users, m.items, m.user_dim, m.item_dim) == (2, 1, 2, 3)
        a, b = view.users(["a", "b"])
        assert (a.version, a.vector.tolist(), a.last_n) == (1, [1.0, 2.0], ("x", "y"))
        assert (b.version, b.vector.tolist(), b.last_n) == (1, [0.5, -1.0], ())
        assert a.vector.dtype == np.float32
        x = view.item("x")
        assert (x.version, x.vector.tolist()) == (1, [1.0, 0.0, 0.0])
        assert view.users(["nobody", "a"])[0] is None


def test_next_version_updates_removes_and_reports_changes(store):
    store.apply(V1)
    store.apply(V2)
    with store.reader() as view:
        assert (view.version(), view.watermark_ms()) == (2, 2000)
        m = view.meta()
        assert (m.users, m.items, m.user_dim, m.item_dim) == (2, 2, 2, 3)  # a + removed b; y + removed x
        a = view.user("a")
        assert (a.version, a.vector.tolist(), a.last_n) == (2, [3.0, 4.0], ("y",))
        assert view.user("b") is None and view.item("x") is None
        assert view.item("y").vector.tolist() == [0.0, 1.0, 0.0]

        since1 = view.changes_since(1)
        assert {k: (r.version, r.removed) for k, r in since1.users.items()} == {"a": (2, False), "b": (2, True)}
        assert {k: (r.version, r.removed) for k, r in since1.items.items()} == {"x": (2, True), "y": (2, False)}
        assert (since1.since, since1.version) == (1, 2)
        assert view.changes_since(2).users == {} and view.changes_since(2).items == {}
        items_only = view.items_since(1)
        assert items_only.users == {} and set(items_only.items) == {"x", "y"}
        # Live ids only: the tombstones of b and x are not listed.
        assert (view.user_ids(), view.item_ids()) == (["a"], ["y"])


def test_ids_list_every_live_row_sorted(store):
    with store.reader() as view:
        assert (view.user_ids(), view.item_ids()) == ([], [])
    store.apply(V1)
    with store.reader() as view:
        assert (view.user_ids(), view.item_ids()) == (["a", "b"], ["x"])


def test_changes_since_is_right_beyond_the_change_log(store):
    # Version v (1..5) writes user "u<v>"; changes since 1 are u2..u5, whichever path reads them.
    for v in range(1, 6):
        store.apply(Publish(v, v * 10, "m1", f"c{v}", users={f"u{v}": (vec(v, v), ())}))
    with store.reader() as view:
        assert {k: r.version for k, r in view.changes_since(1).users.items()} == {"u2": 2, "u3": 3, "u4": 4, "u5": 5}
        assert {k: r.version for k, r in view.changes_since(3).users.items()} == {"u4": 4, "u5": 5}
        assert set(view.changes_since(0).users) == {"u1", "u2", "u3", "u4", "u5"}


@pytest.mark.parametrize(
    "bad, message",
    [
        (Publish(1, 3000, "m1", "c", users={"a": (vec(9, 9), ())}), "must exceed the store's version 1"),
        (Publish(2, 3000, "m1", "c", users={"a": (vec(9, np.nan), ())}), "non-finite"),
        (Publish(2, 3000, "m1", "c", users={"a": (vec(9, 9, 9), ())}), "dim 3, the store holds dim 2"),
        (Publish(2, 3000, "m1", "c", users={"a": (vec(1), ()), "c": (vec(1, 2), ())}), "share a dimension"),
        (Publish(2, 3000, "m1", "c", items={"x": vec(1, 1, 1)}, removed_items=frozenset({"x"})), "both updated"),
        (Publish(2, 3000, "m1", "c", users={"": (vec(1, 2), ())}), "non-empty strings"),
    ],
)
def test_rejected_publish_changes_nothing(store, bad, message):
    store.apply(V1)
    before = snapshot(store)
    with pytest.raises(PublishError, match=message):
        store.apply(bad)
    assert snapshot(store) == before


def test_a_new_model_may_change_dimensions(store):
    store.apply(V1)
    meta = store.apply(Publish(2, 3000, "m2", "c2", users={"a": (vec(1, 2, 3, 4), ())}))
    assert (meta.model_version, meta.user_dim, meta.item_dim) == ("m2", 4, 0)


def test_progress_markers(store):
    store.apply(V1)
    store.set_progress("fanout", 1)
    with store.reader() as view:
        assert (view.progress("fanout"), view.progress("other")) == (1, 0)


def test_a_view_is_unusable_after_its_block(store):
    store.apply(V1)
    with store.reader() as view:
        pass
    with pytest.raises(RuntimeError, match="after its"):
        view.user("a")


def test_rocks_store_persists_and_locks_out_a_second_writer(tmp_path):
    path = tmp_path / "db"
    with RocksStore(path) as store:
        store.apply(V1)
        with pytest.raises(Exception, match="LOCK"):
            RocksStore(path)
    with RocksStore(path) as store, store.reader() as view:
        assert view.meta().cursor == "c1"
        assert view.user("a").vector.tolist() == [1.0, 2.0]


def test_secondary_follows_the_primary_between_views(tmp_path):
    path = tmp_path / "db"
    with pytest.raises(FileNotFoundError, match="no RocksDB store"):
        RocksSecondary(path)
    with RocksStore(path) as primary:
        primary.apply(V1)
        with RocksSecondary(path, tmp_path / "secondary") as secondary:
            with secondary.reader() as view:
                assert view.version() == 1 and view.user("b") is not None
            primary.apply(V2)
            with secondary.reader(catch_up=False) as view:
                assert view.version() == 1  # no catch-up: still the old version, whole
                assert view.user("b").vector.tolist() == [0.5, -1.0]
            with secondary.reader() as view:
                assert view.version() == 2
                assert view.user("b") is None and view.user("a").vector.tolist() == [3.0, 4.0]
