"""Prometheus metrics, one registry per app (no import-time globals, so tests build many apps)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The service's counters: requests, latency, batch sizes, queue depth, items embedded."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "bindsearch_requests_total",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bindsearch_request_duration_seconds",
            "HTTP request latency by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "bindsearch_batch_size",
            "Inputs per model batch, by modality.",
            ["modality"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "bindsearch_queue_depth",
            "Inputs waiting for the model, by modality.",
            ["modality"],
            registry=self.registry,
        )
        self.embedded = Counter(
            "bindsearch_items_embedded_total",
            "Inputs embedded, by modality.",
            ["modality"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "bindsearch_queue_rejected_total",
            "Inputs refused with 429 (queue full), by modality.",
            ["modality"],
            registry=self.registry,
        )

        self.inflight_bytes = Gauge(
            "bindsearch_inflight_request_bytes",
            "Request body bytes held by the requests in flight (capped by max_inflight_bytes).",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP response by method, route template and status, with its latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server error middleware answers if the app raises

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            labels = (scope["method"], template, str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
