"""Helpers for the serving tests: a small model version, a store published from it, a serving process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from publisher.records import Publish
from publisher.store import RocksStore
from tests.conftest import free_port
from trainer.artifact import ModelVersion

REPO = Path(__file__).resolve().parents[1]


def model_rows(version: ModelVersion, user_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The model's own ID row of each user (row 0 for users it does not know): what a publish of them holds."""
    weight = version.model.user_tower.id_table.weight.detach().numpy()
    return {u: weight[version.encoder.user_vocab.index(u)].copy() for u in user_ids}


def publish_version(
    store: RocksStore,
    version: ModelVersion,
    number: int,
    *,
    users: Mapping[str, tuple[np.ndarray, tuple[str, ...]]] | None = None,
    items: Mapping[str, np.ndarray] | None = None,
    removed_items: frozenset[str] = frozenset(),
    watermark_ms: int = 1_000,
) -> None:
    """Write store version ``number`` under ``version``; ``items`` default to every item vector of the model."""
    if items is None:
        items = dict(zip(version.item_ids, version.item_vectors, strict=True))
    store.apply(
        Publish(
            version=number,
            watermark_ms=watermark_ms,
            model_version=version.version_id,
            cursor=str(number),
            users=dict(users or {}),
            items=dict(items),
            removed_items=removed_items,
        )
    )


@dataclass
class Served:
    """A ``python -m serving run`` process on loopback."""

    process: subprocess.Popen
    url: str
    metrics_url: str
    log: Path

    def client(self, token: str | None = None, timeout: float = 10.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


@contextmanager
def serving_process(
    store: Path, models: Path, log_dir: Path, *, extra: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> Iterator[Served]:
    """Start serving on free loopback ports, wait until ``/readyz`` answers 200, SIGTERM it afterwards."""
    port, metrics_port = free_port(), free_port()
    log = log_dir / f"serving-{port}.log"
    cmd = [sys.executable, "-m", "serving", "run", "--store", str(store), "--models", str(models)]
    cmd += ["--port", str(port), "--metrics-port", str(metrics_port), *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(
            cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    served = Served(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"serving exited {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(served.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serving not ready after 60 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"serving did not stop within 15 s of SIGTERM:\n{log.read_text()}") from None
