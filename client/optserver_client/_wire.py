"""HTTP/1.1 over plain TCP for the client's ``http://`` requests: small, strict, few copies.

Two halves. :class:`ResponseParser` is sans-I/O: fed bytes, it parses one response (status line,
headers, a Content-Length, chunked or until-close body; interim 1xx responses skipped) and raises
:class:`WireError` for anything malformed or over a limit. :class:`Transport` and
:class:`AsyncTransport` are the I/O: a pool of kept-alive sockets, the request written with
scatter-gather (``sendmsg`` of the head and the body's buffers, never joined), a Content-Length
body read with ``recv_into`` straight into its preallocated buffer, and every failure raised as
the httpx exception httpx would raise, so that the retry policy treats both transports alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import httpx
import numpy as np

from optserver_client.buffers import BufferPool
from optserver_client.safetensors_io import Buffer, DocumentSink, SafetensorsError, allocate

#: Given a final response's status, media type and Content-Length: a sink that reads its body
#: into its tensors' places, or None for one buffer (see :class:`ResponseParser`).
SinkFactory = Callable[[int, str, int], DocumentSink | None]

__all__ = ["AsyncTransport", "Response", "ResponseParser", "Transport", "WireError", "usable"]

#: Bound on the status lines and headers of one response (interim ones and trailers included).
MAX_HEAD_BYTES = 64 << 10
#: Bound on the header fields of one response (interim ones and trailers included).
MAX_FIELDS = 256
#: Idle connections kept per client; more are closed when they come back.
MAX_IDLE = 16
#: Connections open at once per client (httpx's default); a request beyond waits for one, at
#: most the pool timeout (httpx.PoolTimeout: never sent, so retried as httpx's is).
MAX_CONNECTIONS = 100
_IOV_MAX = 512  # buffers per sendmsg call (Linux takes up to 1024)
_SCRATCH = 64 << 10  # bytes read at once until the body's size is known
_STEP = 512  # bytes looked at per search for a line's end: what follows is not copied again

_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")
_LENGTH = re.compile(r"[0-9]{1,18}")
_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_PATH_SAFE = "/%:@!$&'()*+,;="
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})
_OWN = _FRAMING | {"host"}  # request headers the transport writes itself
_HEAD, _FIXED, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_EOF, _DONE = range(8)


class WireError(Exception):
    """A response that is not valid HTTP/1.1, or exceeds a limit."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: Buffer  # writable: arrays decoded from it are writable views
    keep_alive: bool  # whether the connection may carry another request
    #: The tensors and metadata of a body read by a sink (``body`` is then empty).
    decoded: tuple[dict[str, np.ndarray], dict[str, str]] | None = None


