"""A synthetic recommender world with known ground truth, emitted as the event contracts of ``streaming.events``.

The world has users whose interests drift, a catalogue with power-law popularity that grows during the horizon,
and a legacy recommender that fills slates; a click model turns impressions into clicks. Because the generating
model is known, evaluation can ask for the true affinity of any (user, item, time), and the true top-k.

* Item popularity follows Zipf's law, ``w_r ∝ (r + 1) ** -item_zipf_exponent`` for popularity rank ``r``; user
  activity follows the same law with ``user_activity_exponent``.
* A user's interest at time ``t`` moves along a closed path through a few anchor vectors (spherical interpolation
  with a smoothstep easing, per-user speed and phase, optional Poisson jumps that skip a segment), so
  :meth:`SyntheticWorld.interest` has a closed form and is continuous between jumps.
* Items lie near their category centroid, pulled towards their tags' vectors, so category and tags carry signal.
* The legacy recommender samples a slate without replacement from a mixture of the popularity prior and a softmax
  over the user's current affinity (Gumbel-top-k, Vieira 2014 "Gumbel-max trick and weighted reservoir sampling"),
  and orders it by a noisy score.
* ``P(click | pos) = bias(pos) * sigmoid(a * <u(t), v> + b + quality_weight * quality)``, with the position bias
  ``bias(pos) = (1 / log2(pos + 2)) ** position_bias_exponent`` of DCG; ``quality`` is the standardised log
  popularity weight, so popular items are also intrinsically more clickable.

Events are generated lazily in chunks of requests and merged in time order; the same config always yields the same
byte stream (each part of the world draws from its own ``SeedSequence([seed, stream])``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from streaming.events import Click, Event, Impression, Item, UserProfile

__all__ = ["DAY_MS", "SyntheticWorld", "WorldConfig"]

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
# Candidate requests drawn per chunk. A constant, so the stream never depends on how much of it is consumed.
_CHUNK = 512
_BLOCK = 1 << 22
# Tie-break at equal delivery times: a catalogue record precedes the impressions that show it.
_ITEM, _IMPRESSION, _CLICK = 0, 1, 2
# Independent random streams, so e.g. changing the request rate leaves the catalogue and the users unchanged.
_S_SPACE, _S_ITEMS, _S_USERS, _S_TRAFFIC = 1, 2, 3, 4
_AGE_BUCKETS = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (55, "45-54"), (1000, "55+"))


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a world; the same config always yields the same events.

    ``requests_per_day`` is the mean rate, modulated over the day by ``diurnal_amplitude`` (peak at 20:00 UTC).
    ``drift_speed``: anchor-to-anchor segments a median user travels per day. ``max_delivery_delay_ms`` > 0 lets
    impressions and clicks arrive up to that late (emission order is by arrival, ``ts_ms`` stays the event time, and
    a click may then arrive before its impression); 0 keeps the stream ordered by ``ts_ms``.
    """

    seed: int = 0
    n_users: int = 2000
    n_items: int = 3000  # items that exist at start_ms; new ones are added at new_items_per_day
    n_categories: int = 20
    n_tags: int = 200
    n_cities: int = 50
    dim: int = 16
    start_ms: int = 1_704_067_200_000  # 2024-01-01T00:00:00Z
    days: float = 2.0
    requests_per_day: float = 10_000.0
    diurnal_amplitude: float = 0.5
    slate_size: int = 10
    item_zipf_exponent: float = 1.1
    user_activity_exponent: float = 0.8
    new_items_per_day: float = 150.0
    initial_item_max_age_days: float = 30.0
    item_spread: float = 0.6  # noise around the category centroid (relative to a unit centroid)
    tag_weight: float = 0.5
    tag_purity: float = 0.8  # share of an item's tags drawn from its category's own pool
    interest_spread: float = 0.4
    anchors_per_user: int = 3
    drift_speed: float = 0.5
    jump_rate_per_day: float = 0.0
    legacy_popular_share: float = 0.6
    legacy_temperature: float = 0.1
    legacy_rank_noise: float = 0.3
    click_scale: float = 6.0
    click_bias: float = -6.0
    quality_weight: float = 0.7
    position_bias_exponent: float = 1.0
    click_delay_ms: float = 4000.0  # median; log-normal, clipped to [500 ms, 60 s]
    max_delivery_delay_ms: int = 0

    def __post_init__(self) -> None:
        positive = ("n_users", "n_items", "n_categories", "n_tags", "n_cities", "dim", "slate_size", "anchors_per_user")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"WorldConfig.{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.n_items < self.slate_size:
            raise ValueError(f"WorldConfig: n_items ({self.n_items}) must be >= slate_size ({self.slate_size})")
        if self.days <= 0 or self.requests_per_day <= 0:
            raise ValueError(
                f"WorldConfig: days and requests_per_day must be > 0, got {self.days}, {self.requests_per_day}"
            )
        if not 0 <= self.diurnal_amplitude <= 1 or not 0 <= self.legacy_popular_share <= 1:
            raise ValueError("WorldConfig: diurnal_amplitude and legacy_popular_share must lie in [0, 1]")
        if min(self.new_items_per_day, self.jump_rate_per_day, self.max_delivery_delay_ms, self.drift_speed) < 0:
            raise ValueError("WorldConfig: rates, drift_speed and max_delivery_delay_ms must be >= 0")
        if self.legacy_temperature <= 0 or self.click_delay_ms <= 0:
            raise ValueError("WorldConfig: legacy_temperature and click_delay_ms must be > 0")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Weights ``(rank + 1) ** -exponent`` summing to 1, with ranks assigned in random order."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return (w / w.sum())[rng.permutation(n)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SyntheticWorld:
    """A deterministic world: catalogue, users with drifting interests, and a lazy, time-ordered event stream."""

    def __init__(self, config: WorldConfig = WorldConfig()) -> None:
        self.config = config
        c = config
        space = np.random.default_rng(np.random.SeedSequence([c.seed, _S_SPACE]))
        self._centroids = _unit(space.standard_normal((c.n_categories, c.dim)))  # [n_categories, dim]
        # Tag t belongs to category t % n_categories: each category owns a pool of about n_tags / n_categories.
        self._tag_owner = np.arange(c.n_tags) % c.n_categories
        tag_noise = 0.5 * space.standard_normal((c.n_tags, c.dim)) / math.sqrt(c.dim)
        self._tag_vecs = _unit(self._centroids[self._tag_owner] + tag_noise)  # [n_tags, dim]
        self._build_items()
        self._build_users()
        logger.debug(
            "world seed=%d: %d users, %d items (%d new)", c.seed, c.n_users, self._n_all, self._n_all - c.n_items
        )

    # ---------------------------------------------------------------- construction
    def _build_items(self) -> None:
        c = self.config
        rng = np.random.default_rng(np.random.SeedSequence([c.seed, _S_ITEMS]))
        n_new = int(round(c.new_items_per_day * c.days))
        n = c.n_items + n_new
        old = c.start_ms - rng.integers(0, int(c.initial_item_max_age_days * DAY_MS) + 1, c.n_items)
        new = c.start_ms + 1 + rng.integers(0, self.end_ms() - c.start_ms - 1, n_new)
        # Ids are ordered by creation, so the items existing at t are a prefix of the catalogue.
        self._created = np.sort(np.concatenate([old, new])).astype(np.int64)
        cat_w = _zipf_weights(c.n_categories, 0.5, rng)
        self._cat = rng.choice(c.n_categories, size=n, p=cat_w)
        # Tags: 1-4 per item, mostly from the category's own pool (so tags carry signal), the rest from anywhere.
        pool_len = (c.n_tags - self._cat + c.n_categories - 1) // c.n_categories  # [n]; 0 when n_tags < n_categories
        own = self._cat[:, None] + c.n_categories * (rng.random((n, 4)) * pool_len[:, None]).astype(np.int64)
        any_tag = rng.integers(0, c.n_tags, (n, 4))
        from_own = (rng.random((n, 4)) < c.tag_purity) & (pool_len[:, None] > 0)
        self._tags = np.where(from_own, own, any_tag)  # [n, 4]
        self._n_tags = rng.integers(1, 5, n)
        used = np.arange(4)[None, :] < self._n_tags[:, None]
        tag_mean = (self._tag_vecs[self._tags] * used[..., None]).sum(1) / self._n_tags[:, None]
        noise = c.item_spread * rng.standard_normal((n, c.dim)) / math.sqrt(c.dim)
        self._vecs = _unit(self._centroids[self._cat] + c.tag_weight * tag_mean + noise)  # [n_items, dim]
        self._pop = _zipf_weights(n, c.item_zipf_exponent, rng)
        self._cum_pop = np.cumsum(self._pop)
        self._pop32, self._vecs32 = self._pop.astype(np.float32), self._vecs.astype(np.float32)
        log_w = np.log(self._pop)
        self._quality = (log_w - log_w.mean()) / max(log_w.std(), 1e-12)
        # Long-tailed stats: log-normal price around a per-category level, Pareto-tailed length.
        price_level = rng.normal(3.0, 0.7, c.n_categories)
        self._price = np.round(np.exp(price_level[self._cat] + rng.normal(0.0, 0.8, n)), 2)
        self._length = np.round(30.0 * (1.0 + rng.pareto(1.5, n)), 1)
        self._n_all = n
        self._item_ids = [f"i{k}" for k in range(n)]

    def _build_users(self) -> None:
        c = self.config
        rng = np.random.default_rng(np.random.SeedSequence([c.seed, _S_USERS]))
        n, k = c.n_users, c.anchors_per_user
        # Each user has two home categories; anchors sit near one of them, sometimes near any category.
        home = rng.integers(0, c.n_categories, (n, 2))
        pick = np.where(rng.random((n, k)) < 0.8, home[np.arange(n)[:, None], rng.integers(0, 2, (n, k))], -1)
        anchor_cat = np.where(pick < 0, rng.integers(0, c.n_categories, (n, k)), pick)
        noise = c.interest_spread * rng.standard_normal((n, k, c.dim)) / math.sqrt(c.dim)
        self._anchors = _unit(self._centroids[anchor_cat] + noise)  # [n_users, k, dim]
        self._phase = rng.random(n) * k
        self._speed = c.drift_speed * np.exp(rng.normal(0.0, 0.5, n))
        horizon_days = c.days
        n_jumps = rng.poisson(c.jump_rate_per_day * horizon_days, n)
        width = max(int(n_jumps.max(initial=0)), 1)
        jumps = np.sort(c.start_ms + rng.random((n, width)) * (self.end_ms() - c.start_ms), axis=1)
        self._jumps = np.where(np.arange(width)[None, :] < n_jumps[:, None], jumps, np.inf)  # [n_users, width]
        act = _zipf_weights(n, c.user_activity_exponent, rng)
        self._user_cdf = np.cumsum(act)
        self._user_cdf[-1] = 1.0
        # Profile features, weakly tied to the first home category.
        h = home[:, 0]
        fav_city = rng.integers(0, c.n_cities, c.n_categories)
        self._city = np.where(rng.random(n) < 0.3, fav_city[h], rng.integers(0, c.n_cities, n))
        gender_logit = rng.normal(0.0, 1.0, c.n_categories)
        self._female = rng.random(n) < _sigmoid(gender_logit[h])
        age_mean = rng.uniform(22.0, 50.0, c.n_categories)
        self._age = np.clip(np.round(rng.normal(age_mean[h], 10.0)), 14, 80)
        self._tenure = np.round(np.exp(rng.normal(math.log(200.0), 1.2, n)))
        # Topics: the anchor categories, each dropped with p=0.3 (the first kept), plus a random one with p=0.3.
        keep = rng.random((n, k)) >= 0.3
        keep[:, 0] = True
        extra = np.where(rng.random(n) < 0.3, rng.integers(0, c.n_categories, n), -1)
        self._topics = np.concatenate([np.where(keep, anchor_cat, -1), extra[:, None]], axis=1)
        self._user_ids = [f"u{k}" for k in range(n)]

    # ---------------------------------------------------------------- catalogue and users
    def end_ms(self) -> int:
        """End of the horizon: no request at or after it (clicks may trail it by up to a minute)."""
        return self.config.start_ms + int(round(self.config.days * DAY_MS))

    def user_ids(self) -> list[str]:
        return list(self._user_ids)

    def item_ids(self) -> list[str]:
        """All items, including those created during the horizon, in order of creation."""
        return list(self._item_ids)

    def items_at(self, ts_ms: int) -> list[str]:
        """Items that exist at ``ts_ms`` (created at or before it)."""
        return self._item_ids[: int(np.searchsorted(self._created, ts_ms, side="right"))]

    def _index(self, ident: str, prefix: str, n: int) -> int:
        body = ident[1:] if isinstance(ident, str) and ident.startswith(prefix) else ""
        if not body.isdigit() or int(body) >= n:
            raise KeyError(f"unknown id {ident!r}: expected '{prefix}0'..'{prefix}{n - 1}'")
        return int(body)

    def _item_index(self, item_ids: Sequence[str]) -> np.ndarray:
        return np.fromiter((self._index(i, "i", self._n_all) for i in item_ids), np.int64, len(item_ids))

    def item(self, item_id: str) -> Item:
        return self._item_record(self._index(item_id, "i", self._n_all))

    def _item_record(self, k: int) -> Item:
        tags = tuple(dict.fromkeys(f"t{t}" for t in self._tags[k, : self._n_tags[k]].tolist()))
        created = int(self._created[k])
        stats = {"price": float(self._price[k]), "length": float(self._length[k])}
        return Item(f"i{k}", f"c{self._cat[k]}", tags, stats, created, max(created, self.config.start_ms))

    def user(self, user_id: str) -> UserProfile:
        k = self._index(user_id, "u", self.config.n_users)
        age = float(self._age[k])
        bucket = next(name for bound, name in _AGE_BUCKETS if age < bound)
        topics = tuple(dict.fromkeys(f"c{t}" for t in self._topics[k].tolist() if t >= 0))
        return UserProfile(
            user_id=f"u{k}",
            discrete={"city": f"city{self._city[k]}", "gender": "f" if self._female[k] else "m", "age_bucket": bucket},
            multi={"topics": topics},
            numeric={"age": age, "tenure_days": float(self._tenure[k])},
            ts_ms=self.config.start_ms,
        )

    def popularity(self) -> dict[str, float]:
        """The Zipf prior weights over all items (they sum to 1)."""
        return dict(zip(self._item_ids, self._pop.tolist(), strict=True))

    # ---------------------------------------------------------------- ground truth
    def _interests(self, users: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """users: [n] indices, ts: [n] ms -> [n, dim] unit interest vectors (closed form)."""
        c = self.config
        k = c.anchors_per_user
        jumps = (self._jumps[users] <= ts[:, None]).sum(1)
        s = self._phase[users] + self._speed[users] * (ts - c.start_ms) / DAY_MS + jumps
        seg = np.floor(s)
        f = s - seg
        f = f * f * (3.0 - 2.0 * f)  # smoothstep: the user lingers near each anchor, velocity stays continuous
        seg = seg.astype(np.int64)
        a = self._anchors[users, seg % k]
        b = self._anchors[users, (seg + 1) % k]
        omega = np.arccos(np.clip((a * b).sum(1), -1.0, 1.0))
        sin = np.sin(omega)
        safe = sin > 1e-6
        w0 = np.where(safe, np.sin((1.0 - f) * omega) / np.where(safe, sin, 1.0), 1.0 - f)
        w1 = np.where(safe, np.sin(f * omega) / np.where(safe, sin, 1.0), f)
        return _unit(w0[:, None] * a + w1[:, None] * b)

    def interest(self, user_id: str, ts_ms: int) -> np.ndarray:
        """The user's true interest at ``ts_ms``: [dim], unit norm."""
        k = self._index(user_id, "u", self.config.n_users)
        return self._interests(np.array([k]), np.array([ts_ms], dtype=np.float64))[0]

    def interests(self, user_ids: Sequence[str], ts_ms: int | Sequence[int]) -> np.ndarray:
        """Batch form of :meth:`interest`: [len(user_ids), dim]; ``ts_ms`` is one time or one per user."""
        users = np.array([self._index(u, "u", self.config.n_users) for u in user_ids], dtype=np.int64)
        ts = np.broadcast_to(np.asarray(ts_ms, dtype=np.float64), users.shape)
        return self._interests(users, ts)

    def item_vector(self, item_id: str) -> np.ndarray:
        """The item's latent vector: [dim], unit norm."""
        return self._vecs[self._index(item_id, "i", self._n_all)].copy()

    def affinity(self, user_id: str, ts_ms: int, item_ids: Sequence[str] | None = None) -> np.ndarray:
        """True click probability at position 0: [n], over ``item_ids`` or, by default, over ``items_at(ts_ms)``."""
        c = self.config
        idx = self._item_index(item_ids) if item_ids is not None else np.arange(len(self.items_at(ts_ms)))
        u = self.interest(user_id, ts_ms)
        return _sigmoid(c.click_scale * (self._vecs[idx] @ u) + c.click_bias + c.quality_weight * self._quality[idx])

    def true_top_k(self, user_id: str, ts_ms: int, k: int) -> list[str]:
        """The ``k`` existing items with the highest true affinity at ``ts_ms``, best first."""
        aff = self.affinity(user_id, ts_ms)
        order = np.argsort(-aff, kind="stable")[:k]
        return [self._item_ids[j] for j in order.tolist()]

    @cached_property
    def _position_bias(self) -> np.ndarray:
        pos = np.arange(self.config.slate_size)
        return (1.0 / np.log2(pos + 2.0)) ** self.config.position_bias_exponent

    # ---------------------------------------------------------------- traffic
    def _traffic(self) -> Iterator[tuple[np.ndarray, ...]]:
        """Yields batches of columns (key, kind, seq, ts, user, item, request * slate_size + position).

        ``key`` is the delivery time; each batch is sorted by (key, kind, seq) and follows the previous one.
        """
        c = self.config
        rng = np.random.default_rng(np.random.SeedSequence([c.seed, _S_TRAFFIC]))
        end, amp = self.end_ms(), c.diurnal_amplitude
        gap_ms = DAY_MS / (c.requests_per_day * (1.0 + amp))  # thinning: draw at the peak rate, accept λ(t)/λ_max
        clock, next_request = float(c.start_ms), 0
        released = c.n_items  # catalogue records of later items not yet in the stream
        pool = tuple(np.empty(0, np.int64) for _ in range(7))  # key, kind, seq, ts, user, item, request/position
        while clock < end:
            t = clock + np.cumsum(rng.exponential(gap_ms, _CHUNK))
            clock = float(t[-1])
            hour = (t % DAY_MS) / 3_600_000.0
            rate = 1.0 + amp * np.cos(2.0 * np.pi * (hour - 20.0) / 24.0)
            keep = (t < end) & (rng.random(_CHUNK) * (1.0 + amp) < rate)
            ts = np.floor(t[keep]).astype(np.int64)
            if len(ts) == 0:
                continue
            requests = next_request + np.arange(len(ts), dtype=np.int64)
            next_request += len(ts)
            # Slates cost [requests, catalogue] floats: bound that block to ~16 MB however large the catalogue.
            rows = max(1, _BLOCK // self._n_all)
            batch = _concat(
                *(self._requests(rng, ts[i : i + rows], requests[i : i + rows]) for i in range(0, len(ts), rows))
            )
            horizon = int(ts[-1])
            upto = int(np.searchsorted(self._created, horizon, side="right"))
            pool = _concat(pool, self._item_batch(released, upto), batch)
            released = upto
            ready, pool = _split(pool, horizon)
            yield ready
        tail = int(np.searchsorted(self._created, end, side="left"))
        pool = _concat(pool, self._item_batch(released, tail))
        ready, _ = _split(pool, None)
        yield ready

    def _item_batch(self, lo: int, hi: int) -> tuple[np.ndarray, ...]:
        idx = np.arange(lo, hi, dtype=np.int64)
        created, zeros = self._created[lo:hi], np.zeros(hi - lo, np.int64)
        return created, np.full(hi - lo, _ITEM), idx, created, zeros, idx, zeros

    def _requests(self, rng: np.random.Generator, ts: np.ndarray, requests: np.ndarray) -> tuple[np.ndarray, ...]:
        """One slate per request time; returns the impression and click rows (unsorted)."""
        c = self.config
        n = len(ts)
        users = np.searchsorted(self._user_cdf, rng.random(n), side="right").clip(max=c.n_users - 1)
        u = self._interests(users, ts.astype(np.float64))  # [n, dim]
        visible = np.searchsorted(self._created, ts, side="right")  # [n]; items [0, visible) exist
        m = int(visible.max())
        cos = u.astype(np.float32) @ self._vecs32[:m].T  # [n, m]
        # Legacy recommender: q = share * pop / P(existing) + (1 - share) * softmax(cos / temperature).
        # cos <= 1, so exp((cos - 1) / temperature) needs no max subtraction; float32 halves the memory traffic.
        mix = np.exp((cos - 1.0) / np.float32(c.legacy_temperature))
        mix *= ((1.0 - c.legacy_popular_share) / mix.sum(1, keepdims=True)).astype(np.float32)
        mix += (c.legacy_popular_share / self._cum_pop[visible - 1]).astype(np.float32)[:, None] * self._pop32[:m]
        # Gumbel-top-k in exponential form: the k smallest E / q sample k items without replacement, ∝ q.
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            keys = rng.standard_exponential((n, m), dtype=np.float32)
            keys /= mix
        # Underflowed weights give inf keys: cap them, so that items that do not exist yet (inf) lose to every other.
        np.fmin(keys, np.finfo(np.float32).max, out=keys)  # fmin also maps 0 / 0 (NaN) to the cap
        first_new = int(visible.min())
        if m > first_new:  # items created between the chunk's requests must not be shown before they exist
            keys[:, first_new:][np.arange(first_new, m)[None, :] >= visible[:, None]] = np.inf
        k = min(c.slate_size, int(visible.min()))
        slate = np.argpartition(keys, k - 1, axis=1)[:, :k]  # [n, k]
        rows = np.arange(n)[:, None]
        true_logit = (
            c.click_scale * cos[rows, slate].astype(np.float64) + c.click_bias + c.quality_weight * self._quality[slate]
        )
        # The legacy ranker orders the slate by a noisy estimate of the true logit.
        order = np.argsort(-(true_logit / c.click_scale + rng.normal(0.0, c.legacy_rank_noise, (n, k))), axis=1)
        slate, true_logit = slate[rows, order], true_logit[rows, order]
        p_click = self._position_bias[:k] * _sigmoid(true_logit)  # [n, k]
        clicked = rng.random((n, k)) < p_click
        imp_ts = np.repeat(ts, k)
        ci = np.flatnonzero(clicked.ravel())
        delay = np.clip(c.click_delay_ms * np.exp(rng.normal(0.0, 0.6, len(ci))), 500.0, 60_000.0).astype(np.int64)
        click_ts = imp_ts[ci] + delay
        user = np.repeat(users, k)
        item = slate.ravel()
        req_pos = (np.repeat(requests, k) * c.slate_size + np.tile(np.arange(k), n)).astype(np.int64)
        ts_all = np.concatenate([imp_ts, click_ts])
        key = ts_all
        if c.max_delivery_delay_ms > 0:
            key = ts_all + rng.integers(0, c.max_delivery_delay_ms + 1, len(ts_all))
        kind = np.concatenate([np.full(n * k, _IMPRESSION), np.full(len(ci), _CLICK)])
        rows_of = np.concatenate([np.arange(n * k), ci])  # impressions, then each click repeats its impression row
        return key, kind, req_pos[rows_of], ts_all, user[rows_of], item[rows_of], req_pos[rows_of]

    def _arrays(self) -> Iterator[tuple[np.ndarray, ...]]:
        """The whole stream as sorted array batches; catalogue and profiles first, at start_ms."""
        c = self.config
        n_users, start = c.n_users, c.start_ms
        yield self._item_batch(0, c.n_items)
        users = np.arange(n_users, dtype=np.int64)
        starts, zeros = np.full(n_users, start, np.int64), np.zeros(n_users, np.int64)
        yield starts, np.full(n_users, -1), users, starts, users, zeros, zeros
        yield from self._traffic()

    def events(self, limit: int | None = None) -> Iterator[Event]:
        """The event stream, lazily: Item and UserProfile records first, then traffic in time order.

        ``limit`` stops after that many events (the stream is cut, never altered: the first ``n`` events are the
        same for every ``limit >= n``).
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit: expected None or an integer >= 0, got {limit}")
        emitted = 0
        slate, uids, iids = self.config.slate_size, self._user_ids, self._item_ids
        for _, kind, _, ts, user, item, req_pos in self._arrays():
            cols = zip(kind.tolist(), ts.tolist(), user.tolist(), item.tolist(), req_pos.tolist(), strict=True)
            for kd, t, u, i, rp in cols:
                if limit is not None and emitted >= limit:
                    return
                emitted += 1
                if kd == _IMPRESSION:
                    r, p = divmod(rp, slate)
                    yield Impression(uids[u], iids[i], f"r{r}", p, t)
                elif kd == _CLICK:
                    yield Click(uids[u], iids[i], f"r{rp // slate}", t)
                elif kd == _ITEM:
                    yield self._item_record(i)
                else:
                    yield self.user(uids[u])

    def count_events(self) -> int:
        """How many events :meth:`events` yields in total (runs the simulation without building records)."""
        return sum(len(batch[0]) for batch in self._arrays())


def _concat(*parts: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate(cols) for cols in zip(*parts, strict=True))


def _split(pool: tuple[np.ndarray, ...], horizon: int | None) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Sorts the pool by (delivery key, kind, seq); returns the rows before ``horizon`` and the rest.

    Every later event has a delivery key >= the horizon (the time of the chunk's last request), so what lies
    strictly before it can be emitted now without breaking the order.
    """
    key, kind, seq = pool[0], pool[1], pool[2]
    order = np.lexsort((seq, kind, key))
    pool = tuple(col[order] for col in pool)
    cut = len(key) if horizon is None else int(np.searchsorted(pool[0], horizon, side="left"))
    return tuple(col[:cut] for col in pool), tuple(col[cut:] for col in pool)
