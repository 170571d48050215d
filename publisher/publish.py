"""The periodic publisher: pull what changed, write it as one version, bring the index and fan-out along.

One cycle (:meth:`Publisher.publish_once`):

1. read the store's meta (version ``v``, the cursor of the last publish);
2. ``source.changes_since(cursor)``; nothing new (no rows, same watermark and model) means no new
   version, and the cycle still counts as a success. When the model changed, every row the store holds
   belongs to the old one: the rows the source did not republish (ids it no longer tracks) are rewritten
   under the new model (:class:`~publisher.source.RowSource`; removed when the source cannot), so that
   the version that switches the model switches every row;
3. write :class:`~publisher.records.Publish` ``v + 1`` with the new cursor in the same batch
   (:meth:`Store.apply`), so a crash before it leaves version ``v`` and its cursor, and the next
   cycle pulls the same changes again: nothing skipped, nothing published twice;
4. the item index catches up with ``items_since(its version)`` and is snapshotted now and then;
5. the fan-out sends everything after its recorded progress, then records the new progress.

Steps 4 and 5 catch up from the store rather than from the publish in hand, so a failure in one
cycle (Kafka down, a crash between steps) is repaired by the next one. Versions continue across
restarts because they are read back from the store. The watermark never moves backwards.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry

from publisher.fanout import Fanout
from publisher.index import Index, IndexSnapshots, apply_delta, load_index, make_index
from publisher.metrics import PublisherMetrics
from publisher.records import Delta, Meta, Publish
from publisher.settings import PublisherSettings
from publisher.source import Changes, ChangeSource, RowSource
from publisher.store import Store, StoreView

__all__ = ["Publish", "Publisher", "PublishResult"]

logger = logging.getLogger(__name__)

FANOUT = "fanout"


@dataclass(frozen=True)
class PublishResult:
    """What one cycle did: the version written (``None`` when nothing had changed) and how long it took."""

    meta: Meta | None
    seconds: float


class Publisher:
    """Publishes ``source``'s changes to ``store`` every ``settings.interval_s`` seconds."""

    def __init__(
        self,
        store: Store,
        source: ChangeSource,
        settings: PublisherSettings,
        *,
        fanout: Fanout | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.store = store
        self.source = source
        self.settings = settings
        self.fanout = fanout
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = PublisherMetrics(self.registry, settings.interval_s)
        self.snapshots = IndexSnapshots(settings.resolved_index_dir, keep=settings.index_snapshots_kept)
        self._index: Index | None = None
        self._index_version = 0
        self._index_saved_at = 0.0
        self._index_dirty = False
        with store.reader() as view:
            meta = view.meta()
            if meta is not None:
                self.metrics.restored(meta)
            self.metrics.fanout_version.set(view.progress(FANOUT))
            if settings.index_kind != "none":
                self._load_index(view)

    @property
    def index(self) -> Index | None:
        """The item index as of the last cycle (``None`` until the first item vectors arrive)."""
        return self._index

    @property
    def index_version(self) -> int:
        return self._index_version

    def publish_once(self) -> PublishResult:
        """One cycle; raises on failure (counted in ``freshtower_publish_failures_total``)."""
        start = time.perf_counter()
        wrote = False
        try:
            with self.store.reader() as view:
                prev = view.meta()
            changes = self.source.changes_since(prev.cursor if prev else "")
            if prev is not None and changes.model_version != prev.model_version:
                changes = self._whole_switch(changes, prev.model_version)
            prev_watermark = prev.watermark_ms if prev else 0
            meta = None
            if (
                prev is None
                or changes.has_rows()
                or changes.watermark_ms > prev_watermark
                or changes.model_version != prev.model_version
            ):
                wrote = True
                publish = Publish(
                    version=(prev.version if prev else 0) + 1,
                    watermark_ms=max(changes.watermark_ms, prev_watermark),
                    model_version=changes.model_version,
                    cursor=changes.cursor,
                    users=changes.users,
                    items=changes.items,
                    removed_users=changes.removed_users,
                    removed_items=changes.removed_items,
                    created_ms=int(time.time() * 1000),
                )
                logger.debug("publishing version %d: %d rows", publish.version, publish.rows())
                meta = self.store.apply(publish)
                self.metrics.published(meta)
            if self.settings.index_kind != "none":
                self._sync_index()
            if self.fanout is not None:
                self._sync_fanout()
        except Exception:
            self.metrics.failures.inc()
            self.metrics.duration.observe(time.perf_counter() - start)
            raise
        seconds = time.perf_counter() - start
        if wrote:
            self.metrics.duration.observe(seconds)
        self.metrics.last_success.set(time.time())
        return PublishResult(meta, seconds)

    def _whole_switch(self, changes: Changes, old_model: str) -> Changes:
        """``changes`` plus every published row it lacks, rewritten under the new model (or removed, for a source
        that cannot give rows of any id): one version then switches the whole store (module docstring, step 2)."""
        with self.store.reader() as view:
            users = [u for u in view.user_ids() if u not in changes.users and u not in changes.removed_users]
            items = [i for i in view.item_ids() if i not in changes.items and i not in changes.removed_items]
        if not users and not items:
            return changes
        if not isinstance(self.source, RowSource):
            logger.warning(
                "model %s -> %s: the source cannot give rows of ids it did not republish; removing %d users, %d items",
                old_model,
                changes.model_version,
                len(users),
                len(items),
            )
            return dataclasses.replace(
                changes,
                removed_users=changes.removed_users | frozenset(users),
                removed_items=changes.removed_items | frozenset(items),
            )
        new_users, new_items = self.source.rows_for(changes.model_version, users, items)
        rewritten: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {}
        for start in range(0, len(users), 10_000):  # short views: readers wait for a writer's views to close
            chunk = users[start : start + 10_000]
            with self.store.reader() as view:
                old_rows = view.users(chunk)
            for user_id, old in zip(chunk, old_rows, strict=True):
                vector, last_n = new_users[user_id]
                # A history only the store still has (the source forgot the user, or its state was rebuilt) stays.
                rewritten[user_id] = (vector, last_n or (old.last_n if old is not None else ()))
        logger.info(
            "model %s -> %s: rewriting %d users and %d items the source did not republish, in the same version",
            old_model,
            changes.model_version,
            len(users),
            len(items),
        )
        return dataclasses.replace(
            changes, users={**changes.users, **rewritten}, items={**changes.items, **dict(new_items)}
        )

    def run(self, stop: threading.Event) -> None:
        """Publish every ``interval_s`` until ``stop`` is set; a failed cycle is logged and retried next time."""
        interval = self.settings.interval_s
        next_at = time.monotonic()
        while not stop.is_set():
            try:
                result = self.publish_once()
                if result.meta is not None:
                    logger.info(
                        "published version %d in %.3f s (watermark %d)",
                        result.meta.version,
                        result.seconds,
                        result.meta.watermark_ms,
                    )
            except Exception:
                logger.exception("publish failed; retrying in %.1f s", interval)
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # overran: start the next cycle at once, without a burst to catch up
                next_at = now
            stop.wait(next_at - now)
        self.save_index()

    # ------------------------------------------------------------------------------------ index

    def _load_index(self, view: StoreView) -> None:
        latest = self.snapshots.latest(max_version=view.version())
        if latest is None:
            return
        version, path = latest
        try:
            index = load_index(path)
        except (OSError, ValueError, RuntimeError) as exc:
            logger.warning("cannot load index snapshot %s (%s); rebuilding from the store", path, exc)
            return
        if index.kind != self.settings.index_kind:
            logger.info(
                "snapshot %s is a %s index, settings ask for %s: rebuilding", path, index.kind, self.settings.index_kind
            )
            return
        self._index, self._index_version = index, version
        logger.info("loaded index snapshot of version %d (%d items)", version, len(index))

    def _new_index(self, dim: int) -> Index:
        s = self.settings
        return make_index(
            s.index_kind,
            dim,
            m=s.hnsw_m,
            ef_construction=s.hnsw_ef_construction,
            ef_search=s.hnsw_ef_search,
            nprobe=s.ivf_nprobe,
        )

    def _sync_index(self) -> None:
        with self.store.reader() as view:
            meta = view.meta()
            if meta is None or self._index_version >= meta.version:
                return
            if self._index is not None and meta.item_dim and meta.item_dim != self._index.dim:
                # A new model changed the item vector size: rebuild from every live item.
                logger.info("item dim changed %d -> %d: rebuilding the index", self._index.dim, meta.item_dim)
                self._index, self._index_version = None, 0
            delta = view.items_since(self._index_version)
        if self._index is None:
            if not meta.item_dim:
                self._index_version = delta.version
                return
            self._index = self._new_index(meta.item_dim)
        stale = [k for k, r in delta.items.items() if not r.removed and r.vector.shape[0] != self._index.dim]
        if stale:
            # Rows of an older model not yet republished with the new one: leave them out until they are.
            logger.warning("%d item vectors have a dim other than the index's %d; skipped", len(stale), self._index.dim)
            skip = set(stale)
            delta = Delta(delta.since, delta.version, {}, {k: r for k, r in delta.items.items() if k not in skip})
        upserted, removed = apply_delta(self._index, delta)
        self._index_version = delta.version
        self._index_dirty = self._index_dirty or bool(upserted or removed)
        now = time.monotonic()
        if self._index_dirty and now - self._index_saved_at >= self.settings.index_snapshot_interval_s:
            self.save_index()

    def save_index(self) -> None:
        """Snapshot the index as of its version (skipped when unchanged since the last snapshot)."""
        if self._index is None or not self._index_dirty:
            return
        path = self.snapshots.save(self._index, self._index_version)
        self._index_saved_at = time.monotonic()
        self._index_dirty = False
        logger.info("saved index snapshot %s (%d items)", path, len(self._index))

    # ------------------------------------------------------------------------------------ fan-out

    def _sync_fanout(self) -> None:
        assert self.fanout is not None
        with self.store.reader() as view:
            done = view.progress(FANOUT)
            meta = view.meta()
            if meta is None or done >= meta.version:
                return
            delta = view.changes_since(done)
        self.fanout.send(delta, meta)
        self.store.set_progress(FANOUT, meta.version)
        self.metrics.fanout_version.set(meta.version)
