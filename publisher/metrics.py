"""The publisher's Prometheus metrics, registered on a registry passed in (tests use their own).

Timestamps are gauges in seconds since the epoch, so freshness is ``time() - metric`` in PromQL
(Prometheus naming practices); counters end in ``_total``. The names are a contract with
``deploy/prometheus`` alert rules: do not rename them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from publisher.records import Meta

__all__ = ["PublisherMetrics"]

# Publishes take milliseconds for a few rows and tens of seconds for a full model's worth.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class PublisherMetrics:
    """Gauges, counters and the duration histogram of one publisher process."""

    def __init__(self, registry: CollectorRegistry, interval_s: float) -> None:
        self.registry = registry
        self.last_success = Gauge(
            "freshtower_publish_last_success_timestamp_seconds",
            "When the last publish cycle succeeded (store written, index and fan-out caught up).",
            registry=registry,
        )
        self.watermark = Gauge(
            "freshtower_published_watermark_timestamp_seconds",
            "Newest event time reflected in the published version.",
            registry=registry,
        )
        self.version = Gauge("freshtower_published_version", "Version number of the published data.", registry=registry)
        self.interval = Gauge(
            "freshtower_publish_interval_seconds", "Configured time between publishes.", registry=registry
        )
        self.duration = Histogram(
            "freshtower_publish_duration_seconds",
            "Time of publish cycles that wrote or tried to write a version.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.rows = Counter(
            "freshtower_published_rows_total", "Rows written, removals included.", ["kind"], registry=registry
        )
        self.failures = Counter(
            "freshtower_publish_failures_total", "Publish cycles that raised an error.", registry=registry
        )
        self.fanout_version = Gauge(
            "freshtower_fanout_version", "Last version written whole to the fan-out topic.", registry=registry
        )
        self.interval.set(interval_s)
        for kind in ("user", "item"):
            self.rows.labels(kind=kind)  # both series exist from the start, at 0

    def published(self, meta: Meta) -> None:
        """A version is now in the store."""
        self.version.set(meta.version)
        self.watermark.set(meta.watermark_ms / 1000.0)
        self.rows.labels(kind="user").inc(meta.users)
        self.rows.labels(kind="item").inc(meta.items)

    def restored(self, meta: Meta) -> None:
        """On start: report what the store already holds (the last success is when it was written)."""
        self.version.set(meta.version)
        self.watermark.set(meta.watermark_ms / 1000.0)
        self.last_success.set(meta.created_ms / 1000.0)
