"""Helpers for the streaming-worker tests: a registered model version and a produced stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streaming.archive_sink import ArchiveSink
from streaming.events import Event
from streaming.item_rows import MODEL_HEADER, RowsMirror
from streaming.producer import EventProducer
from streaming.settings import KafkaSettings
from streaming.sources.synthetic import SyntheticWorld, WorldConfig
from streaming.state import StateStore
from streaming.worker import Worker
from trainer.artifact import make_version, save_version
from trainer.dataset import Dataset
from trainer.features import FeatureEncoder
from trainer.model import ModelConfig, TwoTowerModel
from trainer.registry import Registry

WORLD = WorldConfig(seed=3, n_users=400, n_items=500, days=2.0, requests_per_day=4000, new_items_per_day=100)


def split_world(config: WorldConfig = WORLD) -> tuple[SyntheticWorld, list[Event], list[Event]]:
    """Day one (what the full model saw) and day two (the stream)."""
    world = SyntheticWorld(config)
    events = list(world.events())
    cut = config.start_ms + 86_400_000
    return world, [e for e in events if e.ts_ms < cut], [e for e in events if e.ts_ms >= cut]


def register_model(root: Path, day_one: list[Event]) -> Registry:
    """A promoted (untrained) model version whose vocabularies come from day one."""
    dataset = Dataset.from_events(day_one)
    encoder = FeatureEncoder.fit(dataset)
    model = TwoTowerModel(encoder, ModelConfig(dim=16, id_dim=16, embedding_dim=8, hidden=(32,)))
    registry = Registry(root)
    cutoff = int(dataset.clicks.ts_ms.max())
    version = make_version(
        model, encoder, dataset.items, version_id="v1", parent=None, data_range=(0, cutoff + 1), data_cutoff_ms=cutoff
    )
    with registry.new_version("v1") as staging:
        save_version(staging, version)
    registry.promote("v1")
    return registry


def promote_second_version(registry: Registry, events: list, cutoff_ms: int) -> None:
    """v2: vocabularies from ``events`` (day one and the morning of day two), a different initialisation."""
    dataset = Dataset.from_events(events)
    encoder = FeatureEncoder.fit(dataset)
    model = TwoTowerModel(encoder, ModelConfig(dim=16, id_dim=16, embedding_dim=8, hidden=(32,), seed=1))
    version = make_version(
        model, encoder, dataset.items, version_id="v2", parent="v1", data_range=(0, cutoff_ms), data_cutoff_ms=cutoff_ms
    )
    with registry.new_version("v2") as staging:
        save_version(staging, version)
    registry.promote("v2")


def produce(settings: KafkaSettings, events: list[Event]) -> None:
    with EventProducer(settings) as producer:
        producer.send_all(events)


def produce_raw(settings: KafkaSettings, records: list[tuple[str, bytes, bytes]]) -> None:
    """``(topic kind, key, value)`` records sent as they are, past the producer's validation (malformed input)."""
    raw = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    for kind, key, value in records:
        raw.send(settings.topic(kind), key=key, value=value)
    raw.close()


def committed_records(settings: KafkaSettings, topic: str, timeout_s: float = 60.0) -> list:
    """Every record of ``topic`` a read-committed reader sees once no transaction is open there (read to the high
    watermark, not to the last stable offset); each partition's records in offset order."""
    hw_reader = KafkaConsumer(group_id=None, **settings.client_config())
    reader = KafkaConsumer(group_id=None, isolation_level="read_committed", **settings.client_config())
    tps = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic))]
    reader.assign(tps)
    reader.seek_to_beginning(*tps)
    end = hw_reader.end_offsets(tps)
    records = []
    deadline = time.monotonic() + timeout_s
    while any(reader.position(tp) < end[tp] for tp in tps):
        assert time.monotonic() < deadline, f"a transaction on {topic} did not end"
        for batch in reader.poll(timeout_ms=500).values():
            records += batch
    reader.close()
    hw_reader.close()
    return records


def committed_item_rows(
    settings: KafkaSettings, timeout_s: float = 60.0, model_version: str = "v1"
) -> tuple[RowsMirror, dict[bytes, bytes | None]]:
    """``item-rows`` as a read-committed reader sees it once no transaction is open: the mirror and the last value
    of every key."""
    mirror, last = RowsMirror(model_version), {}
    for r in committed_records(settings, settings.topic("item-rows"), timeout_s):
        mirror.apply(r.key, r.value, dict(r.headers)[MODEL_HEADER].decode())
        last[r.key] = r.value
    return mirror, last


def read_state(path: Path) -> dict[str, object]:
    """Everything a worker made durable, decoded for comparison."""
    store = StateStore(path)
    try:
        rows = {k.decode(): np.frombuffer(v, dtype=np.float32, offset=20).copy() for k, v in store.scan(b"t:")}
        counts = {k.decode(): v for prefix in (b"c:", b"e:", b"n:", b"p:") for k, v in store.scan(prefix)}
        return {"rows": rows, "counts": counts, "offsets": store.offsets(), "meta": store.meta()}
    finally:
        store.close()


def run_to_idle(process: Worker | ArchiveSink, idle_s: float = 1.5, timeout_s: float = 120) -> None:
    """Run a worker or an archive sink until it has taken everything in Kafka and stayed idle for ``idle_s``."""
    stop = threading.Event()
    timer = threading.Timer(timeout_s, stop.set)  # a safety net: the test then fails on its assertions
    timer.start()
    try:
        process.run(stop, exit_when_idle_s=idle_s)
    finally:
        timer.cancel()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)
