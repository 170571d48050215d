"""When a RocksDB secondary instance may catch up, and when it must be opened afresh.

A secondary follows its primary with ``try_catch_up_with_primary()``, which replays the primary's
write-ahead log a whole ``WriteBatch`` at a time. One exception, measured with rocksdict 0.3.29:
after the primary flushes its memtable (a graceful close does; so does reopening after a crash,
which replays and flushes the old log), a catch-up reads a *mix*. Values the secondary replayed
from the log before stay in its memtable and hide the newer values the flush wrote to a table
file, while keys it never replayed show the new values. A reader then sees meta version 6
next to a row of version 7: a torn version.

A flush starts a new log file (the old one is deleted once flushed), so :class:`Follower` watches
the set of ``*.log`` files in the primary's directory. While it matches the one seen when the
secondary last synced, catching up is safe. When it differs, the secondary is opened afresh,
which reads the table files first and then replays the logs on top of them. The file set is
listed again after the sync (and after ``read``). If it changed meanwhile, the primary flushed
during the sync, so the sync is done again from a fresh instance.

Opening afresh *during* the primary's close is torn too, worse. Measured with rocksdict 0.3.29, a
primary in a thread of the same process writing a ``WriteBatch`` every half millisecond and then
closing, a secondary reopened in a loop beside it: in 45 and 22 of 200 trials (two runs) one open
read an *empty* database (no meta at all; the primary had never flushed before, else it would read
the state of its last flush). The open read the MANIFEST as it was before the close's flush
installed its table file, and listed the logs after the close had deleted the flushed one, so it
replayed neither. The close switches to a new log (``000004.log`` becomes ``000004.log
000008.log``, then ``000008.log``), and in every torn read checked (all 22 of the second run) the
log files listed before the open differed from the ones listed after the read: the check above
catches it. But such a read often *fails* (the worker's state says "no checkpoint yet"; the worker
source's test beside a running worker failed so, once in 19 runs here), and a read that
raised skipped the check. So when ``read`` raises and the log files changed during the sync, the
failure is taken for a torn read and the sync is done again from a fresh instance; when they held
still, the error is the state's own (a new worker state that has no checkpoint yet) and is raised
as it is. The MANIFEST keeps its name across the close (it is appended to), so file names other
than the logs' tell nothing.
Catching up (not reopening) in the same loop read no empty state in 200 trials.

A ``read`` that knows what a whole state looks like may also raise :class:`Torn` (the worker source
does when the checkpoint count of the same database goes back): the sync is then done again from a
fresh instance whatever the log files did.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["Follower", "Torn", "wal_files"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Torn(Exception):
    """Raised by a ``read`` given to :meth:`Follower.sync` that saw no whole state of the primary; the sync is
    done again from a fresh secondary."""


def wal_files(primary: str | Path) -> tuple[str, ...]:
    """The names of the write-ahead log files in the RocksDB directory ``primary``, sorted."""
    return tuple(sorted(name for name in os.listdir(primary) if name.endswith(".log")))


class Follower:
    """Keeps one secondary of the primary at ``primary`` whole across the primary's flushes, closes and restarts.

    The owner holds the secondary and serializes calls to :meth:`sync` (e.g. under its own lock).
    ``attempts``: syncs tried before giving up when the log files change during every one of them.
    """

    def __init__(self, primary: str | Path, *, attempts: int = 3) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.primary = Path(primary)
        self.attempts = attempts
        # The log files when the secondary last synced whole; None: it must be opened afresh.
        self._seen: tuple[str, ...] | None = None

    def sync(self, catch_up: Callable[[], object], reopen: Callable[[], object], read: Callable[[], T]) -> T:
        """Bring the secondary up to date, then return ``read()``, all from one whole state of the primary.

        ``catch_up()`` replays the primary's log into the open secondary; ``reopen()`` closes it and
        opens a fresh one; ``read()`` reads what must come from one sync (may do nothing) and may
        raise :class:`Torn`. An error of ``catch_up``, ``reopen`` or ``read`` is raised as it is when
        the log files held still during the sync; when they changed, it may come from a torn read, so
        the sync is done again. Raises :class:`RuntimeError` (from the last error or :class:`Torn`, if
        any) when the log files changed, or the read was torn, in each of ``attempts`` syncs.
        """
        last: Exception | None = None
        for attempt in range(self.attempts):
            logs = wal_files(self.primary)
            self._seen, seen = None, self._seen  # the secondary's state is unknown until this sync succeeds
            try:
                if attempt == 0 and logs == seen:
                    catch_up()
                else:
                    reopen()
                result = read()
            except Torn as exc:
                last, why = exc, f"a read was torn ({exc})"
            except Exception as exc:
                if wal_files(self.primary) == logs:
                    raise  # the primary's own state, read whole
                last, why = exc, f"the write-ahead log changed during a sync that failed ({exc})"
            else:
                if wal_files(self.primary) == logs:
                    self._seen = logs
                    return result
                last, why = None, "the write-ahead log changed during a sync"
            logger.info("%s: %s; syncing again from a fresh secondary", self.primary, why)
        if isinstance(last, Torn):
            raise RuntimeError(
                f"each of {self.attempts} syncs with {self.primary} read a torn state; expected one to read it whole"
            ) from last
        raise RuntimeError(
            f"the write-ahead log files of {self.primary} changed during each of {self.attempts} syncs; "
            "expected them to hold still for one"
        ) from last
