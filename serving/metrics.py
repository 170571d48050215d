"""What a serving process exports on ``/metrics`` (port 9103, where deploy/prometheus scrapes it)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["OUTCOMES", "ServingMetrics"]

# ok: answered from a known user; cold_user: answered from the default row and whatever the request sent;
# bad_request: a 4xx (malformed, out of range, unknown item, oversized, unauthorised); error: a 5xx.
OUTCOMES = ("ok", "cold_user", "bad_request", "error")
# Up to 10 s: the request timeout is 2 s by default, and a slower answer is a failure anyway.
_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServingMetrics:
    """The serving process's series, in their own registry."""

    def __init__(self, registry: CollectorRegistry, latency_target_s: float) -> None:
        self.registry = registry
        self.request_seconds = Histogram(
            "freshtower_request_seconds",
            "Time from request to response, by endpoint",
            ["endpoint"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "freshtower_requests",
            "Requests by endpoint, outcome and status code",
            ["endpoint", "outcome", "code"],
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "freshtower_request_stage_seconds",
            "Time of one stage of a recommendation: store (rows), user_tower, search",
            ["stage"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.model_info = Gauge(
            "freshtower_served_model_info", "1 for the model version served now", ["version"], registry=registry
        )
        self.publish_version = Gauge(
            "freshtower_served_publish_version", "The store version served now (0 until ready)", registry=registry
        )
        self.watermark = Gauge(
            "freshtower_served_watermark_timestamp_seconds",
            "Event time of the newest event reflected in the served version",
            registry=registry,
        )
        self.freshness = Gauge(
            "freshtower_served_freshness_seconds",
            "Now minus the served watermark (how old the newest event behind an answer is)",
            registry=registry,
        )
        self.index_items = Gauge("freshtower_index_items", "Items in the served index", registry=registry)
        self.index_build_seconds = Gauge(
            "freshtower_index_build_seconds",
            "Time to bring the standby index to a new version (load or build, plus the delta)",
            registry=registry,
        )
        self.snapshot_swaps = Counter("freshtower_snapshot_swaps", "Served versions switched to", registry=registry)
        self.latency_target = Gauge(
            "freshtower_serving_latency_target_seconds",
            "The p99 latency the FreshtowerServingSlow alert compares with (setting latency_target_s)",
            registry=registry,
        )
        self.latency_target.set(latency_target_s)
        self._watermark_s = 0.0
        self.freshness.set_function(lambda: time.time() - self._watermark_s if self._watermark_s else 0.0)
        self._model: str | None = None

    def served(self, model_version: str, publish_version: int, watermark_ms: int, index_items: int) -> None:
        """Record the snapshot just swapped in."""
        if model_version != self._model:
            if self._model is not None:
                self.model_info.remove(self._model)
            self.model_info.labels(model_version).set(1)
            self._model = model_version
        self.publish_version.set(publish_version)
        self._watermark_s = watermark_ms / 1000
        self.watermark.set(self._watermark_s)
        self.index_items.set(index_items)
        self.snapshot_swaps.inc()
