"""Rolling-origin evaluation: ``python -m trainer eval --test-fractions 0.1,0.2,0.3 --seeds 0,1,2``.

One static split says little on MovieLens-100K (~90 warm test users at the 10% cut). Here every model is fit
and scored at several cut points (cut = the first click at or after the ``1 - F`` click quantile, for each test
fraction ``F``; the test period runs from the cut to the end of the data, as in the single split) and, at each
cut, once per seed (the seed of the two-tower model and ALS; the popularity models and ItemCF do not depend on
it).

Strata. A test user with a training click is *warm*; one without is *cold*. Cold users are not skipped: every
model must answer for them at the cut. The two-tower model scores them from their profile (the user-id row is
the unknown row and the last-N list is empty), ALS, ItemCF and popularity fall back to the training popularity
(:mod:`trainer.peers`). Metrics are reported per stratum (``warm``, ``cold``) and over both (``all``).

No leakage: each model is fit on :attr:`RollingSplit.train`, which holds the clicks before the cut, the items
created before it, only the user profiles dated before it (a profile dated at or after the cut is dropped, so
that user is scored from the default profile) and no exposure counts (they carry no time). Every history the
two-tower model reads at scoring comes from those training clicks.

Intervals and pooling over seeds. The test users of a cut do not depend on the seed, so each user's Recall@K is
first averaged over the seeds (the mean over users of those averages equals the average of the per-seed means);
the 95% interval then resamples users (:mod:`trainer.intervals`, 1000 resamples by default) with the same
resamples for every model, which makes the two-tower-minus-peer differences and the two_tower / ALS ratio
paired. The mean over the cut points is a plain mean of the per-cut estimates; it has no interval (the test
periods are nested, so the cuts share users and are not independent).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from trainer.dataset import Dataset
from trainer.intervals import DEFAULT_LEVEL, bootstrap_indices, mean_interval, paired_difference, ratio_interval
from trainer.metrics import hit_matrix, recall_per_user
from trainer.peers import Recommender
from trainer.report import _nan_to_none
from trainer.split import TemporalSplit, quantile_cut, temporal_split

if TYPE_CHECKING:
    from trainer.tuning import Tuner

__all__ = [
    "RollingSplit",
    "markdown_report",
    "plot_rolling",
    "rolling_split",
    "run_rolling",
    "score_users",
    "summarize",
]

logger = logging.getLogger(__name__)

ROLLING_KS = (20, 50)
STRATA = ("warm", "cold", "all")
REFERENCE = "two_tower"


@dataclass(frozen=True)
class RollingSplit:
    """One cut point: the warm split of :func:`trainer.split.temporal_split` (with the leak-free training set
    described in the module docstring) and the cold users with their test items."""

    warm: TemporalSplit
    cold_users: list[str]
    cold_relevant: list[set[str]]
    test_fraction: float

    @property
    def train(self) -> Dataset:
        return self.warm.train

    @property
    def cut_ms(self) -> int:
        return self.warm.cut_ms

    @property
    def users(self) -> list[str]:
        """Warm users (sorted), then cold users (sorted)."""
        return [*self.warm.users, *self.cold_users]

    @property
    def relevant(self) -> list[set[str]]:
        return [*self.warm.relevant, *self.cold_relevant]

    @property
    def cold(self) -> np.ndarray:
        """``[len(users)]`` bool: True for a cold user."""
        return np.array([False] * len(self.warm.users) + [True] * len(self.cold_users), dtype=bool)

    @property
    def info(self) -> dict[str, Any]:
        return {
            **self.warm.info,
            "test_fraction": self.test_fraction,
            "warm_test_users": len(self.warm.users),
            "cold_test_users": len(self.cold_users),
            "cold_test_pairs": sum(len(r) for r in self.cold_relevant),
            "train_profiles": len(self.train.users),
        }


def rolling_split(dataset: Dataset, test_fraction: float, source: dict[str, Any] | None = None) -> RollingSplit:
    """Cut ``dataset`` so that the latest ``test_fraction`` of its clicks is the test period; keep cold users."""
    cut = quantile_cut(dataset, test_fraction)
    rule = f"test = clicks from the cut (the {1 - test_fraction:.0%} click quantile) to the end"
    split = temporal_split(dataset, cut, None, rule=rule, source=source)
    train = split.train
    profiles = {u: p for u, p in train.users.items() if p.ts_ms < cut}
    train = Dataset(train.items, profiles, train.clicks, Counter())
    warm_users = set(train.clicks.user.tolist())
    test = dataset.between(cut, None).clicks
    cold: dict[str, set[str]] = {}
    for user, item in zip(test.user.tolist(), test.item.tolist(), strict=True):
        if user not in warm_users:
            cold.setdefault(user, set()).add(item)
    cold_users = sorted(cold)
    warm = dataclasses.replace(split, train=train)
    return RollingSplit(warm, cold_users, [cold[u] for u in cold_users], test_fraction)


def score_users(
    models: dict[str, Callable[[], Recommender]], split: RollingSplit, ks: Sequence[int] = ROLLING_KS
) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, float]]:
    """Fit each model on ``split.train`` and return name → K → per-user Recall@K ``[len(split.users)]``, and
    name → fit seconds. Every test user has at least one test item, so no user is dropped."""
    depth = max(ks)
    users, relevant = split.users, split.relevant
    n_rel = np.array([len(r) for r in relevant], dtype=np.int64)
    recalls: dict[str, dict[int, np.ndarray]] = {}
    fit_s: dict[str, float] = {}
    for name, factory in models.items():
        model = factory()
        t0 = time.perf_counter()
        model.fit(split.train)
        fit_s[name] = round(time.perf_counter() - t0, 2)
        recs = model.recommend(users, depth, split.cut_ms)
        recalls[name] = recall_per_user(hit_matrix(recs, relevant, depth), n_rel, ks)
        logger.info(
            "F=%g %s: recall@20 warm %.4f cold %.4f (fit %.1fs)",
            split.test_fraction,
            name,
            float(np.mean(recalls[name][20][~split.cold])) if (~split.cold).any() else float("nan"),
            float(np.mean(recalls[name][20][split.cold])) if split.cold.any() else float("nan"),
            fit_s[name],
        )
    return recalls, fit_s


def summarize(
    per_seed: Sequence[dict[str, dict[int, np.ndarray]]],
    cold: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """Per stratum: each model's mean Recall@K with its interval, two_tower minus each peer (paired) and the
    two_tower / ALS ratio. ``per_seed``: one :func:`score_users` result per seed, aligned user by user."""
    names = list(per_seed[0])
    ks = sorted(per_seed[0][names[0]])
    pooled = {n: {k: np.mean([s[n][k] for s in per_seed], axis=0) for k in ks} for n in names}
    out: dict[str, Any] = {}
    for stratum in STRATA:
        mask = {"warm": ~cold, "cold": cold, "all": np.ones_like(cold)}[stratum]
        n = int(mask.sum())
        entry: dict[str, Any] = {"users": n, "models": {}, "vs_two_tower": {}, "ratio_two_tower_als": {}}
        if n == 0:
            out[stratum] = entry
            continue
        idx = bootstrap_indices(n, resamples, seed)
        for name in names:
            entry["models"][name] = {
                f"recall@{k}": mean_interval(pooled[name][k][mask], idx, level).to_dict() for k in ks
            }
        if REFERENCE in pooled:
            ref = pooled[REFERENCE]
            for name in names:
                if name != REFERENCE:
                    entry["vs_two_tower"][name] = {
                        f"recall@{k}": paired_difference(ref[k][mask], pooled[name][k][mask], idx, level).to_dict()
                        for k in ks
                    }
            if "als" in pooled:
                entry["ratio_two_tower_als"] = {
                    f"recall@{k}": ratio_interval(ref[k][mask], pooled["als"][k][mask], idx, level).to_dict()
                    for k in ks
                }
        out[stratum] = entry
    return out


def _over_cuts(cuts: list[dict[str, Any]]) -> dict[str, Any]:
    """Plain means over the cut points of every per-cut point estimate (no interval: the cuts share users)."""

    def mean(values: list[float]) -> float:
        finite = [v for v in values if v is not None and np.isfinite(v)]
        return float(np.mean(finite)) if len(finite) == len(values) and finite else float("nan")

    out: dict[str, Any] = {}
    for stratum in STRATA:
        entries = [c["strata"][stratum] for c in cuts]
        block: dict[str, Any] = {}
        for part in ("models", "vs_two_tower"):
            names = entries[0][part]
            block[part] = {
                n: {m: mean([e[part].get(n, {}).get(m, {}).get("value", np.nan) for e in entries]) for m in names[n]}
                for n in names
            }
        ratio = entries[0]["ratio_two_tower_als"]
        block["ratio_two_tower_als"] = {m: mean([e["ratio_two_tower_als"][m]["value"] for e in entries]) for m in ratio}
        # The ratio of the mean recalls over the cuts, next to the mean of the per-cut ratios.
        tt, als = block["models"].get(REFERENCE), block["models"].get("als")
        if tt and als:
            block["ratio_of_means_two_tower_als"] = {m: tt[m] / als[m] if als[m] > 0 else float("nan") for m in tt}
        out[stratum] = block
    return out


def _cell(entry: dict[str, float] | None, signed: bool = False) -> str:
    """A table cell: the value, with its interval when it has one (also the sequential tables')."""
    if not entry or entry.get("value") is None or not np.isfinite(entry["value"]):
        return "n/a"
    fmt = "{:+.4f}" if signed else "{:.4f}"
    low, high = entry.get("low"), entry.get("high")
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return fmt.format(entry["value"])
    return f"{fmt.format(entry['value'])} [{fmt.format(low)}, {fmt.format(high)}]"


def markdown_report(report: dict[str, Any]) -> str:
    """One section per stratum: Recall@20 and @50 per model and cut with 95% intervals, the paired differences
    two_tower minus peer, the two_tower / ALS ratio, and the mean over the cut points."""
    cuts = report["cuts"]
    head = "| | " + " | ".join(f"F={c['test_fraction']:g}" for c in cuts) + " | mean over cuts |"
    rule = "|---" * (len(cuts) + 2) + "|"
    lines: list[str] = []
    for stratum in STRATA:
        users = ", ".join(f"F={c['test_fraction']:g}: {c['strata'][stratum]['users']}" for c in cuts)
        lines += [f"### {stratum} test users ({users})", ""]
        over = report["over_cuts"][stratum]
        for k in ROLLING_KS:
            m = f"recall@{k}"
            lines += [f"Recall@{k}, mean [95% interval]:", "", head, rule]
            for name in report["models"]:
                cells = [_cell(c["strata"][stratum]["models"].get(name, {}).get(m)) for c in cuts]
                cells.append(_cell({"value": over["models"].get(name, {}).get(m)}))
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            for peer in cuts[0]["strata"][stratum]["vs_two_tower"]:
                cells = [_cell(c["strata"][stratum]["vs_two_tower"].get(peer, {}).get(m), signed=True) for c in cuts]
                cells.append(_cell({"value": over["vs_two_tower"].get(peer, {}).get(m)}, signed=True))
                lines.append(f"| two_tower − {peer} | " + " | ".join(cells) + " |")
            if over.get("ratio_two_tower_als"):
                cells = [_cell(c["strata"][stratum]["ratio_two_tower_als"].get(m)) for c in cuts]
                cells.append(_cell({"value": over["ratio_two_tower_als"].get(m)}))
                lines.append("| two_tower / als | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot_rolling(
    report: dict[str, Any],
    path: Path,
    metric: str = "recall@20",
    *,
    title: str = "Rolling-origin evaluation",
    ylabel: str | None = None,
) -> None:
    """One panel per stratum: ``metric`` per cut point (x: test fraction) and model, with 95% interval bars (also
    the sequential protocol's plot, :mod:`trainer.sequential_report`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.report import _bar_colours

    cuts = report["cuts"]
    x = np.array([c["test_fraction"] for c in cuts], dtype=float)
    names = list(report["models"])
    colours = dict(zip(names, _bar_colours(names), strict=True))
    fig, axes = plt.subplots(1, len(STRATA), figsize=(4.6 * len(STRATA), 4.0), sharey=True, squeeze=False)
    # Side by side within 60% of the gap between cuts, so that each point stays nearer its own cut than the next.
    width = min(0.08, 0.6 / (len(x) * len(names))) * (float(np.ptp(x)) if len(x) > 1 and np.ptp(x) > 0 else 0.1)
    for ax, stratum in zip(axes[0], STRATA, strict=True):
        for j, name in enumerate(names):
            rows = [c["strata"][stratum]["models"].get(name, {}).get(metric) for c in cuts]
            v = np.array([r["value"] if r and r["value"] is not None else np.nan for r in rows], dtype=float)
            lo = np.array([r["low"] if r and r["low"] is not None else np.nan for r in rows], dtype=float)
            hi = np.array([r["high"] if r and r["high"] is not None else np.nan for r in rows], dtype=float)
            xs = x + (j - (len(names) - 1) / 2) * width  # side by side, so the bars do not hide each other
            ax.errorbar(xs, v, yerr=np.nan_to_num(np.vstack([v - lo, hi - v])), marker="o", capsize=3,
                        color=colours[name], label=name)  # fmt: skip
        ax.set_title(f"{stratum} ({', '.join(str(c['strata'][stratum]['users']) for c in cuts)} users)")
        ax.set_xticks(x, [f"{f:g}" for f in x])
        ax.set_xlabel("test fraction (cut = 1 − F click quantile)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel or f"{metric} (95% bootstrap interval over users)")
    axes[0][-1].legend(fontsize="small")
    fig.suptitle(f"{title}: {report['dataset']}, seeds {report['seeds']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_rolling(
    dataset: Dataset,
    build: Callable[[int], dict[str, Callable[[], Recommender]]],
    test_fractions: Sequence[float],
    seeds: Sequence[int],
    resamples: int = 1000,
    source: dict[str, Any] | None = None,
    tuner: Tuner | None = None,
    per_user: list[tuple[dict[str, dict[int, np.ndarray]], np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Every model of ``build(seed)`` at every cut and seed; returns the report (JSON-ready but for NaN).

    ``tuner(split, seed)`` (:class:`trainer.tuning.Tuner`), when given, replaces ``build``: it chooses each model's
    setting on a validation window before the cut and returns the factories and what it chose (stored per cut
    and seed under ``tuning``). ``per_user``, when given, receives per cut the seed-pooled per-user Recall@K of
    every model and the cold mask (to pool several synthetic worlds, :mod:`trainer.worlds`).
    """
    if not test_fractions or not seeds:
        raise ValueError("expected at least one test fraction and one seed")
    t0 = time.perf_counter()
    cuts: list[dict[str, Any]] = []
    names: list[str] = []
    steps = tqdm(total=len(test_fractions) * len(seeds), desc="cuts x seeds", unit="fit set")
    for fraction in test_fractions:
        split = rolling_split(dataset, fraction, source)
        per_seed, fit_s, tuning = [], {}, {}
        for seed in seeds:
            steps.set_postfix_str(f"F={fraction:g} seed {seed}")
            if tuner is None:
                models = build(seed)
            else:
                models, tuning[str(seed)] = tuner(split, seed)
            recalls, seconds = score_users(models, split)
            per_seed.append(recalls)
            for name, s in seconds.items():
                fit_s.setdefault(name, []).append(s)
            steps.update()
        names = list(per_seed[0])
        strata = summarize(per_seed, split.cold, resamples=resamples, seed=0)
        cuts.append({"test_fraction": fraction, "split": split.info, "fit_s": fit_s, "strata": strata})
        if tuner is not None:
            cuts[-1]["tuning"] = tuning
        if per_user is not None:
            ks = per_seed[0][names[0]].keys()
            per_user.append(
                ({n: {k: np.mean([s[n][k] for s in per_seed], axis=0) for k in ks} for n in names}, split.cold)
            )
    steps.close()
    return {
        "seeds": list(seeds),
        "test_fractions": list(test_fractions),
        "models": names,
        "resamples": resamples,
        "level": DEFAULT_LEVEL,
        "pooling": "per-user Recall@K averaged over seeds, then users resampled (same resamples for every model)",
        "cuts": cuts,
        "over_cuts": _over_cuts(cuts),
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }


def write_reports(
    report: dict[str, Any], json_path: Path, md_path: Path, png_path: Path, command: str, extra: str = ""
) -> str:
    """Write the JSON, markdown and PNG reports (``extra``: markdown appended); returns the markdown."""
    body = markdown_report(report) + (f"\n{extra}" if extra else "")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_nan_to_none({**report, "command": command}), indent=2, allow_nan=False) + "\n")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(
        f"# Rolling-origin evaluation: {report['dataset']}\n\n`{command}`\n\n{report['pooling']}.\n\n{body}"
    )
    plot_rolling(report, png_path)
    return body
