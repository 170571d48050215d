"""Summaries, tables and the plot of the sequential evaluation (:mod:`trainer.sequential`), and its command line
(``python -m trainer eval --protocol sequential``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.intervals import DEFAULT_LEVEL, bootstrap_indices, mean_interval, paired_difference, ratio_interval
from trainer.report import _nan_to_none
from trainer.rolling import STRATA, _cell, plot_rolling

__all__ = ["markdown_report", "over_cuts", "plot_sequential", "run_cli", "summarize", "write_reports"]

logger = logging.getLogger(__name__)

REFERENCE = "two_tower"


def summarize(
    per_seed: Sequence[dict[str, dict[int, np.ndarray]]],
    clicks: np.ndarray,
    cold: np.ndarray,
    ks: Sequence[int],
    resamples: int = 1000,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """Per stratum: each model's ``hit@K`` (per-user HitRate, mean over users) and ``click_hit@K`` (hits / clicks)
    with intervals, two_tower minus each peer on ``hit@K`` (paired) and the two_tower / ALS ratio.

    ``per_seed``: per seed, name → K → hits per user ``[n_users]``; ``clicks``: scored clicks per user (> 0)."""
    names = list(per_seed[0])
    hits = {n: {k: np.mean([s[n][k] for s in per_seed], axis=0) for k in ks} for n in names}  # pooled over seeds
    rate = {n: {k: hits[n][k] / clicks for k in ks} for n in names}
    out: dict[str, Any] = {}
    for stratum in STRATA:
        mask = {"warm": ~cold, "cold": cold, "all": np.ones_like(cold)}[stratum]
        n = int(mask.sum())
        entry: dict[str, Any] = {
            "users": n,
            "clicks": int(clicks[mask].sum()),
            "models": {},
            "vs_two_tower": {},
            "ratio_two_tower_als": {},
        }
        if n == 0:
            out[stratum] = entry
            continue
        idx = bootstrap_indices(n, resamples, seed)
        for name in names:
            entry["models"][name] = {
                **{f"hit@{k}": mean_interval(rate[name][k][mask], idx, level).to_dict() for k in ks},
                **{
                    f"click_hit@{k}": ratio_interval(hits[name][k][mask], clicks[mask], idx, level).to_dict()
                    for k in ks
                },
            }
        if REFERENCE in names:
            ref = rate[REFERENCE]
            for name in names:
                if name != REFERENCE:
                    entry["vs_two_tower"][name] = {
                        f"hit@{k}": paired_difference(ref[k][mask], rate[name][k][mask], idx, level).to_dict()
                        for k in ks
                    }
            if "als" in names:
                entry["ratio_two_tower_als"] = {
                    f"hit@{k}": ratio_interval(ref[k][mask], rate["als"][k][mask], idx, level).to_dict() for k in ks
                }
        out[stratum] = entry
    return out


def _mean(values: list[Any]) -> float:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if len(finite) == len(values) and finite else float("nan")


def over_cuts(cuts: list[dict[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    """Plain means over the cut points of the per-cut point estimates (no interval: the test periods are nested)."""
    out: dict[str, Any] = {}
    for stratum in STRATA:
        entries = [c["strata"][stratum] for c in cuts]
        block: dict[str, Any] = {}
        for part in ("models", "vs_two_tower", "ratio_two_tower_als"):
            if part == "ratio_two_tower_als":
                metrics = entries[0][part]
                block[part] = {m: _mean([e[part].get(m, {}).get("value") for e in entries]) for m in metrics}
                continue
            block[part] = {
                n: {m: _mean([e[part].get(n, {}).get(m, {}).get("value") for e in entries]) for m in metrics}
                for n, metrics in entries[0][part].items()
            }
        out[stratum] = block
    return out


def markdown_report(report: dict[str, Any]) -> str:
    """Per stratum and K: HitRate@K per user and per click for every model and cut with 95% intervals, the paired
    differences two_tower minus peer, the two_tower / ALS ratio, and the mean over the cut points."""
    cuts = report["cuts"]
    head = "| | " + " | ".join(f"F={c['test_fraction']:g}" for c in cuts) + " | mean over cuts |"
    rule = "|---" * (len(cuts) + 2) + "|"
    lines: list[str] = []
    for stratum in STRATA:
        sizes = ", ".join(
            f"F={c['test_fraction']:g}: {c['strata'][stratum]['users']} users, {c['strata'][stratum]['clicks']} clicks"
            for c in cuts
        )
        lines += [f"### {stratum} test users ({sizes})", ""]
        over = report["over_cuts"][stratum]
        for k in report["ks"]:
            lines += [f"HitRate@{k}, mean [95% interval]:", "", head, rule]
            for metric, label in ((f"hit@{k}", "per user"), (f"click_hit@{k}", "per click")):
                for name in report["models"]:
                    cells = [_cell(c["strata"][stratum]["models"].get(name, {}).get(metric)) for c in cuts]
                    cells.append(_cell({"value": over["models"].get(name, {}).get(metric)}))
                    lines.append(f"| {name} ({label}) | " + " | ".join(cells) + " |")
            m = f"hit@{k}"
            for peer in cuts[0]["strata"][stratum]["vs_two_tower"]:
                cells = [_cell(c["strata"][stratum]["vs_two_tower"].get(peer, {}).get(m), signed=True) for c in cuts]
                cells.append(_cell({"value": over["vs_two_tower"].get(peer, {}).get(m)}, signed=True))
                lines.append(f"| two_tower − {peer} (per user) | " + " | ".join(cells) + " |")
            if over.get("ratio_two_tower_als"):
                cells = [_cell(c["strata"][stratum]["ratio_two_tower_als"].get(m)) for c in cuts]
                cells.append(_cell({"value": over["ratio_two_tower_als"].get(m)}))
                lines.append("| two_tower / als (per user) | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot_sequential(report: dict[str, Any], path: Path, metric: str = "hit@20") -> None:
    """One panel per stratum: ``metric`` per cut point and model, with 95% interval bars (the rolling plot)."""
    plot_rolling(
        report,
        path,
        metric,
        title="Sequential evaluation (history up to each click)",
        ylabel=f"{metric} per user (95% bootstrap interval over users)",
    )


def write_reports(report: dict[str, Any], json_path: Path, md_path: Path, png_path: Path, command: str) -> str:
    """Write the JSON, markdown and PNG reports; returns the markdown tables."""
    body = markdown_report(report)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_nan_to_none({**report, "command": command}), indent=2, allow_nan=False) + "\n")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    sizes = "; ".join(
        f"F={c['test_fraction']:g}: {c['split']['test_clicks_scored']} clicks scored, "
        f"{c['split']['test_clicks_repeat_not_scored']} repeats not scored"
        for c in report["cuts"]
    )
    md_path.write_text(
        f"# Sequential evaluation: {report['dataset']}\n\n`{command}`\n\n"
        f"Every test click scored with the user's history up to it, models frozen at the cut "
        f"(`trainer/sequential.py`). {report['pooling']}. {sizes}; {report['elapsed_s']} s in all.\n\n{body}"
    )
    plot_sequential(report, png_path)
    return body


def run_cli(args: argparse.Namespace, config: Any, json_path: Path, md_path: Path, png_path: Path) -> int:
    """``eval --protocol sequential``: :func:`trainer.sequential.run_sequential` on ``config``'s data set."""
    import shlex
    import sys

    from trainer.evaluate import build_dataset, build_models
    from trainer.sequential import SequentialConfig, run_sequential

    fractions = [float(v) for v in (args.test_fractions or str(config.ml100k_test_fraction)).split(",") if v.strip()]
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()] if args.seeds else [config.seed]
    dataset, source = build_dataset(config)
    report = run_sequential(
        dataset,
        lambda seed: build_models(dataclasses.replace(config, seed=seed)),
        fractions,
        seeds,
        resamples=args.bootstrap_resamples,
        source=source,
        config=SequentialConfig(max_clicks=args.max_clicks),
    )
    report = {"dataset": config.dataset, "quick": config.quick, **report}
    command = shlex.join(["python", "-m", "trainer", *sys.argv[1:]])
    print(write_reports(report, json_path, md_path, png_path, command))
    logger.info("wrote %s, %s, %s", json_path, md_path, png_path)
    return 0
