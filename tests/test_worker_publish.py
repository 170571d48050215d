"""The publisher over the streaming worker's state: real Kafka, real RocksDB, a real worker beside it.

What must hold: every changed user is published with the worker's effective ID row and last-N; a
new catalogue item is retrievable from the next publish on, with the item tower's vector on its
features; a later publish carries only what changed; a publisher reading while the worker
checkpoints publishes whole checkpoints, each equal to an independent replay of the stream up to
that checkpoint; a publisher that fell out of the change log republishes everything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from publisher.publish import Publisher
from publisher.settings import PublisherSettings
from publisher.store import RocksStore
from publisher.worker_source import WorkerCursor, WorkerSource
from streaming.events import Click, Impression, Item, UserProfile
from streaming.examples import ExampleBuilder, ExampleSettings
from streaming.learner import IncrementalLearner
from streaming.sources.synthetic import WorldConfig
from streaming.state import StateStore
from streaming.worker import Worker, WorkerSettings
from tests.worker_fixtures import produce, promote_second_version, register_model, run_to_idle, split_world
from trainer.artifact import ModelVersion, load_version
from trainer.registry import Registry

REPO = Path(__file__).resolve().parents[1]
WORLD = WorldConfig(seed=3, n_users=150, n_items=200, days=2.0, requests_per_day=600, new_items_per_day=20)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list, Path, ModelVersion]:
    """Day one (the model's data), day two (the stream), the registry and its promoted version ``v1``."""
    _, day_one, day_two = split_world(WORLD)
    models = tmp_path_factory.mktemp("models")
    registry = register_model(models, day_one)
    return day_one, day_two, models, load_version(registry.path("v1"))


def item_vectors(version: ModelVersion, ids: list[str], catalogue: dict, rows: np.ndarray) -> np.ndarray:
    """The serving vectors ``[n, dim]`` of ``ids`` with ID rows ``rows: [n, id_dim]``."""
    with torch.no_grad():
        batch = version.encoder.encode_items(ids, catalogue)
        return version.model.item_tower(batch, id_rows=torch.from_numpy(rows)).numpy()


@pytest.mark.kafka
def test_publishes_effective_rows_and_new_items_then_only_what_changed(kafka_settings, tmp_path, world):
    day_one, day_two, models, version = world
    model, encoder = version.model, version.encoder
    # The compacted catalogue topic holds day one's records too; the stream is day two, after the model's data
    # cutoff, with every user's profile restated in it.
    cutoff = version.data_cutoff_ms
    catalogue = [e for e in day_one if isinstance(e, Item)]
    profiles = [e for e in day_one if isinstance(e, UserProfile)]
    records = [*catalogue, *(dataclasses.replace(p, ts_ms=cutoff + 1 + k) for k, p in enumerate(profiles))]
    template = catalogue[0]
    fresh = Item("fresh-1", template.category, template.tags, dict(template.stats), cutoff + 60_000, cutoff + 60_000)
    # A user the model never saw, clicking once: below admission (min_count=2), so no online row.
    newcomer = Click("newcomer", template.item_id, "r-newcomer", day_two[-1].ts_ms + 1)
    events = [*records, *day_two, fresh, newcomer]
    produce(kafka_settings, events)
    state_dir = tmp_path / "state"
    settings = WorkerSettings(
        state_dir=state_dir, models_dir=models, group_id=f"w-{uuid.uuid4().hex[:8]}", batch_size=32, sync=False
    )
    worker = Worker(kafka_settings, settings, version)
    run_to_idle(worker)
    assert worker.builder.watermark_ms == newcomer.ts_ms  # the newest event applied

    pub_settings = PublisherSettings(store_path=tmp_path / "kv", interval_s=1.0, index_kind="flat")
    with WorkerSource(state_dir, models) as source, RocksStore(pub_settings.store_path, sync=False) as store:
        publisher = Publisher(store, source, pub_settings)
        first = publisher.publish_once().meta
        # Every user with a click has a last-N (and the online rows are all of clicking users); every catalogue
        # record and every clicked item with an online row is an item row.
        users = dict(worker.builder.last_n)
        clicked = {e.item_id for e in events if isinstance(e, Click)}
        # (The worker has closed its state; its catalogue is what the stream sent, newest record per item.)
        described = {e.item_id: e for e in sorted((e for e in events if isinstance(e, Item)), key=lambda e: e.ts_ms)}
        items = set(described) | {i for i in clicked if i in worker.learner.items}
        assert (first.version, first.users, first.items) == (1, len(users), len(items))
        assert (first.watermark_ms, first.model_version) == (newcomer.ts_ms, "v1")
        assert WorkerCursor.parse(first.cursor).checkpoint == worker.checkpoints
        with store.reader() as view:
            for user_id, last_n in users.items():
                row = view.user(user_id)
                np.testing.assert_array_equal(row.vector, worker.learner.users.row(user_id))
                assert row.last_n == tuple(last_n)
            assert "newcomer" not in worker.learner.users
            np.testing.assert_array_equal(
                view.user("newcomer").vector, model.user_tower.id_table.weight[0].detach().numpy()
            )
            assert view.user("newcomer").last_n == (template.item_id,)

            # The new item was never clicked and the model does not know it: its vector is the item tower on
            # its features alone (ID row 0), computed here through the model's own lookup.
            with torch.no_grad():
                expected = model.item_vectors(encoder.encode_items(["fresh-1"], {"fresh-1": fresh}))[0].numpy()
            np.testing.assert_allclose(view.item("fresh-1").vector, expected, rtol=0, atol=1e-6)

            # A clicked item is served with its trained online row, which moved it away from the model's vector.
            known = set(encoder.item_vocab.tokens)
            hot, _ = Counter(e.item_id for e in events if isinstance(e, Click) and e.item_id in known).most_common(1)[0]
            features = described
            online = item_vectors(version, [hot], features, worker.learner.items.row(hot)[None])[0]
            np.testing.assert_allclose(view.item(hot).vector, online, rtol=0, atol=1e-6)
            with torch.no_grad():
                frozen = model.item_vectors(encoder.encode_items([hot], features))[0].numpy()  # the model's own row
            assert np.abs(online - frozen).max() > 1e-4
        ids, scores = publisher.index.search(expected, 1)
        assert ids == [["fresh-1"]] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)

        # More events: four users click (three known, the newcomer again, now admitted) on three known items,
        # and another item is created. Only those are published next.
        start = newcomer.ts_ms + 1000
        clickers = [*encoder.user_vocab.tokens[:3], "newcomer"]
        targets = sorted(clicked & known)[:3]
        fresh2 = dataclasses.replace(fresh, item_id="fresh-2", category="c0", ts_ms=start)
        more = [fresh2] + [Click(u, targets[k % 3], f"r2-{k}", start + 10 + k) for k, u in enumerate(clickers)]
        produce(kafka_settings, more)
        worker = Worker(kafka_settings, settings, version)
        run_to_idle(worker)
        second = publisher.publish_once().meta
        # 4 users (last-N and row changed); 3 clicked items (rows trained) + fresh-2; the last click at start + 13.
        assert (second.version, second.users, second.items) == (2, 4, 4)
        assert second.watermark_ms == start + 13
        assert WorkerCursor.parse(second.cursor).checkpoint == worker.checkpoints
        with store.reader() as view:
            delta = view.changes_since(1)
            assert set(delta.users) == set(clickers) and set(delta.items) == {*targets, "fresh-2"}
            for user_id in clickers:
                np.testing.assert_array_equal(delta.users[user_id].vector, worker.learner.users.row(user_id))
                assert delta.users[user_id].last_n == tuple(worker.builder.last_n[user_id])
            assert "newcomer" in worker.learner.users
            everything = view.changes_since(0)
        assert "fresh-2" in publisher.index

    # The same state through the command line, into a fresh store: a first publish carries every row.
    cli_store = tmp_path / "cli"
    cmd = [sys.executable, "-m", "publisher", "run", "--source", "worker", "--worker-state", str(state_dir)]
    cmd += ["--models", str(models), "--store", str(cli_store), "--interval", "1", "--metrics-port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--index", "none"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    published = threading.Event()

    def follow() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "published version 1" in line:
                published.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    published.wait(timeout=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0 and published.is_set(), "".join(lines)
    reader.join(timeout=5)
    with RocksStore(cli_store) as store, store.reader() as view:
        meta = view.meta()
        assert (meta.version, meta.cursor, meta.watermark_ms) == (1, second.cursor, second.watermark_ms)
        assert (meta.users, meta.items) == (len(everything.users), len(everything.items))
        for user_id, row in everything.users.items():
            np.testing.assert_array_equal(view.user(user_id).vector, row.vector)
            assert view.user(user_id).last_n == row.last_n
        for item_id, row in everything.items.items():
            np.testing.assert_allclose(view.item(item_id).vector, row.vector, rtol=0, atol=1e-6)


@dataclasses.dataclass
class Published:
    """What one version held: the worker checkpoint and watermark it names, and the rows it wrote."""

    version: int
    checkpoint: int
    watermark_ms: int
    users: dict[str, tuple[np.ndarray, tuple[str, ...]]]
    items: dict[str, np.ndarray]


@pytest.mark.kafka
def test_a_publisher_beside_the_running_worker_publishes_whole_checkpoints(kafka_settings, tmp_path, world, caplog):
    day_one, _, models, version = world
    model, encoder = version.model, version.encoder
    # A hand-made stream with distinct event times: the worker applies events in event-time order, so a
    # checkpoint with watermark W holds exactly the clicks with ts <= W, and nothing after.
    catalogue = [e for e in day_one if isinstance(e, Item)][:80]
    start = version.data_cutoff_ms + 3_600_000
    catalogue = [dataclasses.replace(item, ts_ms=start + j) for j, item in enumerate(catalogue)]
    users = list(encoder.user_vocab.tokens[:120])
    profiles = [UserProfile(u, ts_ms=start + 100 + j) for j, u in enumerate(users)]
    rng = np.random.default_rng(7)
    times = (start + 10_000 + rng.integers(2, 7, size=3000).cumsum()).tolist()
    picks_u, picks_i = rng.integers(0, len(users), size=len(times)), rng.integers(0, len(catalogue), size=len(times))
    clicks = [
        Click(users[u], catalogue[i].item_id, f"r{k}", t + 1)
        for k, (u, i, t) in enumerate(zip(picks_u.tolist(), picks_i.tolist(), times, strict=True))
    ]
    # Each click follows its impression by 1 ms; every topic partition gets records.
    stream = [*catalogue, *profiles]
    for click in clicks:
        stream += [Impression(click.user_id, click.item_id, click.request_id, 0, click.ts_ms - 1), click]
    produce(kafka_settings, stream)

    state_dir = tmp_path / "state"
    batch = 8
    settings = WorkerSettings(
        state_dir=state_dir,
        models_dir=models,
        group_id=f"w-{uuid.uuid4().hex[:8]}",
        batch_size=batch,
        checkpoint_interval_s=0.05,
        sync=False,
    )
    worker = Worker(kafka_settings, settings, version)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            run_to_idle(worker)
        except BaseException as exc:  # surfaced by the assertion after join()
            errors.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()

    published: list[Published] = []
    pub_settings = PublisherSettings(store_path=tmp_path / "kv", interval_s=1.0, index_kind="none")
    with (
        WorkerSource(state_dir, models) as source,
        RocksStore(pub_settings.store_path, sync=False) as store,
        caplog.at_level(logging.INFO, logger="publisher.worker_source"),
    ):
        publisher = Publisher(store, source, pub_settings)
        while worker.checkpoints < 2 and thread.is_alive():
            time.sleep(0.01)  # checkpoint 1 is durable once the worker counts 2
        running = True
        while running:
            running = thread.is_alive()  # one more publish after the worker stopped: its final state
            meta = publisher.publish_once().meta
            if meta is not None:
                with store.reader() as view:
                    delta = view.changes_since(meta.version - 1)
                published.append(
                    Published(
                        meta.version,
                        WorkerCursor.parse(meta.cursor).checkpoint,
                        meta.watermark_ms,
                        {u: (r.vector.copy(), r.last_n) for u, r in delta.users.items()},
                        {i: r.vector.copy() for i, r in delta.items.items()},
                    )
                )
            time.sleep(0.03)
        thread.join()
        assert not errors, errors
        final = published[-1]  # idle checkpoints after it changed nothing, so wrote no version
        assert final.watermark_ms == clicks[-1].ts_ms and final.checkpoint <= worker.checkpoints

        # The reference: the same stream replayed through the same example builder and learner, batch by batch.
        reference = StateStore(tmp_path / "reference")
        builder = ExampleBuilder(ExampleSettings(settings.last_n, settings.join_window_ms), reference)
        learner = IncrementalLearner(model, encoder, builder, settings.learner(), reference)
        examples = [x for x in (builder.add(e) for e in stream) if x is not None]
        click_times = np.array([c.ts_ms for c in clicks])
        # Every version but the last was written while clicks were still arriving (the last one holds the idle
        # flush of the final partial batch); all but the first came from the change log.
        intermediate = published[:-1]
        assert len(intermediate) >= 3, [(p.checkpoint, p.watermark_ms) for p in published]
        assert caplog.text.count("republishing every row") == 1 and "first publish" in caplog.text
        trained, discriminating = 0, 0
        previous_lists: dict[str, tuple[str, ...]] = {}
        previous_batches = 0
        for p in intermediate:
            applied = int((click_times <= p.watermark_ms).sum())
            batches = applied // batch  # a full batch is trained as it fills; the rest waits in `pending`
            while trained < batches:
                learner.learn_batch(examples[trained * batch : (trained + 1) * batch])
                trained += 1
            lists = {u: tuple(c.item_id for c in clicks[:applied] if c.user_id == u)[-settings.last_n :] for u in users}
            # Nothing skipped: every user whose last-N moved and every row trained since the previous version.
            moved = {u for u in users if lists[u] != previous_lists.get(u, ())}
            touched = examples[previous_batches * batch : batches * batch]
            assert moved | {x.user_id for x in touched} <= set(p.users), p.version
            assert {x.item_id for x in touched} <= set(p.items), p.version
            # Nothing torn: every published row is the replay's row at exactly that checkpoint.
            for user_id, (vector, last_n) in p.users.items():
                assert last_n == lists[user_id], (p.version, user_id)
                np.testing.assert_allclose(vector, learner.users.row(user_id), rtol=0, atol=1e-5)
            ids = sorted(p.items)
            if ids:  # a checkpoint may move only last-N lists (clicks whose batch has not filled yet)
                rows = np.stack([learner.items.row(i) for i in ids])
                np.testing.assert_allclose(
                    np.stack([p.items[i] for i in ids]), item_vectors(version, ids, builder.catalogue, rows), atol=1e-5
                )
            # The check has teeth: some published user's row and last-N still move after this checkpoint.
            later = {c.user_id for c in clicks[applied:]}
            discriminating += any(
                u in later and np.abs(v - worker.learner.users.row(u)).max() > 1e-3 for u, (v, _) in p.users.items()
            )
            previous_lists, previous_batches = lists, batches
        assert discriminating >= 3
        # The last version is the worker's final state (its idle flush trained the last partial batch too).
        for user_id, (vector, last_n) in final.users.items():
            np.testing.assert_array_equal(vector, worker.learner.users.row(user_id))
            assert last_n == tuple(worker.builder.last_n[user_id])
        reference.close()

        # This secondary tailed the worker's log while it ran; after the worker closed (flushing its memtable
        # to a table file) it still reads the last checkpoint whole.
        last = WorkerCursor.parse(source.changes_since("").cursor)
        assert last.checkpoint == worker.checkpoints


def test_a_worker_closing_between_two_pulls_leaves_no_torn_read_and_idle_checkpoints_keep_the_cursor(
    tmp_path, world, caplog
):
    """Checkpoints written by hand in the worker's layout, keeping 2 checkpoints of change log like a worker would."""
    _, _, models, version = world
    dim = version.model_config.id_dim
    state = StateStore(tmp_path / "state", sync=False)
    watermark_ms = 0

    def checkpoint(seq: int, user_id: str | None = None) -> None:
        # User `user_id` clicked item f"i{seq}" at time seq * 1000 ms and its online row became [seq, seq, ...];
        # None: an idle checkpoint (no event, the watermark stays).
        nonlocal watermark_ms
        if user_id is not None:
            watermark_ms = seq * 1000
            state.put(b"x:%016x:u:%s" % (seq, user_id.encode()), b"")
            row = np.full(dim, seq, np.float32).tobytes()
            state.put(b"t:user:" + user_id.encode(), struct.pack("<qqf", seq, seq, 0.1) + row)
            state.put(b"n:" + user_id.encode(), json.dumps([f"i{seq}"]).encode())
        for key, _ in state.scan(b"x:%016x:" % (seq - 2)):
            state.delete(key)
        state.checkpoint({}, {"checkpoints": seq, "watermark_ms": watermark_ms, "model_version": "v1"})

    def pulled(changes) -> tuple[int, int, dict[str, tuple[float, tuple[str, ...]]]]:
        rows = {u: (float(v.mean()), last_n) for u, (v, last_n) in changes.users.items()}
        return WorkerCursor.parse(changes.cursor).checkpoint, changes.watermark_ms, rows

    for seq, user_id in ((1, "a"), (2, "b"), (3, "a")):
        checkpoint(seq, user_id)
    with WorkerSource(tmp_path / "state", models, change_log_checkpoints=2) as source:
        first = source.changes_since("")
        assert pulled(first) == (3, 3000, {"a": (3.0, ("i3",)), "b": (2.0, ("i2",))})
        checkpoint(4, "a")
        checkpoint(5, "a")
        second = source.changes_since(first.cursor)  # caught up from the worker's log: now in the memtable
        assert pulled(second) == (5, 5000, {"a": (5.0, ("i5",))})
        checkpoint(6, "b")
        checkpoint(7, "a")
        state.close()  # what a stopping worker does: its memtable, checkpoints 4 to 7, goes to a table file
        third = source.changes_since(second.cursor)
        assert pulled(third) == (7, 7000, {"a": (7.0, ("i7",)), "b": (6.0, ("i6",))})
        state = StateStore(tmp_path / "state", sync=False)  # the worker starts again
        checkpoint(8, "b")
        fourth = source.changes_since(third.cursor)
        assert pulled(fourth) == (8, 8000, {"b": (8.0, ("i8",))})

        # An idle worker keeps checkpointing; the publisher writes no version for an empty pull, so its cursor
        # stays at checkpoint 8 while the log of checkpoint 8 is deleted (at checkpoint 10).
        for seq in (9, 10, 11):
            checkpoint(seq)
            assert pulled(source.changes_since(fourth.cursor)) == (seq, 8000, {})
        checkpoint(12, "a")
        assert pulled(source.changes_since(fourth.cursor)) == (12, 12000, {"a": (12.0, ("i12",))})
    # A source that did not watch the idle checkpoints finds the log no longer reaching back to the cursor:
    # every row again, and a log line saying why. So for a cursor of another model or another database.
    everything = (12, 12000, {"a": (12.0, ("i12",)), "b": (8.0, ("i8",))})
    with (
        WorkerSource(tmp_path / "state", models, change_log_checkpoints=2) as source,
        caplog.at_level(logging.INFO, logger="publisher.worker_source"),
    ):
        full = source.changes_since(fourth.cursor)
        assert pulled(full) == everything
        assert "the change log keeps checkpoints from 11, the cursor needs them from 9" in caplog.text
        now = WorkerCursor.parse(full.cursor)
        for cursor, reason in (
            (dataclasses.replace(now, model_version="v0"), "model version changed from 'v0' to 'v1'"),
            (dataclasses.replace(now, state_id="another-database"), "the worker state was rebuilt"),
            (dataclasses.replace(now, checkpoint=13), "the worker state was rebuilt"),
            ("8", "is not a worker cursor"),
        ):
            caplog.clear()
            assert pulled(source.changes_since(str(cursor))) == everything
            assert reason in caplog.text
        assert pulled(source.changes_since(str(now))) == (12, 12000, {})
    state.close()


@pytest.mark.kafka
def test_a_model_switch_rewrites_the_rows_of_users_the_worker_forgot(kafka_settings, tmp_path, world):
    # A worker with room for 20 user rows and lists (every clicking user admitted) forgets users (row and last-N) as others
    # click. Published while the worker held them, their rows stay in the store; when v2 replaces v1, the version
    # that switches the model must rewrite them too.
    day_one, day_two, shared_models, _ = world
    models = tmp_path / "models"
    shutil.copytree(shared_models, models)
    registry = Registry(models)
    settings = WorkerSettings(
        state_dir=tmp_path / "state",
        models_dir=models,
        group_id=f"w-{uuid.uuid4().hex[:8]}",
        batch_size=32,
        sync=False,
        min_count=1,
        max_rows=20,
        max_last_n_users=20,
        expire_every_batches=1,
    )
    pub_settings = PublisherSettings(store_path=tmp_path / "kv", interval_s=1.0, index_kind="flat")
    clicks = [e for e in day_two if isinstance(e, Click)]
    cutoff = clicks[len(clicks) // 2].ts_ms
    with RocksStore(pub_settings.store_path, sync=False) as store:
        published: set[str] = set()
        for part in ([e for e in day_two if e.ts_ms <= cutoff], [e for e in day_two if e.ts_ms > cutoff]):
            produce(kafka_settings, part)
            worker = Worker(kafka_settings, settings, load_version(registry.path("v1")), registry=registry)
            run_to_idle(worker)
            with WorkerSource(settings.state_dir, models) as source:
                assert Publisher(store, source, pub_settings).publish_once().meta.model_version == "v1"
            with store.reader() as view:
                published |= set(view.user_ids())

        promote_second_version(registry, day_one + [e for e in day_two if e.ts_ms <= cutoff], cutoff)
        v2 = load_version(registry.path("v2"))
        worker = Worker(kafka_settings, settings, v2, registry=registry)
        run_to_idle(worker)  # the restart adopts v2 and replays the clicks after its cutoff
        tracked = {u for u in published if u in worker.builder.last_n or u in worker.learner.users}
        forgotten = published - tracked
        assert len(forgotten) >= 20  # the path under test is taken, for many users

        with WorkerSource(settings.state_dir, models) as source:
            switch = Publisher(store, source, pub_settings).publish_once().meta
        assert switch.model_version == "v2"
        with store.reader() as view:
            user_ids, item_ids = view.user_ids(), view.item_ids()
            users = dict(zip(user_ids, view.users(user_ids), strict=True))
            items = view.items(item_ids)
    assert set(user_ids) == published
    # One version switched every row: nothing of v1 is left for a reader to mix with v2.
    assert {r.version for r in users.values()} == {switch.version}
    assert {r.version for r in items} == {switch.version}
    weight = v2.model.user_tower.id_table.weight.detach().numpy()
    for user_id in forgotten:
        np.testing.assert_array_equal(users[user_id].vector, weight[v2.encoder.user_vocab.index(user_id)])
    for user_id in tracked:
        if user_id in worker.learner.users:
            np.testing.assert_array_equal(users[user_id].vector, worker.learner.users.row(user_id))
