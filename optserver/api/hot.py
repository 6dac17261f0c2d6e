"""The hot routes (push a step, pull weights) answered without FastAPI's per-request machinery.

A step at 1e3 floats spends most of its server time outside the step itself: FastAPI resolves
the route's dependencies (a third of the busy time), then the middleware stack and the router
each wrap ``receive`` and ``send`` again. :class:`HotPath` is a pure ASGI middleware in front of
all that: for ``POST .../step`` and ``GET .../params`` it does what the FastAPI route does, in
the same order and with the same functions (bearer token, :meth:`SessionStore.open`, content
negotiation, :meth:`Service.push` / :meth:`Service.pull`), and records the same metrics.

It answers only what it can answer exactly as the route would: a request whose parameters the
route would refuse with a validation error (a session id over 64 characters, an unknown
``return``, an over-long ``Idempotency-Key``) is handed to the route, untouched, so that every
refusal keeps FastAPI's wording. The routes stay registered, so OpenAPI documents them as they
are, and ``Settings.hot_path = False`` serves everything through them.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from optserver_client.vocabulary import IDEMPOTENCY_KEY_HEADER, RETURN_MODES
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from optserver.api.direct import direct_bytes
from optserver.api.http import read_body, reply_response, request_format, response_format
from optserver.api.problems import exception_response
from optserver.metrics import Metrics
from optserver.replies import Format, Returns
from optserver.service import Service
from optserver.session import Session
from optserver.wire import Buffer

__all__ = ["MAX_IDEMPOTENCY_KEY", "MAX_SESSION_ID", "HotPath", "HotRoute", "bearer_token"]

log = logging.getLogger("optserver")

#: The routes' own bounds on these parameters (``Path(max_length=...)``, ``Header(...)``).
MAX_SESSION_ID = 64
MAX_IDEMPOTENCY_KEY = 256

#: A handler: the request and its session id; None hands the request to the FastAPI route.
Handler = Callable[[Request, str], Awaitable[Response] | None]


@dataclass(frozen=True)
class HotRoute:
    """One route taken here: its method, its FastAPI route's path regex and template (the
    metrics label), and the handler."""

    method: str
    regex: re.Pattern[str]
    template: str
    handler: Handler


def bearer_token(request: Request) -> str | None:
    """The bearer token, as ``fastapi.security.HTTPBearer(auto_error=False)`` reads it."""
    authorization = request.headers.get("authorization")
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    if not scheme or not credentials or scheme.lower() != "bearer":
        return None
    return credentials


class HotPath:
    """The ASGI middleware: the hot routes here, everything else to ``app``."""

    def __init__(self, app: ASGIApp, *, routes: list[HotRoute], metrics: Metrics) -> None:
        self.app = app
        self.routes = routes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes:
                if scope["method"] != route.method:
                    continue
                match = route.regex.match(scope["path"])
                if match is None:
                    continue
                await self._serve(route, match.group(1), scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self, route: HotRoute, session_id: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        start = time.perf_counter()
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        request = Request(scope, counting_receive)
        answer = route.handler(request, session_id)
        if answer is None:
            await self.app(scope, receive, send)  # nothing was read: the route takes it whole
            return
        try:
            response = await answer
        except ClientDisconnect:
            response = Response(status_code=400)  # as the app's handler: nobody listens now
        except Exception as exc:
            response = exception_response(request, exc)
        await response(scope, counting_receive, send)
        metrics = self.metrics
        metrics.bytes.labels("in").inc(received + direct_bytes(scope))
        metrics.bytes.labels("out").inc(memoryview(response.body).nbytes)
        metrics.requests.labels(route.method, route.template, str(response.status_code)).inc()
        metrics.request_seconds.labels(route.template).observe(time.perf_counter() - start)


class Handlers:
    """The hot handlers of one app: the same steps as the routes in
    :mod:`optserver.api.routes.tensors`, given the app's service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def _open(self, request: Request, session_id: str) -> Session:
        return self.service.store.open(session_id, bearer_token(request))

    def step(self, request: Request, session_id: str) -> Awaitable[Response] | None:
        query = request.query_params
        returns = query.get("return", "stepped")
        key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
        if (
            len(session_id) > MAX_SESSION_ID
            or returns not in RETURN_MODES
            or (key is not None and len(key) > MAX_IDEMPOTENCY_KEY)
        ):
            return None
        return self._step(request, session_id, returns, key)

    async def _step(
        self, request: Request, session_id: str, returns: Returns, key: str | None
    ) -> Response:
        session = self._open(request, session_id)
        fmt_out = response_format(request)
        service = self.service

        async def read() -> tuple[Format, Buffer]:
            fmt_in = request_format(request)
            return fmt_in, await read_body(request, service.settings, fmt_in)

        reply = await service.push(session, read, fmt_out=fmt_out, returns=returns, key=key)
        return reply_response(reply)

    def pull(self, request: Request, session_id: str) -> Awaitable[Response] | None:
        if len(session_id) > MAX_SESSION_ID:
            return None
        return self._pull(request, session_id, request.query_params.get("names"))

    async def _pull(self, request: Request, session_id: str, names: str | None) -> Response:
        session = self._open(request, session_id)
        fmt = response_format(request)
        wanted = [n for n in names.split(",") if n] if names is not None else None
        return reply_response(await self.service.pull(session, wanted, fmt))


def hot_routes(app_routes: Sequence[Any], handlers: Handlers) -> list[HotRoute]:
    """The hot routes, from the FastAPI routes that document them (by operation id; the
    routes as declared, included without a further prefix): their
    regex and template are the routes' own."""
    wanted = {"step": handlers.step, "pullParams": handlers.pull}
    found = []
    for route in app_routes:
        handler = wanted.get(getattr(route, "operation_id", None) or "")
        if handler is None:
            continue
        (method,) = route.methods - {"HEAD"}
        if list(route.param_convertors) != ["session_id"]:
            raise AssertionError(f"{route.path} has parameters the hot path does not read")
        found.append(HotRoute(method, route.path_regex, route.path, handler))
    if len(found) != len(wanted):
        raise AssertionError(f"hot routes missing: {sorted(wanted)}")
    return found
