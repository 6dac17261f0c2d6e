"""The ASGI middleware that counts every HTTP exchange into the server's :class:`Metrics`:
requests by method, route template and status, their latency, and body bytes both ways."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from optserver.api.direct import direct_bytes
from optserver.metrics import Metrics

__all__ = ["MetricsMiddleware"]

#: Methods counted under their own name; any other is "other" (clients choose methods).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    """Counts requests, latency and body bytes of every HTTP exchange (pure ASGI: no copies).

    Requests are labelled by the path template of the route that took them, never by the raw
    path (clients choose paths: the series would be unbounded); paths no route matches are
    ``unmatched``."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # id(endpoint) -> (endpoint, template), for the routes that leave scope["route"] unset;
        # built on first use (routes are added after the middleware is made) and again when
        # the number of routes changes.
        self._templates: dict[int, tuple[object, str]] = {}
        self._routes_seen = -1

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
            # FastAPI's routes name themselves in scope["route"] (the hot path: no lookup);
            # Starlette's Route and Mount (/openapi.json, the docs' static files) only leave
            # the endpoint they matched in scope["endpoint"].
            route = getattr(scope.get("route"), "path", None) or self._template(scope)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            bytes_in.inc(direct_bytes(scope))  # read into its buffer, past receive()
            metrics.requests.labels(method, route, str(status[0])).inc()
            metrics.request_seconds.labels(route).observe(time.perf_counter() - start)

    def _template(self, scope: Any) -> str:
        """The path template of the route whose endpoint is ``scope["endpoint"]``, or
        ``unmatched`` (no route took the request)."""
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return "unmatched"
        routes = getattr(scope.get("router"), "routes", None) or []
        if len(routes) != self._routes_seen:
            self._templates = {}
            self._index(routes, "")
            self._routes_seen = len(routes)
        known = self._templates.get(id(endpoint))
        # Keyed by id: endpoints may be unhashable; the identity check rules out a reused id.
        return known[1] if known is not None and known[0] is endpoint else "unmatched"

    def _index(self, routes: Iterable[Any], prefix: str) -> None:
        for route in routes:
            # A Mount's template ends in "/{path}": one series for everything under it.
            template = getattr(route, "path_format", None)
            # What the route puts in scope["endpoint"]: a Route its endpoint, a Mount its app.
            endpoint = getattr(route, "endpoint", None)
            if endpoint is None:
                endpoint = getattr(route, "app", None)
            if isinstance(template, str) and endpoint is not None:
                # An endpoint served at several paths counts under the first of them.
                self._templates.setdefault(id(endpoint), (endpoint, prefix + template))
            # A mounted app's own routes record their endpoint in place of the Mount's.
            children = getattr(route, "routes", None)
            if isinstance(template, str) and template.endswith("/{path}") and children:
                self._index(children, prefix + template.removesuffix("/{path}"))
