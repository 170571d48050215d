"""How long the nightly job takes to learn the catalogue and the profiles, with and without snapshots.

An archive of ``--days`` days is written in which a catalogue of ``--items`` items and ``--users`` profiles is
updated every day (each item and profile gets ``--updates-per-day`` new records a day, over ``--flushes`` flushes,
as a price or a profile feed would). For the last day, in one run:

* ``full``: every item and user record ever archived, newest per id (what ``trainer full`` did before snapshots;
  :func:`streaming.archive.read_range`);
* ``snapshot``: :func:`streaming.archive_state.read_state` from the snapshot of the day before (made first, not
  timed) plus the last day's files;

each timed ``--repeats`` times (best kept), and the two states are checked to be equal. The ratio is the result.

Writes ``bench/results/archive_state_read.json``.

    .venv/bin/python bench/archive_state_read.py [--days 30] [--items 20000] [--users 20000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from streaming.archive import ArchiveWriter, read_range  # noqa: E402
from streaming.archive_state import read_state  # noqa: E402
from streaming.events import Item, UserProfile  # noqa: E402

DAY_MS = 86_400_000
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def full_read(root: Path, end_ms: int) -> dict[str, object]:
    latest: dict[str, object] = {}
    for record in read_range(root, None, end_ms, types={"item", "user"}):
        key = ("i:" + record.item_id) if isinstance(record, Item) else ("u:" + record.user_id)
        if key not in latest or latest[key].ts_ms <= record.ts_ms:
            latest[key] = record
    return latest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--updates-per-day", type=int, default=1)
    parser.add_argument("--flushes", type=int, default=4, help="archive files per (day, type)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="freshtower-state-") as tmp:
        root = Path(tmp)
        writer = ArchiveWriter(root, max_buffered=10**9)
        per_flush = DAY_MS // (args.flushes * args.updates_per_day)
        for d in tqdm(range(args.days), desc="archive", unit="day"):
            for u in range(args.updates_per_day * args.flushes):
                ts = T0 + d * DAY_MS + u * per_flush
                lo, hi = (
                    (u % args.flushes) * args.items // args.flushes,
                    (u % args.flushes + 1) * args.items // args.flushes,
                )
                writer.write(
                    Item(f"i{n}", f"c{n % 20}", (f"t{n % 50}",), {"price": float(d)}, T0, ts + n % 1000)
                    for n in range(lo, hi)
                )
                lo, hi = (
                    (u % args.flushes) * args.users // args.flushes,
                    (u % args.flushes + 1) * args.users // args.flushes,
                )
                writer.write(
                    UserProfile(f"u{k}", {"city": f"x{k % 30}"}, {}, {"age": float(d)}, ts + k % 1000)
                    for k in range(lo, hi)
                )
                writer.flush()
        last = dt.date(2024, 1, 1) + dt.timedelta(days=args.days - 1)
        read_state(root, last - dt.timedelta(days=1))  # the previous night's snapshot
        records = sum(1 for _ in read_range(root, None, None, types={"item", "user"}))
        timings: dict[str, float] = {}
        states: dict[str, dict] = {}
        for name in ("full", "snapshot"):
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                if name == "full":
                    states[name] = full_read(root, T0 + args.days * DAY_MS)
                else:
                    state = read_state(root, last, write=False)
                    states[name] = {
                        (("i:" + r.item_id) if isinstance(r, Item) else ("u:" + r.user_id)): r for r in state
                    }
                best = min(best, time.perf_counter() - t)
            timings[name] = best
            print(f"{name:>8}: {best:.2f} s")
        if states["full"] != states["snapshot"]:
            raise SystemExit("the snapshot read differs from the full read")
    report = {
        "benchmark": "archive_state_read",
        "config": vars(args) | {"out": str(args.out)},
        "records_archived": records,
        "ids": len(states["full"]),
        "seconds": timings,
        "speedup": timings["full"] / timings["snapshot"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_runtime_s": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "archive_state_read.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{records:,} records, {len(states['full']):,} ids: full {timings['full']:.2f} s, snapshot "
        f"{timings['snapshot']:.2f} s (x{report['speedup']:.1f}); wrote {args.out / 'archive_state_read.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
