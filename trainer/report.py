"""Reports of ``python -m trainer eval``: the markdown table and the PNG bar plot (moved out of
:mod:`trainer.evaluate`, which re-exports them), and the JSON helper that writes NaN as null."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["markdown_table", "plot_metrics"]

PLOT_METRICS = ("recall@20", "ndcg@20", "head_recall@20", "tail_recall@20")
TABLE_METRICS = (
    "recall@10",
    "recall@20",
    "recall@50",
    "ndcg@10",
    "ndcg@20",
    "head_recall@20",
    "tail_recall@20",
    "head_recall@50",
    "tail_recall@50",
    "coverage@50",
)


def markdown_table(
    results: dict[str, dict[str, float]],
    metrics: Sequence[str] = TABLE_METRICS,
    with_se: Sequence[str] = ("recall@20",),
) -> str:
    """One row per model, one column per metric, the best value of each column in bold.

    Metrics in ``with_se`` also show ``± standard error`` when the results carry ``<metric>_se``.
    """
    best = {}
    for m in metrics:
        finite = [r[m] for r in results.values() if m in r and np.isfinite(r[m])]
        best[m] = max(finite) if finite else None
    lines = ["| model | " + " | ".join(metrics) + " | fit s |", "|---" * (len(metrics) + 2) + "|"]
    for name, r in results.items():
        cells = []
        for m in metrics:
            v = r.get(m, float("nan"))
            cell = f"**{v:.4f}**" if v == best[m] else f"{v:.4f}"
            if m in with_se and f"{m}_se" in r:
                cell += f" ± {r[f'{m}_se']:.4f}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r.get('fit_s', float('nan')):.1f} |")
    return "\n".join(lines)


def _bar_colours(names: Sequence[str]) -> list[str]:
    """The two-tower model in dark blue, its ablations in light blue, each peer in its own colour.

    Colour says "which family" rather than "which row", so a reader sees the two-tower rows against the peers.
    """
    peer_colours = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    out: list[str] = []
    peers = 0
    for name in names:
        if name == "two_tower":
            out.append("#1f4e9c")
        elif name.startswith("two_tower"):
            out.append("#9ecae1")
        else:
            out.append(peer_colours[peers % len(peer_colours)])
            peers += 1
    return out


def plot_metrics(
    results: dict[str, dict[str, float]], path: Path, title: str, metrics: Sequence[str] = PLOT_METRICS
) -> None:
    """One panel per metric, one horizontal bar per model (names stay readable with a dozen ablations).

    A metric with a ``<metric>_se`` entry gets a ± 1 standard error whisker. Each value is written just past the
    end of its bar (and whisker), so labels never sit on a coloured bar.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    names = list(results)
    y = np.arange(len(names))
    colours = _bar_colours(names)
    fig, axes = plt.subplots(
        1, len(metrics), sharey=True, figsize=(3.4 * len(metrics) + 2.8, 0.34 * len(names) + 1.7), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = np.array([results[n].get(metric, np.nan) for n in names], dtype=float)
        errors = np.array([results[n].get(f"{metric}_se", np.nan) for n in names], dtype=float)
        has_se = not np.isnan(errors).all()
        ax.barh(y, np.nan_to_num(values), color=colours, xerr=np.nan_to_num(errors) if has_se else None,
                error_kw={"elinewidth": 1.0, "capsize": 2, "ecolor": "0.25"})  # fmt: skip
        ends = np.nan_to_num(values) + (np.nan_to_num(errors) if has_se else 0.0)
        for row, (v, end) in enumerate(zip(values, ends, strict=True)):
            ax.annotate("n/a" if np.isnan(v) else f"{v:.3f}", (end, row), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize="small")  # fmt: skip
        # Room on the right for the labels of the longest bar.
        ax.set_xlim(0.0, max(float(np.max(ends)), 1e-3) * 1.3)
        ax.set_title(metric + (" (± 1 s.e.)" if has_se else ""))
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, names)
    axes[0][0].invert_yaxis()  # first model on top, as in the table
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value
