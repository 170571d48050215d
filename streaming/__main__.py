"""``python -m streaming``: topics, event sources replayed into Kafka, and a validating consumer."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from streaming.archive_sink import add_arguments as add_archive_arguments
from streaming.consumer import EventConsumer
from streaming.events import Event
from streaming.lifecycle import run_main, setup_logging
from streaming.producer import EventProducer
from streaming.replay import replay
from streaming.settings import KafkaSettings, load_settings
from streaming.topics import EVENT_TOPICS, ensure_topics

logger = logging.getLogger("streaming")


def _settings(args: argparse.Namespace) -> KafkaSettings:
    return load_settings(
        KafkaSettings,
        section="kafka",
        config=args.config,
        overrides={"bootstrap_servers": args.bootstrap, "topic_prefix": args.topic_prefix},
    )


def _source(args: argparse.Namespace) -> tuple[Iterator[Event], int | None]:
    """The chosen source's events and, when known, how many there will be."""
    if args.source == "movielens":
        from streaming.sources.movielens import MovieLens100K, fetch

        data = MovieLens100K(fetch(args.data_dir))
        events = data.events(min_rating=args.min_rating)
        return events, args.limit
    from streaming.sources.synthetic import SyntheticWorld, WorldConfig

    world = SyntheticWorld(WorldConfig(seed=args.seed, n_users=args.users, n_items=args.items, days=args.days))
    return world.events(limit=args.limit), args.limit


def _iso_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def cmd_topics(args: argparse.Namespace) -> int:
    for name in ensure_topics(_settings(args)):
        print(name)
    return 0


def cmd_fetch_movielens(args: argparse.Namespace) -> int:
    from streaming.sources.movielens import fetch

    print(fetch(args.data_dir))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    settings = _settings(args)
    ensure_topics(settings)
    events, total = _source(args)
    with EventProducer(settings) as producer:
        stats = replay(events, producer, rate=args.rate, total=total, description=f"replay {args.source}")
    print(f"sent {stats.sent} events ({dict(stats.by_type)}) in {stats.seconds:.1f} s, {stats.rate:,.0f} events/s")
    return 0


def consume_until_idle(
    settings: KafkaSettings, group: str, idle_s: float, expected: int | None = None
) -> tuple[Counter[str], dict[str, set[int]], int]:
    """Consume every event topic until nothing arrives for ``idle_s`` (or ``expected`` events came).

    Returns events per type, the partitions each user's records arrived on, and the dead letters.
    """
    per_type: Counter[str] = Counter()
    user_partitions: dict[str, set[int]] = {}
    with (
        EventConsumer(settings, group, list(EVENT_TOPICS.values())) as consumer,
        tqdm(total=expected, desc="consume", unit="ev", mininterval=0.5) as bar,
    ):
        last = time.monotonic()
        while time.monotonic() - last < idle_s and (expected is None or sum(per_type.values()) < expected):
            received = consumer.poll(timeout_ms=500)
            if received:
                last = time.monotonic()
            for r in received:
                per_type[r.event.TYPE] += 1
                if r.event.TYPE != "item":
                    user_partitions.setdefault(r.event.user_id, set()).add(r.partition)
            bar.update(len(received))
            consumer.commit()
        dead = sum(consumer.stats.dead_letters.values())
    return per_type, user_partitions, dead


