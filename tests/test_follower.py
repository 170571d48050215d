"""A serving follower (RocksSecondary) stays whole while its primary, in another process, closes, crashes and restarts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from publisher.follower import Follower, wal_files
from publisher.store import RocksSecondary

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
