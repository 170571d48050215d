"""``python -m serving run``: the retrieval API over the publisher's store, with metrics on port 9103.

  run    serve ``/recommend``, ``/similar``, ``/healthz``, ``/readyz`` (OpenAPI at ``/docs``) on --host:--port
         (127.0.0.1:8000 by default), reading --store as a RocksDB secondary and --models for the model versions

Several processes on one host may serve the same store (each opens its own secondary; give each its own
--port and --metrics-port). SIGTERM or Ctrl-C stops accepting, finishes the requests in flight (uvicorn's
graceful shutdown) and exits. Settings: ``[serving]`` in the TOML file, ``FRESHTOWER_SERVING_*`` variables
(``FRESHTOWER_SERVING_TOKEN`` sets the bearer token), then flags.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
import uvicorn
from prometheus_client import CollectorRegistry, start_http_server

from serving.app import create_app
from serving.metrics import ServingMetrics
from serving.settings import ServingSettings
from serving.snapshot import ServedVersions
from serving.worker_records import WorkerRecords
from streaming.settings import SettingsError, load_settings

__all__ = ["build_parser", "main"]

logger = logging.getLogger("serving")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the retrieval API")
    run.add_argument("--config", type=Path, help="TOML file with a [serving] table (or FRESHTOWER_CONFIG)")
    run.add_argument("--store", type=Path, help="the publisher's store (default data/publisher/store)")
    run.add_argument("--models", type=Path, help="the model registry (default artifacts/models)")
    run.add_argument("--index-dir", type=Path, help="the publisher's index snapshots (default <store>-index)")
    run.add_argument("--worker-state", type=Path, help="the worker's state on this host: profiles, click counts")
    run.add_argument("--host", help="API address (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="API port (default 8000; 0 picks a free one)")
    run.add_argument("--metrics-port", type=int, help="Prometheus port (default 9103; 0 picks a free one)")
    run.add_argument("--index", choices=("auto", "flat", "hnsw", "ivf"), help="index kind (default auto)")
    run.add_argument("--token-file", type=Path, help="a file holding the bearer token the API requires")
    run.add_argument("--prior-gamma", type=float, help="serve-time item prior weight (0: off)")
    run.add_argument("--metrics-addr", help="Prometheus address (default 127.0.0.1)")
    run.add_argument("--log-level", default="INFO")
    run.set_defaults(run=cmd_run)
    return parser


def settings_from(args: argparse.Namespace) -> ServingSettings:
    token = args.token_file.read_text().strip() if args.token_file else None
    overrides: dict[str, Any] = {
        "store_path": args.store,
        "models_dir": args.models,
        "index_dir": args.index_dir,
        "worker_state": args.worker_state,
        "host": args.host,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "metrics_addr": args.metrics_addr,
        "index_kind": args.index,
        "token": token,
        "prior_gamma": args.prior_gamma,
    }
    return load_settings(ServingSettings, section="serving", config=args.config, overrides=overrides)


def run(settings: ServingSettings) -> int:
    torch.set_num_threads(1)  # one small MLP per request: threads would only contend with the request pool
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry, settings.latency_target_s)
    server, _ = start_http_server(settings.metrics_port, settings.metrics_addr, registry=registry)
    print(f"metrics on http://{settings.metrics_addr}:{server.server_port}/metrics", flush=True)
    records = WorkerRecords(settings.worker_state) if settings.worker_state is not None else None
    served = ServedVersions(settings, metrics)
    stop = threading.Event()

    def refresh_loop() -> None:
        while not stop.is_set():
            try:
                served.refresh()
                if records is not None:
                    records.catch_up()
            except Exception:
                logger.exception("refreshing the served version failed; serving the previous one")
            stop.wait(settings.refresh_interval_s)

    refresher = threading.Thread(target=refresh_loop, name="refresher", daemon=True)
    refresher.start()
    app = create_app(settings, served, metrics, records)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http="httptools",
        loop="uvloop",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        limit_concurrency=1000,
    )
    api = uvicorn.Server(config)

    def announce() -> None:
        while not api.started and refresher.is_alive():
            stop.wait(0.05)
        for s in api.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                print(f"serving on http://{host}:{port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    # uvicorn handles SIGTERM/SIGINT while it runs, then raises the signal again with the handler it found:
    # this one, so the process goes on to close its stores and exits 0 instead of dying of the signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda n, _f: logger.info("received %s: stopped", signal.Signals(n).name))
    try:
        api.run()  # handles SIGTERM / SIGINT: stops accepting, drains, returns
    finally:
        stop.set()
        refresher.join(10)
        served.close()
        if records is not None:
            records.close()
        server.shutdown()
    logger.info("stopped")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from(args)
    except (SettingsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(settings)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
