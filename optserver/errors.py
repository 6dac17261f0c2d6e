"""The service's exception hierarchy; each maps to one RFC 9457 problem type.

Everything a request can do wrong raises a subclass of :class:`ProblemError`. The HTTP layer turns
it into ``application/problem+json`` with ``type``, ``title``, ``status``, ``detail`` and the
exception's ``extra`` members (``tensor``, ``expected``, ``received``, ``current_version``, ...).
The store raises these too: they carry an HTTP status, but nothing of FastAPI.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BadRequest",
    "Conflict",
    "DiskFull",
    "Forbidden",
    "HeadersTooLarge",
    "IdempotencyKeyReused",
    "InsufficientStorage",
    "InvalidTensor",
    "JournalUnavailable",
    "LimitExceeded",
    "NonfiniteResult",
    "NotAcceptable",
    "NotFound",
    "PayloadTooLarge",
    "ProblemError",
    "RequestTimeout",
    "ServiceUnavailable",
    "StaleGradient",
    "Unauthorized",
    "UnprocessableContent",
    "UnsupportedMediaType",
    "problem_type",
]

PROBLEM_BASE = "urn:optserver:problem:"


def problem_type(slug: str) -> str:
    """The ``type`` URI of a problem: ``urn:optserver:problem:<slug>``."""
    return PROBLEM_BASE + slug


class ProblemError(Exception):
    """Base of every error answered as problem+json."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal server error"

    def __init__(
        self,
        detail: str,
        *,
        slug: str | None = None,
        retry_after: float | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        if slug is not None:
            self.slug = slug  # type: ignore[misc]
        self.headers: dict[str, str] = {}
        if retry_after is not None:  # when trying again makes sense (503, 507)
            self.headers["Retry-After"] = str(max(1, round(retry_after)))

    @property
    def type(self) -> str:
        return problem_type(self.slug)

    def to_problem(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


class BadRequest(ProblemError):
    """Malformed body: not JSON, not safetensors, a header that does not add up."""

    status = 400
    slug = "malformed-body"
    title = "Malformed request body"


class UnprocessableContent(ProblemError):
    """Well-formed, but the values are not acceptable (options, modes, names)."""

    status = 422
    slug = "invalid-request"
    title = "Invalid request"


class InvalidTensor(UnprocessableContent):
    """A tensor does not fit: unknown name, shape or dtype mismatch, NaN/Inf, too large."""

    slug = "invalid-tensor"
    title = "Invalid tensor"


class Unauthorized(ProblemError):
    status = 401
    slug = "unauthorized"
    title = "Missing or wrong credentials"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.headers["WWW-Authenticate"] = 'Bearer realm="optserver"'


class Forbidden(ProblemError):
    status = 403
    slug = "forbidden"
    title = "Credentials do not open this resource"


class NotFound(ProblemError):
    status = 404
    slug = "not-found"
    title = "Not found"


class NotAcceptable(ProblemError):
    status = 406
    slug = "not-acceptable"
    title = "No acceptable response type"


class Conflict(ProblemError):
    status = 409
    slug = "conflict"
    title = "Conflict with the session's state"


class StaleGradient(Conflict):
    """ssp mode: the push was computed on weights too many versions old."""

    slug = "stale-gradient"
    title = "Stale gradient"


class PayloadTooLarge(ProblemError):
    status = 413
    slug = "payload-too-large"
    title = "Request body too large"


class UnsupportedMediaType(ProblemError):
    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported content type"


class LimitExceeded(ProblemError):
    """A configured quota (sessions, tensors, elements) would be exceeded."""

    status = 429
    slug = "limit-exceeded"
    title = "Limit exceeded"


class InsufficientStorage(ProblemError):
    """The total-bytes quota of the server would be exceeded."""

    status = 507
    slug = "insufficient-storage"
    title = "Quota of stored bytes exceeded"


class ServiceUnavailable(ProblemError):
    status = 503
    slug = "unavailable"
    title = "Service unavailable"


class JournalUnavailable(ServiceUnavailable):
    """The data directory cannot record the change (a read-only or failing disk): nothing was
    applied; retry later (``Retry-After``)."""

    slug = "journal-unavailable"
    title = "The journal cannot record changes"


class DiskFull(InsufficientStorage):
    """The data directory's filesystem is out of space or inodes (ENOSPC, EDQUOT): nothing was
    applied; retry once space is freed (``Retry-After``)."""

    title = "Insufficient storage"


class NonfiniteResult(UnprocessableContent):
    """The step would leave NaN or Inf in the weights or the optimizer state (nonfinite policy
    ``reject``): it was refused and nothing changed."""

    slug = "nonfinite-result"
    title = "The step would produce NaN or Inf"


class IdempotencyKeyReused(UnprocessableContent):
    """An Idempotency-Key seen before arrived with a different request."""

    slug = "idempotency-key-reused"
    title = "Idempotency-Key reused with a different request"


class HeadersTooLarge(ProblemError):
    """The request's header fields exceed the server's limit (they are held in memory)."""

    status = 431
    slug = "headers-too-large"
    title = "Request header fields too large"


class RequestTimeout(ProblemError):
    """The client sent its request too slowly (headers or body past their deadline)."""

    status = 408
    slug = "request-timeout"
    title = "Request timeout"
