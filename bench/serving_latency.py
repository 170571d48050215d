"""Serving latency at 100k and 1M items: exact search against IVF and HNSW, over loopback HTTP, one process.

For each catalogue size the bench writes a real RocksDB store (item vectors in 64 dimensions, 10,000 users
with an ID row and a last-N of 20), a small 64-d model version (untrained: the towers' cost does not depend
on their weights), and an index snapshot of each kind where the publisher would (``--index-dir``). Item
vectors are drawn around 2,000 cluster centres (noise 0.5 of the centre's norm), which is closer to trained
embeddings than uniform noise on the sphere and harder than well-separated clusters.

Measured per (size, index kind):

- recall@100 of the index against exact search, over 500 user vectors computed by the serving code, for a
  sweep of search breadths (HNSW ``ef_search``, IVF ``nprobe``); served: the smallest breadth reaching 0.95;
- in-process search time per query (faiss alone) and the build time of the index;
- over HTTP, ``python -m serving run --index KIND``: p50/p99 of ``GET /recommend?k=100`` from one client
  sending one request at a time (``--requests``), and requests/s with ``--concurrency`` clients in flight;
  where the time goes: the server's own timings (store rows, user tower, search) and the rest (HTTP,
  validation, JSON, the thread hop).

Client and server share the machine's 2 cores, so the HTTP figures include the client's own cost.

    .venv/bin/python bench/serving_latency.py     # ~10 min; bench/results/serving_latency.{json,png}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from publisher.index import IndexSnapshots, make_index  # noqa: E402
from publisher.records import Publish  # noqa: E402
from publisher.store import RocksStore  # noqa: E402
from serving.user_vector import user_vectors  # noqa: E402
from streaming.sources.synthetic import SyntheticWorld, WorldConfig  # noqa: E402
from trainer.artifact import ModelVersion, load_version, make_version, save_version  # noqa: E402
from trainer.dataset import Dataset  # noqa: E402
from trainer.features import FeatureEncoder  # noqa: E402
from trainer.model import ModelConfig, TwoTowerModel  # noqa: E402
from trainer.registry import Registry  # noqa: E402

logger = logging.getLogger("bench.serving_latency")
DIM = 64
USERS = 10_000
K = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(root: Path) -> ModelVersion:
    world = SyntheticWorld(WorldConfig(seed=1, n_users=200, n_items=300, days=1.0, requests_per_day=500))
    dataset = Dataset.from_events(world.events())
    encoder = FeatureEncoder.fit(dataset)
    model = TwoTowerModel(encoder, ModelConfig(dim=DIM, id_dim=32, embedding_dim=16, hidden=(128,)))
    version = make_version(
        model, encoder, dataset.items, version_id="bench", parent=None, data_range=(0, 1), data_cutoff_ms=0
    )
    registry = Registry(root)
    with registry.new_version("bench") as staging:
        save_version(staging, version)
    registry.promote("bench")
    return load_version(registry.path("bench"))


def item_vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((2000, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32) / np.sqrt(
        DIM
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_store(path: Path, version: ModelVersion, vectors: np.ndarray, rng: np.random.Generator) -> int:
    ids = [f"b{j}" for j in range(len(vectors))]
    id_dim = version.model.user_tower.id_table.embedding_dim
    with RocksStore(path, sync=False) as store:
        number = 0
        for start in range(0, len(ids), 100_000):
            number += 1
            users = {}
            if start == 0:
                rows = (0.05 * rng.standard_normal((USERS, id_dim))).astype(np.float32)
                hist = rng.integers(0, len(ids), (USERS, 20))
                users = {f"u{u}": (rows[u], tuple(ids[j] for j in hist[u])) for u in range(USERS)}
            items = dict(zip(ids[start : start + 100_000], vectors[start : start + 100_000], strict=True))
            store.apply(Publish(number, 1_000, version.version_id, str(number), users=users, items=items))
    return number


def queries(version: ModelVersion, store_path: Path, n: int) -> np.ndarray:
    from publisher.store import RocksSecondary

    with RocksSecondary(store_path) as store, store.reader() as view:
        users = [f"u{u}" for u in range(n)]
        rows = view.users(users)
    return user_vectors(version, users, [r.vector for r in rows], [r.last_n for r in rows], [None] * n)


def measure_index(kind: str, vectors: np.ndarray, q: np.ndarray, exact: list[list[str]] | None, args) -> dict:
    ids = [f"b{j}" for j in range(len(vectors))]
    start = time.perf_counter()
    index = make_index(kind, DIM, m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search[0])
    for s in range(0, len(ids), 100_000):
        index.upsert(ids[s : s + 100_000], vectors[s : s + 100_000])
    build = time.perf_counter() - start
    sweep = []
    breadths = {"hnsw": args.ef_search, "ivf": args.nprobe}.get(kind, [0])
    for ef in breadths:
        if kind == "hnsw":
            index.ef_search = ef  # type: ignore[attr-defined]
        elif kind == "ivf":
            index.nprobe = ef  # type: ignore[attr-defined]
        found = []
        times = []
        for row in q:
            t = time.perf_counter()
            got, _ = index.search(row[None], K)
            times.append(time.perf_counter() - t)
            found.append(got[0])
        recall = 1.0
        if exact is not None:
            recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact, strict=True)]))
        sweep.append(
            {
                "breadth": ef or None,
                "search_p50_ms": round(float(np.percentile(times, 50)) * 1e3, 3),
                "search_p99_ms": round(float(np.percentile(times, 99)) * 1e3, 3),
                "recall_at_100": round(recall, 4),
                "found": found,
            }
        )
    # Served: the smallest breadth (ef_search, nprobe) that reaches recall@100 >= 0.95 (else the largest tried).
    chosen = next((s for s in sweep if s["recall_at_100"] >= 0.95), sweep[-1])
    if kind == "hnsw":
        index.ef_search = chosen["breadth"]  # type: ignore[attr-defined]
    elif kind == "ivf":
        index.nprobe = chosen["breadth"]  # type: ignore[attr-defined]
    return {
        "index": index,
        "found": chosen.pop("found"),
        "build_s": round(build, 2),
        **chosen,
        "sweep": [{k: v for k, v in s.items() if k != "found"} for s in sweep],
    }


def start_serving(
    store: Path, models: Path, index_dir: Path, kind: str, breadth: int | None, log: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "serving", "run", "--store", str(store), "--models", str(models)]
    cmd += ["--index-dir", str(index_dir), "--index", kind, "--port", str(port), "--metrics-port", str(free_port())]
    with open(log, "w") as out:
        env = {**os.environ}
        if kind == "hnsw":
            env["FRESHTOWER_SERVING_HNSW_EF_SEARCH"] = str(breadth)
        elif kind == "ivf":
            env["FRESHTOWER_SERVING_IVF_NPROBE"] = str(breadth)
        process = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"serving exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"serving not ready:\n{log.read_text()}")
        time.sleep(0.2)


async def closed_loop(url: str, n: int, concurrency: int, seconds: float | None) -> tuple[list[float], list[dict]]:
    latencies: list[float] = []
    timings: list[dict] = []
    deadline = time.perf_counter() + seconds if seconds else None
    counter = iter(range(10**9))
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:

        async def one() -> None:
            while True:
                k = next(counter)
                if (deadline is None and k >= n) or (deadline is not None and time.perf_counter() > deadline):
                    return
                start = time.perf_counter()
                r = await client.get("/recommend", params={"user_id": f"u{k % USERS}", "k": K})
                latencies.append(time.perf_counter() - start)
                r.raise_for_status()
                timings.append(r.json()["timings_ms"])

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return latencies, timings


def http_figures(url: str, args) -> dict:
    asyncio.run(closed_loop(url, 200, 1, None))  # warm-up
    lat, timings = asyncio.run(closed_loop(url, args.requests, 1, None))
    lat_ms = np.array(lat) * 1e3
    stages = {k: float(np.mean([t[k] for t in timings])) for k in ("store_ms", "user_tower_ms", "search_ms")}
    conc, _ = asyncio.run(closed_loop(url, 0, args.concurrency, args.seconds))
    return {
        "http_p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
        "http_p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
        "requests_per_s": round(len(conc) / args.seconds, 1),
        "mean_store_ms": round(stages["store_ms"], 3),
        "mean_user_tower_ms": round(stages["user_tower_ms"], 3),
        "mean_search_ms": round(stages["search_ms"], 3),
        "mean_http_and_rest_ms": round(float(lat_ms.mean()) - sum(stages.values()), 3),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['items'] // 1000}k {r['kind']}" + (f" {r['breadth']}" if r["breadth"] else "") for r in rows]
    parts = ["mean_store_ms", "mean_user_tower_ms", "mean_search_ms", "mean_http_and_rest_ms"]
    bottom = np.zeros(len(rows))
    for part in parts:
        values = np.array([r[part] for r in rows])
        ax.bar(labels, values, bottom=bottom, label=part.removeprefix("mean_").removesuffix("_ms"))
        bottom += values
    ax.scatter(labels, [r["http_p99_ms"] for r in rows], color="black", marker="_", s=400, label="p99", zorder=3)
    ax.set_ylabel("ms per GET /recommend (k=100)")
    ax.set_title("Where a request's time goes (mean), and p99, one serving process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--kinds", default="flat,ivf,hnsw", help="index kinds; flat first (the exact reference)")
    parser.add_argument("--ef-search", default="128,256,512,1024", help="HNSW search breadths to sweep")
    parser.add_argument("--nprobe", default="32,64,128,256,512", help="IVF lists probed to sweep")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/serving_latency.json")
    args = parser.parse_args()
    args.ef_search = [int(e) for e in args.ef_search.split(",")]
    args.nprobe = [int(e) for e in args.nprobe.split(",")]
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp_name:
        tmp = Path(tmp_name)
        version = make_model(tmp / "models")
        for size in [int(s) for s in args.sizes.split(",")]:
            root = tmp / f"n{size}"
            vectors = item_vectors(size, rng)
            t = time.perf_counter()
            last = write_store(root / "kv", version, vectors, rng)
            print(f"{size} items: store written in {time.perf_counter() - t:.1f} s", flush=True)
            q = queries(version, root / "kv", 500)
            exact = None
            for kind in args.kinds.split(","):
                measured = measure_index(kind, vectors, q, exact, args)
                if kind == "flat":
                    exact = measured["found"]
                IndexSnapshots(root / f"index-{kind}").save(measured.pop("index"), last)
                measured.pop("found")
                index_dir, log = root / f"index-{kind}", root / f"{kind}.log"
                process, url = start_serving(root / "kv", tmp / "models", index_dir, kind, measured["breadth"], log)
                try:
                    row = {"items": size, "kind": kind, **measured, **http_figures(url, args)}
                except Exception:
                    print(
                        f"serving failed ({kind}, {size} items); its log ends:\n{log.read_text()[-3000:]}", flush=True
                    )
                    raise
                finally:
                    process.terminate()
                    process.wait(30)
                print(row, flush=True)
                rows.append(row)
            shutil.rmtree(root)
    out = {
        "dim": DIM,
        "k": K,
        "users": USERS,
        "hnsw": {"m": args.hnsw_m, "ef_construction": args.ef_construction, "ef_search_swept": args.ef_search},
        "ivf": {"nlist": "4*sqrt(n)", "nprobe_swept": args.nprobe},
        "requests": args.requests,
        "concurrency": args.concurrency,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "runtime_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} in {out['runtime_s']} s")


if __name__ == "__main__":
    main()
