"""The item-owner role inside a worker process (``--own-items``), and what keeps it alive.

The role is an :class:`~streaming.item_owner.ItemOwner` in a thread of the worker, with its own member name,
scratch state and Kafka clients, and its metrics on the worker's ``/metrics``. Everything it holds is in Kafka
(``item-rows`` and the owner group's offsets, committed together), so one life of it can be replaced by another at
any moment without losing or repeating a gradient: the new life's producer fences the old one's transactional id
(and aborts what it left open), and it restores its partitions from ``item-rows``.

That is what the watchdog does. A life whose loop has not come round for ``stall_s`` is stuck inside a client
call: kafka-python 3.0's group member was seen waiting for good in ``poll`` after a rebalance at start-up (no
heartbeat and no rejoin: the group dropped it, and the partitions it was due never reached it). The watchdog logs
where it is stuck, closes its clients (which ends a wait on their network loop), and starts the next life, which
joins the group as a new member. A life that fails with an error stops the worker instead (exit 70, for its
supervisor), as before: that is a fault to see, not a stall to ride out.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable

from streaming.item_owner import ItemOwner

__all__ = ["OwnerRole"]

logger = logging.getLogger(__name__)


class OwnerRole:
    """Runs the owner ``make(life, previous)`` gives (life 0 with no previous life, then 1, 2... for each
    replacement) in a thread until :meth:`close`; sets ``worker_stop`` and :attr:`failed` if a life fails with an
    error. ``stall_s``: the watchdog's limit (0: off)."""

    def __init__(
        self, make: Callable[[int, ItemOwner | None], ItemOwner], worker_stop: threading.Event, stall_s: float
    ) -> None:
        self._make = make
        self._worker_stop = worker_stop
        self.stall_s = stall_s
        self.stop = threading.Event()
        self.failed = False
        self.life = 0
        self._retired: set[ItemOwner] = set()  # replaced lives: how they end is not the role's failure
        self.owner = make(0, None)
        self.thread = self._start(self.owner)
        if stall_s > 0:
            threading.Thread(target=self._watch, name="item-owner-watchdog", daemon=True).start()

    def _start(self, owner: ItemOwner) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(owner,), name=f"item-owner-{self.life}", daemon=True)
        thread.start()
        return thread

    def _run(self, owner: ItemOwner) -> None:
        try:
            owner.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 (the process must not go on without its owner role)
            if owner in self._retired:  # a replaced life, woken by the close of its clients
                logger.info("the replaced item-owner life ended: %s: %s", type(exc).__name__, exc)
                return
            logger.exception("the item-owner role failed: stopping the worker")
            self.failed = True
            self._worker_stop.set()

    # ------------------------------------------------------------------ watchdog
    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            quiet = time.monotonic() - self.owner.beat_at
            if quiet > self.stall_s and self.thread.is_alive():
                self._replace(quiet)

    def _replace(self, quiet: float) -> None:
        old, thread = self.owner, self.thread
        frame = sys._current_frames().get(thread.ident or -1)
        where = " <- ".join(f"{f.name} ({f.filename}:{f.lineno})" for f in traceback.extract_stack(frame)[::-1][:6])
        logger.error(
            "the item-owner role made no progress for %.0f s (limit %g s), stuck at %s: replacing it; its "
            "partitions are restored from item-rows", quiet, self.stall_s, where or "?",
        )  # fmt: skip
        old.metrics.replacements.inc()
        self._retired.add(old)
        # Closing its clients from here ends a wait on their network loop; bounded, as a close may hang too.
        closer = threading.Thread(target=old.close, name="item-owner-close", daemon=True)
        closer.start()
        closer.join(10)
        if self.stop.is_set():  # the worker is stopping: no new life
            return
        try:
            owner = self._make(self.life + 1, old)
        except Exception:  # noqa: BLE001 (no owner role: the worker must stop, for its supervisor to restart it)
            logger.exception("the item-owner role could not be started again: stopping the worker")
            self.failed = True
            self._worker_stop.set()
            self.stop.set()
            return
        self.life += 1
        self.owner = owner
        self.thread = self._start(owner)
        thread.join(5)
        if not thread.is_alive() and not closer.is_alive():
            shutil.rmtree(old.settings.state_dir, ignore_errors=True)

    # ------------------------------------------------------------------ worker's exit
    def drain(self, idle_s: float) -> None:
        """After an idle worker's exit: keep owning until no step has been committed for ``idle_s``."""
        while self.thread.is_alive():
            owner, steps = self.owner, self.owner.stats.steps
            time.sleep(idle_s)
            if self.owner is owner and owner.stats.steps == steps:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
