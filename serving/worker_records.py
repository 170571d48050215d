"""Profiles and item click counts from the streaming worker's state on this host (optional).

The published store holds what changes with every click (ID rows, last-N); user profiles and the stream's
item click counts live in the worker's RocksDB state (:mod:`streaming.records`, :mod:`streaming.examples`).
Serving reads them through a RocksDB secondary that the refresher catches up; they are not versioned with the
publish (a profile changes rarely; a click count is a prior, not a row), so a response may mix a publish with a
profile a few hundred milliseconds newer. Without a worker state on the host, ``GET /recommend`` uses default
profile features and the serve-time prior is off.
"""

from __future__ import annotations

import logging
import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streaming.events import InvalidEvent, Limits, UserProfile, decode
from streaming.state import StateStore

__all__ = ["WorkerRecords"]

logger = logging.getLogger(__name__)

_COUNT = struct.Struct("<q")  # streaming.examples: per-item click counters under b"c:<item_id>"
_NO_LIMITS = Limits(max_bytes=1 << 30, max_future_ms=1 << 62)  # validated when the worker took them


class WorkerRecords:
    """Read-only access to profiles (``prof:``) and click counts (``c:``) of the worker state at ``state_dir``.

    The total of the counts (the denominator of ``p_j``) is re-summed at most every ``total_every_s`` seconds.
    """

    def __init__(self, state_dir: str | Path, *, total_every_s: float = 10.0) -> None:
        self.state_dir = Path(state_dir)
        self._tmp = tempfile.TemporaryDirectory(prefix="freshtower-serving-worker-")
        self._state: StateStore | None = None
        self._lock = threading.Lock()
        self._total = 0
        self._summed_at = -float("inf")
        self.total_every_s = total_every_s
        if not self._open():
            # A serving process may start before the worker's first run: default profiles until the state exists.
            logger.warning("no worker state at %s yet: default profiles and no prior until it appears", state_dir)

    def _open(self) -> bool:
        if self._state is None and (self.state_dir / "CURRENT").exists():
            self._state = StateStore(self.state_dir, secondary=self._tmp.name)
            logger.info("reading profiles and click counts from the worker state at %s", self.state_dir)
        return self._state is not None

    def catch_up(self) -> None:
        """Follow the worker's newest checkpoint (the refresher calls this); also re-sums the click counts."""
        with self._lock:
            if not self._open():
                return
            try:
                self._state.catch_up()
            except Exception as exc:  # rocksdict raises plain Exception; the next refresh tries again
                logger.warning("catching up with the worker state at %s failed: %s", self.state_dir, exc)
            now = time.monotonic()
            if now - self._summed_at >= self.total_every_s:  # a scan of every counter: not at every refresh
                self._total = sum(_COUNT.unpack(v)[0] for _, v in self._state.scan(b"c:"))
                self._summed_at = now

    def profile(self, user_id: str) -> UserProfile | None:
        if self._state is None:
            return None
        raw = self._state.get(b"prof:" + user_id.encode())
        if raw is None:
            return None
        try:
            event = decode(raw, _NO_LIMITS)
        except InvalidEvent:
            return None
        return event if isinstance(event, UserProfile) else None

    def log_prior(self, item_ids: Sequence[str]) -> np.ndarray:
        """``log p_j`` ``[n]`` float32: each item's share of the stream's clicks, add-one smoothed (an unclicked
        item gets ``log(1 / (total + n_items))`` rather than minus infinity)."""
        state = self._state
        counts = np.array(
            [
                _COUNT.unpack(r)[0] if state is not None and (r := state.get(b"c:" + i.encode())) else 0
                for i in item_ids
            ],
            dtype=np.float64,
        )
        total = self._total + len(item_ids)
        return np.log((counts + 1.0) / max(total, 1)).astype(np.float32)

    def close(self) -> None:
        with self._lock:
            if self._state is not None:
                self._state.close()
            self._tmp.cleanup()
