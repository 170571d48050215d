"""The publisher: versions, cursors, metrics, the index it keeps; torn versions never visible; crashes survived."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from publisher.publish import Publisher
from publisher.settings import PublisherSettings
from publisher.source import Changes, MemorySource
from publisher.store import RocksStore
from streaming.settings import SettingsError, load_settings

REPO = Path(__file__).resolve().parents[1]


def settings(tmp_path: Path, **kw) -> PublisherSettings:
    return PublisherSettings(store_path=tmp_path / "db", interval_s=1.0, **kw)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_settings_bound_the_interval_and_read_the_environment(tmp_path):
    with pytest.raises(SettingsError, match="1 to 86400 seconds, got 0.5"):
        PublisherSettings(interval_s=0.5)
    with pytest.raises(SettingsError, match="index_kind"):
        PublisherSettings(index_kind="ivf-pq")
    env = {"FRESHTOWER_INTERVAL_S": "10", "FRESHTOWER_STORE_PATH": str(tmp_path / "s"), "FRESHTOWER_FANOUT": "true"}
    s = load_settings(PublisherSettings, section="publisher", environ=env)
    assert (s.interval_s, s.store_path, s.fanout) == (10.0, tmp_path / "s", True)
    assert s.resolved_index_dir == tmp_path / "s-index"


def test_versions_cursor_and_metrics_across_cycles_and_restarts(tmp_path):
    source = MemorySource(model_version="m1")
    source.put_user("u1", [1, 0], ["i1"], event_ms=5_000)
    source.put_user("u2", [0, 1], event_ms=6_000)
    source.put_item("i1", [1, 1, 0], event_ms=4_000)
    registry = CollectorRegistry()
    with RocksStore(tmp_path / "db") as store:
        pub = Publisher(store, source, settings(tmp_path, index_kind="none"), registry=registry)
        assert sample(registry, "freshtower_publish_interval_seconds") == 1.0
        first = pub.publish_once().meta
        assert (first.version, first.watermark_ms, first.users, first.items) == (1, 6_000, 2, 1)
        assert first.cursor == source.changes_since("").cursor
        assert sample(registry, "freshtower_published_version") == 1
        assert sample(registry, "freshtower_published_watermark_timestamp_seconds") == 6.0  # newest event, in s
        assert sample(registry, "freshtower_published_rows_total", kind="user") == 2
        assert sample(registry, "freshtower_published_rows_total", kind="item") == 1
        assert sample(registry, "freshtower_publish_duration_seconds_count") == 1
        assert sample(registry, "freshtower_publish_last_success_timestamp_seconds") >= time.time() - 60

        # Nothing changed: no new version, still a success, no duration sample.
        assert pub.publish_once().meta is None
        assert sample(registry, "freshtower_publish_duration_seconds_count") == 1

        source.put_user("u1", [0.6, 0.8], ["i1", "i2"], event_ms=9_000)
        second = pub.publish_once().meta
        assert (second.version, second.watermark_ms, second.users, second.items) == (2, 9_000, 1, 0)
        assert sample(registry, "freshtower_published_rows_total", kind="user") == 3
        with store.reader() as view:
            assert view.user("u1").vector.tolist() == pytest.approx([0.6, 0.8])
            assert (view.user("u1").version, view.user("u2").version) == (2, 1)

    # Restart: the version and cursor come back from the store; nothing is published twice.
    registry = CollectorRegistry()
    with RocksStore(tmp_path / "db") as store:
        pub = Publisher(store, source, settings(tmp_path, index_kind="none"), registry=registry)
        assert sample(registry, "freshtower_published_version") == 2
        assert sample(registry, "freshtower_publish_last_success_timestamp_seconds") == second.created_ms / 1000
        assert pub.publish_once().meta is None
        source.remove_user("u2", event_ms=10_000)
        third = pub.publish_once().meta
        assert (third.version, third.users) == (3, 1)
        with store.reader() as view:
            assert view.user("u2") is None


class FixedChanges:
    """A source that always reports one change with the given watermark (an out-of-order upstream)."""

    def __init__(self, watermarks: list[int]) -> None:
        self.watermarks = watermarks

    def changes_since(self, cursor: str) -> Changes:
        k = int(cursor or 0)
        return Changes(str(k + 1), self.watermarks[k], {"u": (np.ones(2, np.float32), ())}, {}, "m1")


def test_the_watermark_never_moves_backwards(tmp_path):
    with RocksStore(tmp_path / "db") as store:
        pub = Publisher(store, FixedChanges([9_000, 4_000]), settings(tmp_path, index_kind="none"))
        assert pub.publish_once().meta.watermark_ms == 9_000
        assert pub.publish_once().meta.watermark_ms == 9_000  # the source said 4 000


class FlakySource:
    """Fails on the first pull, then delegates."""

    def __init__(self, inner: MemorySource) -> None:
        self.inner, self.calls = inner, 0

    def changes_since(self, cursor: str) -> Changes:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("learner state unavailable")
        return self.inner.changes_since(cursor)


def test_a_failed_cycle_is_counted_and_the_loop_goes_on(tmp_path):
    inner = MemorySource()
    inner.put_user("u", [1.0, 2.0])
    registry = CollectorRegistry()
    with RocksStore(tmp_path / "db") as store:
        pub = Publisher(store, FlakySource(inner), settings(tmp_path, index_kind="none"), registry=registry)
        stop = threading.Event()
        loop = threading.Thread(target=pub.run, args=(stop,))
        loop.start()
        deadline = time.monotonic() + 10
        while sample(registry, "freshtower_published_version") != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        loop.join(timeout=10)
        assert not loop.is_alive()
        assert sample(registry, "freshtower_publish_failures_total") == 1
        assert sample(registry, "freshtower_published_version") == 1


def test_the_index_follows_published_items_and_is_restored_from_its_snapshot(tmp_path):
    source = MemorySource()
    source.put_item("a", [1, 0])
    source.put_item("b", [0, 1])
    source.put_item("c", [0.6, 0.8])
    s = settings(tmp_path, index_kind="flat", index_snapshot_interval_s=0)
    with RocksStore(tmp_path / "db") as store:
        pub = Publisher(store, source, s)
        pub.publish_once()
        ids, scores = pub.index.search(np.array([[1.0, 0.0]], np.float32), 3)
        assert ids == [["a", "c", "b"]]  # scores 1.0, 0.6, 0.0
        source.remove_item("a")
        source.put_item("b", [0.8, 0.6])  # b moves towards the query
        source.put_item("d", [-1, 0])  # a new catalogue item is retrievable in the same cycle
        pub.publish_once()
        ids, scores = pub.index.search(np.array([[1.0, 0.0]], np.float32), 4)
        assert ids == [["b", "c", "d"]]
        assert scores[0].tolist() == pytest.approx([0.8, 0.6, -1.0, -np.inf])
        assert pub.index_version == 2
        assert [p.name for p in sorted(s.resolved_index_dir.iterdir())] == [
            "index-000000000001.ftidx",
            "index-000000000002.ftidx",
        ]
    with RocksStore(tmp_path / "db") as store:
        pub = Publisher(store, source, s)  # loads snapshot 2, nothing to catch up
        assert pub.index_version == 2 and len(pub.index) == 3
        assert pub.index.search(np.array([[1.0, 0.0]], np.float32), 1)[0] == [["b"]]


def test_a_new_model_with_another_item_dim_rebuilds_the_index(tmp_path):
    source = MemorySource(model_version="m1")
    source.put_item("a", [1, 0])
    source.put_item("b", [0, 1])
    with RocksStore(tmp_path / "db") as store:
        pub = Publisher(store, source, settings(tmp_path, index_kind="hnsw"))
        pub.publish_once()
        assert pub.index.dim == 2
        source.set_model_version("m2")
        source.put_item("a", [0, 0, 1])
        source.put_item("c", [1, 0, 0])  # b is not republished: this source cannot give its m2 row, so it goes
        pub.publish_once()
        assert (pub.index.dim, len(pub.index), "b" in pub.index) == (3, 2, False)
        assert pub.index.search(np.array([[1.0, 0.0, 0.0]], np.float32), 1)[0] == [["c"]]
        with store.reader() as view:
            assert view.item("b") is None and view.item_ids() == ["a", "c"]


class RowMemorySource(MemorySource):
    """A :class:`MemorySource` that can also give the row of any id under its current model (a RowSource)."""

    def __init__(self, model_version: str) -> None:
        super().__init__(model_version)
        self.asked: list[tuple[str, list[str], list[str]]] = []
        self.moved_on = False

    def rows_for(self, model_version, users, items):
        if self.moved_on:
            raise RuntimeError("the source moved to another model; publish again")
        self.asked.append((model_version, list(users), list(items)))
        return (
            {u: (np.array([9, 9], np.float32), ("h",) if u == "u3" else ()) for u in users},
            {i: np.array([0, 9, 0], np.float32) for i in items},
        )


def test_a_model_switch_rewrites_every_row_in_one_version(tmp_path):
    source = RowMemorySource("m1")
    source.put_user("u1", [1, 0], ["a"])
    source.put_user("u2", [0, 1], ["b", "a"])
    source.put_user("u3", [1, 1], ["b"])
    source.put_item("a", [1, 0, 0])
    source.put_item("b", [0, 0, 1])
    registry = CollectorRegistry()
    with RocksStore(tmp_path / "db") as store:
        pub = Publisher(store, source, settings(tmp_path, index_kind="flat"), registry=registry)
        pub.publish_once()
        # The new model: the source republishes u1 and a (the ids it tracks); u2, u3 and b only the store has.
        source.set_model_version("m2")
        source.put_user("u1", [2, 0], ["a"])
        source.put_item("a", [2, 0, 0])
        source.moved_on = True  # ... and has already moved to a third model when asked: nothing is written
        with pytest.raises(RuntimeError, match="moved to another model"):
            pub.publish_once()
        assert sample(registry, "freshtower_publish_failures_total") == 1
        with store.reader() as view:
            assert (view.version(), view.meta().model_version) == (1, "m1")
        source.moved_on = False
        meta = pub.publish_once().meta
        assert source.asked == [("m2", ["u2", "u3"], ["b"])]
        assert (meta.version, meta.model_version, meta.users, meta.items) == (2, "m2", 3, 2)
        with store.reader() as view:
            rows = dict(zip(["u1", "u2", "u3"], view.users(["u1", "u2", "u3"]), strict=True))
            assert {u: r.version for u, r in rows.items()} == {"u1": 2, "u2": 2, "u3": 2}  # all in the switch
            assert rows["u1"].vector.tolist() == [2, 0] and rows["u2"].vector.tolist() == [9, 9]
            # A history the source no longer has stays; one it gives wins.
            assert (rows["u2"].last_n, rows["u3"].last_n) == (("b", "a"), ("h",))
            assert view.item("b").vector.tolist() == [0, 9, 0] and view.item("b").version == 2
        assert pub.index.search(np.array([[0.0, 1.0, 0.0]], np.float32), 1)[0] == [["b"]]
        # The next cycle under the same model asks for nothing more.
        source.put_user("u1", [3, 0], ["a"])
        pub.publish_once()
        assert len(source.asked) == 1


# ------------------------------------------------------------------------------ torn versions

N_KEYS = 64
N_PUBLISHES = 200


def stamp_all(source: MemorySource, k: int) -> None:
    """Publish number k writes every key with vector [k, k, k, k] and last-N ("v<k>",)."""
    for u in range(N_KEYS):
        source.put_user(f"u{u}", np.full(4, k, np.float32), [f"v{k}"])


def check_view(view) -> tuple[int, bool]:
    """(version, mixed?): a view is mixed unless the meta and every row carry one version."""
    version = view.version()
    rows = view.users([f"u{u}" for u in range(N_KEYS)])
    whole = view.meta().users == N_KEYS and all(
        r is not None and r.version == version and r.vector.tolist() == [version] * 4 and r.last_n == (f"v{version}",)
        for r in rows
    )
    return version, not whole


def test_a_reader_thread_never_sees_a_mixed_version(tmp_path):
    source = MemorySource()
    with RocksStore(tmp_path / "db", sync=False) as store:
        pub = Publisher(store, source, settings(tmp_path, index_kind="none"))
        stamp_all(source, 1)
        pub.publish_once()
        seen: set[int] = set()
        mixed: list[int] = []
        done = threading.Event()

        def read() -> None:
            while not done.is_set():
                with store.reader() as view:
                    version, bad = check_view(view)
                seen.add(version)
                if bad:
                    mixed.append(version)

        reader = threading.Thread(target=read)
        reader.start()
        for k in range(2, N_PUBLISHES + 2):
            stamp_all(source, k)
            assert pub.publish_once().meta.version == k
            time.sleep(0.001)  # the GIL would otherwise let the reader in only every few publishes
        done.set()
        reader.join()
    assert mixed == []
    assert len(seen) >= 20, f"the reader saw only versions {sorted(seen)}: too few to show anything"


READER_PROCESS = """
import json, sys, time
from publisher.store import RocksSecondary
sys.path.insert(0, sys.argv[4])
from test_publish import check_view
path, last, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
seen, mixed, views = set(), [], 0
with RocksSecondary(path) as store:
    print("ready", flush=True)
    while time.monotonic() < deadline:
        with store.reader() as view:
            version, bad = check_view(view)
        views += 1
        seen.add(version)
        if bad:
            mixed.append(version)
        if version >= last:
            break
