"""The client's exceptions: one hierarchy, rooted at :class:`OptserverError`.

::

    OptserverError
    ├── TransportError            the server could not be reached (after the retries)
    ├── ProtocolError             the server answered something the client cannot read
    ├── ShardError                some shards of a sharded session failed, the others did not
    └── APIError                  the server answered with an error (problem+json)
        ├── ValidationError       400, 406, 415, 422: the request was wrong
        ├── AuthenticationError   401: missing or wrong token / admin key
        ├── PermissionDeniedError 403: the credentials do not open this session
        ├── NotFoundError         404
        ├── ConflictError         409
        │   └── StaleGradientError  ssp mode: the push's base_version is too old
        ├── PayloadTooLargeError  413
        ├── LimitExceededError    429, 507: a server quota is exhausted
        └── ServerError           5xx

Every :class:`APIError` carries the whole RFC 9457 problem document (``.problem``) besides its
standard members, so extension members (``tensor``, ``expected``, ...) are never lost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from optserver_client.vocabulary import VERSION_HEADER, ProblemSlug, problem_type

__all__ = [
    "APIError",
    "AuthenticationError",
    "ConflictError",
    "LimitExceededError",
    "NotFoundError",
    "OptserverError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProtocolError",
    "ServerError",
    "ShardError",
    "StaleGradientError",
    "TransportError",
    "ValidationError",
    "error_from_parts",
    "error_from_response",
]

# Longest piece of a non-JSON error body kept in the exception (an HTML error page can be long).
_MAX_TEXT_DETAIL = 500


class OptserverError(Exception):
    """Base class of every exception this package raises on purpose."""


class TransportError(OptserverError):
    """The request failed at the connection level and retrying did not help.

    ``error`` is the last httpx exception (also chained as ``__cause__``); ``attempts`` counts the
    requests made, the first one included.
    """

    def __init__(self, message: str, *, error: httpx.RequestError, attempts: int) -> None:
        super().__init__(message)
        self.error = error
        self.attempts = attempts


class ProtocolError(OptserverError):
    """A successful response whose body does not follow the protocol (bad safetensors, ...)."""


class ShardError(OptserverError):
    """Part of an operation on a sharded session failed: the shards in ``errors`` (shard index
    -> the exception, an :class:`APIError` or :class:`TransportError`, at ``urls[index]``) did
    not do their part; the others did theirs, which is kept. ``shard`` and ``error`` are the
    first failed shard and its exception (also chained as ``__cause__``).

    For a step, ``key`` is its Idempotency-Key: pushing the same request again (gradients and
    options) with ``key=error.key`` completes the step exactly once (the shards that applied it
    answer from memory, the others apply it), unless a shard refused it as stale, which it
    would do again. Other operations (PATCH, PUT, DELETE) can simply be repeated.
    ``results``: what each shard that did its part answered (parsed), by shard index.
    """

    def __init__(
        self,
        errors: Mapping[int, BaseException],
        urls: Mapping[int, str],
        *,
        key: str | None = None,
        results: Mapping[int, Any] | None = None,
    ) -> None:
        self.errors = dict(errors)
        self.urls = dict(urls)
        self.key = key
        self.results = dict(results or {})
        self.shard = min(self.errors)
        self.error = self.errors[self.shard]
        failed = ", ".join(f"{i} ({self.urls.get(i, '?')})" for i in self.errors)
        retry = f"; push again with key={key!r} to complete it" if key is not None else ""
        super().__init__(f"shard {failed} failed: {self.error}{retry}")


class APIError(OptserverError):
    """The server answered with an HTTP error status.

    ``status``, ``type``, ``title`` and ``detail`` are the problem document's standard members,
    ``problem`` the whole document (extension members included) and ``response_headers`` the
    response's headers. For a body that is not problem+json, ``problem`` is synthesized from the
    status line and the body's text.
    """

    def __init__(
        self,
        status: int,
        problem: Mapping[str, Any],
        response_headers: httpx.Headers | None = None,
    ) -> None:
        self.status = status
        self.problem: dict[str, Any] = dict(problem)
        self.type = str(problem.get("type") or "about:blank")
        self.title = str(problem.get("title") or _reason(status))
        self.detail = str(problem.get("detail") or "")
        self.response_headers = (
            response_headers if response_headers is not None else httpx.Headers()
        )
        message = f"{status} {self.title}"
        super().__init__(f"{message}: {self.detail}" if self.detail else message)


class ValidationError(APIError):
    """400, 406, 415 or 422: the request itself is wrong (tensor, shape, dtype, option, ...)."""


class AuthenticationError(APIError):
    """401: the token or admin key is missing or wrong."""


class PermissionDeniedError(APIError):
    """403: the credentials are valid but do not open this resource."""


class NotFoundError(APIError):
    """404: no such session (or route)."""


class ConflictError(APIError):
    """409: the request conflicts with the session's current state."""


class StaleGradientError(ConflictError):
    """409 in ssp mode: the push was computed on weights too many versions behind.

    ``current_version`` is the session's version when the push was refused (the problem's
    ``current_version`` member, else the version header, else -1): pull the
    weights, recompute, push again.
    """

    def __init__(
        self,
        status: int,
        problem: Mapping[str, Any],
        response_headers: httpx.Headers | None = None,
    ) -> None:
        super().__init__(status, problem, response_headers)
        self.current_version = _current_version(problem, self.response_headers)


class PayloadTooLargeError(APIError):
    """413: the request body exceeds the server's limit; push fewer or smaller tensors."""


class LimitExceededError(APIError):
    """429 or 507: a server quota (sessions, tensors, elements, memory) is exhausted."""


class ServerError(APIError):
    """5xx: the server failed (503 only once the retries are used up)."""


_STALE_GRADIENT = problem_type(ProblemSlug.STALE_GRADIENT)

_BY_STATUS: dict[int, type[APIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    406: ValidationError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: ValidationError,
    422: ValidationError,
    429: LimitExceededError,
    507: LimitExceededError,
}


def error_from_parts(
    status: int, headers: httpx.Headers | Mapping[str, str], body: bytes | bytearray | memoryview
) -> APIError:
    """The exception for an error response given as status, headers and body."""
    headers = headers if isinstance(headers, httpx.Headers) else httpx.Headers(headers)
    problem = _problem(status, headers, body)
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else APIError
    if status == 409 and problem.get("type") == _STALE_GRADIENT:
        cls = StaleGradientError
    return cls(status, problem, headers)


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error :class:`httpx.Response` (its body must have been read)."""
    return error_from_parts(response.status_code, response.headers, response.content)


def _problem(
    status: int, headers: httpx.Headers, body: bytes | bytearray | memoryview
) -> dict[str, Any]:
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.endswith("json") and body:
        try:
            document = json.loads(bytes(body))
        except ValueError:
            document = None
        if isinstance(document, dict):
            document.setdefault("status", status)
            return document
    # A proxy's HTML page, a plain-text 502, an empty 503: keep what can be shown.
    text = bytes(body[:_MAX_TEXT_DETAIL]).decode("utf-8", "replace").strip()
    return {"type": "about:blank", "title": _reason(status), "status": status, "detail": text}


def _reason(status: int) -> str:
    phrase: str = httpx.codes.get_reason_phrase(status)
    return phrase or "HTTP error"


def _current_version(problem: Mapping[str, Any], headers: httpx.Headers) -> int:
    for value in (problem.get("current_version"), headers.get(VERSION_HEADER)):
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
    return -1
