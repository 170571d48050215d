"""The streaming worker's Prometheus metrics (names fixed by deploy/prometheus/alerts.yml)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

__all__ = ["OwnerMetrics", "WorkerMetrics"]


class WorkerMetrics:
    """One set of metrics on its own registry (a process exposes it; tests read it directly)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("freshtower_events_consumed_total", "Valid events consumed", ["topic"], registry=r)
        self.examples = Counter("freshtower_examples_trained_total", "Click examples applied by SGD", registry=r)
        self.dead_letters = Counter(
            "freshtower_dead_letters_total", "Records sent to the dead-letter topic", ["topic"], registry=r
        )
        self.skipped_steps = Counter(
            "freshtower_sgd_skipped_steps_total", "SGD steps skipped because the loss was not finite", registry=r
        )
        self.duplicates = Counter("freshtower_duplicate_clicks_total", "Clicks dropped as duplicates", registry=r)
        self.sgd_seconds = Histogram(
            "freshtower_sgd_step_seconds",
            "Time of one incremental SGD step",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.lag = Gauge(
            "freshtower_consumer_lag", "Records behind the partition's end", ["topic", "partition"], registry=r
        )
        self.watermark = Gauge(
            "freshtower_event_watermark_timestamp_seconds", "Newest event time applied to the state", registry=r
        )
        self.rows = Gauge("freshtower_embedding_rows", "Online rows per embedding table", ["table"], registry=r)
        self.checkpoint = Gauge(
            "freshtower_checkpoint_timestamp_seconds", "Wall-clock time of the last checkpoint", registry=r
        )
        self.buffered = Gauge("freshtower_buffered_events", "Events fetched and not yet applied", registry=r)
        self.progress = Gauge(
            "freshtower_progress_timestamp_seconds",
            "Wall-clock time the worker last applied events or found nothing to apply (FreshtowerWorkerStalled)",
            registry=r,
        )
        self.kafka_errors = Counter(
            "freshtower_kafka_errors_total", "Failed Kafka client calls, by error", ["error"], registry=r
        )
        # The model the online rows start from: how fresh the nightly side is (FreshtowerModelStale).
        self.model = Info("freshtower_model", "The model version the worker updates", registry=r)
        self.model_cutoff = Gauge(
            "freshtower_model_data_cutoff_timestamp_seconds",
            "Newest event time the current model version was trained on",
            registry=r,
        )
        self.model_created = Gauge(
            "freshtower_model_created_timestamp_seconds",
            "Wall-clock time the current model version was made",
            registry=r,
        )
        self.model_switches = Counter(
            "freshtower_model_switches_total",
            "Model versions adopted while running (promotions, rollbacks)",
            registry=r,
        )
        # user_state = "changelog" (streaming.changelog): the partitions held and the last restore.
        self.restore_seconds = Gauge(
            "freshtower_state_restore_seconds",
            "Time the last move of partitions took (drop, restore from the user-state changelog, reload)",
            registry=r,
        )

    def count_kafka_error(self, exc: BaseException) -> None:
        self.kafka_errors.labels(type(exc).__name__).inc()

    def observe_model(self, version_id: str, data_cutoff_ms: int, created_ms: int) -> None:
        """Record the model version now in use."""
        self.model.info({"version": version_id})
        self.model_cutoff.set(data_cutoff_ms / 1000)
        self.model_created.set(created_ms / 1000)


class OwnerMetrics:
    """An item owner's metrics (:mod:`streaming.item_owner`), on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.gradients = Counter(
            "freshtower_item_owner_gradients_total",
            "Gradient records read: applied, or dropped (another model version, unreadable)",
            ["outcome"],
            registry=r,
        )
        self.steps = Counter("freshtower_item_owner_steps_total", "Transactions committed", registry=r)
        self.step_seconds = Histogram(
            "freshtower_item_owner_step_seconds",
            "Time of one step: apply, send the rows, commit the transaction",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.rows = Gauge("freshtower_item_owner_rows", "Item rows held for the owned partitions", registry=r)
        self.partitions = Gauge("freshtower_item_owner_partitions", "item-grads partitions owned", registry=r)
        self.restore_seconds = Gauge(
            "freshtower_item_owner_restore_seconds", "Time the last restore from item-rows took", registry=r
        )
        self.lag = Gauge(
            "freshtower_item_owner_lag", "Gradient records behind the partition's end", ["partition"], registry=r
        )
        self.replacements = Counter(
            "freshtower_item_owner_replacements_total",
            "Lives of the item-owner role in a worker replaced by its watchdog (stuck for stall_s)",
            registry=r,
        )
        self.progress = Gauge(
            "freshtower_item_owner_progress_timestamp_seconds",
            "Wall-clock time the owner last committed a step or found nothing to apply",
            registry=r,
        )
