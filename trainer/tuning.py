"""Hyper-parameters chosen on a validation window before each cut: ``python -m trainer eval --tune``.

At every cut of the rolling-origin evaluation (:mod:`trainer.rolling`) the cut's training data is split again in
time by the same rule (:func:`trainer.rolling.rolling_split` with :attr:`TuningGrid.validation_fraction`): the
latest share of the *training* clicks is the validation window, everything before it is the validation-training
part. Each candidate setting is fit on the validation-training part and asked, at the validation cut, for every
validation user (warm and cold, as the test window scores them); the setting with the highest mean Recall@20 over
those users wins (ties: the first in grid order). The chosen setting is then fit on the whole training part and
scores the test window once. Nothing at or after the test cut reaches a candidate, and nothing at or after the
validation cut reaches its fit.

What is tuned (:class:`TuningGrid`):

- ALS: factors x regularisation x alpha, then a serve-time prior on the chosen fit (the ``als+prior`` row);
- ItemCF: neighbours x shrinkage; recency-weighted popularity: its half-life (neither depends on the seed, so
  each is chosen once per cut);
- the two-tower model: epochs (one training run stopped at each count) x the serve-time prior ``gamma`` x its
  half-life, ``gamma = 0`` included: the prior's weight is learnt on the validation window rather than fixed.
  ``two_tower[no prior]`` is the same fit served without the prior: the ablation that decides the default.

A serve-time prior only changes the ranking, so each fit scores every ``(gamma, half-life)`` pair without refitting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from trainer.dataset import Dataset
from trainer.metrics import hit_matrix, recall_per_user
from trainer.peers import ALS, ItemCF, Popularity, Recommender
from trainer.rolling import RollingSplit, rolling_split

__all__ = [
    "QUICK_GRID",
    "TuningGrid",
    "Tuner",
    "argmax",
    "choose",
    "rescore_prior",
    "validation_recall",
    "validation_split",
]

logger = logging.getLogger(__name__)

Setting = dict[str, Any]
Factory = Callable[[], Recommender]


@dataclass(frozen=True)
class TuningGrid:
    """The candidate settings of ``trainer eval --tune``. A half-life of ``None`` means undecayed."""

    validation_fraction: float = 0.1  # the latest share of each cut's training clicks
    k: int = 20  # the selection metric: mean Recall@k over all validation users
    als_factors: tuple[int, ...] = (16, 32, 64, 128)
    als_regularization: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    als_alpha: tuple[float, ...] = (1.0, 10.0, 40.0)
    als_iterations: int = 15
    # ALS scores are predicted preferences (about 0 .. 1), not cosines over a temperature: a prior grid of its own.
    als_prior_gamma: tuple[float, ...] = (0.0, 0.02, 0.1, 0.5, 2.0, 8.0)
    itemcf_neighbours: tuple[int, ...] = (10, 50, 200)
    itemcf_shrinkage: tuple[float, ...] = (0.0, 20.0, 100.0)
    recent_half_life_days: tuple[float, ...] = (0.25, 0.5, 1.0, 3.0, 7.0, 30.0)
    two_tower_epochs: tuple[int, ...] = (5, 8)
    two_tower_prior_gamma: tuple[float, ...] = (0.0, 0.25, 1.0, 4.0, 16.0, 32.0)
    prior_half_life_days: tuple[float | None, ...] = (0.5, 3.0, 30.0, None)

    def als(self) -> list[Setting]:
        return [
            {"factors": f, "regularization": r, "alpha": a}
            for f in self.als_factors
            for r in self.als_regularization
            for a in self.als_alpha
        ]

    def itemcf(self) -> list[Setting]:
        return [{"neighbours": n, "shrinkage": s} for n in self.itemcf_neighbours for s in self.itemcf_shrinkage]

    def recent(self) -> list[Setting]:
        return [{"half_life_days": h} for h in self.recent_half_life_days]

    def priors(self, gammas: Sequence[float]) -> list[Setting]:
        """``gamma = 0`` once (the half-life does not matter then), every other gamma with every half-life."""
        out = [{"gamma": 0.0, "half_life_days": None}] if 0.0 in gammas else []
        return out + [{"gamma": g, "half_life_days": h} for g in gammas if g != 0.0 for h in self.prior_half_life_days]


# For tests and --quick: a few candidates each and short training.
QUICK_GRID = TuningGrid(
    als_factors=(8, 16),
    als_regularization=(0.1, 10.0),
    als_alpha=(1.0, 10.0),
    als_iterations=5,
    als_prior_gamma=(0.0, 0.5),
    itemcf_neighbours=(10,),
    itemcf_shrinkage=(0.0, 20.0),
    recent_half_life_days=(1.0, 3.0),
    two_tower_epochs=(1, 2),
    two_tower_prior_gamma=(0.0, 1.0),
    prior_half_life_days=(3.0, None),
)


def validation_split(train: Dataset, fraction: float) -> RollingSplit:
    """The validation window of one cut: :func:`~trainer.rolling.rolling_split` of the cut's training data."""
    return rolling_split(train, fraction, source={"validation_of": "the cut's training data"})