print(json.dumps({"seen": sorted(seen), "mixed": mixed, "views": views}), flush=True)
"""


@pytest.mark.slow
def test_a_reader_process_on_a_secondary_never_sees_a_mixed_version(tmp_path):
    source = MemorySource()
    last = N_PUBLISHES + 1
    with RocksStore(tmp_path / "db") as store:
        pub = Publisher(store, source, settings(tmp_path, index_kind="none"))
        stamp_all(source, 1)
        pub.publish_once()
        reader = subprocess.Popen(
            [sys.executable, "-c", READER_PROCESS, str(tmp_path / "db"), str(last), "60", str(REPO / "tests")],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert reader.stdout.readline().strip() == "ready"
        for k in range(2, last + 1):
            stamp_all(source, k)
            pub.publish_once()
            time.sleep(0.002)  # let the reader's catch-ups interleave with the writes
        out, _ = reader.communicate(timeout=90)
    result = json.loads(out)
    assert result["mixed"] == []
    assert result["seen"][-1] == last
    assert len(result["seen"]) >= 20 and result["views"] >= 100, result


# ------------------------------------------------------------------------------ crashes

CRASHING_PUBLISHER = """
import logging, sys, time
import numpy as np
from publisher.publish import Publisher
from publisher.settings import PublisherSettings
from publisher.source import Changes
from publisher.store import RocksStore

