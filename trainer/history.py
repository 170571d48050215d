"""Users' click histories for "the last N items clicked before time t" (the last-N user feature).

The nightly job and the evaluation look these up for every training click and every request; the
online learner keeps its own per-user lists (:mod:`streaming.examples`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from trainer.dataset import Clicks
from trainer.features import Vocab

__all__ = ["ClickHistory"]


class ClickHistory:
    """Every user's clicks as item-vocabulary indices in time order, for "last N before t" lookups."""

    def __init__(self, clicks: Clicks, item_vocab: Vocab) -> None:
        users, user_of_click = np.unique(clicks.user, return_inverse=True)
        # Clicks are in time order already, so a stable sort by user gives (user, time) order.
        order = np.argsort(user_of_click, kind="stable")
        self._users = {u: k for k, u in enumerate(users.tolist())}
        self._items = item_vocab.lookup(clicks.item[order].tolist())  # [n_clicks] sorted by (user, ts)
        self._ts = clicks.ts_ms[order]
        sorted_users = user_of_click[order]
        self._start = np.searchsorted(sorted_users, np.arange(len(users)), side="left")  # [n_users]
        self._end = np.searchsorted(sorted_users, np.arange(len(users)), side="right")
        n = len(order)
        # cut[s]: the first click of the same user at the same time as sorted click s. Clicks at one instant
        # are not "before" each other, so a click's history ends there.
        new_run = np.ones(n, dtype=bool)
        if n > 1:
            new_run[1:] = (sorted_users[1:] != sorted_users[:-1]) | (self._ts[1:] != self._ts[:-1])
        cut_sorted = np.maximum.accumulate(np.where(new_run, np.arange(n), 0))
        self._click_cut = np.empty(n, dtype=np.int64)
        self._click_cut[order] = cut_sorted
        self._click_start = np.empty(n, dtype=np.int64)
        self._click_start[order] = self._start[sorted_users]

    def _gather(self, start: np.ndarray, cut: np.ndarray, n: int) -> tuple[Tensor, Tensor]:
        """``[B, n]`` values (left-aligned, most recent last) and mask for history ranges ``[max(start, cut-n), cut)``."""
        lengths = np.minimum(cut - start, n)
        width = int(lengths.max(initial=0))
        offsets = np.arange(width)[None, :]
        first = (cut - lengths)[:, None]
        mask = offsets < lengths[:, None]
        idx = np.where(mask, first + offsets, 0)
        values = np.where(mask, self._items[idx] if len(self._items) else 0, 0)
        return torch.from_numpy(values.astype(np.int64)), torch.from_numpy(mask)

    def at_clicks(self, positions: np.ndarray, n: int) -> tuple[Tensor, Tensor]:
        """Last ``n`` items before each click ``positions`` (indices into the Clicks arrays): ``[B, n']`` each."""
        positions = np.asarray(positions, dtype=np.int64)
        return self._gather(self._click_start[positions], self._click_cut[positions], n)

    def before(self, user_ids: Sequence[str], at_ms: int | Sequence[int], n: int) -> tuple[Tensor, Tensor]:
        """Last ``n`` items each user clicked strictly before ``at_ms``: ``[B, n']`` values and mask."""
        times = np.broadcast_to(np.asarray(at_ms, dtype=np.int64), (len(user_ids),))
        start = np.zeros(len(user_ids), dtype=np.int64)
        cut = np.zeros(len(user_ids), dtype=np.int64)
        for i, (user, t) in enumerate(zip(user_ids, times.tolist(), strict=True)):
            k = self._users.get(user)
            if k is not None:
                lo, hi = int(self._start[k]), int(self._end[k])
                start[i] = lo
                cut[i] = lo + int(np.searchsorted(self._ts[lo:hi], t, side="left"))
        return self._gather(start, cut, n)

    def clicked(self, user_id: str) -> np.ndarray:
        """Item-vocabulary indices of every click of ``user_id`` (int64, time order, may repeat)."""
        k = self._users.get(user_id)
        return np.zeros(0, dtype=np.int64) if k is None else self._items[self._start[k] : self._end[k]]
