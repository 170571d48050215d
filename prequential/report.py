"""The main job's report: ``report.md`` with the tables, and PNG plots, under the run's directory.

Seeds are pooled for the headline tables: each (seed, user) pair is one resampling unit, so a user's clicks
under one seed stay together. Per-seed differences are listed too, so that a reader sees whether the seeds
agree in sign.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from prequential.metrics import STRATA, Scored, paired_difference, rate_interval
from prequential.run import ARMS, RunResult

__all__ = ["write_report", "pooled"]

BASELINE = "nightly_only"
LABELS = {
    "full_incremental": "full + incremental (served)",
    "nightly_fresh": "nightly + fresh last-N",
    "nightly_only": "nightly-only",
    "popularity": "popularity",
    "popularity_recent": "recent popularity (3-day half-life)",
    "als": "ALS (refitted nightly)",
}


def pooled(results: Mapping[int, RunResult]) -> Scored:
    rows = [{**r, "user": f"{seed}:{r['user']}"} for seed, result in results.items() for r in result.rows]
    return Scored.from_rows(rows, ARMS)


def _day(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d")


def summary(scored: Scored, ks: tuple[int, ...] = (20, 50)) -> dict:
    """HitRate per arm and paired differences against nightly-only, per stratum, with intervals."""
    out: dict = {}
    for stratum in STRATA:
        part = scored.subset(scored.mask(stratum))
        entry: dict = {"events": len(part), "users": len(set(part.user.tolist()))}
        for k in ks:
            entry[f"hr@{k}"] = {arm: rate_interval(part, arm, k).__dict__ for arm in ARMS} if len(part) else {}
            if len(part):
                entry[f"rows@{k}"] = paired_difference(part, "full_incremental", "nightly_fresh", k).__dict__
            entry[f"diff@{k}"] = (
                {arm: paired_difference(part, arm, BASELINE, k).__dict__ for arm in ARMS if arm != BASELINE}
                if len(part)
                else {}
            )
        out[stratum] = entry
    return out


def _fmt(interval: dict, signed: bool = False) -> str:
    if not interval or interval["n"] == 0:
        return "–"
    f = "{:+.4f}" if signed else "{:.4f}"
    return f"{f.format(interval['value'])} [{f.format(interval['low'])}, {f.format(interval['high'])}]"


def write_report(
    out: Path, dataset: str, results: Mapping[int, RunResult], system: dict, seconds: float, command: str = ""
) -> Path:
    scored = pooled(results)
    table = summary(scored)
    (out / "summary.json").write_text(json.dumps(table, indent=1) + "\n")
    _plot_over_time(out / "hitrate_over_time.png", results)
    _plot_settle(out / "freshness.png", results)
    lines = [f"# freshtower main job: {dataset}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    first = next(iter(results.values()))
    steps = [s for s in first.steps if s["scored"]]
    lines += [
        f"Seeds {', '.join(map(str, results))}; {len(scored)} scored clicks ({len(set(scored.user.tolist()))} "
        f"seed-user pairs), from {_day(steps[0]['from_ms'])} to {_day(steps[-1]['to_ms'])} in {len(steps)} steps per seed; "
        f"wall time {seconds / 60:.1f} min. System: {json.dumps(system)}.",
        "",
        "Every click is scored under every arm from what the system held before its step was produced (test, then",
        "train); intervals are 95% bootstrap intervals resampling users (1,000 replicates).",
        "",
        "## HitRate by arm (all scored clicks)",
        "",
        "| arm | HitRate@20 | HitRate@50 | @20 vs nightly-only | ratio @20 |",
        "|---|---|---|---|---|",
    ]
    base20 = table["all"]["hr@20"][BASELINE]["value"]
    for arm in ARMS:
        diff = table["all"]["diff@20"].get(arm, {})
        ratio = table["all"]["hr@20"][arm]["value"] / base20 if base20 else float("nan")
        lines.append(
            f"| {LABELS[arm]} | {_fmt(table['all']['hr@20'][arm])} | {_fmt(table['all']['hr@50'][arm])} | "
            f"{_fmt(diff, True) if diff else ''} | {ratio:.3f}× |"
        )
    lines += ["", "## Strata (HitRate@20; paired differences)", ""]
    lines += [
        "| stratum | clicks | nightly-only | nightly + fresh last-N | full + incremental | full + incremental − nightly-only | fresh last-N − nightly-only | full + incremental − fresh last-N |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stratum, entry in table.items():
        if not entry["events"]:
            lines.append(f"| {stratum} | 0 | | | | | | |")
            continue
        hr = entry["hr@20"]
        lines.append(
            f"| {stratum} | {entry['events']} | {hr['nightly_only']['value']:.4f} | {hr['nightly_fresh']['value']:.4f} | "
            f"{hr['full_incremental']['value']:.4f} | {_fmt(entry['diff@20']['full_incremental'], True)} | "
            f"{_fmt(entry['diff@20']['nightly_fresh'], True)} | {_fmt(entry['rows@20'], True)} |"
        )
    lines += [
        "",
        "## Seeds",
        "",
        "| seed | clicks | full + incremental − nightly-only @20 | nightly + fresh − nightly-only @20 | full + incremental − nightly + fresh @20 | run min |",
        "|---|---|---|---|---|---|",
    ]
    for seed, result in results.items():
        one = Scored.from_rows(result.rows, ARMS)
        lines.append(
            f"| {seed} | {len(one)} | {paired_difference(one, 'full_incremental', BASELINE, 20)} | "
            f"{paired_difference(one, 'nightly_fresh', BASELINE, 20)} | "
            f"{paired_difference(one, 'full_incremental', 'nightly_fresh', 20)} | {result.seconds / 60:.1f} |"
        )
    lines += [
        "",
        "## Nightly runs",
        "",
        "| seed | day trained through | days | outcome | seconds |",
        "|---|---|---|---|---|",
    ]
    for seed, result in results.items():
        for night in result.nights:
            lines.append(f"| {seed} | {night['day']} | {night['days']} | {night['outcome']} | {night['seconds']} |")
    settle = np.array([s["settle_s"] for r in results.values() for s in r.steps if s["scored"]])
    events = sum(r.events for r in results.values())
    total = sum(r.seconds for r in results.values())
    lines += [
        "",
        "## Freshness and throughput",
        "",
        f"After each step is produced, the next step waits until the worker has learnt all of it, the publisher has "
        f"published it and serving answers from it: p50 {np.percentile(settle, 50):.2f} s, p99 "
        f"{np.percentile(settle, 99):.2f} s, max {settle.max():.2f} s per step of up to "
        f"{max(s['events'] for r in results.values() for s in r.steps if s['scored'])} events (`freshness.png`).",
        f"Throughput of the whole replay: {events / total:.0f} events/s including scoring and nightly runs.",
        "",
        "![HitRate@20 over time](hitrate_over_time.png)",
        "",
        "![freshness](freshness.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plot_over_time(path: Path, results: Mapping[int, RunResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed, result = next(iter(results.items()))
    scored = Scored.from_rows(result.rows, ARMS)
    if not len(scored):
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    order = np.argsort(scored.ts_ms, kind="stable")
    parts = np.array_split(order, min(12, len(order)))  # equal windows of clicks, none left over
    xs = [dt.datetime.fromtimestamp(scored.ts_ms[p[-1]] / 1000, dt.UTC) for p in parts]
    times = scored.ts_ms[order]
    for arm in ARMS:
        hits = scored.hits(arm, 20)
        ys = [hits[p].mean() for p in parts]
        style = "-" if arm in ("full_incremental", "nightly_fresh", "nightly_only") else ":"
        ax.plot(xs, ys, style, marker="o", markersize=3, label=LABELS[arm])
    for night in result.nights[1:]:
        if night["outcome"] == "promoted" and night["midnight_ms"] >= times[0]:
            ax.axvline(dt.datetime.fromtimestamp(night["midnight_ms"] / 1000, dt.UTC), color="grey", alpha=0.4, lw=1)
    ax.set_ylabel(f"HitRate@20 (windows of ~{len(order) // len(parts)} clicks)")
    ax.set_title(f"Prequential HitRate@20 by arm (seed {seed}; grey lines: nightly promotions)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_settle(path: Path, results: Mapping[int, RunResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    settle = [s["settle_s"] for r in results.values() for s in r.steps if s["scored"]]
    axes[0].hist(settle, bins=30)
    axes[0].set_xlabel("seconds from a step produced to it learnt, published and served")
    axes[0].set_ylabel("steps")
    for seed, result in results.items():
        xs = np.cumsum([s["settle_s"] + s.get("score_s", 0) + s["produce_s"] for s in result.steps])
        ys = np.cumsum([s["events"] for s in result.steps])
        axes[1].plot(xs, ys, label=f"seed {seed}")
    axes[1].set_xlabel("seconds (steps only)")
    axes[1].set_ylabel("events replayed")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
