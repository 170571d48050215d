"""Why the online half gains what it gains: the main job on the synthetic world under a few worker settings.

Each variant is one full run of ``python -m prequential --dataset synthetic`` (its own broker, worker,
publisher, serving and nightly job). Compared, on the same clicks of each run: HitRate@20 of full + incremental
against nightly-only and against nightly + fresh last-N (the worker's ID rows' own share), overall and for new
users and new items. The variants move what the worker controls:

* the worker's learning rate (row-wise Adagrad, ``--worker lr=...``; default 0.05), its mini-batch size (64;
  256 when the figures in ``bench/results/main_job_search.json`` were made, see its ``worker_defaults_when_run``)
  and its logQ weight (1, the nightly job's);
* ``new-worker``: the worker (with its store and serving) replaced by a new one after each promotion, against
  the steady-state worker of ``default`` that has run for days and switched versions, paired on the same clicks;
* the step size, i.e. how many clicks pass between two points where everything is learnt, published and
  served. In simulated time this is the publish interval: the harness waits for each publish, so the wall-clock
  interval (``--publish-interval``) changes the run's length, not what it measures.

    .venv/bin/python bench/main_job_search.py [--variants default,lr0.2,lr0.5,step100] [--seed 0]

Writes ``bench/results/main_job_search.json`` and ``.png``; variants already in the JSON are kept unless run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default": [],
    "lr0.2": ["--worker", "lr=0.2"],
    "lr0.5": ["--worker", "lr=0.5"],
    "batch64": ["--worker", "batch_size=64"],
    "logq0.5": ["--worker", "logq_weight=0.5"],
    "step100": ["--step-clicks", "100"],
    "no-learn": ["--no-learn"],
    "new-worker": ["--new-worker-each-night"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="default,lr0.2,lr0.5,step100")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    runs = REPO / "runs" / "search"
    results = []
    started = time.time()
    for name in args.variants.split(","):
        print(f"== {name}", flush=True)
        before = set(runs.glob("*")) if runs.exists() else set()
        cmd = [sys.executable, "-m", "prequential", "--dataset", "synthetic", "--seeds", str(args.seed),
               "--out", str(runs), *VARIANTS[name]]  # fmt: skip
        t0 = time.time()
        subprocess.run(cmd, cwd=REPO, check=True)
        (run,) = set(runs.glob("*")) - before
        summary = json.loads((run / "summary.json").read_text())
        entry = {"variant": name, "args": VARIANTS[name], "seconds": round(time.time() - t0, 1), "report": str(run)}
        for stratum in ("all", "new user", "new item"):
            s = summary[stratum]
            if not s["events"]:
                continue
            entry[stratum] = {
                "clicks": s["events"],
                "hr20": {arm: round(v["value"], 4) for arm, v in s["hr@20"].items()},
                "full_vs_nightly_only": s["diff@20"]["full_incremental"],
                "full_vs_fresh_features": s["rows@20"],
            }
        results.append(entry)
        a = entry["all"]
        print(f"   HR@20 full {a['hr20']['full_incremental']:.4f} nightly-only {a['hr20']['nightly_only']:.4f} "
              f"({a['hr20']['full_incremental'] / a['hr20']['nightly_only']:.3f}x)", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "main_job_search.json"
    if path.exists():  # keep the variants not run this time
        ran = {r["variant"] for r in results}
        results = [r for r in json.loads(path.read_text())["results"] if r["variant"] not in ran] + results
    steady_vs_new = _steady_vs_new(results)
    report = {
        "benchmark": "main_job_search",
        "what": "the main job on the synthetic world under worker settings; HitRate@20 per arm and paired differences",
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_runtime_s": round(time.time() - started, 1),
        "results": results,
        "steady_vs_new_worker": steady_vs_new,
    }
    (args.out / "main_job_search.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(results, args.out / "main_job_search.png")
    print(f"wrote {args.out / 'main_job_search.json'}")
    return 0


def _steady_vs_new(results: list[dict]) -> dict | None:
    """HitRate@20 of what serving answered with the steady-state worker (``default``) minus with a new worker
    each night (``new-worker``), paired on the clicks both runs scored, 95% bootstrap interval by user."""
    by_name = {r["variant"]: r for r in results}
    if "default" not in by_name or "new-worker" not in by_name:
        return None
    sys.path.insert(0, str(REPO))
    from prequential.metrics import Scored, paired_difference

    def rows(variant: str) -> dict:
        (hits,) = Path(by_name[variant]["report"]).glob("seed-*/hits.jsonl")
        return {(r["user"], r["item"], r["ts_ms"]): r for r in map(json.loads, hits.read_text().splitlines())}

    steady, new = rows("default"), rows("new-worker")
    keys = sorted(steady.keys() & new.keys())
    joined = [
        {
            **steady[k],
            "ranks": {"steady": steady[k]["ranks"]["full_incremental"], "new": new[k]["ranks"]["full_incremental"]},
        }
        for k in keys
    ]
    scored = Scored.from_rows(joined, ["steady", "new"])
    out = {"clicks": len(keys)}
    for stratum in ("all", "new user", "known user", "new item"):
        part = scored.subset(scored.mask(stratum))
        if len(part):
            out[stratum] = paired_difference(part, "steady", "new", 20).__dict__
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["variant"] for r in results]
    for offset, (key, label) in enumerate(
        [("full_vs_nightly_only", "full + incremental − nightly-only"), ("full_vs_fresh_features", "− fresh last-N")]
    ):
        values = [r["all"][key]["value"] for r in results]
        low = [r["all"][key]["value"] - r["all"][key]["low"] for r in results]
        high = [r["all"][key]["high"] - r["all"][key]["value"] for r in results]
        xs = [i + 0.38 * offset for i in range(len(results))]
        ax.bar(xs, values, width=0.36, yerr=[low, high], capsize=3, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks([i + 0.19 for i in range(len(results))], names)
    ax.set_ylabel("HitRate@20 difference (95% CI by user)")
    ax.set_title("Main job on the synthetic world: what the worker's settings change")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
