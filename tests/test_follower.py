"""A follower of a RocksDB primary stays whole while the primary closes, crashes and restarts.

The serving follower (RocksSecondary) beside a primary in another process; the Follower itself driven by hand
(reads that fail or report a torn state while the log files change or hold still); and a secondary reopening beside
a primary closing in a thread of the same process (the worker and the publisher's worker source in one process).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from publisher.follower import Follower, Torn, wal_files
from publisher.store import RocksSecondary
from publisher.worker_source import WorkerSource
from streaming.state import StateStore

REPO = Path(__file__).resolve().parents[1]
SHARED = ["s0", "s1", "s2", "s3"]
LAST = 11

# A publisher process driven over stdin: "publish <v>" writes version v, "close" closes the store and exits.
# Version v rewrites the shared users s0..s3 as [v, k] and adds user n<v> as [v, -1]: in a whole view of
# version m, every shared row has version m and n<k> exists exactly for k <= m.
PRIMARY = """
import sys
import numpy as np
from publisher.records import Publish
from publisher.store import RocksStore

shared = ["s0", "s1", "s2", "s3"]
store = RocksStore(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "publish":
        v = int(arg[0])
        users = {u: (np.array([v, k], np.float32), ()) for k, u in enumerate(shared)}
        users[f"n{v}"] = (np.array([v, -1], np.float32), ())
        meta = store.apply(Publish(v, v * 1000, "m1", f"c{v}", users=users))
        print(f"published {meta.version}", flush=True)
    elif cmd == "close":
        store.close()
        print("closed", flush=True)
        break
"""


class Primary:
    """A RocksStore in a child process."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRIMARY, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self._expect("ready")

    def _expect(self, line: str) -> None:
        got = self.proc.stdout.readline().strip()
        assert got == line, f"primary said {got!r}, expected {line!r}"

    def publish(self, version: int) -> None:
        self.proc.stdin.write(f"publish {version}\n")
        self.proc.stdin.flush()
        self._expect(f"published {version}")

    def close(self) -> None:
        self.proc.stdin.write("close\n")
        self.proc.stdin.flush()
        self._expect("closed")
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no flush, no close; the log holds the last publish (sync=True)
        self.proc.wait(timeout=30)
        self.proc.stdin.close()
        self.proc.stdout.close()


def observe(follower: RocksSecondary) -> tuple[int, list[str]]:
    """(meta version, what in the view does not belong to that version) after one catch-up."""
    with follower.reader() as view:
        version = view.version()
        rows = dict(zip(SHARED, view.users(SHARED), strict=True))
        news = dict(zip(range(1, LAST + 1), view.users([f"n{k}" for k in range(1, LAST + 1)]), strict=True))
    torn = [f"{u} at v{r.version}" for u, r in rows.items() if r is None or r.version != version]
    torn += [
        f"n{k} {'missing' if r is None else 'present'}" for k, r in news.items() if (r is not None) != (k <= version)
    ]
    return version, torn


def test_follower_stays_whole_across_primary_close_crash_and_restart(tmp_path):
    path = tmp_path / "db"
    seen: list[tuple[str, int, list[str]]] = []
    primary = Primary(path)
    try:
        primary.publish(1)
        with RocksSecondary(path, tmp_path / "secondary") as follower:
            seen.append(("v1", *observe(follower)))
            for v in range(2, 7):
                primary.publish(v)
                seen.append((f"v{v}", *observe(follower)))
            # Version 7 goes out and the primary closes (flushing its memtable) before the follower reads:
            # a plain catch-up would keep s0..s3 of version 6 from the replayed log and show n7 from the table.
            primary.publish(7)
            primary.close()
            seen.append(("closed", *observe(follower)))

            primary = Primary(path)
            primary.publish(8)
            seen.append(("restarted", *observe(follower)))
            primary.publish(9)
            primary.kill()
            seen.append(("killed", *observe(follower)))

            # Version 10 goes out and the primary dies before the follower reads; the next primary's recovery
            # replays the dead one's log and flushes it to a table file, as a close would.
            primary = Primary(path)
            primary.publish(10)
            primary.kill()
            primary = Primary(path)
            seen.append(("recovered", *observe(follower)))
            primary.publish(11)
            primary.close()
            seen.append(("closed again", *observe(follower)))
    finally:
        if primary.proc.poll() is None:
            primary.kill()
    expected = [(f"v{v}", v, []) for v in range(1, 7)]
    expected += [("closed", 7, []), ("restarted", 8, []), ("killed", 9, []), ("recovered", 10, [])]
    expected += [("closed again", 11, [])]
    assert seen == expected


def test_sync_catches_up_while_the_log_files_hold_still_and_reopens_when_they_change(tmp_path):
    primary = tmp_path / "db"
    primary.mkdir()
    (primary / "000004.log").touch()
    (primary / "MANIFEST-000005").touch()
    calls: list[str] = []
    follower = Follower(primary, attempts=2)
    assert wal_files(primary) == ("000004.log",)

    def read() -> int:
        calls.append("read")
        return len(calls)

    # First sync: nothing seen yet, so open afresh; then the files held still, so catch up.
    assert follower.sync(lambda: calls.append("catch_up"), lambda: calls.append("reopen"), read) == 2
    assert follower.sync(lambda: calls.append("catch_up"), lambda: calls.append("reopen"), read) == 4
    assert calls == ["reopen", "read", "catch_up", "read"]

    # A flush: 000004.log replaced by 000008.log; the next sync opens afresh.
    calls.clear()
    (primary / "000004.log").unlink()
    (primary / "000008.log").touch()
    follower.sync(lambda: calls.append("catch_up"), lambda: calls.append("reopen"), read)
    assert calls == ["reopen", "read"]

    # The files change during the read: read again from a fresh secondary (reopen, read twice in all).
    calls.clear()

    def flush_once() -> None:
        calls.append("catch_up")
        if not (primary / "000010.log").exists():
            (primary / "000010.log").touch()

    follower.sync(flush_once, lambda: calls.append("reopen"), read)
    assert calls == ["catch_up", "read", "reopen", "read"]

    # Changing during every attempt: an error naming the directory, and the next sync opens afresh.
    def flushing(name: str):
        def step() -> None:
            calls.append(name)
            (primary / f"{100 + len(calls):06d}.log").touch()

        return step

    calls.clear()
    with pytest.raises(RuntimeError, match="changed during each of 2 syncs"):
        follower.sync(flushing("catch_up"), flushing("reopen"), read)
    assert calls == ["catch_up", "read", "reopen", "read"]
    calls.clear()
    follower.sync(lambda: calls.append("catch_up"), lambda: calls.append("reopen"), read)
    assert calls == ["reopen", "read"]


def test_a_read_that_fails_while_the_log_files_change_is_done_again_and_one_that_holds_still_is_raised(tmp_path):
    primary = tmp_path / "db"
    primary.mkdir()
    (primary / "000004.log").touch()
    calls: list[str] = []
    follower = Follower(primary, attempts=3)

    def closing_reopen() -> None:
        # The primary closes while the secondary opens: a new log, the flushed one deleted. The open read the
        # MANIFEST from before the flush and found no log to replay: an empty state.
        calls.append("reopen")
        if (primary / "000004.log").exists():
            (primary / "000008.log").touch()
            (primary / "000004.log").unlink()

    def read() -> str:
        calls.append("read")
        if calls == ["reopen", "read"]:  # the first read, from the open during the close
            raise RuntimeError("no checkpoint yet")
        return "whole"

    assert follower.sync(lambda: calls.append("catch_up"), closing_reopen, read) == "whole"
    assert calls == ["reopen", "read", "reopen", "read"]
    calls.clear()
    assert follower.sync(lambda: calls.append("catch_up"), closing_reopen, read) == "whole"
    assert calls == ["catch_up", "read"]

    # While the log files hold still, what the read raises is the state's own: at once, and the next sync reopens.
    def new_state() -> str:
        calls.append("read")
        raise RuntimeError("no checkpoint yet")

    calls.clear()
    with pytest.raises(RuntimeError, match="no checkpoint yet"):
        follower.sync(lambda: calls.append("catch_up"), lambda: calls.append("reopen"), new_state)
    assert calls == ["catch_up", "read"]
    calls.clear()
    assert follower.sync(lambda: calls.append("catch_up"), lambda: calls.append("reopen"), lambda: 1) == 1
    assert calls == ["reopen"]


def test_a_read_that_reports_a_torn_state_is_done_again_from_a_fresh_secondary(tmp_path):
    primary = tmp_path / "db"
    primary.mkdir()
    (primary / "000004.log").touch()
    calls: list[str] = []
    follower = Follower(primary, attempts=2)
    assert follower.sync(lambda: calls.append("catch_up"), lambda: calls.append("reopen"), lambda: 0) == 0

    def torn_once() -> int:
        calls.append("read")
        if calls.count("read") == 1:
            raise Torn("checkpoint 0 after checkpoint 9")
        return 9

    calls.clear()  # the log files hold still, yet the catch-up read torn: read again from a fresh secondary
    assert follower.sync(lambda: calls.append("catch_up"), lambda: calls.append("reopen"), torn_once) == 9
    assert calls == ["catch_up", "read", "reopen", "read"]

    def torn() -> int:
        calls.append("read")
        raise Torn("checkpoint 0 after checkpoint 9")

    calls.clear()
    with pytest.raises(RuntimeError, match="each of 2 syncs .* read a torn state") as caught:
        follower.sync(lambda: calls.append("catch_up"), lambda: calls.append("reopen"), torn)
    assert isinstance(caught.value.__cause__, Torn)
    assert calls == ["catch_up", "read", "reopen", "read"]


def close_beside_a_follower(path: Path, secondary: Path) -> list[str]:
    """One trial: a primary in a thread writes checkpoints 2..39 and closes while a Follower syncs a secondary in a
    loop and reads the checkpoint count; what it read torn (empty, or going back)."""
    primary = StateStore(path, sync=False)
    primary.checkpoint({}, {"checkpoints": 1})
    follower = Follower(path)
    state = StateStore(path, secondary=secondary)

    def reopen() -> None:
        nonlocal state
        state.close()
        state = StateStore(path, secondary=secondary)

    def read() -> int:
        count = int(state.meta().get("checkpoints", 0))
        if count < 1:
            raise RuntimeError(f"{path} has no checkpoint yet")
        return count

    def work() -> None:
        for k in range(2, 40):
            for j in range(50):
                primary.put(b"t:%d" % j, bytes(400))
            primary.checkpoint({}, {"checkpoints": k})
            time.sleep(0.0005)
        primary.close()

    torn: list[str] = []
    seen = 0
    thread = threading.Thread(target=work)
    thread.start()
    try:
        while True:
            done = not thread.is_alive()
            try:
                count = follower.sync(lambda: state.catch_up(), reopen, read)
            except RuntimeError as exc:
                return [f"after checkpoint {seen}: {exc}"]
            if count < seen:
                torn.append(f"checkpoint {count} after {seen}")
            seen = count
            if done:
                break
    finally:
        thread.join()
        state.close()
    return torn if seen == 39 else [*torn, f"ended at checkpoint {seen}"]


def test_a_secondary_beside_a_primary_closing_in_another_thread_never_reads_its_state_torn(tmp_path):
    """The real window: the primary, in this process, closes (flush, new log, old log deleted) while the Follower
    opens its secondary afresh. Unfixed, about one trial in four read an empty state ("no checkpoint yet")."""
    torn = {t: close_beside_a_follower(tmp_path / f"db{t}", tmp_path / f"secondary{t}") for t in range(12)}
    assert {t: found for t, found in torn.items() if found} == {}


def test_the_worker_source_reads_a_checkpoint_that_went_back_again_and_takes_it_when_it_stays(tmp_path, caplog):
    state_dir = tmp_path / "state"
    primary = StateStore(state_dir, sync=False)
    primary.checkpoint({}, {"checkpoints": 3})  # no model version: a read past the checkpoint checks fails on that
    with WorkerSource(state_dir, tmp_path / "models") as source, caplog.at_level(logging.INFO, "publisher.follower"):
        source._whole = ((state_dir / "IDENTITY").read_text().strip(), 5)  # as if a call before had read checkpoint 5
        with pytest.raises(RuntimeError, match="each of 3 syncs .* read a torn state") as caught:
            source.changes_since("5:v1:x")
        assert isinstance(caught.value.__cause__, Torn)
        assert [r.getMessage().endswith("syncing again from a fresh secondary") for r in caplog.records] == [True] * 3
        # Every fresh secondary read checkpoint 3: the state did go back (restored from a copy); taken as it is.
        with pytest.raises(RuntimeError, match="names no model version"):
            source.changes_since("5:v1:x")
    primary.close()