def cmd_consume(args: argparse.Namespace) -> int:
    settings = _settings(args)
    per_type, user_partitions, dead = consume_until_idle(settings, args.group, args.idle)
    split = sum(1 for parts in user_partitions.values() if len(parts) > 1)
    print(
        f"consumed {sum(per_type.values())} events {dict(per_type)}; dead letters: {dead}; "
        f"users: {len(user_partitions)}, users on more than one partition: {split}"
    )
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    """Archive every event topic into daily Parquet partitions, exactly once, until SIGTERM/SIGINT (or idle)."""
    from streaming.archive_sink import run_sink

    return run_sink(args, _settings(args))


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the incremental learner until SIGTERM/SIGINT (or until the stream stays idle)."""
    from prometheus_client import start_http_server

    from streaming.lifecycle import ProcessGuard
    from streaming.worker import Worker, WorkerSettings
    from trainer.artifact import load_version
    from trainer.registry import Registry

    kafka = _settings(args)
    settings = load_settings(
        WorkerSettings,
        section="worker",
        config=args.config,
        overrides={
            "state_dir": args.state_dir,
            "models_dir": args.models,
            "group_id": args.group,
            "batch_size": args.batch_size,
            "metrics_port": args.metrics_port,
            "metrics_addr": args.metrics_addr,
            "instance_id": args.instance_id,
            "user_state": args.user_state,
            "item_rows": args.item_rows or ("owner" if args.user_state == "changelog" else None),
            "own_items": args.own_items,
        },
    )
    registry = Registry(settings.models_dir)
    current = registry.current()
    if current is None:
        print(f"no promoted model in {settings.models_dir}: run `python -m trainer full` first", file=sys.stderr)
        return 2
    version = load_version(registry.path(current))
    ensure_topics(kafka)
    if settings.item_rows == "owner":
        from streaming.topics import ITEM_PATH_TOPICS, SCALE_OUT_TOPICS

        ensure_topics(kafka, names=SCALE_OUT_TOPICS if settings.user_state == "changelog" else ITEM_PATH_TOPICS)
    worker = Worker(kafka, settings, version, registry=registry)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_addr, registry=worker.metrics.registry)
    guard = ProcessGuard("worker", stall_s=settings.stall_timeout_s).install()
    owner = _owner_role(kafka, settings, registry, worker.metrics.registry, guard.stop) if settings.own_items else None
    try:
        worker.run(guard.stop, exit_when_idle_s=args.exit_when_idle, beat=guard.beat)
        if owner is not None and args.exit_when_idle is not None and not guard.stop.is_set():
            owner.drain(args.exit_when_idle)  # the gradients this worker sent last are applied before it exits
    finally:
        if owner is not None:
            owner.close()
        guard.done()
    print(json.dumps(worker.summary(), sort_keys=True))
    return 70 if owner is not None and owner.failed else 0  # 70: EX_SOFTWARE, for the supervisor to restart it


def _owner_role(kafka, settings, registry, metrics_registry, stop):
    """The item-owner role of a worker process (``--own-items``, :mod:`streaming.owner_role`): member name and
    metrics of the worker, scratch state beside its own (one directory per life)."""
    from streaming.item_owner import ItemOwner, OwnerSettings
    from streaming.metrics import OwnerMetrics
    from streaming.owner_role import OwnerRole
    from trainer.artifact import load_version

    metrics = OwnerMetrics(metrics_registry)
    base = settings.state_dir.with_name(settings.state_dir.name + "-item-owner")

    def make(life: int, previous: ItemOwner | None) -> ItemOwner:
        owner_settings = OwnerSettings(
            state_dir=base if life == 0 else base.with_name(f"{base.name}-{life}"),
            group_id=f"{settings.group_id}-item-owner",
            instance_id=settings.member_id(),
            table=settings.learner().item_table,
            session_timeout_ms=settings.session_timeout_ms,
            stall_s=settings.owner_stall_s,
        )
        version = registry.current() if previous is None else previous.model_version  # a new life: where the last was
        owner = ItemOwner(
            kafka, owner_settings, load_version(registry.path(version)), metrics=metrics, registry=registry
        )
        logger.info("running the item-owner role as member %s (life %d)", owner_settings.instance_id, life)
        return owner

    return OwnerRole(make, stop, settings.owner_stall_s)


def cmd_item_owner(args: argparse.Namespace) -> int:
    """Own item-ID rows for a scaled-out worker group until SIGTERM/SIGINT (or until idle); see streaming.item_owner."""
    from streaming.item_owner import ItemOwner, OwnerSettings
    from streaming.lifecycle import ProcessGuard
    from streaming.tables import TableSettings
    from streaming.topics import ITEM_PATH_TOPICS
    from trainer.artifact import load_version
    from trainer.registry import Registry

    kafka = _settings(args)
    registry = Registry(args.models)
    current = registry.current()
    if current is None:
        print(f"no promoted model in {args.models}: run `python -m trainer full` first", file=sys.stderr)
        return 2
    ensure_topics(kafka, names=ITEM_PATH_TOPICS)
    given = {k: v for k, v in vars(args).items() if v is not None}
    table = TableSettings(**{k: given[k] for k in ("min_count", "lr") if k in given})
    fields = ("state_dir", "group_id", "instance_id", "session_timeout_ms", "transaction_timeout_ms", "stall_s")
    settings = OwnerSettings(table=table, **{k: given[k] for k in fields if k in given})
    owner = ItemOwner(kafka, settings, load_version(registry.path(current)), registry=registry)
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_addr, registry=owner.metrics.registry)
    guard = ProcessGuard("item-owner", stall_s=settings.stall_s).install()  # stuck: exit 69, for the supervisor
    try:
        owner.run(guard.stop, exit_when_idle_s=args.exit_when_idle, beat=guard.beat)
    finally:
        guard.done()
    print(json.dumps({**dataclasses.asdict(owner.stats), "owned": sorted(owner.owned)}, sort_keys=True))
    return 0


def cmd_compact_archive(args: argparse.Namespace) -> int:
    """Compact every archived day before ``--before`` (default today, UTC); one JSON line per day."""
    from streaming import archive

    before = args.before or dt.datetime.now(dt.UTC).date()
    chosen = [d for d in archive.days(args.archive) if d < before]
    totals = Counter()
    for day in tqdm(chosen, desc="compact", unit="day", disable=not sys.stderr.isatty()):
        result = archive.compact_day(args.archive, day)
        totals.update({k: v for k, v in dataclasses.asdict(result).items() if k != "day"})
        print(json.dumps({**dataclasses.asdict(result), "day": day.isoformat()}, sort_keys=True))
    logger.info("compacted %d days before %s: %s", len(chosen), before, dict(totals))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streaming",
        description="Kafka side of freshtower: create the event topics, replay event sources into them, "
        "and consume them with validation (bad records go to the dead-letter topic with their reason).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--bootstrap", help="Kafka bootstrap servers (default: FRESHTOWER_BOOTSTRAP_SERVERS or 127.0.0.1:9092)"
    )
    common.add_argument("--topic-prefix", help="prefix of every topic name (default: 'freshtower.')")
    common.add_argument("--config", help="TOML settings file; its [kafka] table is read (also FRESHTOWER_CONFIG)")
    source = argparse.ArgumentParser(add_help=False)
    source.add_argument("--source", choices=["synthetic", "movielens"], default="synthetic")
    source.add_argument("--rate", type=float, help="events per second (default: as fast as the broker takes them)")
    source.add_argument("--limit", type=int, help="stop after this many events")
    source.add_argument("--seed", type=int, default=0, help="synthetic world seed")
    source.add_argument("--users", type=int, default=2000, help="synthetic world users")
    source.add_argument("--items", type=int, default=3000, help="synthetic world items at the start")
    source.add_argument("--days", type=float, default=1.0, help="synthetic world days simulated")
    source.add_argument("--data-dir", type=Path, default=Path("data"), help="where MovieLens-100K is cached")
    source.add_argument("--min-rating", type=float, default=0.0, help="MovieLens ratings below this are not clicks")

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("topics", parents=[common], help="create the event and dead-letter topics (idempotent)")
    p.set_defaults(run=cmd_topics)
    p = sub.add_parser("fetch-movielens", help="download MovieLens-100K (from the RecBole wheel) into --data-dir")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.set_defaults(run=cmd_fetch_movielens)
    p = sub.add_parser("replay", parents=[common, source], help="replay an event source into Kafka")
    p.set_defaults(run=cmd_replay)
    p = sub.add_parser("consume", parents=[common], help="consume and validate every event topic until idle")
    p.add_argument("--group", default="freshtower-consume", help="consumer group id")
    p.add_argument("--idle", type=float, default=5.0, help="stop after this many seconds without a record")
    p.set_defaults(run=cmd_consume)
    p = sub.add_parser("worker", parents=[common], help="run the incremental learner (Kafka -> SGD on ID embeddings)")
    p.add_argument("--models", type=Path, help="model registry directory (default: artifacts/models)")
    p.add_argument("--state-dir", type=Path, help="the worker's RocksDB state (default: data/worker)")
    p.add_argument("--group", help="consumer group id (default: freshtower-worker)")
    p.add_argument("--batch-size", type=int, help="clicks per SGD step (default: 256)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on 127.0.0.1:PORT (0: off)")
    p.add_argument("--metrics-addr", help="address the /metrics server binds (default: 127.0.0.1)")
    p.add_argument("--exit-when-idle", type=float, help="exit after this many seconds with the stream fully applied")
    p.add_argument("--instance-id", help="static member name in the group (default: host name + state directory)")
    p.add_argument(
        "--user-state",
        choices=["local", "changelog"],
        help="'changelog': share the partitions with other workers; user state moves with its partition (scale-out; "
        "sets --item-rows owner). Default: FRESHTOWER_USER_STATE or local",
    )
    p.add_argument("--item-rows", choices=["local", "owner"], help="who steps item rows (default: local)")
    p.add_argument("--own-items", action="store_const", const=True, help="also run the item-owner role in this process")
    p.set_defaults(run=cmd_worker)
    p = sub.add_parser("item-owner", parents=[common], help="own item-ID rows of a scaled-out worker group")
    p.add_argument("--models", type=Path, default=Path("artifacts/models"), help="model registry directory")
    p.add_argument("--state-dir", type=Path, help="scratch RocksDB of the owned rows (default: data/item-owner)")
    p.add_argument("--group", dest="group_id", help="consumer group id of the owners (default: freshtower-item-owner)")
    p.add_argument("--instance-id", help="member name, the transactional id's suffix (default: random)")
    p.add_argument("--lr", type=float, help="row-wise Adagrad step (default: the worker's, 0.05)")
    p.add_argument("--min-count", type=int, help="admission count of ids the model does not know (default: 2)")
    p.add_argument("--session-timeout-ms", type=int, help="group session timeout (default: 15000)")
    p.add_argument("--transaction-timeout-ms", type=int, help="Kafka transaction timeout (default: 10000)")
    p.add_argument("--stall-s", type=float, help="exit (69) when the loop is stuck this long (default: 120; 0: off)")
    p.add_argument("--metrics-port", type=int, default=9105, help="serve Prometheus /metrics on PORT (0: off)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address the /metrics server binds")
    p.add_argument("--exit-when-idle", type=float, help="exit after this many seconds without a gradient")
    p.set_defaults(run=cmd_item_owner)
    p = sub.add_parser("archive", parents=[common], help="archive every event topic into daily Parquet partitions")
    add_archive_arguments(p)
    p.set_defaults(run=cmd_archive)
    p = sub.add_parser(
        "compact-archive",
        help="merge each closed day's archive files into one file per type (safe while the sink and readers run)",
    )
    p.add_argument("--archive", type=Path, default=Path("data/archive"), help="archive root (default data/archive)")
    p.add_argument(
        "--before",
        type=_iso_date,
        help="compact the days before this UTC date, YYYY-MM-DD (default: today)",
    )
    p.set_defaults(run=cmd_compact_archive)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_main(f"streaming {args.command}", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
