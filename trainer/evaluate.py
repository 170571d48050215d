"""``python -m trainer eval``: offline evaluation of the two-tower retriever against simple peers.

The protocol (design brief, "Quality is measured, not assumed"):

1. Build a :class:`~trainer.dataset.Dataset` from a source: the synthetic world or MovieLens-100K.
2. Split by time (:func:`temporal_split`): every model learns from the clicks before the cut and is asked, at the
   cut, for the top K items of each user; the clicks from the cut to the end are the test set.
   - synthetic: the test period is the world's last day;
   - ml100k: the test period is the last 10% of clicks, a global time quantile (a month of MovieLens-100K holds
     anywhere from ~10k to ~18k ratings, so a fixed number of days would give a test set of unpredictable size).
     Most ratings in that period come from users who joined during it, so only ~90 users are warm test users:
     read ``recall@K_se`` (standard error over users) before reading a difference between two models.
   A test (user, item) pair the user already clicked in training is dropped: every model excludes training-seen
   items from its list, so keeping them would only count unreachable targets. Repeated test clicks on one item
   count once. Test users without a training click ("cold" users) are skipped and counted in the split summary:
   the peers know nothing about them and the question here is how well a model uses a history.
   Test items that never appear in training stay in the test set (fresh items are part of the job); the split
   summary says how many there are.
3. Fit every model, score Recall@{10,20,50}, NDCG@{10,20} and head / tail Recall@{20,50}
   (:mod:`trainer.metrics`; head = the top 20% of the training catalogue by training clicks).
4. Print a markdown table and write JSON, markdown and a PNG bar plot (defaults under ``runs/eval-<dataset>/``).

With ``--test-fractions F,F,...`` and / or ``--seeds S,S,...`` the command runs the rolling-origin evaluation of
:mod:`trainer.rolling` instead: every model at every cut and seed, cold test users scored as a stratum of their own,
95% bootstrap intervals over users (defaults under ``runs/eval-rolling-<dataset>/``). ``--tune`` chooses every
model's setting on a validation window before each cut (:mod:`trainer.tuning`); ``--world-seeds`` runs it on several
synthetic worlds and pools them (:mod:`trainer.worlds`); the command-line side is :mod:`trainer.rolling_cli`. With
``--protocol sequential`` the same cuts are scored click by click, each test click with the user's history up to it
(:mod:`trainer.sequential`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.dataset import Dataset
from trainer.metrics import ranking_metrics
from trainer.peers import ALS, ItemCF, Popularity, Recommender
from trainer.report import PLOT_METRICS, TABLE_METRICS, markdown_table, plot_metrics
from trainer.split import HEAD_FRACTION, TemporalSplit, quantile_cut, temporal_split

__all__ = [
    "DEFAULT_MODELS",
    "HEAD_FRACTION",
    "PLOT_METRICS",
    "TABLE_METRICS",
    "EvalConfig",
    "TemporalSplit",
    "evaluate_models",
    "load_dataset",
    "markdown_table",
    "plot_metrics",
    "quantile_cut",
    "temporal_split",
]

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
DEFAULT_MODELS = ("two_tower", "als", "itemcf", "popularity", "popularity_recent")
RECENT_HALF_LIFE_DAYS = 3.0  # picked on the validation periods described in trainer.peers.ALS
# Two-tower training epochs per data set, picked on validation periods before the test period: on MovieLens-100K
# 8 epochs beat 5 (validation Recall@20 0.1497 against 0.1280; bench/tune_two_tower.py, where no other training
# setting beat the defaults). A data set not listed uses the retriever's default (trainer.retriever.DEFAULT_EPOCHS).
DATASET_EPOCHS = {"ml100k": 8}
RECALL_KS = (10, 20, 50)
NDCG_KS = (10, 20)
SPLIT_KS = (20, 50)


@dataclass(frozen=True)
class EvalConfig:
    """What one ``eval`` run does. ``quick``: a small synthetic world and short training, for tests and CI."""

    dataset: str = "synthetic"
    models: tuple[str, ...] = DEFAULT_MODELS
    ablations: bool = False
    quick: bool = False
    seed: int = 0
    data_dir: Path = Path("data")
    ml100k_test_fraction: float = 0.1
    min_rating: float = 0.0
    epochs: int | None = None  # two-tower epochs; None: 2 with quick, else default_epochs(dataset)
    serving_prior: float = 0.0  # > 0: also a "two_tower+prior" row ranked by cos / tau + gamma * log p_j
    prior_half_life_days: float | None = None


def _synthetic_world_config(quick: bool, seed: int) -> Any:
    from streaming.sources.synthetic import WorldConfig

    if quick:
        # ~4 s to generate on one core: 4 days, 1k users, 1.5k items, ~15k clicks.
        return WorldConfig(seed=seed, n_users=1000, n_items=1500, days=4.0, requests_per_day=4000.0)
    # ~10 s to generate: 8 days, 2k users, ~4k items, ~98k clicks (~86k before the last day, the training part).
    return WorldConfig(seed=seed, days=8.0)


def load_dataset(config: EvalConfig) -> TemporalSplit:
    """Build the dataset named by ``config.dataset`` and split it by time (see the module docstring)."""
    if config.dataset == "synthetic":
        from streaming.sources.synthetic import SyntheticWorld

        world_config = _synthetic_world_config(config.quick, config.seed)
        world = SyntheticWorld(world_config)
        dataset = Dataset.from_events(world.events())
        cut = world.end_ms() - DAY_MS
        rule = "synthetic: train before the last day, test on the last day"
        return temporal_split(dataset, cut, None, rule=rule, source={"world": dataclasses.asdict(world_config)})
    if config.dataset == "ml100k":
        from streaming.sources.movielens import MovieLens100K, fetch

        root = fetch(config.data_dir)
        dataset = Dataset.from_events(MovieLens100K(root).events(min_rating=config.min_rating))
        cut = quantile_cut(dataset, config.ml100k_test_fraction)
        rule = f"ml100k: test = last {config.ml100k_test_fraction:.0%} of clicks by time (ratings >= {config.min_rating:g})"
        source = {"root": str(root), "min_rating": config.min_rating, "test_fraction": config.ml100k_test_fraction}
        return temporal_split(dataset, cut, None, rule=rule, source=source)
    raise ValueError(f"unknown dataset {config.dataset!r}; expected 'synthetic' or 'ml100k'")


def build_dataset(config: EvalConfig) -> tuple[Dataset, dict[str, Any]]:
    """The whole dataset named by ``config.dataset``, unsplit, and how it was made (for the rolling evaluation)."""
    if config.dataset == "synthetic":
        from streaming.sources.synthetic import SyntheticWorld

        world_config = _synthetic_world_config(config.quick, config.seed)
        return Dataset.from_events(SyntheticWorld(world_config).events()), {"world": dataclasses.asdict(world_config)}
    if config.dataset == "ml100k":
        from streaming.sources.movielens import MovieLens100K, fetch

        root = fetch(config.data_dir)
        dataset = Dataset.from_events(MovieLens100K(root).events(min_rating=config.min_rating))
        return dataset, {"root": str(root), "min_rating": config.min_rating}
    raise ValueError(f"unknown dataset {config.dataset!r}; expected 'synthetic' or 'ml100k'")


def default_epochs(dataset: str) -> int:
    """The two-tower epochs ``trainer eval`` trains for on ``dataset`` (:data:`DATASET_EPOCHS`)."""
    from trainer.retriever import DEFAULT_EPOCHS

    return DATASET_EPOCHS.get(dataset, DEFAULT_EPOCHS)


def _two_tower_factories(config: EvalConfig) -> dict[str, Callable[[], Recommender]]:
    """The two-tower retriever and, with ``ablations``, its variants, each under its JSON name."""
    from trainer.model import ModelConfig
    from trainer.retriever import TwoTowerRetriever
    from trainer.train import TrainConfig

    epochs = config.epochs or (2 if config.quick else default_epochs(config.dataset))
    model_config = ModelConfig(seed=config.seed)
    base = TrainConfig(seed=config.seed)

    def make(
        name: str,
        train_config: TrainConfig,
        serving_prior: float = 0.0,
        half_life: float | None = None,
        model: ModelConfig = model_config,
    ) -> Callable[[], Recommender]:
        return lambda: TwoTowerRetriever(
            model,
            train_config,
            epochs=epochs,
            name=name,
            serving_prior=serving_prior,
            prior_half_life_days=half_life,
        )

    out = {"two_tower": make("two_tower", base)}
    if config.serving_prior > 0:
        out["two_tower+prior"] = make("two_tower+prior", base, config.serving_prior, config.prior_half_life_days)
    # Model variants: each changes one thing of the model; run with --ablations or named in --models.
    recency = dataclasses.replace(model_config, last_n_pooling="recency")
    model_variants = {"two_tower[last_n=recency]": make("two_tower[last_n=recency]", base, model=recency)}
    out.update({name: factory for name, factory in model_variants.items() if config.ablations or name in config.models})
    if config.ablations:
        # The default is listwise, logQ on, SSL on, in-batch negatives only; each variant changes one thing.
        easy = max(base.easy_negatives, base.batch_size)
        # Seed 004's alternative to logQ: no correction in training, the item prior multiplied in at serving.
        variants: dict[str, tuple[dict[str, Any], float]] = {
            "two_tower[logq=off]": ({"logq": False}, 0.0),
            "two_tower[logq=0.5]": ({"logq_weight": 0.5}, 0.0),
            "two_tower[logq=off,serving_prior]": ({"logq": False}, 1.0),
            "two_tower[ssl=off]": ({"ssl_weight": 0.0}, 0.0),
            "two_tower[negatives=in_batch+easy]": ({"easy_negatives": easy, "hard_fraction": 0.0}, 0.0),
            "two_tower[negatives=in_batch+easy+hard]": ({"easy_negatives": easy, "hard_fraction": 0.5}, 0.0),
            "two_tower[objective=pointwise]": ({"objective": "pointwise"}, 0.0),
            "two_tower[objective=pairwise_hinge]": ({"objective": "pairwise_hinge"}, 0.0),
            "two_tower[objective=pairwise_logistic]": ({"objective": "pairwise_logistic"}, 0.0),
        }
        for name, (changes, prior) in variants.items():
            out[name] = make(name, dataclasses.replace(base, **changes), prior)
    return out


def build_models(config: EvalConfig) -> dict[str, Callable[[], Recommender]]:
    """Factories for the requested models, keyed by the name they get in the report, in report order."""
    peers: dict[str, Callable[[], Recommender]] = {
        "als": lambda: ALS(seed=config.seed, iterations=10 if config.quick else 15),
        "itemcf": ItemCF,
        "popularity": Popularity,
        "popularity_recent": lambda: Popularity(half_life_days=RECENT_HALF_LIFE_DAYS),
    }
    out: dict[str, Callable[[], Recommender]] = {}
    for name in config.models:
        if name == "two_tower":
            out.update(_two_tower_factories(config))
        elif name.startswith("two_tower["):
            variants = _two_tower_factories(dataclasses.replace(config, ablations=True))
            if name not in variants:
                raise ValueError(f"unknown two-tower variant {name!r}; expected one of {sorted(variants)}")
            out[name] = variants[name]
        elif name in peers:
            out[name] = peers[name]
        else:
            raise ValueError(f"unknown model {name!r}; expected some of {', '.join(DEFAULT_MODELS)}")
    return out


def evaluate_models(models: dict[str, Callable[[], Recommender]], split: TemporalSplit) -> dict[str, dict[str, float]]:
    """Fit each model on ``split.train``, ask for top ``max(K)`` at the cut and score it. Returns name → metrics.

    The protocol says no model recommends what the user clicked in training; a model that does anyway is not
    stopped (those slots simply miss) but warned about, and ``recommended_seen`` counts the offending slots.
    """
    train = split.train
    catalogue_size = split.info["catalogue_items"]
    depth = max(RECALL_KS + NDCG_KS + SPLIT_KS)
    test_users = set(split.users)
    seen: dict[str, set[str]] = {}
    for user, item in zip(train.clicks.user.tolist(), train.clicks.item.tolist(), strict=True):
        if user in test_users:
            seen.setdefault(user, set()).add(item)
    results: dict[str, dict[str, float]] = {}
    for name, factory in (bar := tqdm(models.items(), desc="models", unit="model")):
        bar.set_postfix_str(name)
        model = factory()
        t0 = time.perf_counter()
        model.fit(train)
        t1 = time.perf_counter()
        recs = model.recommend(split.users, depth, split.cut_ms)
        t2 = time.perf_counter()
        metrics = ranking_metrics(recs, split.relevant, RECALL_KS, NDCG_KS, split.head, SPLIT_KS, catalogue_size)
        metrics.update({"fit_s": round(t1 - t0, 2), "recommend_s": round(t2 - t1, 2)})
        repeats = sum(len(seen[u].intersection(r)) for u, r in zip(split.users, recs, strict=True))
        if repeats:
            logger.warning(
                "%s recommended %d training-seen (user, item) pairs; the protocol excludes them", name, repeats
            )
            metrics["recommended_seen"] = repeats
        results[name] = metrics
        logger.info(
            "%s: recall@20 %.4f, ndcg@20 %.4f (fit %.1fs)", name, metrics["recall@20"], metrics["ndcg@20"], t1 - t0
        )
    return results
