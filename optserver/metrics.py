"""Prometheus metrics of one server, in a registry of its own (tests run several apps)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from optserver.store import SessionStore

__all__ = ["Metrics", "MetricsMiddleware"]

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, store: SessionStore) -> None:
        r = self.registry = CollectorRegistry()
        self.steps = Counter("optserver_steps_applied", "Optimizer steps applied.", registry=r)
        self.pushes = Counter("optserver_pushes_received", "Gradient pushes received.", registry=r)
        self.rejected = Counter(
            "optserver_pushes_rejected", "Pushes refused or skipped, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.replays = Counter(
            "optserver_idempotent_replays", "Pushes answered from the idempotency memory.",
            registry=r,
        )  # fmt: skip
        self.step_seconds = Histogram(
            "optserver_step_seconds", "Time to apply one push (lock wait excluded).",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.bytes = Counter(
            "optserver_http_bytes", "HTTP body bytes, by direction (in, out).", ["direction"],
            registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "optserver_http_requests", "HTTP requests by method, route and status.",
            ["method", "route", "status"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "optserver_http_request_seconds", "HTTP request latency by route.", ["route"],
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        sessions = Gauge("optserver_sessions", "Sessions held.", registry=r)
        sessions.set_function(lambda: len(store))
        memory = Gauge(
            "optserver_session_memory_bytes", "Bytes of weights and optimizer state held.",
            registry=r,
        )  # fmt: skip
        memory.set_function(lambda: sum(s.memory_bytes for s in store.sessions()))


class MetricsMiddleware:
    """Counts requests, latency and body bytes of every HTTP exchange (pure ASGI: no copies)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics, start, status = self.metrics, time.perf_counter(), [500]
        bytes_in = metrics.bytes.labels("in")
        bytes_out = metrics.bytes.labels("out")

        async def counting_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                bytes_in.inc(len(message.get("body", b"")))
            return message

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                bytes_out.inc(len(message.get("body", b"")))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.requests.labels(scope["method"], route, str(status[0])).inc()
            metrics.request_seconds.labels(route).observe(time.perf_counter() - start)
