"""What a worker's user state costs per million users: memory in the process and bytes in RocksDB.

For sizing scaled-out workers (docs/scale-out.md#sizing). At each size N the script writes, through
:class:`streaming.state.StateStore` and in the worker's key layout, the state of N users into its own RocksDB
database per part:

* ``rows``: the user-ID rows ``t:user:<id>`` (:data:`streaming.tables.ROW_HEADER` + ``float32[id_dim]``), at the
  default model's ``id_dim`` (``trainer.model.ModelConfig``, 32) and at 64;
* ``lists``: the last-N lists ``n:<id>`` (JSON, 20 item ids each, drawn from ``--items`` items) and their activity
  times ``na:<id>``, as :class:`streaming.examples.ExampleBuilder` writes them.

Checkpoints of ``--checkpoint-keys`` keys each (fsync on, as in the worker), then RocksDB's flush and a full
compaction (``compact_range``). Disk bytes are the database directory's files (SSTs, WAL, MANIFEST, logs), after
the checkpoints and after the compaction, plus ``rocksdb.total-sst-files-size``.

Memory: a fresh process per part and size opens that database and builds the worker's in-memory state from it
as a restarted worker does (``EmbeddingTable`` / ``ExampleBuilder`` load their keys). Reported: the RSS added by
the load (``VmRSS`` after, less before), the peak (``VmHWM`` less the RSS before), the numpy arrays' own bytes
(the table), and a ``sys.getsizeof`` sum of the Python objects (the lists). The table's ``max_rows`` is N, so its
arrays hold exactly N rows (a table that grows past N under a larger bound holds up to twice that: it doubles).

Per million users is the slope of a least-squares line through the sizes (the intercept is the fixed cost:
the interpreter, RocksDB's own files, the interned item ids).

    .venv/bin/python bench/state_size.py [--sizes 100000 300000 1000000]

Writes ``bench/results/state-size.json`` and ``bench/results/state-size.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from streaming.examples import ExampleBuilder, ExampleSettings  # noqa: E402
from streaming.state import StateStore  # noqa: E402
from streaming.tables import ROW_HEADER, EmbeddingTable, TableSettings  # noqa: E402
from trainer.model import ModelConfig  # noqa: E402

LAST_N = ExampleSettings().last_n
WATERMARK_MS = 1_700_000_000_000


def user_id(k: int) -> str:
    return f"u{k}"  # the synthetic world's ids (streaming.sources.synthetic)


def parts(id_dims: list[int]) -> list[tuple[str, int]]:
    return [*(("rows", d) for d in id_dims), ("lists", 0)]


def part_name(kind: str, dim: int) -> str:
    return f"rows{dim}" if kind == "rows" else kind


# ---------------------------------------------------------------------------------------------------- disk
def dir_bytes(path: Path) -> dict[str, int]:
    out = {"total": 0, "sst": 0, "wal": 0, "other": 0}
    for entry in path.iterdir():
        size = entry.stat().st_size
        out["total"] += size
        kind = "sst" if entry.suffix == ".sst" else "wal" if entry.suffix == ".log" else "other"
        out[kind] += size
    return out


def write_part(path: Path, kind: str, dim: int, n: int, items: int, chunk: int, seed: int, bar: tqdm) -> dict:
    """Write N users' keys of one part in checkpoints of ``chunk`` keys; disk bytes before and after compaction."""
    rng = np.random.default_rng(seed)
    py_rng = random.Random(seed)
    store = StateStore(path)
    raw = 0
    started = time.perf_counter()
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        if kind == "rows":
            vectors = (rng.standard_normal((hi - lo, dim)) * 0.05).astype(np.float32)
            for k in range(lo, hi):
                value = ROW_HEADER.pack(WATERMARK_MS + k, 7, 0.5) + vectors[k - lo].tobytes()
                key = b"t:user:" + user_id(k).encode()
                store.put(key, value)
                raw += len(key) + len(value)
        else:
            for k in range(lo, hi):
                ident = user_id(k).encode()
                listed = json.dumps([f"i{py_rng.randrange(items)}" for _ in range(LAST_N)]).encode()
                active = (WATERMARK_MS + k).to_bytes(8, "little", signed=True)
                store.put(b"n:" + ident, listed)
                store.put(b"na:" + ident, active)
                raw += 2 + len(ident) + len(listed) + 3 + len(ident) + len(active)
        store.checkpoint({"freshtower.clicks:0": hi}, {"watermark_ms": WATERMARK_MS + n})
        bar.update(hi - lo)
    write_s = time.perf_counter() - started
    db = store._db  # the bench looks at RocksDB itself; the worker never needs to
    after_checkpoints = dir_bytes(path)
    started = time.perf_counter()
    db.flush(True)
    db.compact_range(None, None)
    compact_s = time.perf_counter() - started
    sst = db.property_int_value("rocksdb.total-sst-files-size")
    live = db.property_int_value("rocksdb.estimate-live-data-size")
    store.close()
    return {
        "raw_key_value_bytes": raw,
        "after_checkpoints": after_checkpoints,
        "after_compaction": dir_bytes(path),
        "sst_files_size": sst,
        "estimate_live_data_size": live,
        "write_s": round(write_s, 2),
        "compact_s": round(compact_s, 2),
    }


