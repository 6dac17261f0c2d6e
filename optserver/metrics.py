"""Prometheus metrics of one server, in a registry of its own (tests run several apps)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from optserver.store import SessionStore
from optserver.workers import STALENESS_BUCKETS, StalenessHistogram

__all__ = ["Metrics", "MetricsMiddleware"]

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, store: SessionStore) -> None:
        r = self.registry = CollectorRegistry()
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
        r.register(SessionCollector(store))


def _buckets(histogram: StalenessHistogram) -> list[tuple[str, float]]:
    cumulative, out = 0, list[tuple[str, float]]()
    for bound, count in zip(STALENESS_BUCKETS, histogram.counts, strict=False):
        cumulative += count
        out.append((str(float(bound)), cumulative))
    out.append(("+Inf", histogram.count))
    return out


class SessionCollector:
    """The server's step and push totals, and per-session and per-worker bookkeeping, read
    from the store at scrape time: counted once, where they happen (a sync round is one step),
    and deleted sessions and forgotten workers simply disappear from the per-session series."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        steps = CounterMetricFamily("optserver_steps_applied", "Optimizer steps applied.")
        received = CounterMetricFamily("optserver_pushes_received", "Gradient pushes received.")
        refused = CounterMetricFamily(
            "optserver_pushes_rejected", "Pushes refused or skipped, by reason.", labels=["reason"]
        )
        totals = self.store.totals()
        steps.add_metric([], totals["steps_applied"])
        received.add_metric([], totals["pushes_received"])
        for reason, count in sorted(totals["rejected"].items()):
            refused.add_metric([reason], count)
        yield from (steps, received, refused)
        labels = ["session", "worker"]
        staleness = HistogramMetricFamily(
            "optserver_push_staleness",
            "Steps between the version a gradient was computed on and the one it was applied "
            "to, per session.",
            labels=["session"],
        )
        pushes = CounterMetricFamily("optserver_worker_pushes", "Pushes by worker.", labels=labels)
        applied = CounterMetricFamily(
            "optserver_worker_applied", "Pushes applied, by worker.", labels=labels
        )
        rejected = CounterMetricFamily(
            "optserver_worker_rejected", "Pushes refused or skipped, by worker.", labels=labels
        )
        seen = GaugeMetricFamily(
            "optserver_worker_last_base_version",
            "The version a worker's last push was computed on.",
            labels=labels,
        )
        session_bytes = GaugeMetricFamily(
            "optserver_session_bytes",
            "Bytes of weights and optimizer state held by a session.",
            labels=["session"],
        )
        worker_staleness = HistogramMetricFamily(
            "optserver_worker_staleness", "Staleness of a worker's applied pushes.", labels=labels
        )
        for session in self.store.sessions():
            with session.locked():
                session_bytes.add_metric([session.id], session.memory_bytes)
                staleness.add_metric(
                    [session.id], _buckets(session.staleness), float(session.staleness.total)
                )
                for worker, stats in session.workers:
                    key = [session.id, worker]
                    pushes.add_metric(key, stats.pushes)
                    applied.add_metric(key, stats.applied)
                    rejected.add_metric(key, sum(stats.rejected.values()))
                    if stats.last_base_version is not None:
                        seen.add_metric(key, stats.last_base_version)
                    worker_staleness.add_metric(
                        key, _buckets(stats.staleness), float(stats.staleness.total)
                    )
        yield from (session_bytes, staleness, pushes, applied, rejected, seen, worker_staleness)


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
