"""One consistent served version, swapped whole: a store view, the model it was published under, its index.

A response must come from one model version, one publish version and the index built from that publish, and
a new publish, a model switch or an index rebuild must not fail or delay requests. Requests take no lock that
an update holds. The process keeps two *sides*, each a RocksDB secondary of the store and an item index
(left-right, as in double buffering):

- requests read the current :class:`Snapshot` (one attribute read) and use its side only. That side's
  secondary is never caught up while it is current, so every row a request reads belongs to the snapshot's
  version, and its index is never written to;
- the refresher thread brings the *other* side to the newest version: it waits until no request still holds
  it (requests are short and bounded by the request timeout), catches its secondary up, applies the item rows
  changed since that side's index version (``items_since``: upserts, removals; a full build when the item
  size changed with the model), loads the model version named by the meta if it is new, and swaps the
  current snapshot to it. The side that was current becomes the standby and is brought up next time.

A request marks the side it uses (:meth:`ServedVersions.acquire`), and checks after marking that the snapshot
is still current, so the refresher never touches a side a request is reading.

Until the publisher has created the store and published item vectors, nothing is served (``/readyz`` answers
503); a store version that holds no item vector of its model (a publish of users only, before the first items or
right after a model switch) is not swapped in. Then each side loads
the publisher's newest index snapshot at or below its store version
(:class:`publisher.index.IndexSnapshots`) and catches up from there; without one it builds from every item
row. With ``index_kind="auto"`` the kind follows the catalogue size (``exact_max_items``).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from publisher.index import HNSWIndex, Index, IndexSnapshots, apply_delta, load_index, make_index
from publisher.ivf import IVFIndex
from publisher.records import Delta, Meta
from publisher.store import RocksSecondary, StoreView
from serving.metrics import ServingMetrics
from serving.settings import ServingSettings
from trainer.artifact import ModelVersion, load_version
from trainer.registry import Registry

__all__ = ["ServedVersions", "Snapshot"]

logger = logging.getLogger(__name__)

_CHUNK = 50_000


class _Side:
    """A store secondary and the item index kept at its version; requests in flight counted."""

    def __init__(self, name: str, store: RocksSecondary) -> None:
        self.name = name
        self.store = store
        self.index: Index | None = None
        self.index_version = 0
        self._in_flight = 0
        self._count = threading.Lock()

    def enter(self) -> None:
        with self._count:
            self._in_flight += 1

    def leave(self) -> None:
        with self._count:
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        return self._in_flight


@dataclass(frozen=True, eq=False)
class Snapshot:
    """What one response is made from. ``meta``: the store version; ``model``: the version named by it."""

    meta: Meta
    model: ModelVersion
    index: Index
    side: _Side
    swapped_at: float

    @contextmanager
    def view(self) -> Iterator[StoreView]:
        """Rows of exactly ``meta.version`` (this side's secondary is not caught up while it is served)."""
        with self.side.store.reader(catch_up=False) as view:
            yield view


class _Models:
    """Model versions by id from the registry, the last two kept (the current and the one before)."""

    def __init__(self, models_dir: Path) -> None:
        self._registry = Registry(models_dir)
        self._loaded: OrderedDict[str, ModelVersion] = OrderedDict()

    def get(self, version_id: str) -> ModelVersion:
        if version_id not in self._loaded:
            path = self._registry.path(version_id)
            self._loaded[version_id] = load_version(path)
            logger.info("loaded model version %s from %s", version_id, path)
            while len(self._loaded) > 2:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(version_id)
        return self._loaded[version_id]


class ServedVersions:
    """The current :class:`Snapshot` and the refresher that replaces it (module docstring)."""

    def __init__(self, settings: ServingSettings, metrics: ServingMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._models = _Models(settings.models_dir)
        self._snapshots = IndexSnapshots(settings.resolved_index_dir)
        self._tmp = tempfile.TemporaryDirectory(prefix="freshtower-serving-")
        self._sides: list[_Side] = []  # opened by the first refresh that finds the store (the publisher makes it)
        self._current: Snapshot | None = None
        self._swap = threading.Lock()  # only refreshers take it: one update at a time

    @property
    def current(self) -> Snapshot | None:
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    @contextmanager
    def acquire(self) -> Iterator[Snapshot]:
        """The current snapshot, held for the ``with`` block; :class:`LookupError` when none is ready yet."""
        while True:
            snapshot = self._current
            if snapshot is None:
                raise LookupError("no store version is loaded yet")
            snapshot.side.enter()
            if snapshot is self._current:
                break
            snapshot.side.leave()  # swapped between the read and the mark: take the new one
        try:
            yield snapshot
        finally:
            snapshot.side.leave()

    # ------------------------------------------------------------------ refresher
    def refresh(self, drain_timeout_s: float = 30.0) -> bool:
        """Bring the standby side to the newest version and serve it; returns whether a new snapshot was swapped in."""
        with self._swap:
            if not self._sides and not self._open_sides():
                return False
            current = self._current
            standby = next(s for s in self._sides if current is None or s is not current.side)
            deadline = time.monotonic() + drain_timeout_s
            while standby.in_flight:
                if time.monotonic() > deadline:
                    logger.warning(
                        "requests still hold side %s after %.0f s; not refreshing", standby.name, drain_timeout_s
                    )
                    return False
                time.sleep(0.001)
            with standby.store.reader() as view:  # the catch-up: no request reads this side
                meta = view.meta()
                if meta is None or not meta.model_version:
                    return False
                if not meta.item_dim:
                    # The publisher has written users but no item vector of this model yet (a first publish, or
                    # the first one after a model switch): there is nothing to search; keep what is served.
                    logger.debug("store version %d holds no item vectors of %s yet", meta.version, meta.model_version)
                    return False
                if current is not None and meta.version == current.meta.version:
                    return False
                model = self._models.get(meta.model_version)
                start = time.perf_counter()
                self._bring_index(standby, view, meta)
                built = time.perf_counter() - start
            assert standby.index is not None
            snapshot = Snapshot(meta, model, standby.index, standby, time.time())
            self._current = snapshot
        self.metrics.index_build_seconds.set(built)
        self.metrics.served(meta.model_version, meta.version, meta.watermark_ms, len(standby.index))
        logger.debug("serving version %d (model %s, %d items)", meta.version, meta.model_version, len(standby.index))
        return True

    def _open_sides(self) -> bool:
        if not (self.settings.store_path / "CURRENT").exists():
            logger.debug("no store at %s yet; not ready", self.settings.store_path)
            return False
        root = Path(self._tmp.name)
        self._sides = [_Side(name, RocksSecondary(self.settings.store_path, root / name)) for name in ("a", "b")]
        return True

    def run(self, stop: threading.Event) -> None:
        """Refresh every ``refresh_interval_s`` until ``stop``; a failed refresh is logged and retried."""
        while not stop.is_set():
            try:
                self.refresh()
            except Exception:
                logger.exception("refreshing the served version failed; serving the previous one")
            stop.wait(self.settings.refresh_interval_s)

    def close(self) -> None:
        with self._swap:
            for side in self._sides:
                side.store.close()
            self._tmp.cleanup()

    # ------------------------------------------------------------------ index
    def _kind(self, items: int) -> str:
        kind = self.settings.index_kind
        if kind == "auto":
            return "flat" if items <= self.settings.exact_max_items else self.settings.ann_kind
        return kind

    def _new_index(self, kind: str, dim: int) -> Index:
        s = self.settings
        return make_index(
            kind,
            dim,
            m=s.hnsw_m,
            ef_construction=s.hnsw_ef_construction,
            ef_search=s.hnsw_ef_search,
            nprobe=s.ivf_nprobe,
        )

    def _bring_index(self, side: _Side, view: StoreView, meta: Meta) -> None:
        """``side.index`` at ``meta.version``: the delta since its version, or a fresh load or build."""
        if side.index is not None and meta.item_dim and side.index.dim != meta.item_dim:
            logger.info("item dim changed %d -> %d: building the index afresh", side.index.dim, meta.item_dim)
            side.index, side.index_version = None, 0
        if side.index is None:
            side.index, side.index_version = self._first_index(view, meta)
        delta = view.items_since(side.index_version)
        dim = side.index.dim
        stale = [k for k, r in delta.items.items() if not r.removed and r.vector.shape[0] != dim]
        if stale:  # rows of an older model not yet republished under this one (the publisher does the same)
            logger.warning("%d item vectors have a dim other than the index's %d; skipped", len(stale), dim)
            skip = set(stale)
            delta = Delta(delta.since, delta.version, {}, {k: r for k, r in delta.items.items() if k not in skip})
        apply_delta(side.index, delta)
        side.index_version = meta.version

    def _first_index(self, view: StoreView, meta: Meta) -> tuple[Index, int]:
        latest = self._snapshots.latest(max_version=meta.version)
        if latest is not None:
            version, path = latest
            try:
                index = load_index(path)
            except (OSError, ValueError, RuntimeError) as exc:
                logger.warning("cannot load index snapshot %s (%s); building from the store", path, exc)
            else:
                wanted = self._kind(len(index))
                if index.dim == meta.item_dim and index.kind == wanted:
                    # The search breadth is serving's setting, not the publisher's.
                    if isinstance(index, HNSWIndex):
                        index.ef_search = self.settings.hnsw_ef_search
                    elif isinstance(index, IVFIndex):
                        index.nprobe = self.settings.ivf_nprobe
                    logger.info("loaded index snapshot %s (%s, %d items)", path, index.kind, len(index))
                    return index, version
                logger.info(
                    "snapshot %s is %s dim %d; want %s dim %d: building",
                    path,
                    index.kind,
                    index.dim,
                    wanted,
                    meta.item_dim,
                )
        ids = view.item_ids()
        dim = meta.item_dim
        index = self._new_index(self._kind(len(ids)), dim)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            rows = view.items(chunk)
            live = [
                (k, r.vector) for k, r in zip(chunk, rows, strict=True) if r is not None and r.vector.shape[0] == dim
            ]
            if live:
                index.upsert([k for k, _ in live], np.stack([v for _, v in live]))
        logger.info("built a %s index of %d items from store version %d", index.kind, len(index), meta.version)
        return index, meta.version
