"""The serving process's settings: one frozen object, built with ``load_settings(ServingSettings, section="serving")``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streaming.events import Limits
from streaming.settings import SettingsError

__all__ = ["INDEX_KINDS", "ServingSettings"]

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")


@dataclass(frozen=True)
class ServingSettings:
    """What one serving process reads, where it listens and what it bounds.

    ``store_path``: the publisher's RocksDB store (read as a secondary; on another host, the store that
    ``publisher replica`` builds); ``models_dir``: the model registry, from which the version the store's rows
    were published under is loaded; ``index_dir``: the publisher's index snapshots (default
    ``<store_path>-index``), loaded at start instead of building an index from every item row.
    ``worker_state``: optional, the streaming worker's state on this host, read as a secondary for user
    profiles (``GET /recommend``) and the item click counts of the serve-time prior.

    ``index_kind``: ``flat`` (exact), ``hnsw``, ``ivf``, or ``auto`` (exact up to ``exact_max_items`` items,
    ``ann_kind`` above; bench/serving_latency.py measured the choice). ``prior_gamma`` > 0 turns the serve-time item prior on
    (``cos/τ + γ·log p_j`` over the ``prior_candidates`` nearest items; needs ``worker_state``).
    ``token``: when set, every API request needs ``Authorization: Bearer <token>`` (not ``/healthz``).
    ``latency_target_s`` is exported for the p99 alert. Bounds: ``max_k``, ``max_body_bytes``,
    ``max_context_items`` (recent items of a POST), ``request_timeout_s``.
    """

    store_path: Path = Path("data/publisher/store")
    models_dir: Path = Path("artifacts/models")
    index_dir: Path | None = None
    worker_state: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_addr: str = "127.0.0.1"
    metrics_port: int = 9103
    token: str = ""
    index_kind: str = "auto"
    exact_max_items: int = 200_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 256
    ivf_nprobe: int = 256  # recall@100 >= 0.95 at 100k and 1M items (bench/serving_latency.py)
    ann_kind: str = "ivf"
    refresh_interval_s: float = 0.2
    default_k: int = 20
    max_k: int = 500
    max_body_bytes: int = 64 * 1024
    max_context_items: int = 256
    max_id_chars: int = Limits.max_id_chars
    request_timeout_s: float = 2.0
    prior_gamma: float = 0.0
    prior_candidates: int = 500
    latency_target_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("store_path", "models_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("index_dir", "worker_state"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.index_kind not in INDEX_KINDS:
            raise SettingsError(f"setting 'index_kind': expected one of {INDEX_KINDS}, got {self.index_kind!r}")
        if self.ann_kind not in ("hnsw", "ivf"):
            raise SettingsError(f"setting 'ann_kind': expected 'hnsw' or 'ivf', got {self.ann_kind!r}")
        if not 1 <= self.default_k <= self.max_k <= 10_000:
            raise SettingsError(
                f"settings 'default_k', 'max_k': expected 1 <= default_k <= max_k <= 10000, "
                f"got {self.default_k} and {self.max_k}"
            )
        for name in ("refresh_interval_s", "request_timeout_s", "latency_target_s"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"setting {name!r}: expected > 0, got {getattr(self, name)}")
        if self.max_body_bytes < 256 or self.max_context_items < 0 or self.max_id_chars < 1:
            raise SettingsError(
                "settings 'max_body_bytes' >= 256, 'max_context_items' >= 0, 'max_id_chars' >= 1 expected, got "
                f"{self.max_body_bytes}, {self.max_context_items}, {self.max_id_chars}"
            )
        if not self.prior_gamma >= 0:
            raise SettingsError(f"setting 'prior_gamma': expected >= 0, got {self.prior_gamma}")
        if self.prior_gamma > 0 and self.worker_state is None:
            raise SettingsError("setting 'prior_gamma' > 0 needs 'worker_state' (the stream's click counts)")

    @property
    def resolved_index_dir(self) -> Path:
        return (
            self.index_dir if self.index_dir is not None else self.store_path.with_name(self.store_path.name + "-index")
        )
