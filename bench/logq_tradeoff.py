"""How the strength of the popularity correction trades head against tail recall.

Two ways to put the item prior back into an in-batch softmax model (DESIGN.md "Positives and negatives"):

* **train-time logQ** with strength ``beta`` (``TrainConfig.logq_weight``): train on ``cos / tau - beta * log q_j``;
  ``beta = 1`` is the correction of Yi et al. (RecSys 2019), ``beta = 0`` none;
* **serve-time prior** with strength ``gamma`` (seed 004): train with no correction, rank by
  ``cos / tau + gamma * log p_j`` (``TwoTowerRetriever(serving_prior=gamma)``, ``p_j`` the training click share).

Each point is the offline protocol of ``python -m trainer eval`` (same temporal split, same default model and
training settings, same metrics), for ``--seeds`` seeds (the seed drives the model's initialisation and the
training order; on the synthetic world it also draws the world). The serve-time points reuse the ``beta = 0``
model of the same seed: only the ranking changes, so they cost no training.

Writes ``bench/results/logq_tradeoff.json`` (every point of every seed, and the means) and ``.png`` (head vs tail
Recall@20 and overall Recall@20 against the strength, one row per data set).

    .venv/bin/python bench/logq_tradeoff.py [--datasets synthetic,ml100k] [--seeds 3] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import logging
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
    NDCG_KS,
    RECALL_KS,
    SPLIT_KS,
    EvalConfig,
    TemporalSplit,
    default_epochs,
    load_dataset,
)
from trainer.metrics import ranking_metrics  # noqa: E402
from trainer.model import ModelConfig  # noqa: E402
from trainer.retriever import TwoTowerRetriever  # noqa: E402
from trainer.train import TrainConfig  # noqa: E402

logger = logging.getLogger("bench.logq_tradeoff")

BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
GAMMAS = (0.25, 0.5, 0.75, 1.0)
KEYS = ("recall@20", "head_recall@20", "tail_recall@20", "ndcg@20", "recall@50", "coverage@50")


def _score(model: TwoTowerRetriever, split: TemporalSplit) -> dict[str, float]:
    depth = max(RECALL_KS + NDCG_KS + SPLIT_KS)
    recs = model.recommend(split.users, depth, split.cut_ms)
    metrics = ranking_metrics(
        recs, split.relevant, RECALL_KS, NDCG_KS, split.head, SPLIT_KS, split.info["catalogue_items"]
    )
    return {key: float(metrics[key]) for key in KEYS}


def sweep(dataset: str, seed: int, epochs: int, betas: tuple[float, ...], gammas: tuple[float, ...]) -> list[dict]:
    """Every point of one (data set, seed): the train-time strengths, then the serve-time ones."""
    split = load_dataset(EvalConfig(dataset=dataset, seed=seed))
    points = []
    base: TwoTowerRetriever | None = None
    for beta in tqdm(betas, desc=f"{dataset} seed {seed}", unit="model", leave=False):
        train = TrainConfig(seed=seed, logq_weight=beta)  # beta = 0 is bit for bit logq=False (tests/test_train.py)
        model = TwoTowerRetriever(ModelConfig(seed=seed), train, epochs=epochs)
        t0 = time.perf_counter()
        model.fit(split.train)
        points.append({"mode": "train", "strength": beta, "fit_s": round(time.perf_counter() - t0, 1)})
        points[-1].update(_score(model, split))
        if beta == 0.0:
            base = model
    if base is None:
        raise ValueError("the serve-time points need the uncorrected model: include beta = 0")
    for gamma in gammas:
        base.serving_prior = gamma
        points.append({"mode": "serve", "strength": gamma, **_score(base, split)})
    base.serving_prior = 0.0
    return points


def summarise(points: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (mode, strength)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for p in points:
        groups.setdefault((p["mode"], p["strength"]), []).append(p)
    out = []
    for (mode, strength), rows in groups.items():
        entry: dict[str, Any] = {"mode": mode, "strength": strength, "seeds": len(rows)}
        for key in KEYS:
            values = np.array([r[key] for r in rows])
            entry[key] = round(float(values.mean()), 4)
            entry[f"{key}_std"] = round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4)
        out.append(entry)
    return out


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4.2 * len(results)), squeeze=False)
    styles = {
        "train": ("tab:blue", "o", "train-time logQ, beta"),
        "serve": ("tab:orange", "s", "serve-time prior, gamma"),
    }
    for row, (dataset, summary) in enumerate(results.items()):
        left, right = axes[row]
        for mode, (colour, marker, label) in styles.items():
            pts = sorted((p for p in summary if p["mode"] == mode), key=lambda p: p["strength"])
            if mode == "serve":  # the serve-time curve starts at the uncorrected model
                pts = [p for p in summary if p["mode"] == "train" and p["strength"] == 0.0] + pts
            tail = [p["tail_recall@20"] for p in pts]
            head = [p["head_recall@20"] for p in pts]
            left.plot(tail, head, marker=marker, color=colour, label=label)
            for p, x, y in zip(pts, tail, head, strict=True):
                left.annotate(f"{p['strength']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            right.errorbar(
                [p["strength"] for p in pts],
                [p["recall@20"] for p in pts],
                yerr=[p["recall@20_std"] for p in pts],
                marker=marker,
                color=colour,
                capsize=3,
                label=label,
            )
        left.set(xlabel="tail Recall@20", ylabel="head Recall@20", title=f"{dataset}: head vs tail")
        right.set(xlabel="strength (beta or gamma)", ylabel="Recall@20", title=f"{dataset}: overall (mean ± sd)")
        left.legend(fontsize=8)
        right.legend(fontsize=8)
        left.grid(alpha=0.3)
        right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="synthetic,ml100k", help="comma-separated: synthetic, ml100k")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    parser.add_argument("--epochs", type=int, help="two-tower epochs (default: those of trainer eval per data set)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "logq_tradeoff.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    t0 = time.perf_counter()
    raw: dict[str, list[dict]] = {}
    for dataset in datasets:
        raw[dataset] = []
        for seed in range(args.seeds):
            for point in sweep(dataset, seed, args.epochs or default_epochs(dataset), BETAS, GAMMAS):
                raw[dataset].append({"seed": seed, **point})
                logger.info(
                    "%s seed %d %s %.2f: recall@20 %.4f head %.4f tail %.4f",
                    dataset,
                    seed,
                    point["mode"],
                    point["strength"],
                    point["recall@20"],
                    point["head_recall@20"],
                    point["tail_recall@20"],
                )
    summary = {dataset: summarise(points) for dataset, points in raw.items()}
    report = {
        "command": "python bench/logq_tradeoff.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "epochs": {d: args.epochs or default_epochs(d) for d in datasets},
        "seeds": args.seeds,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "summary": summary,
        "points": raw,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(summary, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    for dataset, rows in summary.items():
        print(f"\n{dataset} (mean of {args.seeds} seeds)")
        print("mode   strength  recall@20        head@20  tail@20  coverage@50")
        for r in rows:
            print(
                f"{r['mode']:<6} {r['strength']:>8.2f}  {r['recall@20']:.4f} ± {r['recall@20_std']:.4f}  "
                f"{r['head_recall@20']:.4f}   {r['tail_recall@20']:.4f}   {r['coverage@50']:.4f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
