"""A recency-weighted item prior at serving time, chosen on validation periods, then measured on the test period.

The two-tower model trained with logQ scores ``log P(j | u)`` as it was over the whole training window. What is
popular drifts (on MovieLens-100K, recency-weighted popularity beats every personalised model on Recall@20), and a
stream knows what is popular *now*. This script ranks by ``cos / tau + gamma * log p_j`` with ``p_j`` the item's
click share with each click weighted ``2 ** (-age / half_life)`` (``TwoTowerRetriever(serving_prior=gamma,
prior_half_life_days=half_life)``; ``half_life = inf``: every training click counts the same).

Protocol, per data set and seed (0 .. ``--seeds``-1), with the split of ``python -m trainer eval``:

1. **Validation**: the training part is split again by the same rule (MovieLens-100K: its last 10% of clicks by
   time; synthetic: its last day); the default two-tower model and the ALS peer of ``trainer eval`` are trained
   on the earlier part and every ``(gamma, half_life)`` of a grid re-ranks their recommendations (one fit per
   model and seed: only the ranking changes). ALS gets the same prior on a grid of its own score scale, so the
   comparison is on equal terms.
2. The point with the best mean validation Recall@20 over seeds is chosen per data set and model.
3. **Test**: both models are trained on the whole training part (exactly the ``two_tower`` and ``als`` rows of
   ``trainer eval``) and scored plain and with their chosen prior; recency-weighted popularity is scored on the
   same split. Differences in Recall@20 over the same users (paired) are reported per seed, with standard errors.

The test period is never looked at before the choice. Writes ``bench/results/serving_prior.json`` and ``.png``.

    .venv/bin/python bench/serving_prior.py [--datasets ml100k,synthetic] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer.evaluate import (  # noqa: E402
    DAY_MS,
    NDCG_KS,
    RECALL_KS,
    RECENT_HALF_LIFE_DAYS,
    SPLIT_KS,
    EvalConfig,
    TemporalSplit,
    default_epochs,
    load_dataset,
    temporal_split,
)
from trainer.metrics import hit_matrix, ranking_metrics, recall_per_user  # noqa: E402
from trainer.model import ModelConfig  # noqa: E402
from trainer.peers import ALS, Popularity, Recommender  # noqa: E402
from trainer.retriever import TwoTowerRetriever  # noqa: E402
from trainer.train import TrainConfig  # noqa: E402

logger = logging.getLogger("bench.serving_prior")

GAMMAS = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)
HALF_LIVES = (0.5, 1.0, 3.0, 7.0, 30.0, math.inf)  # days; inf = undecayed
# ALS scores are predicted preferences (about 0 .. 1), not cosines over a temperature: a grid on its own scale.
ALS_GAMMAS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
KEYS = ("recall@10", "recall@20", "recall@50", "ndcg@20", "head_recall@20", "tail_recall@20", "coverage@50")


def validation_split(dataset: str, split: TemporalSplit, test_fraction: float = 0.1) -> TemporalSplit:
    """The training part split again by the rule that made ``split``."""
    train = split.train
    if dataset == "ml100k":
        ts = train.clicks.ts_ms
        cut = int(ts[min(int(np.floor((1.0 - test_fraction) * len(ts))), len(ts) - 1)])
        rule = f"validation: last {test_fraction:.0%} of the training clicks"
    else:
        cut = split.cut_ms - DAY_MS
        rule = "validation: the last training day"
    return temporal_split(train, cut, None, rule=rule)


def score(model: Recommender, split: TemporalSplit) -> tuple[dict[str, float], np.ndarray]:
    """The report's metrics and the per-user Recall@20 ``[users]`` (for paired differences)."""
    depth = max(RECALL_KS + NDCG_KS + SPLIT_KS)
    recs = model.recommend(split.users, depth, split.cut_ms)
    metrics = ranking_metrics(
        recs, split.relevant, RECALL_KS, NDCG_KS, split.head, SPLIT_KS, split.info["catalogue_items"]
    )
    n_relevant = np.array([len(r) for r in split.relevant])
    per_user = recall_per_user(hit_matrix(recs, split.relevant, depth), n_relevant, (20,))[20]
    return {k: float(metrics[k]) for k in KEYS}, per_user


