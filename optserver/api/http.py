"""HTTP plumbing shared by the routes: bounded body reading, content negotiation, responses."""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Mapping

from optserver_client.vocabulary import BINARY, REPLAYED_HEADER, VERSION_HEADER
from starlette.requests import Request
from starlette.responses import Response

from optserver.api.direct import (
    FIRST_MAPPING,
    DirectBody,
    map_body,
    offered,
    resize_body,
    rounded,
)
from optserver.config import Settings
from optserver.errors import (
    BadRequest,
    NotAcceptable,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from optserver.replies import MEDIA, Format, Reply
from optserver.wire import Buffer, allocate

__all__ = [
    "Format",
    "RawResponse",
    "body_limit",
    "read_body",
    "reply_response",
    "request_format",
    "response_format",
]


#: Bodies up to this get their whole buffer at their first byte; larger ones grow with the data
#: (see _MappedBody): their first HEAD_BYTES in the heap, then in a mapping of FIRST_MAPPING or
#: more, doubled as needed.
SMALL_BODY = 64 << 10
HEAD_BYTES = 1 << 20

#: What a client with too large a JSON body should do instead (followed by the binary limit).
SAFETENSORS_HINT = "send the tensors as safetensors instead"


def body_limit(settings: Settings, fmt: Format) -> int:
    """The largest body of that encoding: JSON has its own, smaller limit, since parsing a JSON
    document holds the interpreter (every other request) until it is done."""
    if fmt == "json":
        return min(settings.max_json_body_bytes, settings.max_body_bytes)
    return settings.max_body_bytes


async def read_body(
    request: Request, settings: Settings, fmt: Format, *, json_hint: str = SAFETENSORS_HINT
) -> Buffer:
    """The request body, in the limits of its encoding ``fmt``: refused with 413 as soon as it
    is known to exceed :func:`body_limit` (before reading it when Content-Length says so), with
    408 when it arrives too slowly (see :class:`_Receiver`). Memory is committed as the bytes
    arrive, so a declared length alone costs nothing. ``json_hint``: what to do instead of a
    too large JSON body (empty: nothing, the route takes only JSON)."""
    limit = body_limit(settings, fmt)
    declared = request.headers.get("content-length")
    size: int | None = None
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(f"invalid Content-Length {declared!r}") from None
        if size > limit:
            raise _too_large(settings, fmt, limit, json_hint, size)
    direct = offered(request.scope)  # only ever for a body with a Content-Length
    receiver = _Receiver(request, settings, size, direct)
    try:
        if direct is not None and not direct.claimed:
            direct.claim()  # the protocol reads the rest straight into the body's buffer
            await receiver.whole()
            return direct.value()
        if size is not None:
            sink: _ExactBody | _MappedBody = (
                _ExactBody(size) if size <= SMALL_BODY else _MappedBody(size)
            )
            while (chunk := await receiver.next()) is not None:
                sink.write(chunk)
            if sink.position != size:
                raise BadRequest(f"the body ended after {sink.position} of {size} bytes")
            return sink.value()
        grown = bytearray()
        while (chunk := await receiver.next()) is not None:
            grown += chunk
            if len(grown) > limit:
                raise _too_large(settings, fmt, limit, json_hint, None)
        return grown
    finally:
        receiver.close()


def _too_large(
    settings: Settings, fmt: Format, limit: int, hint: str, size: int | None
) -> PayloadTooLarge:
    what = "body" if size is None else f"body of {size} bytes"
    if fmt == "json" and limit < settings.max_body_bytes:
        detail = f"the JSON {what} exceeds the limit of {limit} bytes for JSON bodies"
        if hint:
            binary = settings.max_body_bytes
            detail += f"; {hint} (Content-Type: {BINARY}, up to {binary} bytes)"
        return PayloadTooLarge(detail, limit=limit)
    return PayloadTooLarge(f"the {what} exceeds the limit of {limit} bytes", limit=limit)


class _Receiver:
    """The chunks of a request body, under deadlines: each within ``body_idle_timeout_s`` of
    the previous one, and the whole body of N bytes within ``body_idle_timeout_s + N /
    body_min_bytes_per_s`` (without a Content-Length: at that average rate so far), or 408. A
    client that sends a byte now and then cannot hold a connection and its buffer for long.

    One watchdog timer per body, re-armed only when it fires: a timeout per chunk would cost
    ~4 us each, and a 40 MB body comes in some 600 chunks. Call :meth:`close` when done."""

    def __init__(
        self,
        request: Request,
        settings: Settings,
        size: int | None,
        direct: DirectBody | None = None,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.stream = request.stream()
        self.direct = direct
        self.loop = asyncio.get_running_loop()
        self.idle = settings.body_idle_timeout_s
        self.rate = settings.body_min_bytes_per_s
        self.size = size
        self.start = self.last = self.loop.time()
        self.received = 0
        self.expired = False
        self.timer = self.loop.call_at(self._due(), self._watch)

    def _total(self) -> float:
        return self.idle + (self.size if self.size is not None else self.received) / self.rate

    def _due(self) -> float:
        if self.direct is not None and self.direct.claimed:  # the protocol tracks its progress
            self.received, self.last = self.direct.position, max(self.last, self.direct.last)
        return min(self.last + self.idle, self.start + self._total())

    def _watch(self) -> None:
        due = self._due()
        if self.loop.time() < due:  # chunks came meanwhile: wait for the new deadline
            self.timer = self.loop.call_at(due, self._watch)
            return
        self.expired = True
        self.task.cancel()  # the task waits for a chunk: this is the only place it awaits

    async def whole(self) -> None:
        """Wait for a claimed direct body to be complete, under the same deadlines."""
        assert self.direct is not None
        try:
            await self.direct.wait()
        except asyncio.CancelledError:
            if self.expired and self.task.uncancel() == 0:
                self._due()  # the latest progress, for the message
                raise self._timeout() from None
            raise

    async def next(self) -> bytes | None:
        """The next chunk, None at the end of the body."""
        try:
            chunk = await anext(self.stream)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if self.expired and self.task.uncancel() == 0:
                raise self._timeout() from None
            raise  # cancelled by someone else too
        self.received += len(chunk)
        self.last = self.loop.time()
        return chunk

    def close(self) -> None:
        self.timer.cancel()

    def _timeout(self) -> RequestTimeout:
        elapsed = self.loop.time() - self.start
        of = f" of {self.size}" if self.size is not None else ""
        if self.last + self.idle < self.start + self._total():
            why = f"no part of the body arrived for {self.idle:g} s"
        elif self.size is not None:
            why = (
                f"the body of {self.size} bytes did not arrive within {self._total():g} s "
                f"({self.idle:g} s + {self.rate} bytes/s)"
            )
        else:
            why = f"the body arrived slower than {self.rate} bytes/s"
        return RequestTimeout(f"{why}; {self.received}{of} bytes arrived in {elapsed:.1f} s")


class _ExactBody:
    """A small body: its whole buffer, allocated at the first byte."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.position = 0
        self.buffer: memoryview | None = None

    def write(self, chunk: bytes) -> None:
        end = self.position + len(chunk)
        if end > self.size:
            raise BadRequest("the body is longer than its Content-Length")
        if self.buffer is None:
            self.buffer = allocate(self.size)
        self.buffer[self.position : end] = chunk
        self.position = end

    def value(self) -> Buffer:
        return self.buffer if self.buffer is not None else b""


class _MappedBody:
    """A larger body, in memory committed as its bytes arrive, never on the word of
    Content-Length: its first MiB as the chunks came (all a body of up to 1 MiB needs), then
    in an anonymous private mapping that doubles up to the declared size. Growing it moves page
    tables (mremap), not bytes, and the mapping asks for huge pages as numpy does for large
    arrays. Its size is always a multiple of 2 MiB: the kernel then places it, and moves it,
    on huge-page boundaries, where other sizes would split its huge pages (2-4 ms more on a
    40 MB body). Filling 40 MB so takes ~3 ms, as one up-front buffer does; a growing
    ``bytearray`` takes 14 ms, ``ndarray.resize`` 15 ms (it zero-fills each extension, without
    huge pages). Starting in the heap keeps a client that sent a few bytes from costing a
    whole 2 MiB huge page."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.position = 0
        self.head: list[bytes] = []
        self.mapping: mmap.mmap | None = None

    def write(self, chunk: bytes) -> None:
        end = self.position + len(chunk)
        if end > self.size:
            raise BadRequest("the body is longer than its Content-Length")
        if self.mapping is None and end <= HEAD_BYTES:
            self.head.append(chunk)  # kept as they came: joined (copied) once, at the end
        else:
            capacity = 0 if self.mapping is None else len(self.mapping)
            if end > capacity:
                wanted = min(self.size, max(end, 2 * capacity, FIRST_MAPPING))
                self._grow(rounded(wanted))
            assert self.mapping is not None
            self.mapping[self.position : end] = chunk
        self.position = end

    def _grow(self, capacity: int) -> None:
        if self.mapping is None:
            self.mapping = map_body(capacity, self.size)
            self.mapping[: self.position] = b"".join(self.head)
            self.head = []
        else:
            resize_body(self.mapping, capacity, self.size)

    def value(self) -> Buffer:
        if self.mapping is None:
            return b"".join(self.head)
        # The view keeps the mapping alive; it is unmapped once the last view is gone.
        return memoryview(self.mapping)[: self.position]


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


def reply_response(reply: Reply) -> RawResponse:
    """An encoded push or pull answer, with its version (and replay) headers."""
    headers = {VERSION_HEADER: str(reply.version)}
    if reply.replayed:
        headers[REPLAYED_HEADER] = "true"
    return RawResponse(reply.body, media_type=reply.media_type, headers=headers)
