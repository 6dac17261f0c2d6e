"""HTTP plumbing shared by the routes: bounded body reading, content negotiation, responses."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response

from optserver.errors import BadRequest, NotAcceptable, PayloadTooLarge, UnsupportedMediaType
from optserver.replies import MEDIA, Format
from optserver.wire import Buffer, allocate

__all__ = [
    "Format",
    "RawResponse",
    "read_body",
    "request_format",
    "response_format",
]


async def read_body(request: Request, limit: int) -> Buffer:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(f"invalid Content-Length {declared!r}") from None
        if size > limit:
            raise PayloadTooLarge(
                f"the body of {size} bytes exceeds the limit of {limit} bytes", limit=limit
            )
        body = allocate(size)
        position = 0
        async for chunk in request.stream():
            end = position + len(chunk)
            if end > size:
                raise BadRequest("the body is longer than its Content-Length")
            body[position:end] = chunk
            position = end
        if position != size:
            raise BadRequest(f"the body ended after {position} of {size} bytes")
        return body
    grown = bytearray()
    async for chunk in request.stream():
        grown += chunk
        if len(grown) > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes", limit=limit)
    return grown


def request_format(request: Request, allowed: tuple[Format, ...] = ("json", "binary")) -> Format:
    """Which encoding the body uses, from Content-Type (415 for anything else)."""
    raw = request.headers.get("content-type", "")
    media = raw.split(";", 1)[0].strip().lower()
    for fmt in allowed:
        if media == MEDIA[fmt]:
            return fmt
    wanted = " or ".join(MEDIA[f] for f in allowed)
    raise UnsupportedMediaType(
        f"Content-Type {raw or '(none)'!r} is not supported here; send {wanted}",
        received=raw or None,
    )


def response_format(request: Request, allowed: tuple[Format, ...] = ("json", "binary")) -> Format:
    """The encoding the client accepts best (Accept header, q-values; JSON by default)."""
    header = request.headers.get("accept")
    if not header:
        return allowed[0]
    best: tuple[float, int, Format] | None = None
    for order, part in enumerate(header.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        q = 1.0
        for param in fields[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        candidates: list[Format]
        if media in ("*/*", "application/*"):
            candidates = [allowed[0]]
        else:
            candidates = [f for f in allowed if MEDIA[f] == media]
        for fmt in candidates:
            rank = (q, -order, fmt)
            if best is None or rank[:2] > best[:2]:
                best = rank
    if best is None:
        offered = ", ".join(MEDIA[f] for f in allowed)
        raise NotAcceptable(f"Accept {header!r} matches nothing this route returns ({offered})")
    return best[2]


class RawResponse(Response):
    """A response whose body is already encoded (any bytes-like object, sent without a copy)."""

    def __init__(
        self,
        body: Buffer,
        *,
        media_type: str,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(b"", status_code=status_code, headers=headers, media_type=media_type)
        self.body = body  # type: ignore[assignment]
        self.headers["content-length"] = str(len(body))
