"""Two candidate HTTP stacks for serving, measured on one tiny endpoint over loopback.

FastAPI (pydantic) and Litestar (msgspec), each on uvicorn with httptools and uvloop, one process. The endpoint
validates two query parameters and returns a 20-item JSON list, which is the shape of ``/recommend`` without
the model. The load is a closed loop of ``--concurrency`` httpx clients on the same 2-core machine, so the
figures are relative, not capacity.

    .venv/bin/python bench/serving_framework.py      # ~1 min; bench/results/serving_framework.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np

APPS = {
    "fastapi+pydantic": textwrap.dedent(
        """
        from fastapi import FastAPI, Query
        from pydantic import BaseModel

        class Hit(BaseModel):
            item_id: str
            score: float

        class Out(BaseModel):
            user_id: str
            items: list[Hit]

        app = FastAPI()

        @app.get("/recommend", response_model=Out)
        async def recommend(user_id: str = Query(max_length=256), k: int = Query(20, ge=1, le=200)) -> Out:
            return Out(user_id=user_id, items=[Hit(item_id=f"i{j}", score=1.0 / (j + 1)) for j in range(k)])
        """
    ),
    "litestar+msgspec": textwrap.dedent(
        """
        from typing import Annotated
        import msgspec
        from litestar import Litestar, get
        from litestar.params import Parameter

        class Hit(msgspec.Struct):
            item_id: str
            score: float

        class Out(msgspec.Struct):
            user_id: str
            items: list[Hit]

        @get("/recommend")
        async def recommend(
            user_id: Annotated[str, Parameter(max_length=256)], k: Annotated[int, Parameter(ge=1, le=200)] = 20
        ) -> Out:
            return Out(user_id=user_id, items=[Hit(item_id=f"i{j}", score=1.0 / (j + 1)) for j in range(k)])

        app = Litestar([recommend])
        """
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, seconds: float, concurrency: int) -> list[float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=5.0) as client:

        async def one(n: int) -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = await client.get(url, params={"user_id": f"u{n}", "k": 20})
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(one(n) for n in range(concurrency)))
    return latencies


def measure(name: str, source: str, seconds: float, concurrency: int, workdir: Path) -> dict:
    module = workdir / f"app_{name.split('+')[0]}.py"
    module.write_text(source)
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", f"{module.stem}:app", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--http", "httptools", "--loop", "uvloop", "--log-level", "warning", "--no-access-log"]
    server = subprocess.Popen(cmd, cwd=workdir)
    try:
        url = f"http://127.0.0.1:{port}/recommend"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, params={"user_id": "warm"}).raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        asyncio.run(load(url, 1.0, concurrency))  # warm-up
        lat = np.array(asyncio.run(load(url, seconds, concurrency)))
        bad = httpx.get(url, params={"user_id": "x", "k": 0})
    finally:
        server.terminate()
        server.wait(10)
    return {
        "framework": name,
        "requests_per_s": round(len(lat) / seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 2),
        "bad_k_status": bad.status_code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving_framework.json"))
    args = parser.parse_args()
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):  # interleaved, so drift of the shared machine hits both alike
            for name, source in APPS.items():
                row = measure(name, source, args.seconds, args.concurrency, Path(tmp))
                print(row, flush=True)
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"concurrency": args.concurrency, "seconds": args.seconds, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
