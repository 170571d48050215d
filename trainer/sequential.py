"""Sequential rolling-origin evaluation: ``python -m trainer eval --protocol sequential --test-fractions ...``.

The static rolling evaluation (:mod:`trainer.rolling`) freezes every user's history at the cut. Serving does not:
it sees each new click as it happens. Here, at the same cut points (:func:`trainer.rolling.rolling_split`), every
model is fit once on the clicks before the cut and then frozen, like a nightly model between two retrains. The
test clicks are walked in time order and each one is scored with the user's history up to that click:

- a test click ``(u, i, t)`` is scored by asking each model for the top K of ``u`` given ``u``'s history = every
  click of ``u`` strictly before ``t`` (the training clicks, then the test clicks before ``t``), never an item of
  that history, and it is a hit at K when ``i`` is among those K;
- **ties**: clicks of one user at the same instant are not before each other (the rule of
  :class:`trainer.history.ClickHistory`): they share one history, which holds none of them, and each is a target;
- a test click whose item is already in the history (a repeat) cannot be a hit under the exclusion rule and is not
  scored; two clicks of one user on one item at the same instant count once. Both are counted in ``info``;
- the models never learn from a test click: only the history they are asked with grows.

How each model uses the history (:mod:`trainer.sequential_scorers`): the two-tower model's user tower reads the
last N items of it, with the trained user-id row (the unknown row for a user without a training click); ALS folds
the user in (the least-squares user factor against the frozen item factors, as ``implicit``'s
``recalculate_user``); ItemCF sums the similarities of the history's items; popularity and recency-weighted
popularity are static at the cut. ALS and ItemCF answer with the training popularity while the history holds no
item they know (a cold user's first click, for one).

Metrics: HitRate@K of each scored click, averaged per user and then over users (``hit@K``), and the plain mean over
clicks (``click_hit@K``). Strata, intervals and seeds as in :mod:`trainer.rolling`: ``warm`` users have a
training click, ``cold`` users do not, ``all`` is both; each user's hit rate is averaged over the seeds, then users
are resampled (:mod:`trainer.intervals`, the same resamples for every model); the per-click mean's interval is the
ratio of the resampled users' hits to their clicks (:func:`trainer.intervals.ratio_interval`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streaming.events import UserProfile
from trainer.dataset import Dataset
from trainer.peers import Recommender, _top_k
from trainer.rolling import rolling_split

__all__ = [
    "SequentialConfig",
    "SequentialSplit",
    "click_ranks",
    "fit_models",
    "run_sequential",
    "sequential_split",
    "user_hits",
]

logger = logging.getLogger(__name__)

SEQUENTIAL_KS = (20, 50)


@dataclass(frozen=True)
class SequentialConfig:
    """``ks``: the HitRate cut-offs; ``batch_states``: histories scored per block; ``profiles_at_click``: the
    two-tower model reads a profile dated before the click (False: only profiles dated before the cut);
    ``max_clicks``: score at most this many test clicks per cut, a fixed random subset (None: all)."""

    ks: tuple[int, ...] = SEQUENTIAL_KS
    batch_states: int = 1024
    profiles_at_click: bool = True
    max_clicks: int | None = None
    subsample_seed: int = 0


@dataclass(frozen=True)
class SequentialSplit:
    """One cut point, as histories ("states") and the test clicks scored against them.

    A state is one (user, instant) with at least one scored click: its history is the first ``state_len[s]``
    clicks of ``history_items[state_user[s]]``. Clicks are ordered by state, states by user then time.
    """

    train: Dataset  # what every model is fit on: rolling_split(...).train
    cut_ms: int
    test_fraction: float
    items: np.ndarray  # [n_items] str, sorted: every item id of the data set (the "global" item index)
    users: list[str]  # test users with a scored click: warm (sorted), then cold (sorted)
    cold: np.ndarray  # [n_users] bool
    history_items: list[np.ndarray]  # per user: global item index of each click, time order (train then test)
    state_user: np.ndarray  # [n_states] index into users
    state_ts: np.ndarray  # [n_states] the instant (ms)
    state_len: np.ndarray  # [n_states] clicks of the user strictly before state_ts
    click_state: np.ndarray  # [n_clicks] non-decreasing
    click_item: np.ndarray  # [n_clicks] global item index of the clicked item
    profiles: dict[str, UserProfile]  # every profile of the data set, each with its date
    info: dict[str, Any]

    def history(self, state: int) -> np.ndarray:
        """Global item indices of the history of ``state``, oldest first."""
        return self.history_items[self.state_user[state]][: self.state_len[state]]

    @property
    def click_user(self) -> np.ndarray:
        return self.state_user[self.click_state]


def sequential_split(
    dataset: Dataset,
    test_fraction: float,
    source: dict[str, Any] | None = None,
    config: SequentialConfig | None = None,
) -> SequentialSplit:
    """The cut of :func:`trainer.rolling.rolling_split` and every test click with the history it is scored with."""
    config = config or SequentialConfig()
    base = rolling_split(dataset, test_fraction, source)
    cut = base.cut_ms
    clicks = dataset.clicks
    items = np.unique(np.concatenate([clicks.item.astype(str), np.asarray(sorted(dataset.items), dtype=str)]))
    item_idx = np.searchsorted(items, clicks.item)
    warm_users = set(base.train.clicks.user.tolist())
    test_users = set(clicks.user[clicks.ts_ms >= cut].tolist())
    order = np.argsort(clicks.user, kind="stable")  # clicks are in time order, so (user, time) order
    bounds = np.flatnonzero(np.r_[True, clicks.user[order][1:] != clicks.user[order][:-1], True])
    per_user = {clicks.user[order[lo]]: order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)}
    warm = sorted(u for u in test_users if u in warm_users)
    cold = sorted(u for u in test_users if u not in warm_users)
    users: list[str] = []
    history_items: list[np.ndarray] = []
    state_user: list[int] = []
    state_ts: list[int] = []
    state_len: list[int] = []
    click_state: list[int] = []
    click_item: list[int] = []
    repeats = duplicates = 0
    for user in [*warm, *cold]:
        pos = per_user[user]
        hist, ts = item_idx[pos], clicks.ts_ms[pos]
        first = len(users)
        n_before = int(np.searchsorted(ts, cut, side="left"))
        seen = set(hist[:n_before].tolist())
        scored_here = False
        j = n_before
        while j < len(ts):
            end = int(np.searchsorted(ts, ts[j], side="right"))  # the clicks of this instant: [j, end)
            targets: list[int] = []
            for item in hist[j:end].tolist():
                if item in seen:
                    repeats += 1
                elif item in targets:
                    duplicates += 1
                else:
                    targets.append(item)
            if targets:
                state_user.append(first)
                state_ts.append(int(ts[j]))
                state_len.append(j)
                for item in targets:
                    click_state.append(len(state_ts) - 1)
                    click_item.append(item)
                scored_here = True
            seen.update(hist[j:end].tolist())
            j = end
        if scored_here:
            users.append(user)
            history_items.append(hist)
    n_all = len(click_item)
    split = SequentialSplit(
        train=base.train,
        cut_ms=cut,
        test_fraction=test_fraction,
        items=items,
        users=users,
        cold=np.array([u not in warm_users for u in users], dtype=bool),
        history_items=history_items,
        state_user=np.asarray(state_user, dtype=np.int64),
        state_ts=np.asarray(state_ts, dtype=np.int64),
        state_len=np.asarray(state_len, dtype=np.int64),
        click_state=np.asarray(click_state, dtype=np.int64),
        click_item=np.asarray(click_item, dtype=np.int64),
        profiles=dict(dataset.users),
        info={
            **base.warm.info,
            "test_fraction": test_fraction,
            "test_clicks_scored": n_all,
            "test_clicks_repeat_not_scored": repeats,
            "test_clicks_duplicate_same_instant": duplicates,
            "test_states": len(state_ts),
            "warm_test_users": int(sum(u in warm_users for u in users)),
            "cold_test_users": int(sum(u not in warm_users for u in users)),
            "clicks_with_empty_history": int(np.sum(np.asarray(state_len, dtype=np.int64)[click_state] == 0)),
        },
    )
    if config.max_clicks is not None and n_all > config.max_clicks:
        split = _subsample(split, config.max_clicks, config.subsample_seed)
    return split


def _subsample(split: SequentialSplit, n: int, seed: int) -> SequentialSplit:
    """Keep ``n`` of the scored clicks, drawn without replacement with ``seed`` (their states and users follow)."""
    keep = np.sort(np.random.default_rng(seed).choice(len(split.click_item), size=n, replace=False))
    states, click_state = np.unique(split.click_state[keep], return_inverse=True)
    users, state_user = np.unique(split.state_user[states], return_inverse=True)
    info = {**split.info, "subsampled_clicks": n, "subsample_seed": seed}
    info["warm_test_users"] = int((~split.cold[users]).sum())
    info["cold_test_users"] = int(split.cold[users].sum())
    return dataclasses.replace(
        split,
        users=[split.users[u] for u in users],
        cold=split.cold[users],
        history_items=[split.history_items[u] for u in users],
        state_user=state_user.astype(np.int64),
        state_ts=split.state_ts[states],
        state_len=split.state_len[states],
        click_state=click_state.astype(np.int64),
        click_item=split.click_item[keep],
        info=info,
    )


def fit_models(
    models: dict[str, Callable[[], Recommender]], split: SequentialSplit
) -> tuple[dict[str, Recommender], dict[str, float]]:
    """Build and fit every model on ``split.train`` (the clicks before the cut only); name → model, → fit seconds."""
    fitted: dict[str, Recommender] = {}
    fit_s: dict[str, float] = {}
    for name, factory in models.items():
        model = factory()
        t0 = time.perf_counter()
        model.fit(split.train)
        fit_s[name] = round(time.perf_counter() - t0, 2)
        fitted[name] = model
    return fitted, fit_s


def click_ranks(
    models: dict[str, Recommender], split: SequentialSplit, config: SequentialConfig | None = None
) -> dict[str, np.ndarray]:
    """Name → ``[n_clicks]`` int64: the 0-based rank of each scored click's item in the model's list for its
    history, ``max(ks)`` when it is not in the top ``max(ks)``."""
    from trainer.sequential_scorers import make_scorer

    config = config or SequentialConfig()
    depth = max(config.ks)
    scorers = {name: make_scorer(model, split, config) for name, model in models.items()}
    ranks = {name: np.full(len(split.click_item), depth, dtype=np.int64) for name in models}
    click_lo = np.searchsorted(split.click_state, np.arange(0, len(split.state_ts) + 1))
    for s0 in range(0, len(split.state_ts), config.batch_states):
        s1 = min(s0 + config.batch_states, len(split.state_ts))
        states = np.arange(s0, s1)
        users = [split.users[u] for u in split.state_user[states]]
        histories = [split.history(s) for s in states]
        times = split.state_ts[states]
        c0, c1 = click_lo[s0], click_lo[s1]
        local = split.click_state[c0:c1] - s0
        for name, scorer in scorers.items():
            scores = scorer.scores(users, histories, times)  # [B, n_candidates]
            for row, h in enumerate(histories):  # never an item of the history
                cols = scorer.columns[h]
                scores[row, cols[cols >= 0]] = -np.inf
            top = _top_k(scores, depth)  # [B, depth]
            valid = np.isfinite(np.take_along_axis(scores, top, axis=1))
            target = scorer.columns[split.click_item[c0:c1]]  # [c]
            match = (top[local] == target[:, None]) & valid[local] & (target >= 0)[:, None]
            ranks[name][c0:c1] = np.where(match.any(axis=1), match.argmax(axis=1), depth)
    return ranks


def user_hits(ranks: np.ndarray, split: SequentialSplit, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """K → ``[n_users]`` hits at K summed over each user's scored clicks."""
    users = split.click_user
    return {k: np.bincount(users, weights=(ranks < k).astype(float), minlength=len(split.users)) for k in ks}


