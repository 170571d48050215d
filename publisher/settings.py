"""The publisher's settings: one frozen object, built with ``load_settings(PublisherSettings, section="publisher")``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streaming.settings import SettingsError

__all__ = ["INDEX_KINDS", "PublisherSettings"]

INDEX_KINDS = ("flat", "hnsw", "ivf", "none")
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 24 * 3600.0


@dataclass(frozen=True)
class PublisherSettings:
    """Where the store lives, how often to publish, what else each publish feeds.

    ``interval_s`` is the publish period (1 s to 24 h). ``index_kind`` chooses the item index kept
    next to the store (``none`` to keep none); a snapshot of it is saved under ``index_dir``
    (default ``<store_path>-index``) at most every ``index_snapshot_interval_s`` seconds.
    ``fanout`` also writes every version to the compacted ``<topic_prefix><fanout_topic>`` topic.
    """

    store_path: Path = Path("data/publisher/store")
    interval_s: float = 60.0
    metrics_port: int = 9102
    metrics_addr: str = "0.0.0.0"
    sync_writes: bool = True
    changelog_versions: int = 1000
    index_kind: str = "flat"
    index_dir: Path | None = None
    index_snapshot_interval_s: float = 300.0
    index_snapshots_kept: int = 3
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 128
    ivf_nprobe: int = 32
    fanout: bool = False
    fanout_topic: str = "embeddings"

    def __post_init__(self) -> None:
        # Accept str paths from direct construction too (load_settings already converts).
        object.__setattr__(self, "store_path", Path(self.store_path))
        if self.index_dir is not None:
            object.__setattr__(self, "index_dir", Path(self.index_dir))
        if not MIN_INTERVAL_S <= self.interval_s <= MAX_INTERVAL_S:
            raise SettingsError(
                f"setting 'interval_s': expected {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g} seconds, got {self.interval_s}"
            )
        if self.index_kind not in INDEX_KINDS:
            raise SettingsError(f"setting 'index_kind': expected one of {INDEX_KINDS}, got {self.index_kind!r}")
        if self.changelog_versions < 1:
            raise SettingsError(f"setting 'changelog_versions': expected >= 1, got {self.changelog_versions}")
        if self.index_snapshots_kept < 1:
            raise SettingsError(f"setting 'index_snapshots_kept': expected >= 1, got {self.index_snapshots_kept}")
        if self.index_snapshot_interval_s < 0:
            raise SettingsError(
                f"setting 'index_snapshot_interval_s': expected >= 0, got {self.index_snapshot_interval_s}"
            )

    @property
    def resolved_index_dir(self) -> Path:
        return (
            self.index_dir if self.index_dir is not None else self.store_path.with_name(self.store_path.name + "-index")
        )