def set_prior(model: TwoTowerRetriever | ALS, gamma: float, half_life: float) -> None:
    model.serving_prior = gamma
    model.prior_half_life_days = None if math.isinf(half_life) else half_life


def models(seed: int, epochs: int) -> dict[str, TwoTowerRetriever | ALS]:
    """The default two-tower model and the ALS peer of ``trainer eval``, each of which gets a prior."""
    return {
        "two_tower": TwoTowerRetriever(ModelConfig(seed=seed), TrainConfig(seed=seed), epochs=epochs),
        "als": ALS(seed=seed, iterations=15),
    }


def grid_of(name: str) -> tuple[float, ...]:
    return GAMMAS if name == "two_tower" else ALS_GAMMAS


def validate(dataset: str, seed: int, epochs: int) -> dict[str, np.ndarray]:
    """Validation Recall@20 ``[gammas, half-lives]`` of one seed's two-tower and ALS models."""
    split = validation_split(dataset, load_dataset(EvalConfig(dataset=dataset, seed=seed)))
    out = {}
    for name, model in models(seed, epochs).items():
        model.fit(split.train)
        gammas = grid_of(name)
        grid = np.zeros((len(gammas), len(HALF_LIVES)))
        for gi, gamma in enumerate(gammas):
            for hi, half_life in enumerate(HALF_LIVES):
                set_prior(model, gamma, half_life)
                grid[gi, hi] = score(model, split)[0]["recall@20"]
        out[name] = grid
    return out


