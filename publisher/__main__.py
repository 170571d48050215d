"""``python -m publisher``: periodic publishes to the KV store, a synthetic driver, a fan-out replica, inspection.

  run --source worker           publish the streaming worker's state (--worker-state, --models; read as a
                                RocksDB secondary, beside the running worker)
  run --source changelog        publish a scaled-out worker group: follow its user-state, item-rows and items
                                topics into --mirror-state, one mirror step per publish (--models)
  run --source MODULE:FACTORY   publish from a ChangeSource built by FACTORY(settings)
  simulate                      publish from synthetic users whose vectors random-walk (event time = now)
  replica                       materialise the fan-out topic into a local store
  inspect                       print a store's meta (read through a secondary instance)

SIGTERM or Ctrl-C stops after the publish in progress; a SIGKILL at any moment leaves the last
complete version readable and the next start continues from it. Metrics are served on
``--metrics-port`` (default 9102; 0 picks a free port, printed on start).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server

from publisher.fanout import Fanout, Replica
from publisher.publish import Publisher
from publisher.settings import PublisherSettings
from publisher.source import ChangeSource, MemorySource, RandomWalk
from publisher.store import RocksSecondary, RocksStore
from streaming.lifecycle import ProcessGuard, run_main, setup_logging
from streaming.settings import KafkaSettings, load_settings

if TYPE_CHECKING:  # imported when used: it brings torch and the model, which the other commands do not need
    from publisher.changelog_source import ChangelogSource
    from publisher.worker_source import WorkerSource

__all__ = ["build_parser", "main"]

logger = logging.getLogger("publisher")


def _settings(args: argparse.Namespace) -> PublisherSettings:
    overrides: dict[str, Any] = {
        "store_path": args.store,
        "interval_s": getattr(args, "interval", None),
        "metrics_port": getattr(args, "metrics_port", None),
        "index_kind": getattr(args, "index", None),
        "fanout": True if getattr(args, "fanout", False) else None,
    }
    return load_settings(PublisherSettings, section="publisher", config=args.config, overrides=overrides)


def _kafka(args: argparse.Namespace) -> KafkaSettings:
    overrides = {"bootstrap_servers": args.bootstrap, "topic_prefix": args.topic_prefix}
    return load_settings(KafkaSettings, section="kafka", config=args.config, overrides=overrides)


def _guard(name: str) -> ProcessGuard:
    """SIGTERM/SIGINT stop the process after its current cycle, and within seconds even when a cycle hangs."""
    return ProcessGuard(name).install()


def _serve_metrics(registry: CollectorRegistry, settings: PublisherSettings) -> Any:
    server, _ = start_http_server(settings.metrics_port, settings.metrics_addr, registry=registry)
    print(f"metrics on http://{settings.metrics_addr}:{server.server_port}/metrics", flush=True)
    return server


def _publish(args: argparse.Namespace, source: ChangeSource, guard: ProcessGuard) -> int:
    settings = _settings(args)
    registry = CollectorRegistry()
    server = _serve_metrics(registry, settings)
    fanout = Fanout(_kafka(args), topic=settings.fanout_topic) if settings.fanout else None
    store = RocksStore(settings.store_path, sync=settings.sync_writes, changelog_versions=settings.changelog_versions)
    try:
        publisher = Publisher(store, source, settings, fanout=fanout, registry=registry)
        logger.info("publishing to %s every %g s", settings.store_path, settings.interval_s)
        publisher.run(guard.stop)
    finally:
        guard.done()
        if fanout is not None:
            fanout.close()
        store.close()
        server.shutdown()
    logger.info("stopped")
    return 0


def _worker_source(args: argparse.Namespace) -> WorkerSource:
    """A :class:`WorkerSource` where the worker's own settings (``[worker]``, ``FRESHTOWER_*``) put its state.

    Reading the worker's section rather than copies of it in ``[publisher]`` keeps the two processes
    agreeing on the state directory and on how many checkpoints of change log the worker keeps.
    """
    from publisher.worker_source import WorkerSource
    from streaming.worker_settings import WorkerSettings

    worker = load_settings(
        WorkerSettings,
        section="worker",
        config=args.config,
        overrides={"state_dir": args.worker_state, "models_dir": args.models},
    )
    logger.info("publishing the worker state at %s (models in %s)", worker.state_dir, worker.models_dir)
    return WorkerSource(worker.state_dir, worker.models_dir, change_log_checkpoints=worker.change_log_checkpoints)


def _changelog_source(args: argparse.Namespace) -> ChangelogSource:
    """A :class:`ChangelogSource` mirroring the group's topics into ``--mirror-state``, models where the workers'
    settings put them (``[worker]`` ``models_dir``, or ``--models``)."""
    from publisher.changelog_source import ChangelogMirror, ChangelogSource
    from streaming.worker_settings import WorkerSettings

    if args.mirror_state is None:
        raise SystemExit("--source changelog needs --mirror-state (the mirror's RocksDB directory)")
    worker = load_settings(WorkerSettings, section="worker", config=args.config, overrides={"models_dir": args.models})
    kafka = _kafka(args)
    logger.info(
        "mirroring %s* into %s and publishing it (models in %s)",
        kafka.topic_prefix,
        args.mirror_state,
        worker.models_dir,
    )
    mirror = ChangelogMirror(kafka, args.mirror_state, models_dir=worker.models_dir)
    try:
        return ChangelogSource(mirror, worker.models_dir)
    except BaseException:
        mirror.close()
        raise


def cmd_run(args: argparse.Namespace) -> int:
    if args.source in ("worker", "changelog"):
        if args.source == "worker" and args.mirror_state is not None:
            raise SystemExit("--mirror-state applies only to --source changelog")
        if args.source == "changelog" and args.worker_state is not None:
            raise SystemExit("--worker-state applies only to --source worker")
        source = _worker_source(args) if args.source == "worker" else _changelog_source(args)
        try:
            return _publish(args, source, _guard("publisher"))
        finally:
            source.close()
    if args.worker_state is not None or args.models is not None or args.mirror_state is not None:
        raise SystemExit("--worker-state, --mirror-state and --models apply only to --source worker or changelog")
    module, _, name = args.source.partition(":")
    if not name:
        raise SystemExit(f"--source: expected 'worker', 'changelog' or MODULE:FACTORY, got {args.source!r}")
    factory = getattr(importlib.import_module(module), name)
    return _publish(args, factory(_settings(args)), _guard("publisher"))


def cmd_simulate(args: argparse.Namespace) -> int:
    guard = _guard("publisher")
    stop = guard.stop
    source = MemorySource(model_version=args.model_version)
    walk = RandomWalk(source, users=args.users, items=args.items, dim=args.dim, seed=args.seed)
    driver = threading.Thread(
        target=walk.run, args=(stop, args.updates_per_s, args.new_items_per_s), name="random-walk", daemon=True
    )
    driver.start()
    if args.duration:
        timer = threading.Timer(args.duration, stop.set)
        timer.daemon = True  # a SIGTERM before the duration must not wait for it
        timer.start()
    try:
        return _publish(args, source, guard)
    finally:
        stop.set()
        driver.join()


def cmd_replica(args: argparse.Namespace) -> int:
    guard = _guard("replica")
    settings = _settings(args)
    store = RocksStore(settings.store_path, sync=settings.sync_writes, changelog_versions=settings.changelog_versions)
    replica = Replica(_kafka(args), store, topic=settings.fanout_topic)
    try:
        replica.run(guard.stop)
    finally:
        guard.done()
        replica.close()
        store.close()
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    with RocksSecondary(args.store) as store, store.reader() as view:
        meta = view.meta()
        out: dict[str, Any] = {"meta": asdict(meta) if meta else None, "fanout_progress": view.progress("fanout")}
        if meta is not None:
            out["freshness_s"] = round(time.time() - meta.watermark_ms / 1000.0, 3)
        for user_id in args.user:
            row = view.user(user_id)
            out.setdefault("users", {})[user_id] = (
                {"version": row.version, "vector": row.vector.tolist(), "last_n": list(row.last_n)} if row else None
            )
        for item_id in args.item:
            item = view.item(item_id)
            out.setdefault("items", {})[item_id] = (
                {"version": item.version, "vector": item.vector.tolist()} if item else None
            )
    print(json.dumps(out, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m publisher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, publishing: bool = True) -> None:
        p.add_argument(
            "--config",
            type=Path,
            help="TOML file with [publisher] and [kafka] tables ([worker] for --source worker or changelog)",
        )
        p.add_argument("--store", type=Path, help="RocksDB directory (setting store_path)")
        p.add_argument("--bootstrap", help="Kafka bootstrap servers (fan-out, --source changelog)")
        p.add_argument("--topic-prefix", help="Kafka topic prefix (fan-out, --source changelog)")
        if publishing:
            p.add_argument("--interval", type=float, help="seconds between publishes, 1 to 86400")
            p.add_argument("--metrics-port", type=int, help="port of /metrics (0 = any free port)")
            p.add_argument("--index", choices=["flat", "hnsw", "ivf", "none"], help="item index kind")
            p.add_argument("--fanout", action="store_true", help="also write each version to the fan-out topic")

    run = sub.add_parser("run", help="publish the streaming worker's state, or any ChangeSource")
    common(run)
    run.add_argument(
        "--source",
        required=True,
        help="'worker' (the streaming worker's state), 'changelog' (a worker group's topics, mirrored), or "
        "MODULE:FACTORY with FACTORY(PublisherSettings) -> ChangeSource",
    )
    run.add_argument("--worker-state", type=Path, help="--source worker: the worker's state directory (its state_dir)")
    run.add_argument(
        "--mirror-state", type=Path, help="--source changelog: the mirror's RocksDB directory (a worker-shaped state)"
    )
    run.add_argument(
        "--models", type=Path, help="--source worker or changelog: the model registry (the workers' models_dir)"
    )
    run.set_defaults(run=cmd_run)

    sim = sub.add_parser("simulate", help="publish from random-walking synthetic users")
    common(sim)
    sim.add_argument("--users", type=int, default=10_000)
    sim.add_argument("--items", type=int, default=5_000)
    sim.add_argument("--dim", type=int, default=32)
    sim.add_argument("--updates-per-s", type=float, default=500.0, help="user vector updates per second")
    sim.add_argument("--new-items-per-s", type=float, default=1.0, help="new catalogue items per second")
    sim.add_argument("--model-version", default="sim-0")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = until SIGTERM)")
    sim.set_defaults(run=cmd_simulate)

    rep = sub.add_parser("replica", help="materialise the fan-out topic into a local store")
    common(rep, publishing=False)
    rep.set_defaults(run=cmd_replica)

    ins = sub.add_parser("inspect", help="print a store's meta and some rows")
    ins.add_argument("--store", type=Path, required=True)
    ins.add_argument("--user", action="append", default=[], help="also print this user's row (repeatable)")
    ins.add_argument("--item", action="append", default=[], help="also print this item's row (repeatable)")
    ins.set_defaults(run=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level.upper())
    return run_main(f"publisher {args.command}", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
