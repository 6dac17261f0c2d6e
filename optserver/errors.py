"""The service's exception hierarchy; each maps to one RFC 9457 problem type.

Everything a request can do wrong raises a subclass of :class:`ProblemError`. The HTTP layer turns
it into ``application/problem+json`` with ``type``, ``title``, ``status``, ``detail`` and the
exception's ``extra`` members (``tensor``, ``expected``, ``received``, ``current_version``, ...).
The store raises these too: they carry an HTTP status, but nothing of FastAPI.
"""

from __future__ import annotations

from typing import Any, ClassVar

from optserver_client.vocabulary import RETRY_AFTER_HEADER, ProblemSlug, problem_type
from pydantic import ValidationError

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
    "invalid_fields",
    "problem_type",
]


class ProblemError(Exception):
    """Base of every error answered as problem+json."""

    status: ClassVar[int] = 500
    #: Each class's default is a ProblemSlug member, as is every ``slug`` argument (typed so).
    #: An instance holds a plain str: slugs key counts of rejections, which are written with
    #: orjson, and orjson takes no str subclass as a dict key.
    slug: str = ProblemSlug.INTERNAL_ERROR
    title: ClassVar[str] = "Internal server error"

    def __init__(
        self,
        detail: str,
        *,
        slug: ProblemSlug | None = None,
        retry_after: float | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        self.slug = str(type(self).slug if slug is None else slug)
        self.headers: dict[str, str] = {}
        if retry_after is not None:  # when trying again makes sense (503, 507)
            self.headers[RETRY_AFTER_HEADER] = str(max(1, round(retry_after)))

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
    slug = ProblemSlug.MALFORMED_BODY
    title = "Malformed request body"


class UnprocessableContent(ProblemError):
    """Well-formed, but the values are not acceptable (options, modes, names)."""

    status = 422
    slug = ProblemSlug.INVALID_REQUEST
    title = "Invalid request"


class InvalidTensor(UnprocessableContent):
    """A tensor does not fit: unknown name, shape or dtype mismatch, NaN/Inf, too large."""

    slug = ProblemSlug.INVALID_TENSOR
    title = "Invalid tensor"


class Unauthorized(ProblemError):
    status = 401
    slug = ProblemSlug.UNAUTHORIZED
    title = "Missing or wrong credentials"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.headers["WWW-Authenticate"] = 'Bearer realm="optserver"'


class Forbidden(ProblemError):
    status = 403
    slug = ProblemSlug.FORBIDDEN
    title = "Credentials do not open this resource"


class NotFound(ProblemError):
    status = 404
    slug = ProblemSlug.NOT_FOUND
    title = "Not found"


class NotAcceptable(ProblemError):
    status = 406
    slug = ProblemSlug.NOT_ACCEPTABLE
    title = "No acceptable response type"


class Conflict(ProblemError):
    status = 409
    slug = ProblemSlug.CONFLICT
    title = "Conflict with the session's state"


class StaleGradient(Conflict):
    """ssp mode: the push was computed on weights too many versions old."""

    slug = ProblemSlug.STALE_GRADIENT
    title = "Stale gradient"


class PayloadTooLarge(ProblemError):
    status = 413
    slug = ProblemSlug.PAYLOAD_TOO_LARGE
    title = "Request body too large"


class UnsupportedMediaType(ProblemError):
    status = 415
    slug = ProblemSlug.UNSUPPORTED_MEDIA_TYPE
    title = "Unsupported content type"


class LimitExceeded(ProblemError):
    """A configured quota (sessions, tensors, elements) would be exceeded."""

    status = 429
    slug = ProblemSlug.LIMIT_EXCEEDED
    title = "Limit exceeded"


class InsufficientStorage(ProblemError):
    """The total-bytes quota of the server would be exceeded."""

    status = 507
    slug = ProblemSlug.INSUFFICIENT_STORAGE
    title = "Quota of stored bytes exceeded"


class ServiceUnavailable(ProblemError):
    status = 503
    slug = ProblemSlug.UNAVAILABLE
    title = "Service unavailable"


class JournalUnavailable(ServiceUnavailable):
    """The data directory cannot record the change (a read-only or failing disk): nothing was
    applied; retry later (``Retry-After``)."""

    slug = ProblemSlug.JOURNAL_UNAVAILABLE
    title = "The journal cannot record changes"


class DiskFull(InsufficientStorage):
    """The data directory's filesystem is out of space or inodes (ENOSPC, EDQUOT): nothing was
    applied; retry once space is freed (``Retry-After``)."""

    title = "Insufficient storage"


class NonfiniteResult(UnprocessableContent):
    """The step would leave NaN or Inf in the weights or the optimizer state (nonfinite policy
    ``reject``): it was refused and nothing changed."""

    slug = ProblemSlug.NONFINITE_RESULT
    title = "The step would produce NaN or Inf"


class IdempotencyKeyReused(UnprocessableContent):
    """An Idempotency-Key seen before arrived with a different request."""

    slug = ProblemSlug.IDEMPOTENCY_KEY_REUSED
    title = "Idempotency-Key reused with a different request"


class HeadersTooLarge(ProblemError):
    """The request's header fields exceed the server's limit (they are held in memory)."""

    status = 431
    slug = ProblemSlug.HEADERS_TOO_LARGE
    title = "Request header fields too large"


class RequestTimeout(ProblemError):
    """The client sent its request too slowly (headers or body past their deadline)."""

    status = 408
    slug = ProblemSlug.REQUEST_TIMEOUT
    title = "Request timeout"


def invalid_fields(error: ValidationError, where: str = "") -> UnprocessableContent:
    """A pydantic ``ValidationError`` as a 422 that names each field and what is wrong with it
    (``errors``: loc, msg, type), never the value sent (it may be a secret); ``where`` prefixes
    the locations (e.g. the metadata key of an embedded document)."""
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"])
    place = ": ".join(part for part in (where, field) if part) or "body"
    return UnprocessableContent(
        f"{place}: {first['msg']}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
        errors=errors,
    )