def test(dataset: str, seed: int, epochs: int, points: dict[str, tuple[str, float, float]]) -> dict[str, Any]:
    """Test metrics of the plain models, of each chosen ``name: (model, gamma, half_life)``, and of recency-weighted
    popularity, for one seed."""
    split = load_dataset(EvalConfig(dataset=dataset, seed=seed))
    out: dict[str, Any] = {}
    per_user: dict[str, np.ndarray] = {}
    for base, model in models(seed, epochs).items():
        model.fit(split.train)
        variants = {base: (0.0, math.inf)} | {n: (g, h) for n, (m, g, h) in points.items() if m == base}
        for name, (gamma, half_life) in variants.items():
            set_prior(model, gamma, half_life)
            out[name], per_user[name] = score(model, split)
    recent = Popularity(half_life_days=RECENT_HALF_LIFE_DAYS)
    recent.fit(split.train)
    out["popularity_recent"], per_user["popularity_recent"] = score(recent, split)
    # Paired over the same users: each variant minus its plain model, minus ALS and minus ALS with its prior.
    out["paired"] = {}
    refs = ["two_tower", "als"] + [n for n, (m, _, _) in points.items() if m == "als"]
    for name in [n for n in per_user if n.startswith("two_tower")]:
        for ref in refs:
            if name != ref:
                d = per_user[name] - per_user[ref]
                out["paired"][f"{name} - {ref}"] = {
                    "mean": round(float(d.mean()), 4),
                    "se": round(float(d.std(ddof=1) / math.sqrt(len(d))), 4),
                }
    out["test_users"] = len(split.users)
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(report["datasets"])
    fig, axes = plt.subplots(len(datasets), 3, figsize=(17, 4.5 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        entry = report["datasets"][dataset]
        for col, name in enumerate(("two_tower", "als")):
            grid = np.array(entry["validation_recall@20_mean"][name])
            ax = axes[row][col]
            im = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(HALF_LIVES)), [f"{h:g}" for h in HALF_LIVES])
            ax.set_yticks(range(len(grid_of(name))), [f"{g:g}" for g in grid_of(name)])
            ax.set(xlabel="prior half-life (days; inf = undecayed)", ylabel="gamma")
            ax.set_title(f"{dataset}, {name}: validation Recall@20")
            for gi in range(grid.shape[0]):
                for hi in range(grid.shape[1]):
                    ax.text(hi, gi, f"{grid[gi, hi]:.3f}", ha="center", va="center", fontsize=7, color="w")
            fig.colorbar(im, ax=ax)
        ax = axes[row][2]
        names = list(entry["test_mean"])
        means = [entry["test_mean"][n]["recall@20"] for n in names]
        sds = [entry["test_sd"][n]["recall@20"] for n in names]
        colours = ["tab:blue" if n.startswith("two_tower") else "tab:gray" for n in names]
        ax.barh(names, means, xerr=sds, color=colours, capsize=3)
        ax.invert_yaxis()
        ax.set(xlabel="test Recall@20 (mean ± sd over seeds)", title=f"{dataset}: test period")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="ml100k,synthetic", help="comma-separated: ml100k, synthetic")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="two-tower epochs (default: those of trainer eval per data set)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serving_prior.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("trainer").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    report: dict[str, Any] = {
        "command": "python bench/serving_prior.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "epochs": {d: args.epochs or default_epochs(d) for d in datasets},
        "seeds": args.seeds,
        "grid": {
            "gamma": {n: list(grid_of(n)) for n in ("two_tower", "als")},
            "half_life_days": list(map(str, HALF_LIVES)),
        },
        "datasets": {},
    }
    for dataset in datasets:
        # 1. validation: mean grid over seeds, per model; 2. the best point of each.
        epochs = args.epochs or default_epochs(dataset)
        per_seed = [validate(dataset, s, epochs) for s in tqdm(range(args.seeds), desc=f"validate {dataset}")]
        grids = {name: np.mean([g[name] for g in per_seed], axis=0) for name in per_seed[0]}
        points: dict[str, tuple[str, float, float]] = {}
        for name, grid in grids.items():
            gi, hi = np.unravel_index(np.argmax(grid), grid.shape)
            points[f"{name}+prior"] = (name, grid_of(name)[gi], HALF_LIVES[hi])
            logger.info("%s %s: validation picks gamma %g, half-life %g d", dataset, name, *points[f"{name}+prior"][1:])
        # 3. test, never looked at before
        runs = [test(dataset, s, epochs, points) for s in tqdm(range(args.seeds), desc=f"test {dataset}")]
        names = [n for n in runs[0] if n not in ("paired", "test_users")]
        mean = {n: {k: round(float(np.mean([r[n][k] for r in runs])), 4) for k in KEYS} for n in names}
        sd = {
            n: {k: round(float(np.std([r[n][k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0, 4) for k in KEYS}
            for n in names
        }
        report["datasets"][dataset] = {
            "chosen": {n: {"gamma": g, "half_life_days": str(h)} for n, (_, g, h) in points.items()},
            "validation_recall@20_mean": {n: np.round(g, 4).tolist() for n, g in grids.items()},
            "test_mean": mean,
            "test_sd": sd,
            "runs": runs,
        }
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    for dataset, entry in report["datasets"].items():
        print(f"\n{dataset}: chosen on validation {entry['chosen']}")
        for name, m in entry["test_mean"].items():
            print(
                f"  {name:<20} recall@20 {m['recall@20']:.4f} ± {entry['test_sd'][name]['recall@20']:.4f}  "
                f"head {m['head_recall@20']:.4f}  tail {m['tail_recall@20']:.4f}  ndcg@20 {m['ndcg@20']:.4f}"
            )
        for seed, run in enumerate(entry["runs"]):
            pairs = ", ".join(f"{k} {v['mean']:+.4f}±{v['se']:.4f}" for k, v in run["paired"].items())
            print(f"  seed {seed} (paired, {run['test_users']} users): {pairs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
