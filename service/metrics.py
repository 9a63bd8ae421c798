"""Prometheus metrics of one app, on a registry of its own so several apps can live in one process."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# A counter's `_created` series (its creation time) doubles the exposition and no dashboard here
# reads it; the switch is process-wide in prometheus_client.
disable_created_metrics()
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """Requests by endpoint and status, errors by code, captions by model and decoding mode,
    request latency; by model: batch sizes, queue depth, readiness and swaps."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "captioner_http_requests",
            "HTTP requests answered, by endpoint (route pattern), method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "captioner_http_errors",
            "Error answers, by status and error code (the code in the JSON body)",
            ["status", "code"],
            registry=self.registry,
        )
        self.unauthorized = Counter(
            "captioner_unauthorized",
            "Requests refused for a missing or wrong key (401), by endpoint and reason (missing, wrong)",
            ["endpoint", "reason"],
            registry=self.registry,
        )
        self.captions = Counter(
            "captioner_caption_requests",
            "Caption requests answered, by model, decoding mode and whether explanations were asked for",
            ["model", "mode", "explain"],
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
            "Images per model call made by the micro-batcher, by model",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "captioner_queue_depth", "Caption requests handed to the model, not yet answered, by model", ["model"], registry=self.registry
        )
        self.ready = Gauge("captioner_model_ready", "1 once the model is loaded, by model", ["model"], registry=self.registry)
        self.swaps = Counter(
            "captioner_model_swaps",
            "Swaps of a model for a new file (SIGHUP), by model and outcome (swapped, refused)",
            ["model", "outcome"],
            registry=self.registry,
        )

    def track_model(self, name: str, depth: Callable[[], float], ready: Callable[[], bool]) -> None:
        """Read a model's queue depth and readiness when scraped, so they are never stale."""
        self.queue_depth.labels(name).set_function(depth)
        self.ready.labels(name).set_function(lambda: float(ready()))

    def forget_model(self, name: str) -> None:
        """A model no longer offered: its gauges go (its counts stay)."""
        for gauge in (self.queue_depth, self.ready):
            try:
                gauge.remove(name)
            except KeyError:
                pass

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float, error_code: str | None) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if error_code is not None:
            self.errors.labels(str(status), error_code).inc()

    def observe_captions(self, model: str, mode: str, explain: bool) -> None:
        self.captions.labels(model, mode, "true" if explain else "false").inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of everything above."""
        return generate_latest(self.registry)
