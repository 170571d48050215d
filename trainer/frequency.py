"""Streaming estimate of how often each item appears in a training batch (Yi et al., RecSys 2019, Algorithm 2).

In-batch negatives are drawn in proportion to clicks, so hot items are over-punished; the listwise loss corrects this
by subtracting ``log p_j`` from every logit during training (seed 000, "logQ"). ``p_j`` has to follow the stream as
items rise and fall, and the catalogue is too large (and changing) for an exact counter, so items are hashed into a
fixed number of buckets and two arrays are kept per hash function:

* ``A[h, b]``: the global step at which bucket ``b`` was last seen;
* ``B[h, b]``: an exponential moving average of the gap, in steps, between two sightings.

At step ``t``, for every bucket ``b`` hit by the batch: ``B <- (1 - alpha) * B + alpha * (t - A)``, then ``A <- t``.
An item that shows up in a batch with probability ``p`` has a mean gap of ``1 / p``, so ``p_hat = 1 / B``. With
several hash functions a collision only ever *shortens* a bucket's gap (another item refreshed it), so the largest
``B`` over the hash functions is the least contaminated and ``p_hat = 1 / max_h B[h, y]``.

Initialisation (a choice the paper leaves to the implementer): steps count from 1 and ``A`` starts at 0, so the first
gap ``t - 0`` is the wait since the stream began, which is a genuine sample of the inter-arrival time for an item
that was in the stream from the start. ``B`` starts at 0, which here means "never seen": the first sighting *seeds*
``B`` with that first gap instead of applying ``(1 - alpha) * 0 + alpha * gap``, which would report
``p_hat = 1 / (alpha * t)`` (up to ``1 / alpha`` = 100 times too high) for the first few hundred sightings. An item
that first appears late in the stream starts with a long gap (``p_hat`` too low) that the moving average forgets
at rate ``alpha`` per sighting.

That last point hurts a learner that runs for days (the streaming worker): an item first seen on day five starts
with a gap of five days of steps, its ``p_hat`` is far too low, and the correction then boosts its positive logits
(``- log p_hat`` is large), so its clicks teach the model little for hundreds of sightings: the new items that
freshness exists for. With ``from_second_sighting=True`` a first sighting only records ``A`` and seeds nothing;
``B`` is seeded at the second sighting with a genuine gap between two sightings. Until then the bucket's gap is
taken as the steps since its one sighting, at least 1: ``p_hat = 1`` in the batch that introduces an item (no
correction while nothing is known), falling as the item stays away. Old checkpoints read the same way ("seen once"
is ``B == 0`` with ``A > 0``, which the default rule never leaves behind).

Keys are hashed with a stable hash (identical in every process and run, unlike Python's ``hash``): strings through
BLAKE2b of their UTF-8 bytes, integers directly; both then go through a SplitMix64 mix salted per hash function.
A key's type is part of its identity: ``"42"`` and ``42`` are different keys.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["FrequencyEstimator"]

logger = logging.getLogger(__name__)

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective mix of uint64 values (wrap-around arithmetic is intended)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


def _salts(seed: int, num_hashes: int) -> np.ndarray:
    """One 64-bit salt per hash function, derived from ``seed`` with BLAKE2b (stable across runs)."""
    raw = [
        hashlib.blake2b(f"freshtower-frequency:{seed}:{h}".encode(), digest_size=8).digest() for h in range(num_hashes)
    ]
    return np.frombuffer(b"".join(raw), dtype="<u8").astype(_U64)


def _key_codes(item_keys: Any) -> np.ndarray:
    """Map keys to uint64 codes: integers as they are (two's complement), strings/bytes via BLAKE2b-64."""
    keys = np.asarray(item_keys)
    if keys.ndim == 0:
        keys = keys.reshape(1)
    if keys.ndim != 1:
        raise ValueError(f"item_keys must be one-dimensional, got shape {keys.shape}")
    if keys.dtype.kind in "iu":
        return keys.astype(np.int64, copy=False).view(_U64) if keys.dtype.kind == "i" else keys.astype(_U64)
    if keys.size == 0:
        return np.zeros(0, dtype=_U64)
    if keys.dtype.kind in "USO":
        digests = []
        for key in keys.tolist():
            if isinstance(key, str):
                key = key.encode("utf-8")
            elif not isinstance(key, bytes):
                raise TypeError(f"item keys must be str, bytes or integers, got {type(key).__name__}: {key!r}")
            digests.append(hashlib.blake2b(key, digest_size=8).digest())
        return np.frombuffer(b"".join(digests), dtype="<u8").astype(_U64)
    raise TypeError(f"item keys must be str, bytes or integers, got an array of dtype {keys.dtype}")


class FrequencyEstimator:
    """Estimates ``p(y)``, the probability that item ``y`` appears in a batch, from the stream of batches.

    ``num_buckets`` per hash function (memory: ``16 * num_hashes * num_buckets`` bytes; 32 MiB by default),
    ``alpha`` the moving-average rate (paper: 0.01), ``seed`` picks the hash functions, ``min_probability`` is
    reported for items never seen (and is the lower clip for all estimates).
    """

    def __init__(
        self,
        num_buckets: int = 1 << 20,
        num_hashes: int = 2,
        alpha: float = 0.01,
        seed: int = 0,
        *,
        min_probability: float = 1e-6,
        from_second_sighting: bool = False,
    ) -> None:
        if num_buckets < 1 or num_hashes < 1:
            raise ValueError(f"num_buckets and num_hashes must be >= 1, got {num_buckets} and {num_hashes}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0.0 < min_probability <= 1.0:
            raise ValueError(f"min_probability must be in (0, 1], got {min_probability}")
        self.num_buckets = int(num_buckets)
        self.num_hashes = int(num_hashes)
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.min_probability = float(min_probability)
        self.from_second_sighting = bool(from_second_sighting)
        self._salts = _salts(self.seed, self.num_hashes)
        self._last_step = np.zeros((self.num_hashes, self.num_buckets), dtype=np.int64)  # A
        self._mean_gap = np.zeros((self.num_hashes, self.num_buckets), dtype=np.float64)  # B; 0 = never seen
        self._step = 0

    @property
    def step(self) -> int:
        """The global step of the latest batch seen (0 before the first)."""
        return self._step

    def buckets(self, item_keys: np.ndarray | Sequence[str] | Sequence[int]) -> np.ndarray:
        """Bucket of each key under each hash function: int64 ``[num_hashes, n]`` (stable across processes)."""
        codes = _key_codes(item_keys)
        mixed = _splitmix64(codes[None, :] ^ self._salts[:, None])
        return (mixed % _U64(self.num_buckets)).astype(np.int64)

    def update(self, item_keys: np.ndarray | Sequence[str] | Sequence[int], step: int | None = None) -> None:
        """Record one batch seen at global ``step`` (default: the previous step + 1). Steps must increase."""
        t = self._step + 1 if step is None else int(step)
        if t <= self._step:
            raise ValueError(f"step must increase: got {t} after step {self._step}")
        index = self.buckets(item_keys)
        for h in range(self.num_hashes):
            # A bucket is updated once per batch however many keys (duplicates or collisions) land on it:
            # the estimate is of "appears in a batch", not of how many times.
            hit = np.unique(index[h])
            last = self._last_step[h, hit]
            gap = (t - last).astype(np.float64)
            old = self._mean_gap[h, hit]
            seed = gap
            if self.from_second_sighting:
                seed = np.where(last > 0, gap, 0.0)  # a first sighting has no gap yet: "seen once"
            self._mean_gap[h, hit] = np.where(old > 0.0, (1.0 - self.alpha) * old + self.alpha * gap, seed)
            self._last_step[h, hit] = t
        self._step = t

    def bucket_state(self, item_keys: np.ndarray | Sequence[str] | Sequence[int]) -> list[tuple[int, int, int, float]]:
        """``(hash, bucket, A, B)`` of every distinct bucket the keys map to: what an update of them changed, for a
        learner that checkpoints the touched buckets rather than the whole arrays."""
        index = self.buckets(item_keys)
        out = []
        for h in range(self.num_hashes):
            for b in np.unique(index[h]).tolist():
                out.append((h, b, int(self._last_step[h, b]), float(self._mean_gap[h, b])))
        return out

    def rescale_batch(self, ratio: float) -> None:
        """Carry the estimate over to batches ``ratio`` times as large (another ``--nproc`` or batch size).

        An item in a batch with probability ``p`` is in one ``ratio`` times as large with probability
        ``1 - (1 - p) ** ratio`` (``ratio * p`` for rare items; hot ones saturate at 1), so every seen bucket's
        mean gap ``1 / p`` becomes ``1 / (1 - (1 - p) ** ratio)``. Gaps are in steps, which the new batches keep
        counting; never-seen buckets stay unseen.
        """
        if not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"ratio must be a finite number > 0, got {ratio}")
        seen = self._mean_gap > 0.0
        p = np.minimum(1.0, 1.0 / self._mean_gap[seen])
        self._mean_gap[seen] = 1.0 / -np.expm1(ratio * np.log1p(-np.minimum(p, 1.0 - 1e-12)))

    def probability(self, item_keys: np.ndarray | Sequence[str] | Sequence[int]) -> np.ndarray:
        """float64 ``[n]``: ``1 / max_h B[h, y]`` clipped to ``[min_probability, 1]``; never-seen keys get the floor."""
        index = self.buckets(item_keys)
        rows = np.arange(self.num_hashes)[:, None]
        gaps = self._mean_gap[rows, index]  # [num_hashes, n]
        if self.from_second_sighting:
            once = (gaps == 0.0) & (self._last_step[rows, index] > 0)
            gaps = np.where(once, np.maximum(1.0, self._step - self._last_step[rows, index]), gaps)
        # Seeing a key updates all of its buckets, so one untouched bucket proves the key itself was never seen.
        seen = gaps.min(axis=0) > 0.0
        p = np.full(index.shape[1], self.min_probability, dtype=np.float64)
        p[seen] = np.clip(1.0 / gaps.max(axis=0)[seen], self.min_probability, 1.0)
        return p

    def log_q(self, item_keys: np.ndarray | Sequence[str] | Sequence[int]) -> np.ndarray:
        """float64 ``[n]``: ``log(probability)``, the term subtracted from training logits (logQ correction)."""
        return np.log(self.probability(item_keys))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays only (safe to save with ``np.savez`` and load with ``allow_pickle=False``)."""
        return {
            "last_step": self._last_step.copy(),
            "mean_gap": self._mean_gap.copy(),
            "step": np.array(self._step, dtype=np.int64),
            "hash_config": np.array([self.num_hashes, self.num_buckets, self.seed], dtype=np.int64),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore from :meth:`state_dict`; the hash configuration must match this estimator's."""
        missing = {"last_step", "mean_gap", "step", "hash_config"} - set(state)
        if missing:
            raise KeyError(f"frequency state lacks {sorted(missing)}; has {sorted(state)}")
        config = [int(v) for v in np.asarray(state["hash_config"]).reshape(-1)]
        expected = [self.num_hashes, self.num_buckets, self.seed]
        if config != expected:
            raise ValueError(
                f"frequency state was built with (num_hashes, num_buckets, seed) = {tuple(config)}, "
                f"this estimator has {tuple(expected)}"
            )
        shape = (self.num_hashes, self.num_buckets)
        last_step = np.asarray(state["last_step"], dtype=np.int64)
        mean_gap = np.asarray(state["mean_gap"], dtype=np.float64)
        if last_step.shape != shape or mean_gap.shape != shape:
            raise ValueError(
                f"frequency state arrays have shapes {last_step.shape} and {mean_gap.shape}, expected {shape}"
            )
        self._last_step = last_step.copy()
        self._mean_gap = mean_gap.copy()
        self._step = int(np.asarray(state["step"]))
        logger.debug("frequency state restored at step %d", self._step)
