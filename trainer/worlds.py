"""The rolling-origin evaluation over several synthetic worlds: ``trainer eval --dataset synthetic --world-seeds``.

Each world seed generates a different world (:class:`streaming.sources.synthetic.WorldConfig` ``seed``), and the
rolling evaluation (:func:`trainer.rolling.run_rolling`) runs on each. Pooled: at each test fraction the test users
of every world are put side by side (a user is a (world, user) pair; each user's Recall@K already averaged over the
model seeds) and resampled together, so the pooled interval and the paired differences cover the worlds as well as
the users. Each world's own report is kept under ``worlds``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trainer.rolling import _over_cuts, summarize

__all__ = ["pool_worlds", "worlds_markdown"]

PerUser = tuple[dict[str, dict[int, np.ndarray]], np.ndarray]


def pool_worlds(
    reports: dict[int, dict[str, Any]], per_user: dict[int, Sequence[PerUser]], resamples: int = 1000
) -> dict[str, Any]:
    """One report over all worlds (the shape of :func:`~trainer.rolling.run_rolling`'s) with ``worlds`` inside.

    ``reports[w]``: world ``w``'s rolling report; ``per_user[w][i]``: its seed-pooled per-user Recall@K and cold
    mask at cut ``i`` (every world has the same test fractions and models)."""
    worlds = sorted(reports)
    first = reports[worlds[0]]
    cuts: list[dict[str, Any]] = []
    for i, fraction in enumerate(first["test_fractions"]):
        parts = [per_user[w][i] for w in worlds]
        names = list(parts[0][0])
        ks = list(parts[0][0][names[0]])
        pooled = {n: {k: np.concatenate([p[0][n][k] for p in parts]) for k in ks} for n in names}
        cold = np.concatenate([p[1] for p in parts])
        cuts.append(
            {
                "test_fraction": fraction,
                "split": {str(w): reports[w]["cuts"][i]["split"] for w in worlds},
                "strata": summarize([pooled], cold, resamples=resamples, seed=0),
            }
        )
    return {
        **{k: first[k] for k in ("seeds", "test_fractions", "models", "resamples", "level")},
        "world_seeds": worlds,
        "pooling": "per-user Recall@K averaged over model seeds; the users of every world side by side, "
        "resampled together (same resamples for every model)",
        "cuts": cuts,
        "over_cuts": _over_cuts(cuts),
        "elapsed_s": round(sum(r["elapsed_s"] for r in reports.values()), 1),
        "worlds": {str(w): reports[w] for w in worlds},
    }


def worlds_markdown(report: dict[str, Any], metric: str = "recall@20") -> str:
    """Per world: ``metric`` over all test users per cut and model, and the two_tower / ALS ratio."""
    lines = [f"## Per world seed ({metric}, all test users, mean [95% interval])", ""]
    for w, world in report["worlds"].items():
        cuts = world["cuts"]
        lines += [f"World seed {w}:", ""]
        lines += ["| | " + " | ".join(f"F={c['test_fraction']:g}" for c in cuts) + " | mean over cuts |"]
        lines += ["|---" * (len(cuts) + 2) + "|"]
        over = world["over_cuts"]["all"]
        for name in world["models"]:
            cells = [_cell(c["strata"]["all"]["models"][name][metric]) for c in cuts]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {over['models'][name][metric]:.4f} |")
        if over.get("ratio_two_tower_als"):
            cells = [_cell(c["strata"]["all"]["ratio_two_tower_als"][metric]) for c in cuts]
            lines.append("| two_tower / als | " + " | ".join(cells) + f" | {over['ratio_two_tower_als'][metric]:.4f} |")
        lines.append("")
    return "\n".join(lines)


def _cell(entry: dict[str, float]) -> str:
    value, low, high = entry.get("value"), entry.get("low"), entry.get("high")
    if value is None or not np.isfinite(value):
        return "n/a"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.4f}"
    return f"{value:.4f} [{low:.4f}, {high:.4f}]"
