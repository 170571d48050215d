"""The main job's harness is honest: a small synthetic world through the real broker, worker, publisher, serving
and nightly job (``prequential.run``), checked on what it recorded.

- With the worker's learning switched off (``learn = false``: features current, the model's own ID rows), the
  served arm and the in-process "nightly + fresh last-N" arm hold the same information, so every scored
  click must get the same rank under both: this catches a harness that scores the two from different states.
- No click is scored by a model or a publish that has learnt from it: every step's model cutoff and served
  watermark lie before the step's first event, and every model version in the registry was trained on data
  that ends before the clicks it scored.
- With learning on, the served arm differs from the in-process one (the worker's rows do reach serving).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from prequential.metrics import Scored
from prequential.run import ARMS, Dishonest, RunSettings, _check_honest, run
from prequential.system import SystemSettings
from streaming.sources.synthetic import SyntheticWorld, WorldConfig
from trainer.artifact import load_version
from trainer.registry import Registry


def _world() -> list:
    config = WorldConfig(seed=3, n_users=300, n_items=300, days=4.0, requests_per_day=1200, new_items_per_day=30)
    return sorted(SyntheticWorld(config).events(), key=lambda e: e.ts_ms)


def _settings(learn: bool) -> RunSettings:
    return RunSettings(
        dataset="synthetic",
        first_cut=0.3,
        score_from=0.5,
        step_clicks=150,
        night_every_days=1,
        system=SystemSettings(learn=learn, settle_timeout_s=120, gate_margin=1.0),  # every night promotes
    )


def _check_versions(root: Path, scored: Scored, steps: list[dict]) -> None:
    registry = Registry(root / "models")
    cutoffs = {}
    for info in registry.list():
        version = load_version(info.path)
        cutoffs[info.version_id] = version.data_cutoff_ms
        assert version.data_cutoff_ms < version.manifest["data_range"]["end_ms"]
    by_step = {s["step"]: s for s in steps}
    for n in np.unique(scored.step):
        step = by_step[int(n)]
        first = int(scored.ts_ms[scored.step == n].min())
        assert step["model_cutoff_ms"] == cutoffs[step["model_version"]]
        assert step["model_cutoff_ms"] < step["from_ms"] <= first
        assert step["served_watermark_ms"] < step["from_ms"]
        assert step["served_model"] == step["model_version"]


def test_with_learning_off_serving_and_the_fresh_features_arm_rank_every_click_alike(tmp_path: Path) -> None:
    settings = _settings(learn=False)
    result = run(settings, _world(), tmp_path)
    scored = Scored.from_rows(result.rows, ARMS)
    assert len(scored) > 300
    assert sum(n["outcome"] == "promoted" for n in result.nights) >= 3  # version 1, and nightly switches
    assert len({s["model_version"] for s in result.steps if s["scored"]}) >= 2
    served, fresh = scored.ranks["full_incremental"], scored.ranks["nightly_fresh"]
    assert (served == fresh).all(), f"{int((served != fresh).sum())} of {len(served)} clicks ranked differently"
    # The frozen last-N arm is a different arm: it must not coincide everywhere.
    assert (scored.ranks["nightly_only"] != fresh).any()
    _check_versions(tmp_path, scored, result.steps)


def test_with_learning_on_the_worker_rows_reach_serving_and_nothing_scores_its_own_training(tmp_path: Path) -> None:
    result = run(_settings(learn=True), _world(), tmp_path)
    scored = Scored.from_rows(result.rows, ARMS)
    assert (scored.ranks["full_incremental"] != scored.ranks["nightly_fresh"]).any()
    _check_versions(tmp_path, scored, result.steps)


def test_a_step_scored_by_a_model_or_publish_that_saw_it_is_refused() -> None:
    class Version:
        version_id, data_cutoff_ms = "v", 99

    step = {"step": 0, "from_ms": 100, "served_watermark_ms": 99, "served_model": "v"}
    _check_honest(step, Version())  # type: ignore[arg-type]
    for bad in ({"served_watermark_ms": 100}, {"served_model": "w"}):
        with pytest.raises(Dishonest):
            _check_honest({**step, **bad}, Version())  # type: ignore[arg-type]
    late = dataclasses.make_dataclass("V", [("version_id", str), ("data_cutoff_ms", int)])("v", 100)
    with pytest.raises(Dishonest):
        _check_honest(step, late)  # type: ignore[arg-type]


def test_sigterm_stops_the_main_job_and_every_process_it_started(tmp_path: Path) -> None:
    """A Ctrl-C or SIGTERM in the middle of a run: exit 130 within seconds, and no broker, worker, publisher,
    serving or nightly process left behind (each is found by the run directory in its command line)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "runs"
    process = subprocess.Popen(
        [sys.executable, "-m", "prequential", "--dataset", "synthetic", "--out", str(out)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not list(out.glob("*/seed-0/logs/serving.log")):  # everything is up once serving has started
        assert process.poll() is None and time.monotonic() < deadline, "the main job did not start its processes"
        time.sleep(0.5)
    time.sleep(3)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert time.monotonic() - started < 40
    assert "stopped; every process was shut down" in stderr
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert [pid for pid in left if int(pid) != os.getpid()] == []