path, mode, n_users, dim, cycles = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s: %(message)s")


class Scripted:
    # Version k sets every user's vector to [k] * dim. In mode "pause" the pull for version 2 stalls
    # like a slow learner, with the publish cycle under way.
    def changes_since(self, cursor):
        k = int(cursor or 0) + 1
        if k == 2 and mode == "pause":
            print("source: pulling version 2 slowly", flush=True)
            time.sleep(120)
        vector = np.full(dim, k, np.float32)
        users = {f"u{i}": (vector, (f"i{k}",)) for i in range(n_users)}
        return Changes(cursor=str(k), watermark_ms=k * 1000, users=users, items={}, model_version="m")


with RocksStore(path) as store:
    publisher = Publisher(store, Scripted(), PublisherSettings(store_path=path, interval_s=1, index_kind="none"))
    for _ in range(cycles):
        publisher.publish_once()
"""


def run_until(args: list[str], pattern: str, timeout_s: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PUBLISHER, *args], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        if re.search(pattern, line):
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"the publisher never logged {pattern!r}")


def assert_whole(path: Path, n_users: int, dim: int) -> int:
    """Open the store after the crash: one version throughout, its cursor with it. Returns the version."""
    with RocksStore(path) as store, store.reader() as view:
        meta = view.meta()
        rows = view.users([f"u{i}" for i in range(n_users)])
    k = meta.version
    assert meta.cursor == str(k) and meta.watermark_ms == k * 1000
    assert all(r.version == k and r.last_n == (f"i{k}",) for r in rows)
    assert np.array_equal(np.stack([r.vector for r in rows]), np.full((n_users, dim), k, np.float32))
    return k


@pytest.mark.slow
def test_sigkill_while_pulling_a_version_leaves_the_previous_one_and_the_next_publish_succeeds(tmp_path):
    path, n, dim = tmp_path / "db", 2000, 16
    proc = run_until([str(path), "pause", str(n), str(dim), "2"], "pulling version 2")
    proc.kill()
    proc.wait()
    assert assert_whole(path, n, dim) == 1
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_PUBLISHER, str(path), "fast", str(n), str(dim), "1"], cwd=REPO
    )
    assert done.returncode == 0
    assert assert_whole(path, n, dim) == 2


@pytest.mark.slow
def test_sigkill_while_writing_a_large_version_leaves_a_whole_version(tmp_path):
    # Version 2 is ~30 MB in one batch; the kill lands as the store logs that it starts writing it.
    path, n, dim = tmp_path / "db", 100_000, 64
    proc = run_until([str(path), "fast", str(n), str(dim), "2"], "writing version 2")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    crashed_at = assert_whole(path, n, dim)
    assert crashed_at in (1, 2)
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_PUBLISHER, str(path), "fast", str(n), str(dim), "1"], cwd=REPO
    )
    assert done.returncode == 0
    assert assert_whole(path, n, dim) == crashed_at + 1


@pytest.mark.slow
def test_simulate_serves_metrics_stops_on_sigterm_and_survives_sigkill(tmp_path):
    store = tmp_path / "db"
    cmd = [sys.executable, "-m", "publisher", "simulate", "--store", str(store), "--interval", "1"]
    cmd += ["--metrics-port", "0", "--users", "300", "--items", "50", "--index", "none", "--updates-per-s", "200"]

    def start() -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        port = None
        for line in proc.stdout:
            if m := re.search(r"metrics on http://[\d.]+:(\d+)/metrics", line):
                port = int(m.group(1))
            if "published version" in line and port is not None:
                return proc, port
        raise AssertionError(f"simulate exited with {proc.wait()} before publishing")

    proc, port = start()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in (
        "freshtower_publish_last_success_timestamp_seconds",
        "freshtower_published_watermark_timestamp_seconds",
        "freshtower_published_version",
        "freshtower_publish_interval_seconds 1.0",
        "freshtower_publish_duration_seconds_bucket",
        'freshtower_published_rows_total{kind="user"}',
        "freshtower_publish_failures_total 0.0",
    ):
        assert name in body
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0 and "stopped" in rest

    with RocksStore(store) as s, s.reader() as view:
        before = view.version()
    proc, _ = start()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc, _ = start()  # the next start continues from whatever version the killed one left
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    with RocksStore(store) as s, s.reader() as view:
        assert view.version() >= before + 2
        assert view.user("u0") is not None
