"""Every error as RFC 9457 ``application/problem+json``: ours, FastAPI's and Starlette's."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from optserver_client.vocabulary import PROBLEM
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from optserver.errors import ProblemError, UnprocessableContent
from optserver.wire import encode_json

__all__ = ["exception_response", "install_problem_handlers", "problem_response"]

log = logging.getLogger("optserver")


def problem_response(problem: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(
        encode_json(problem), status_code=problem["status"], media_type=PROBLEM, headers=headers
    )


async def _ours(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return problem_response(exc.to_problem(), exc.headers)


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"]) or "request"
    # FastAPI's validation errors are ours too: the same type, title and status.
    return await _ours(request, UnprocessableContent(f"{where}: {first['msg']}", errors=errors))


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problem_response(
        {"type": "about:blank", "title": _title(exc.status_code), "status": exc.status_code,
         "detail": str(detail)},
        dict(exc.headers or {}),
    )  # fmt: skip


async def _disconnect(request: Request, exc: Exception) -> Response:
    return Response(status_code=400)  # nobody is listening any more


async def _unexpected(request: Request, exc: Exception) -> Response:
    return exception_response(request, exc)


def exception_response(request: Request, exc: Exception) -> Response:
    """The answer to ``exc`` raised while serving ``request``: its problem for ours, else a
    logged internal error (500) that names only the exception's type."""
    if isinstance(exc, ProblemError):
        return problem_response(exc.to_problem(), exc.headers)
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    # The base class is the internal error (500).
    unexpected = ProblemError(f"unexpected {type(exc).__name__}; see the server log")
    return problem_response(unexpected.to_problem(), unexpected.headers)


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _ours)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(ClientDisconnect, _disconnect)
    app.add_exception_handler(Exception, _unexpected)