class ResponseParser:
    """One response, parsed from the bytes fed to it.

    ``feed`` takes whatever arrived, ``feed_eof`` tells that the peer closed. A Content-Length
    body lands in one buffer from ``allocate`` (a client's
    :class:`~optserver_client.buffers.BufferPool`), or, when ``sink`` offers one for the
    response, in a :class:`~optserver_client.safetensors_io.DocumentSink` that places each
    tensor's bytes in an array of the caller's. The I/O layer reads into :meth:`read_buffer`
    and reports the count to :meth:`received`: while such a body is due, that is the body's
    buffer itself (no copy); before, bytes land in scratch and are fed.
    """

    def __init__(
        self,
        method: str = "GET",
        allocate: Callable[[int], memoryview] = allocate,
        sink: SinkFactory | None = None,
    ) -> None:
        self._allocate = allocate
        self._sink = sink
        self._document: DocumentSink | None = None
        self._no_body = method == "HEAD"
        self._state = _HEAD
        self._pending = bytearray()  # the start of a head or line not complete yet
        self._head_bytes = 0
        self._fields = 0
        self._fixed: memoryview | None = None
        self._scratch: memoryview | None = None  # see read_buffer
        self._grown = bytearray()
        self._filled = 0
        self._left = 0  # bytes still due of the Content-Length body or of the current chunk
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.keep_alive = True
        self.started = False  # whether any byte arrived

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        self.started = self.started or len(view) > 0
        position = 0
        while position < len(view):
            state = self._state
            if state == _DONE:
                self.keep_alive = False  # bytes nobody asked for: never reuse the connection
                return
            if state == _FIXED:
                count = min(self._left, len(view) - position)
                if self._document is not None:
                    with _placing():
                        self._document.feed(view[position : position + count])
                else:
                    assert self._fixed is not None
                    self._fixed[self._filled : self._filled + count] = view[
                        position : position + count
                    ]
                self.body_received(count)
            elif state in (_CHUNK_DATA, _UNTIL_EOF):
                count = len(view) - position
                if state == _CHUNK_DATA:
                    count = min(count, self._left)
                    self._left -= count
                    self._state = _CHUNK_DATA if self._left else _CHUNK_END
                self._grown += view[position : position + count]
            else:
                count = self._line(view, position)
            position += count

    def feed_eof(self) -> None:
        self.keep_alive = False
        if self._state == _UNTIL_EOF:
            self._state = _DONE
        elif self._state != _DONE:
            raise WireError(
                "the server closed the connection "
                + ("before the response ended" if self.started else "without sending a response")
            )

    def body_window(self) -> memoryview | None:
        """Where the rest of a Content-Length body goes, while one is due."""
        if self._state != _FIXED:
            return None
        if self._document is not None:
            return self._document.window()
        return None if self._fixed is None else self._fixed[self._filled :]

    def read_buffer(self) -> memoryview:
        """Where the I/O layer reads next: the body's own buffer while a Content-Length body is
        due, else a scratch buffer whose bytes :meth:`received` parses (and copies out)."""
        window = self.body_window()
        if window is not None:
            return window
        if self._scratch is None:
            self._scratch = allocate(_SCRATCH)
        return self._scratch

    def received(self, count: int) -> None:
        """``count`` bytes were read into the last :meth:`read_buffer` (0: the peer closed)."""
        if not count:
            self.feed_eof()
        elif self.body_window() is not None:
            if self._document is not None:
                with _placing():
                    self._document.advance(count)
            self.body_received(count)
        else:
            assert self._scratch is not None
            self.feed(self._scratch[:count])

    def body_received(self, count: int) -> None:
        self._filled += count
        self._left -= count
        if not self._left:
            self._state = _DONE

    def response(self) -> Response:
        if self._state != _DONE:
            raise WireError("the response is not complete")
        if self._document is not None:
            decoded = self._document.result()
            return Response(self.status, self.reason, self.headers, b"", self.keep_alive, decoded)
        body = self._fixed if self._fixed is not None else self._grown
        return Response(self.status, self.reason, self.headers, body, self.keep_alive)

    def _line(self, view: memoryview, position: int) -> int:
        """Consume a head (up to its blank line) or one line; returns the bytes of ``view`` used."""
        in_head = self._state in (_HEAD, _TRAILER)
        mark = b"\r\n\r\n" if self._state == _HEAD else b"\r\n"
        limit = MAX_HEAD_BYTES - self._head_bytes if in_head else MAX_HEAD_BYTES
        pending = self._pending
        search_from = max(0, len(pending) - len(mark) + 1)
        # A little at a time (doubling): what follows the line is read from ``view`` later.
        take = min(len(view) - position, max(_STEP, len(pending)))
        pending += view[position : position + take]
        end = pending.find(mark, search_from)
        if end < 0 or end + len(mark) > limit:
            if len(pending) > limit or end >= 0:
                raise WireError(f"a response head or line longer than {limit} bytes")
            return take
        end += len(mark)
        used = end - (len(pending) - take)
        block = bytes(pending[:end])
        pending.clear()
        if in_head:
            self._head_bytes += end
        if self._state == _HEAD:
            self._head(block[:-4].split(b"\r\n"))
        elif self._state == _CHUNK_SIZE:
            match = _CHUNK.fullmatch(block[:-2])
            if match is None:
                raise WireError(f"bad chunk size line {block[:80]!r}")
            self._left = int(match[1], 16)
            self._state = _CHUNK_DATA if self._left else _TRAILER
        elif self._state == _CHUNK_END:
            if block != b"\r\n":
                raise WireError("chunk data longer than its size")
            self._state = _CHUNK_SIZE
        elif block == b"\r\n":  # the blank line after the trailers
            self._state = _DONE
        else:
            self._field(block[:-2])  # a trailer: checked, not kept
        return used

    def _field(self, line: bytes) -> tuple[str, str]:
        match = _FIELD.fullmatch(line)
        if match is None:
            raise WireError(f"bad header line {line[:80]!r}")
        self._fields += 1
        if self._fields > MAX_FIELDS:
            raise WireError(f"more than {MAX_FIELDS} header fields")
        return match[1].decode("latin-1"), match[2].decode("latin-1")

    def _head(self, lines: list[bytes]) -> None:
        match = _STATUS.fullmatch(lines[0])
        if match is None:
            raise WireError(f"bad status line {lines[0][:80]!r}")
        fields = [self._field(line) for line in lines[1:]]
        status = int(match[2])
        if status < 200:
            if status == 101 or status < 100:
                raise WireError(f"unexpected status {status}")
            return  # interim (100 Continue, 103 Early Hints): the final response follows
        self.status, self.reason, self.headers = status, (match[3] or b"").decode("latin-1"), fields
        values: dict[str, list[str]] = {}
        for name, value in fields:
            lowered = name.lower()
            if lowered in _FRAMING:
                values.setdefault(lowered, []).extend(v.strip() for v in value.split(","))
        closes = "close" in (token.lower() for token in values.get("connection", ()))
        self.keep_alive = match[1] == b"1" and not closes  # HTTP/1.0: never reused
        codings, lengths = values.get("transfer-encoding"), set(values.get("content-length", ()))
        if self._no_body or status in (204, 304):
            self._state = _DONE
        elif codings is not None:
            if [coding.lower() for coding in codings] != ["chunked"] or lengths:
                raise WireError(f"unsupported framing: Transfer-Encoding {codings}, {lengths}")
            self._state = _CHUNK_SIZE
        elif lengths:
            size = lengths.pop()
            if lengths or not _LENGTH.fullmatch(size):
                raise WireError(f"bad Content-Length {sorted({size, *lengths})}")
            self._left = int(size)
            self._state = _FIXED if self._left else _DONE
            media = next((v for n, v in fields if n.lower() == "content-type"), "")
            sink = self._sink
            if self._left and sink is not None:
                self._document = sink(status, media.split(";")[0].strip().lower(), self._left)
            if self._document is None:
                self._fixed = self._allocate(self._left) if self._left else None
        else:  # neither: the body ends when the server closes the connection
            self.keep_alive = False
            self._state = _UNTIL_EOF


