"""The streaming worker's settings (``FRESHTOWER_*`` variables, ``[worker]`` in the TOML file)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.examples import ExampleSettings
from streaming.learner import LearnerSettings
from streaming.tables import TableSettings

__all__ = ["WorkerSettings"]


@dataclass(frozen=True)
class WorkerSettings:
    """Settings of one worker process (``FRESHTOWER_*`` variables, ``[worker]`` in the TOML file)."""

    state_dir: Path = Path("data/worker")
    group_id: str = "freshtower-worker"
    models_dir: Path = Path("artifacts/models")
    # 64: in the main job, smaller mini-batches let the online rows follow new items and users sooner (synthetic
    # world, 3 seeds: 1.065x nightly-only against 1.037x at 256; MovieLens-100K no worse), and the worker's
    # throughput does not drop (bench/stream_throughput.py: SGD is a fifth of the time at 64).
    batch_size: int = 64
    last_n: int = 20
    # A user's last-N list outlives the user's ID row (idle_ms): it goes after this long without a click, or when
    # more than max_last_n_users lists are kept (least recently active first), so a returning user trains with the
    # history serving reads (streaming.examples).
    last_n_idle_ms: int = 30 * 24 * 3600 * 1000
    max_last_n_users: int = 2_000_000
    join_window_ms: int = 30 * 60 * 1000
    min_count: int = 2
    idle_ms: int = 3 * 24 * 3600 * 1000
    max_rows: int = 1_000_000
    lr: float = 0.05
    logq: bool = True
    logq_weight: float | None = None
    # 0.5 s each (checkpoint, partial batch): a click is in the store within p99 1.8 s at 1 s publishes
    # (bench/freshness_e2e.py; 3.6 s at 2 s and 1 s), under the 2.4 s target.
    checkpoint_interval_s: float = 0.5
    expire_every_batches: int = 50
    max_buffered_events: int = 100_000
    # A click waits at most this long (wall clock) for its mini-batch to fill once the worker has read everything
    # there is: a partial batch is trained then, with easy negatives (min_negatives) so that even one click moves.
    max_batch_delay_s: float = 0.5
    min_negatives: int = 64
    # False: keep the features current (last-N lists, catalogue, profiles, counters) and publish the model's own
    # ID rows, without SGD: freshness through features alone (the main job's check of its own harness).
    learn: bool = True
    # "local": this worker trains its item rows itself (one worker per deployment). "owner": it sends its item
    # gradients to the item owners and mirrors their rows (streaming.item_path, docs/scale-out.md).
    item_rows: str = "local"
    # "local": the user state lives in this worker's RocksDB alone (one worker). "changelog": several workers share
    # the event partitions; each partition's user state goes to the user-state changelog topic in the checkpoint's
    # Kafka transaction and moves with the partition (streaming.changelog). Needs item_rows = "owner".
    user_state: str = "local"
    # Run the item-owner role (streaming.item_owner) in this process too, beside the worker's own loop. A life of
    # the role stuck this long inside a client call is replaced by a new one (streaming.owner_role). 0: off.
    own_items: bool = False
    owner_stall_s: float = 120.0
    change_log_checkpoints: int = 10_000
    metrics_port: int = 9101
    metrics_addr: str = "127.0.0.1"
    sync: bool = True
    instance_id: str = ""
    model_poll_s: float = 10.0
    start_at_cutoff: bool = True
    session_timeout_ms: int = 15_000
    record_cache: int = 100_000
    # Kafka errors are retried for this long, then the worker exits (69) for its supervisor to restart it.
    retry_s: float = 120.0
    # A main loop that has not come round for this long (stuck inside a client call) is ended (69). 0: off.
    stall_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.user_state not in ("local", "changelog"):
            raise ValueError(f"user_state must be 'local' or 'changelog', got {self.user_state!r}")
        if self.user_state == "changelog" and self.item_rows != "owner":
            raise ValueError("user_state = 'changelog' needs item_rows = 'owner': item rows must have one owner")

    def member_id(self) -> str:
        """Static group membership (KIP-345): a restarted worker takes its partitions back at once instead of
        waiting for the group to notice that its previous life died. Default: derived from the state directory,
        which is what identifies a worker (its checkpoint)."""
        if self.instance_id:
            return self.instance_id
        digest = hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:12]
        return f"{socket.gethostname()}-{digest}"

    def examples(self) -> ExampleSettings:
        """The example builder's settings (joins, last-N and how long the lists are kept)."""
        return ExampleSettings(
            self.last_n, self.join_window_ms, self.record_cache, self.last_n_idle_ms, self.max_last_n_users
        )

    def learner(self, train: Mapping[str, Any] | None = None) -> LearnerSettings:
        """The learner's settings; the logQ strength is ``logq_weight`` when set, else the one the model version was
        trained with (its manifest's ``config.train``), so the online updates pursue the nightly objective."""
        table = TableSettings(min_count=self.min_count, idle_ms=self.idle_ms, max_rows=self.max_rows, lr=self.lr)
        weight = self.logq_weight if self.logq_weight is not None else float((train or {}).get("logq_weight", 1.0))
        return LearnerSettings(
            batch_size=self.batch_size,
            logq=self.logq,
            logq_weight=weight,
            min_negatives=self.min_negatives,
            user_table=table,
            item_table=table,
            item_rows=self.item_rows,
        )
