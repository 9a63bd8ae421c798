"""Prometheus metrics of one app, on a registry of its own so several apps can live in one process."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """Requests by endpoint and status, request latency, model batch sizes and queue depth."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "captioner_http_requests",
            "HTTP requests answered, by endpoint (route pattern), method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "captioner_http_request_duration_seconds",
            "Time from receiving a request to answering it",
            ["endpoint"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "captioner_batch_size",
            "Images per model call made by the micro-batcher",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "captioner_queue_depth", "Caption requests waiting for the model", registry=self.registry
        )
        self.ready = Gauge("captioner_model_ready", "1 once the model is loaded", registry=self.registry)

    def track_batcher(self, depth: Callable[[], float], ready: Callable[[], bool]) -> None:
        """Read queue depth and readiness when scraped, so they are never stale."""
        self.queue_depth.set_function(depth)
        self.ready.set_function(lambda: float(ready()))

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything above."""
        return generate_latest(self.registry)