@contextlib.contextmanager
def _placing() -> Iterator[None]:
    """A sink's step: a document it cannot place is a response the client cannot read."""
    try:
        yield
    except SafetensorsError as exc:
        raise WireError(f"invalid safetensors answer: {exc}") from None


# -- sockets -------------------------------------------------------------------------------------


def usable(url: httpx.URL) -> bool:
    """Whether :class:`Transport` can carry requests to ``url``: plain http, no proxy for its host
    (the environment's, which httpx honours too), and ``sendmsg`` (Windows has none)."""
    if url.scheme != "http" or not hasattr(socket.socket, "sendmsg"):
        return False
    proxies = urllib.request.getproxies()
    return not ({"http", "all"} & set(proxies)) or bool(urllib.request.proxy_bypass(url.host))


class _Pool:
    """Target, timeouts and idle connections of one client (thread-safe; used from one event
    loop at a time by the async transport, for which the lock is never contended)."""

    def __init__(
        self,
        url: httpx.URL,
        timeout: float | httpx.Timeout | None,
        buffers: BufferPool | None = None,
    ) -> None:
        from optserver_client import __version__  # not at import: the package imports this module

        self._host = url.raw_host.decode("ascii")
        self._port = url.port or 80
        self._netloc = url.netloc.decode("ascii")
        self._prefix = url.raw_path.partition(b"?")[0].decode("ascii").rstrip("/")
        limits = httpx.Timeout(timeout)
        self._connect_timeout, self._read, self._write = limits.connect, limits.read, limits.write
        self._pool_timeout = limits.pool
        self._agent = f"optserver-client/{__version__}"
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        self._closed = False
        self._body = allocate if buffers is None else buffers.allocate  # response bodies

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for sock in idle:
            sock.close()

    def _take(self) -> socket.socket | None:
        """The most recently used idle connection that the server has not closed meanwhile."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                sock = self._idle.pop()
            if not _readable(sock):
                return sock
            sock.close()  # EOF (keep-alive timeout) or stray bytes: either way unusable

    def _put(self, sock: socket.socket, reusable: bool) -> None:
        if reusable:
            with self._lock:
                if not self._closed and len(self._idle) < MAX_IDLE:
                    self._idle.append(sock)
                    return
        sock.close()

    def _prepare(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str],
        body: Sequence[Buffer],
    ) -> tuple[str, list[memoryview]]:
        """The request target, and the head and body as buffers to send (empty ones left out)."""
        views = [view for view in (memoryview(part).cast("B") for part in body) if len(view)]
        target = self._prefix + quote(path, safe=_PATH_SAFE)
        if params:
            target += "?" + urlencode(params)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._netloc}"]
        length = sum(len(view) for view in views)
        if length or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {length}")
        names = {name.lower() for name in headers}
        if "user-agent" not in names:
            lines.append(f"User-Agent: {self._agent}")
        for name, value in headers.items():
            if not _NAME.fullmatch(name) or _BAD_VALUE.search(value):
                raise httpx.LocalProtocolError(f"invalid header {name!r}: {value!r}")
            if name.lower() not in _OWN:  # the framing is the transport's own
                lines.append(f"{name}: {value}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        return target, [memoryview(head), *views]

    def _pool_exhausted(self, method: str, target: str) -> httpx.PoolTimeout:
        return httpx.PoolTimeout(
            f"all {MAX_CONNECTIONS} connections stayed busy for {self._pool_timeout} s",
            request=httpx.Request(method, f"http://{self._netloc}{target}"),
        )

    def _error(
        self,
        phase: str,
        method: str,
        target: str,
        parser: ResponseParser,
        error: BaseException,
        failed: OSError | None,
    ) -> httpx.TransportError:
        """The httpx exception httpx would raise for ``error`` in ``phase``."""
        if failed is not None and not parser.started:  # nothing came back: the write's failure
            phase, error = "write", failed
        if isinstance(error, WireError):
            kind: type[httpx.TransportError] = httpx.RemoteProtocolError
        else:
            kind = _KINDS[phase][isinstance(error, TimeoutError)]
        message = str(error) or ("timed out" if isinstance(error, TimeoutError) else repr(error))
        return kind(message, request=httpx.Request(method, f"http://{self._netloc}{target}"))


_KINDS: dict[str, tuple[type[httpx.TransportError], type[httpx.TransportError]]] = {
    "connect": (httpx.ConnectError, httpx.ConnectTimeout),
    "write": (httpx.WriteError, httpx.WriteTimeout),
    "read": (httpx.ReadError, httpx.ReadTimeout),
}


class Transport(_Pool):
    """Blocking requests over pooled keep-alive sockets."""

    def __init__(
        self,
        url: httpx.URL,
        timeout: float | httpx.Timeout | None,
        buffers: BufferPool | None = None,
    ) -> None:
        super().__init__(url, timeout, buffers)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str],
        body: Sequence[Buffer] = (),
        sink: SinkFactory | None = None,
    ) -> Response:
        target, views = self._prepare(method, path, params, headers, body)
        parser = ResponseParser(method, self._body, sink)
        phase, sock, failed = "connect", None, None
        if not self._slots.acquire(timeout=self._pool_timeout):
            raise self._pool_exhausted(method, target)
        try:
            sock = self._take() or self._connect()
            phase = "write"
            _settimeout(sock, self._write)
            failed = _send(sock, views)
            phase = "read"
            _settimeout(sock, self._read)
            while not parser.done:
                parser.received(sock.recv_into(parser.read_buffer()))
            return parser.response()
        except (OSError, WireError) as error:
            raise self._error(phase, method, target, parser, error, failed) from error
        finally:
            if sock is not None:
                self._put(sock, _reusable(parser, failed, views))
            self._slots.release()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self._host, self._port), timeout=self._connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class AsyncTransport(_Pool):
    """The same over non-blocking sockets, with the running asyncio event loop."""

    def __init__(
        self,
        url: httpx.URL,
        timeout: float | httpx.Timeout | None,
        buffers: BufferPool | None = None,
    ) -> None:
        super().__init__(url, timeout, buffers)
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)  # bound to a loop at its first wait

    async def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str],
        body: Sequence[Buffer] = (),
        sink: SinkFactory | None = None,
    ) -> Response:
        target, views = self._prepare(method, path, params, headers, body)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise self._pool_exhausted(method, target) from None
        try:
            return await self._request(loop, method, target, views, sink)
        finally:
            self._slots.release()

    async def _request(
        self,
        loop: asyncio.AbstractEventLoop,
        method: str,
        target: str,
        views: list[memoryview],
        sink: SinkFactory | None,
    ) -> Response:
        parser = ResponseParser(method, self._body, sink)
        phase, sock, failed = "connect", None, None
        try:
            sock = self._take() or await self._connect(loop)
            phase = "write"
            failed = await self._send(loop, sock, views)
            phase = "read"
            while not parser.done:
                into = parser.read_buffer()
                try:  # what has arrived already needs no trip through the event loop
                    count = sock.recv_into(into)
                except BlockingIOError:
                    async with asyncio.timeout(self._read):
                        count = await loop.sock_recv_into(sock, into)
                parser.received(count)
            return parser.response()
        except (OSError, WireError) as error:
            raise self._error(phase, method, target, parser, error, failed) from error
        finally:  # cancelled halfway too: a connection in an unknown state is closed
            if sock is not None:
                self._put(sock, _reusable(parser, failed, views))

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        async with asyncio.timeout(self._connect_timeout):
            addresses = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
            error = OSError(f"no address for {self._host!r}")
            for family, kind, proto, _, address in addresses:
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, address)
                except BaseException as failure:
                    sock.close()
                    if not isinstance(failure, OSError):
                        raise
                    error = failure
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            raise error

    async def _send(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, views: list[memoryview]
    ) -> OSError | None:
        first = 0
        while first < len(views):
            try:
                first = _advance(views, first, sock.sendmsg(views[first : first + _IOV_MAX]))
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_writer(sock.fileno(), _wake, ready)
                try:
                    async with asyncio.timeout(self._write):
                        await ready
                finally:
                    loop.remove_writer(sock.fileno())
            except TimeoutError:
                raise
            except OSError as error:  # see _send
                return error
        return None


def _send(sock: socket.socket, views: list[memoryview]) -> OSError | None:
    """Send ``views``; an error other than a timeout is returned, not raised: the server may have
    answered already (say 413 to a body too large) and closed, and that answer is read first."""
    first = 0
    try:
        while first < len(views):
            first = _advance(views, first, sock.sendmsg(views[first : first + _IOV_MAX]))
    except TimeoutError:
        raise
    except OSError as error:
        return error
    return None


def _reusable(parser: ResponseParser, failed: OSError | None, views: list[memoryview]) -> bool:
    """Whether the connection may carry another request after this one.

    Not after an error status to a request with a body: the server may have answered without
    reading the body, and then close the connection unannounced (uvicorn does after a 413); a
    request sent on it meanwhile would fail, and only idempotent ones are retried.
    """
    if failed is not None or not parser.done or not parser.keep_alive:
        return False
    return parser.status < 400 or len(views) == 1


def _advance(views: list[memoryview], first: int, sent: int) -> int:
    """Drop ``sent`` bytes from the front of ``views[first:]``; the index of the next to send."""
    while sent:
        size = len(views[first])
        if sent < size:
            views[first] = views[first][sent:]
            break
        sent -= size
        first += 1
    return first


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _settimeout(sock: socket.socket, timeout: float | None) -> None:
    if sock.gettimeout() != timeout:  # each change is a system call
        sock.settimeout(timeout)


def _readable(sock: socket.socket) -> bool:
    """Whether an idle socket has something to read, i.e. was closed by the server (as httpcore
    checks before reusing a connection); poll where it exists: select refuses fds over 1023."""
    if sock.fileno() < 0:
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])