# ---------------------------------------------------------------------------------------------------- memory
def proc_status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value, _unit = line.split()
            out[name[:-1]] = int(value) * 1024
    return out


def measure_memory(path: Path, kind: str, dim: int, n: int) -> dict:
    """In this (fresh) process: build the part's in-memory state from its database as a restarted worker does."""
    store = StateStore(path)
    gc.collect()
    before = proc_status()["VmRSS"]
    started = time.perf_counter()
    extra: dict = {}
    if kind == "rows":
        settings = TableSettings(max_rows=max(n, 1))
        table = EmbeddingTable("user", np.zeros((1, dim), dtype=np.float32), {}, settings, store)
        assert len(table) == n, (len(table), n)
        arrays = (table._vectors, table._accum, table._last_seen, table._updates)
        extra = {"array_bytes": int(sum(a.nbytes for a in arrays)), "capacity": int(len(table._accum))}
        held = table
    else:
        builder = ExampleBuilder(ExampleSettings(), store)
        assert len(builder.last_n) == n, (len(builder.last_n), n)
        lists = builder.last_n
        items = {id(i): i for history in lists.values() for i in history}
        python = sys.getsizeof(lists) + sys.getsizeof(builder._active)
        python += sum(sys.getsizeof(u) + sys.getsizeof(h) for u, h in lists.items())
        python += sum(sys.getsizeof(t) for t in builder._active.values())  # the keys are the same str objects
        python += sum(sys.getsizeof(i) for i in items.values())
        extra = {"python_object_bytes": python, "distinct_items": len(items)}
        del items  # the bench's own dict, not the worker's
        held = builder
    load_s = time.perf_counter() - started
    gc.collect()
    status = proc_status()
    del held
    store.close()
    return {
        "rss_before": before,
        "rss_delta": status["VmRSS"] - before,
        "peak_delta": status["VmHWM"] - before,
        "load_s": round(load_s, 2),
        **extra,
    }