def run_sequential(
    dataset: Dataset,
    build: Callable[[int], dict[str, Callable[[], Recommender]]],
    test_fractions: Sequence[float],
    seeds: Sequence[int],
    resamples: int = 1000,
    source: dict[str, Any] | None = None,
    config: SequentialConfig | None = None,
) -> dict[str, Any]:
    """Every model of ``build(seed)`` at every cut and seed, scored click by click; returns the report."""
    from trainer.sequential_report import over_cuts, summarize

    config = config or SequentialConfig()
    if not test_fractions or not seeds:
        raise ValueError("expected at least one test fraction and one seed")
    t0 = time.perf_counter()
    cuts: list[dict[str, Any]] = []
    names: list[str] = []
    for fraction in test_fractions:
        split = sequential_split(dataset, fraction, source, config)
        clicks = np.bincount(split.click_user, minlength=len(split.users)).astype(float)
        per_seed: list[dict[str, dict[int, np.ndarray]]] = []
        fit_s: dict[str, list[float]] = {}
        score_s: list[float] = []
        for seed in seeds:
            models, seconds = fit_models(build(seed), split)
            t1 = time.perf_counter()
            ranks = click_ranks(models, split, config)
            score_s.append(round(time.perf_counter() - t1, 2))
            per_seed.append({name: user_hits(r, split, config.ks) for name, r in ranks.items()})
            for name, s in seconds.items():
                fit_s.setdefault(name, []).append(s)
            for name in ranks:
                logger.info(
                    "F=%g seed %d %s: per-click hit@20 %.4f (fit %.1fs)",
                    fraction,
                    seed,
                    name,
                    float(per_seed[-1][name][min(config.ks)].sum() / max(clicks.sum(), 1)),
                    seconds[name],
                )
        names = list(per_seed[0])
        strata = summarize(per_seed, clicks, split.cold, config.ks, resamples=resamples, seed=0)
        cuts.append(
            {"test_fraction": fraction, "split": split.info, "fit_s": fit_s, "score_s": score_s, "strata": strata}
        )
    return {
        "protocol": "sequential",
        "seeds": list(seeds),
        "test_fractions": list(test_fractions),
        "models": names,
        "ks": list(config.ks),
        "resamples": resamples,
        "profiles_at_click": config.profiles_at_click,
        "max_clicks": config.max_clicks,
        "pooling": "per-user HitRate@K (mean over the user's scored clicks) averaged over seeds, then users "
        "resampled (same resamples for every model); click_hit@K = hits / clicks over the resampled users",
        "cuts": cuts,
        "over_cuts": over_cuts(cuts, config.ks),
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
