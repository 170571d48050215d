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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["Follower", "wal_files"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
        opens a fresh one; ``read()`` reads what must come from one sync (may do nothing). Raises
        :class:`RuntimeError` when the log files changed during each of ``attempts`` syncs.
        """
        for attempt in range(self.attempts):
            logs = wal_files(self.primary)
            try:
                if attempt == 0 and logs == self._seen:
                    catch_up()
                else:
                    reopen()
                result = read()
            except BaseException:
                self._seen = None  # the secondary's state is unknown: open it afresh next time
                raise
            if wal_files(self.primary) == logs:
                self._seen = logs
                return result
            self._seen = None
            logger.info(
                "the write-ahead log of %s changed during a sync; syncing again from a fresh secondary", self.primary
            )
        raise RuntimeError(
            f"the write-ahead log files of {self.primary} changed during each of {self.attempts} syncs; "
            "expected them to hold still for one"
        )