def validation_recall(model: Recommender, split: RollingSplit, k: int = 20) -> float:
    """Mean Recall@k of a fitted ``model`` over every user of ``split`` (warm and cold), asked at the cut."""
    recs = model.recommend(split.users, k, split.cut_ms)
    n_rel = np.array([len(r) for r in split.relevant], dtype=np.int64)
    return float(recall_per_user(hit_matrix(recs, split.relevant, k), n_rel, (k,))[k].mean())


def argmax(scored: Sequence[tuple[Setting, float]]) -> Setting:
    """The setting with the highest score; on a tie the first in grid order."""
    if not scored:
        raise ValueError("no candidate to choose from")
    best = int(np.argmax([s for _, s in scored]))  # np.argmax returns the first maximum
    return scored[best][0]


def choose(
    make: Callable[[Setting], Recommender], settings: Sequence[Setting], split: RollingSplit, k: int = 20
) -> tuple[Setting, list[tuple[Setting, float]], Recommender]:
    """Fit ``make(setting)`` on ``split.train`` for every setting and score it on the validation window; returns
    the chosen setting, every ``(setting, recall)`` in grid order and the chosen fitted model."""
    scored: list[tuple[Setting, float]] = []
    best_model: Recommender | None = None
    best_score = -np.inf
    for setting in settings:
        model = make(setting)
        model.fit(split.train)
        score = validation_recall(model, split, k)
        scored.append((setting, score))
        if score > best_score:
            best_model, best_score = model, score
    assert best_model is not None
    return argmax(scored), scored, best_model


def rescore_prior(
    model: Any, split: RollingSplit, settings: Sequence[Setting], k: int = 20
) -> list[tuple[Setting, float]]:
    """Score one fitted model (ALS or the two-tower retriever) under every serve-time prior of ``settings``: the
    prior only re-ranks, so ``serving_prior`` and ``prior_half_life_days`` are set between calls, no refit."""
    scored = []
    for setting in settings:
        model.serving_prior, model.prior_half_life_days = float(setting["gamma"]), setting["half_life_days"]
        scored.append((setting, validation_recall(model, split, k)))
    model.serving_prior, model.prior_half_life_days = 0.0, None
    return scored