def memory_in_subprocess(path: Path, kind: str, dim: int, n: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--measure", str(path), kind, str(dim), str(n)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- report
def fit(sizes: list[int], values: list[float]) -> dict:
    """Least-squares line: bytes per million users (slope) and the fixed cost (intercept)."""
    slope, intercept = np.polyfit(np.asarray(sizes, dtype=float), np.asarray(values, dtype=float), 1)
    return {"per_million": float(slope * 1e6), "fixed": float(intercept)}


def mb(value: float) -> str:
    return f"{value / 1e6:,.1f}"


def summarise(points: list[dict], id_dims: list[int]) -> dict:
    sizes = sorted({p["n"] for p in points})
    out = {}
    for kind, dim in parts(id_dims):
        name = part_name(kind, dim)
        at = [next(p for p in points if p["n"] == n and p["part"] == name) for n in sizes]
        metrics = {
            "rss": [p["memory"]["rss_delta"] for p in at],
            "peak": [p["memory"]["peak_delta"] for p in at],
            "disk_after_checkpoints": [p["disk"]["after_checkpoints"]["total"] for p in at],
            "disk_after_compaction": [p["disk"]["after_compaction"]["total"] for p in at],
            "raw_key_value_bytes": [p["disk"]["raw_key_value_bytes"] for p in at],
            "load_s": [p["memory"]["load_s"] for p in at],
        }
        if kind == "rows":
            metrics["array_bytes"] = [p["memory"]["array_bytes"] for p in at]
        else:
            metrics["python_object_bytes"] = [p["memory"]["python_object_bytes"] for p in at]
        out[name] = {key: fit(sizes, values) for key, values in metrics.items()}
    return out


def markdown(result: dict) -> str:
    fits, points, dims = result["per_million"], result["points"], result["id_dims"]
    lines = [
        "# A worker's user state per million users",
        "",
        f"Command: `{result['command']}` ({result['wall_s']:.0f} s on {result['machine']['cpus']} cores, "
        f"load average {result['load_average_start'][0]:.1f} at the start).",
        "",
        "Per million users (the slope of a line through "
        + ", ".join(f"{n:,}" for n in result["sizes"])
        + " users); MB = 10^6 bytes.",
        "",
        "| part | RSS | peak RSS (load) | numpy / Python objects | RocksDB after checkpoints | after compaction |"
        " key + value bytes | load s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {f"rows{d}": f"user-ID rows, id_dim {d}" for d in dims} | {"lists": f"last-{LAST_N} lists (+ activity)"}
    for name, f in fits.items():
        own = f.get("array_bytes", f.get("python_object_bytes"))
        lines.append(
            f"| {labels[name]} | {mb(f['rss']['per_million'])} | {mb(f['peak']['per_million'])} | "
            f"{mb(own['per_million'])} | {mb(f['disk_after_checkpoints']['per_million'])} | "
            f"{mb(f['disk_after_compaction']['per_million'])} | {mb(f['raw_key_value_bytes']['per_million'])} | "
            f"{f['load_s']['per_million']:.1f} |"
        )
    for d in dims:
        rows, lists = fits[f"rows{d}"], fits["lists"]
        lines.append(
            f"| **a user, id_dim {d}** (rows + lists) | **{mb(rows['rss']['per_million'] + lists['rss']['per_million'])}**"
            f" | {mb(rows['peak']['per_million'] + lists['peak']['per_million'])} | | "
            f"{mb(rows['disk_after_checkpoints']['per_million'] + lists['disk_after_checkpoints']['per_million'])} | "
            f"**{mb(rows['disk_after_compaction']['per_million'] + lists['disk_after_compaction']['per_million'])}**"
            " | | |"
        )
    lines += [
        "",
        "RSS: what a fresh process gained by loading the part from its RocksDB database, as a restarted worker does;"
        " peak: the most it held meanwhile (the table's arrays double as they grow). The table's `max_rows` is N."
        " Not included: the process itself (torch, the model), item state, the join window, catalogue and profile"
        " records and caches, pending admission counts. User ids are the synthetic world's (`u<k>`, 2-7 characters);"
        " longer ids add their length to each of the 5 copies (two in memory, three RocksDB keys).",
        "",
        "Each point (MB):",
        "",
    ]
    lines.append(
        "| part | users | RSS | peak | numpy / Python | RocksDB after checkpoints | after compaction | load s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for p in points:
        m, d = p["memory"], p["disk"]
        own = m.get("array_bytes", m.get("python_object_bytes"))
        lines.append(
            f"| {labels[p['part']]} | {p['n']:,} | {mb(m['rss_delta'])} | {mb(m['peak_delta'])} | {mb(own)} | "
            f"{mb(d['after_checkpoints']['total'])} | {mb(d['after_compaction']['total'])} | {m['load_s']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--id-dims", type=int, nargs="+", default=None, help="default: the model's id_dim and 64")
    p.add_argument("--items", type=int, default=100_000, help="distinct item ids in the last-N lists")
    p.add_argument("--checkpoint-keys", type=int, default=50_000, help="keys per checkpoint while writing")
    p.add_argument("--workdir", type=Path, help="where the databases go (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)  # PATH KIND DIM N: the memory child
    args = p.parse_args()
    if args.measure:
        path, kind, dim, n = args.measure
        print(json.dumps(measure_memory(Path(path), kind, int(dim), int(n))))
        return

    id_dims = args.id_dims or sorted({ModelConfig().id_dim, 64})
    load_start = os.getloadavg()
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="state-size-", dir=args.workdir))
    points = []
    todo = [(n, kind, dim) for n in sorted(args.sizes) for kind, dim in parts(id_dims)]
    try:
        with tqdm(total=sum(n for n, _, _ in todo), unit="user", unit_scale=True, desc="write") as bar:
            for n, kind, dim in todo:
                name = part_name(kind, dim)
                bar.set_description(f"{name} n={n:,}")
                path = workdir / f"{name}-{n}"
                disk = write_part(path, kind, dim, n, args.items, args.checkpoint_keys, seed=n + dim, bar=bar)
                bar.set_description(f"{name} n={n:,} (memory)")
                memory = memory_in_subprocess(path, kind, dim, n)
                points.append({"n": n, "part": name, "dim": dim or None, "disk": disk, "memory": memory})
                shutil.rmtree(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "command": " ".join([".venv/bin/python", "bench/state_size.py", *sys.argv[1:]]),
        "sizes": sorted(args.sizes),
        "id_dims": id_dims,
        "last_n": LAST_N,
        "items": args.items,
        "checkpoint_keys": args.checkpoint_keys,
        "per_million": summarise(points, id_dims),
        "points": points,
        "wall_s": time.perf_counter() - started,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "state-size.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "state-size.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