class _SharedFit:
    """One two-tower fit shared by its rows: trained on the first ``fit(train)``, reused for the same ``train``."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make
        self.model: Any = None
        self.train: Dataset | None = None

    def fit(self, train: Dataset) -> None:
        if self.train is not train:
            self.model = self.make()
            self.model.fit(train)
            self.train = train


class _PriorView:
    """The shared two-tower fit served under one serve-time prior."""

    def __init__(self, shared: _SharedFit, name: str, gamma: float, half_life_days: float | None) -> None:
        self.shared, self.name, self.gamma, self.half_life_days = shared, name, gamma, half_life_days

    def fit(self, train: Dataset) -> None:
        self.shared.fit(train)

    def recommend(self, user_ids: Sequence[str], k: int, at_ms: int) -> list[list[str]]:
        model = self.shared.model
        model.serving_prior, model.prior_half_life_days = self.gamma, self.half_life_days
        return model.recommend(user_ids, k, at_ms)


def _table(scored: Sequence[tuple[Setting, float]]) -> list[dict[str, Any]]:
    """Every candidate with its validation score (mean Recall@k over the validation users), for the JSON."""
    return [{**s, "recall": round(v, 6)} for s, v in scored]


class Tuner:
    """``tuner(split, seed)`` → (model factories with the chosen settings, what was chosen and scored).

    ``models``: the requested names (``two_tower``, ``als``, ``itemcf``, ``popularity``, ``popularity_recent``);
    ``two_tower`` adds the ``two_tower[no prior]`` ablation and ``als`` the ``als+prior`` row.
    ``make_two_tower(seed, epochs)``: a fresh retriever; ``makers`` overrides how a peer is built from a setting
    (the tests put spies there).
    """

    def __init__(
        self,
        models: Sequence[str],
        grid: TuningGrid = TuningGrid(),
        make_two_tower: Callable[[int, int], Any] | None = None,
        makers: dict[str, Callable[[Setting, int], Recommender]] | None = None,
    ) -> None:
        self.models, self.grid = list(models), grid
        self.make_two_tower = make_two_tower
        self.makers: dict[str, Callable[[Setting, int], Recommender]] = {
            "als": lambda s, seed: ALS(seed=seed, iterations=grid.als_iterations, **s),
            "itemcf": lambda s, seed: ItemCF(**s),
            "popularity_recent": lambda s, seed: Popularity(**s),
            **(makers or {}),
        }
        self._unseeded: dict[tuple[int, str], tuple[Any, Setting, list[tuple[Setting, float]]]] = {}

    def __call__(self, split: RollingSplit, seed: int) -> tuple[dict[str, Factory], dict[str, Any]]:
        grid = self.grid
        vsplit = validation_split(split.train, grid.validation_fraction)
        factories: dict[str, Factory] = {}
        chosen: dict[str, Any] = {"validation": _brief(vsplit)}
        for name in tqdm(self.models, desc=f"tune F={split.test_fraction:g} seed {seed}", unit="model", leave=False):
            if name == "two_tower":
                factories.update(self._two_tower(vsplit, seed, chosen))
            elif name == "als":
                factories.update(self._als(vsplit, seed, chosen))
            elif name in ("itemcf", "popularity_recent"):
                best, scored = self._unseeded_choice(name, split, vsplit)
                chosen[name] = {"setting": best, "validation": _table(scored)}
                factories[name] = lambda n=name, b=best: self.makers[n](b, seed)
            elif name == "popularity":
                factories[name] = Popularity
            else:
                raise ValueError(f"unknown model {name!r} for --tune")
        return factories, chosen

    def _als(self, vsplit: RollingSplit, seed: int, chosen: dict[str, Any]) -> dict[str, Factory]:
        """The ALS grid, then the serve-time prior re-ranking the chosen fit (the ``als+prior`` row)."""
        grid, make = self.grid, self.makers["als"]
        best, scored, fitted = choose(lambda s: make(s, seed), grid.als(), vsplit, grid.k)
        prior_scored = rescore_prior(fitted, vsplit, grid.priors(grid.als_prior_gamma), grid.k)
        prior = argmax(prior_scored)
        chosen["als"] = {"setting": best, "validation": _table(scored)}
        chosen["als+prior"] = {
            "setting": {**best, **prior},
            "validation": _table([({**best, **p}, v) for p, v in prior_scored]),
        }
        return {"als": lambda: make(best, seed), "als+prior": lambda: _with_prior(make(best, seed), prior)}

    def _unseeded_choice(
        self, name: str, split: RollingSplit, vsplit: RollingSplit
    ) -> tuple[Setting, list[tuple[Setting, float]]]:
        """ItemCF and recency-weighted popularity do not depend on the seed: chosen once per cut."""
        key = (split.cut_ms, name)
        cached = self._unseeded.get(key)
        if cached is None or cached[0] is not split.train:
            settings = self.grid.itemcf() if name == "itemcf" else self.grid.recent()
            best, scored, _ = choose(lambda s: self.makers[name](s, 0), settings, vsplit, self.grid.k)
            cached = (split.train, best, scored)
            self._unseeded[key] = cached
        return cached[1], cached[2]

    def _two_tower(self, vsplit: RollingSplit, seed: int, chosen: dict[str, Any]) -> dict[str, Factory]:
        """One validation run stopped at each epoch count, every prior scored at each stop; then the chosen
        epochs fit once on the whole training part and serve both the chosen prior and no prior."""
        if self.make_two_tower is None:
            raise ValueError("tuning the two-tower model needs make_two_tower")
        grid = self.grid
        model = self.make_two_tower(seed, max(grid.two_tower_epochs))
        scored: list[tuple[Setting, float]] = []
        for epochs in model.fit_stages(vsplit.train, sorted(grid.two_tower_epochs)):
            for prior, score in rescore_prior(model, vsplit, grid.priors(grid.two_tower_prior_gamma), grid.k):
                scored.append(({"epochs": epochs, **prior}, score))
        best = argmax(scored)
        chosen["two_tower"] = {"setting": best, "validation": _table(scored)}
        no_prior = max((s for s in scored if s[0]["epochs"] == best["epochs"] and s[0]["gamma"] == 0.0),
                       key=lambda s: s[1], default=None)  # fmt: skip
        if no_prior is not None:
            chosen["two_tower[no prior]"] = {"setting": no_prior[0], "validation": _table([no_prior])}
        shared = _SharedFit(lambda: self.make_two_tower(seed, best["epochs"]))  # type: ignore[misc]
        return {
            "two_tower": lambda: _PriorView(shared, "two_tower", best["gamma"], best["half_life_days"]),
            "two_tower[no prior]": lambda: _PriorView(shared, "two_tower[no prior]", 0.0, None),
        }


def _with_prior(model: Any, prior: Setting) -> Any:
    model.serving_prior, model.prior_half_life_days = float(prior["gamma"]), prior["half_life_days"]
    model.name = f"{model.name}+prior"
    return model


def _brief(vsplit: RollingSplit) -> dict[str, Any]:
    info = vsplit.info
    return {
        "cut": info["cut"],
        "cut_ms": info["cut_ms"],
        "train_clicks": info["train_clicks"],
        "validation_clicks": info["test_clicks"],
        "warm_users": info["warm_test_users"],
        "cold_users": info["cold_test_users"],
    }


def settings_markdown(report: dict[str, Any]) -> str:
    """The chosen settings per cut and seed, with their validation Recall@20."""
    lines = ["## Settings chosen on the validation windows", ""]
    lines += ["| cut | seed | validation cut (clicks before / in) | model | setting | validation Recall@20 |"]
    lines += ["|---|---|---|---|---|---|"]
    for cut in report["cuts"]:
        for seed, chosen in cut.get("tuning", {}).items():
            v = chosen["validation"]
            where = f"{v['cut']} ({v['train_clicks']} / {v['validation_clicks']})"
            for name, entry in chosen.items():
                if name == "validation":
                    continue
                setting = entry["setting"]
                best = next((row["recall"] for row in entry["validation"] if _same(row, setting)), None)
                text = ", ".join(f"{k} {_fmt(v)}" for k, v in setting.items())
                lines.append(
                    f"| F={cut['test_fraction']:g} | {seed} | {where} | {name} | {text} | "
                    f"{'n/a' if best is None else f'{best:.4f}'} |"
                )
    return "\n".join(lines) + "\n"


def _same(row: dict[str, Any], setting: Setting) -> bool:
    return all(row.get(k) == v for k, v in setting.items())


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float | int) else str(value)
