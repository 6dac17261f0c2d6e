"""The HTTP server: uvicorn's httptools protocol, plus deadlines for slow clients and a cap on
connections.

Why a subclass: uvicorn (0.54) times nothing out before a request is complete. Its keep-alive
timer runs only between requests and any byte cancels it, so a client that sends a header line
every few seconds holds its connection, and a file descriptor, forever. Its
``limit_concurrency`` is checked only once the headers are complete and counts every open
connection, the slow ones included, so slow clients would get /healthz turned away instead of
being dropped themselves. Both need the connection's events (accepted, a request's first byte,
headers complete, response sent), which only the protocol sees. The subclass hooks just these:

* a header deadline, armed when the connection is accepted (for TLS, once the handshake, bounded
  by its own timeout, is done) and when a response ends on a kept-alive connection, and
  cancelled when the headers are complete. Past it, the answer is 408 and the connection closes,
  however steadily bytes trickle in (an idle connection is just closed, as on keep-alive expiry);
* headers are held in memory until complete (httptools sets no bound): past
  ``max_header_bytes``, 431 and the connection closes;
* beyond ``max_connections``, a new connection is answered 503 with Retry-After and closed at
  once, before it can hold a descriptor for long;
* a connection whose response went out before its request body was read (413 on the declared
  length, 408, 401...) is closed rather than kept alive: uvicorn would keep reading and
  discarding the rest for as long as the client cares to send. The close lingers: the write
  side is shut first and what the client still sends is discarded (for ``LINGER_IDLE_S`` after
  its last bytes, ``LINGER_S`` at most), so that it reads the answer rather than a reset.

Body deadlines (idle time between chunks, a total bound scaled to the size) are in
:func:`optserver.api.http.read_body`, where the application waits for each chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, cast

import httptools
import uvicorn
from optserver_client.vocabulary import PROBLEM
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from optserver.api.direct import DIRECT_BODY, DIRECT_MIN_BYTES, DirectBody
from optserver.config import Settings
from optserver.errors import (
    BadRequest,
    HeadersTooLarge,
    ProblemError,
    RequestTimeout,
    ServiceUnavailable,
)
from optserver.wire import encode_json

__all__ = [
    "ConnectionLimits",
    "GuardedHttpProtocol",
    "derived_max_connections",
    "protocol_class",
    "raise_fd_limit",
    "run",
]

log = logging.getLogger("optserver")

#: How long a connection closed after an early answer keeps draining what the client sends:
#: at most LINGER_S in all, and LINGER_IDLE_S after the last bytes.
LINGER_S = 5.0
LINGER_IDLE_S = 1.0
#: The derived connection cap never exceeds this (memory, not descriptors, is then the bound).
MAX_DERIVED_CONNECTIONS = 8192
RETRY_AFTER_S = 1
#: The exit status of uvicorn.run when the server cannot start (a port in use...).
STARTUP_FAILURE = 3


@dataclass(frozen=True)
class ConnectionLimits:
    """The protocol's bounds; the values come from :class:`Settings` (see :meth:`from_settings`),
    which alone holds their defaults."""

    header_timeout_s: float
    max_connections: int
    max_header_bytes: int
    #: Bodies up to this are offered for direct reading (larger ones get 413 anyway).
    max_body_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings, max_connections: int) -> ConnectionLimits:
        """``max_connections``: the cap in force (the setting's, or one derived from the
        open-file limit)."""
        return cls(
            settings.header_timeout_s,
            max_connections,
            settings.max_header_bytes,
            settings.max_body_bytes,
        )


class _Throttle:
    """At most one log line per ``period`` seconds (a flood must not flood the log too)."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.last = -period
        self.suppressed = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.period:
            self.suppressed += 1
            return False
        self.last = now
        return True


_refusals = _Throttle(10.0)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and the cap described above, and large
    bodies read straight into their buffer (see :mod:`optserver.api.direct`); use
    :func:`protocol_class` to bind the limits.

    Read as a buffered protocol (through :class:`_Buffered`): the event loop reads into
    :meth:`get_buffer`. Outside a direct body that is one scratch buffer of the loop's thread,
    whose bytes go to httptools at once (as ``data_received`` would get them); inside one, it
    is the body's own buffer."""

    # No default: bound by protocol_class, from the settings.
    limits: ClassVar[ConnectionLimits]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_end = 0.0
        self._in_headers = False  # a request has begun and its headers are not complete
        self._header_bytes = 0  # received while its headers were incomplete
        self._headers_done = False  # a request's headers completed in this data_received
        self._closing = False  # refused or lingering: whatever arrives is dropped
        self._direct: DirectBody | None = None  # the body being read straight into its buffer

    # --- connection events ---------------------------------------------------------------

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        if len(self.connections) >= self.limits.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._direct is not None:
            self._direct.fail(ClientDisconnect())
            self._direct = None
        self._cancel_header_deadline()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None and not self._closing:
            return self._direct.writable()
        return _scratch()

    def buffer_updated(self, nbytes: int) -> None:
        direct = self._direct
        if direct is not None and not self._closing:
            if direct.advance(nbytes):
                self._direct_done()
            return
        self.data_received(bytes(_scratch()[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self._closing:  # the rest of a request already answered, or of a refused connection
            if self._linger_timer is not None:
                self._arm_linger()
            return
        self._headers_done = False
        super().data_received(data)
        # httptools keeps the partial headers in memory, without bound: count what arrives while
        # they are incomplete (a read that completes them does not count).
        if self._in_headers and not self._headers_done and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._write_problem(
                    HeadersTooLarge(
                        f"the request line and headers exceed {self.limits.max_header_bytes} bytes"
                    )
                )
                self._linger_close()  # the client is still sending: let it read the answer

    # --- parser and response events ------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        if self._header_timer is None:  # e.g. a pipelined request: its own deadline
            self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._headers_done = True
        self._header_bytes = 0
        self._cancel_header_deadline()
        super().on_headers_complete()
        cycle = self.cycle
        # Not for an upgrade (no cycle of its own), nor for 100-continue: uvicorn answers that
        # itself, and its interim answer must not wait for the body.
        if cycle is None or cycle.scope is not self.scope or self.expect_100_continue:
            return
        if self.scope["method"] != "HEAD":  # a HEAD answer writes no body to go out with
            cycle.transport = _OneWrite(self.transport)  # type: ignore[assignment]
        self._offer_direct_body(cycle)

    # --- direct bodies ---------------------------------------------------------------------

    def _offer_direct_body(self, cycle: RequestResponseCycle) -> None:
        """Offer the request's body for direct reading if it is large and plainly framed."""
        length: bytes | None = None
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and length is not None):
                return  # chunked, or framing httptools has its own opinion about
            if name == b"content-length":
                length = value
        if length is None or not length.isdigit():
            return
        size = int(length)
        if not DIRECT_MIN_BYTES < size <= self.limits.max_body_bytes:
            return
        extensions: dict[str, Any] = dict(self.scope.get("extensions") or {})
        extensions[DIRECT_BODY] = DirectBody(size, lambda body: self._start_direct(cycle, body))
        self.scope["extensions"] = extensions

    def _start_direct(self, cycle: RequestResponseCycle, body: DirectBody) -> None:
        """The application claimed ``cycle``'s body: hand over what uvicorn holds of it, and
        read the rest into the body's buffer."""
        pending = cycle.body
        cycle.body = bytearray()  # what uvicorn appends to (it types the field so)
        if pending and body.write(pending):
            return  # all of it had arrived; the parser has moved on or will see no more body
        if not cycle.more_body:  # the request ended (or the connection was lost) short of it
            body.fail(BadRequest(f"the body ended after {body.position} of {body.size} bytes"))
            return
        if self.cycle is not cycle or self.transport.is_closing():
            body.fail(ClientDisconnect())
            return
        self._direct = body
        self.flow.resume_reading()

    def _direct_done(self) -> None:
        """The body is in: the request is complete. httptools never saw the bytes read into
        the body's buffer, so the next request starts on a fresh parser."""
        self._direct = None
        self.parser = _parser(self)
        self.on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._closing:
            return
        cycle = self.cycle
        # ``cycle`` is the newest request; if it is the one answered and its body is not all
        # in, the rest would be read and dropped for as long as the client sends: close.
        if cycle.response_complete and cycle.more_body:
            self._linger_close()
        elif self.timeout_keep_alive_task is not None:  # kept alive and idle
            self._arm_header_deadline()

    # --- the deadline, the refusal and the close -------------------------------------------

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_timer = self.loop.call_later(
            self.limits.header_timeout_s, self._header_deadline_passed
        )

    def _cancel_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if self._closing or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A request is being answered and a pipelined one is late: close after the answer.
            self.cycle.keep_alive = False
            return
        if not self._in_headers:
            self.transport.close()  # idle: there is nothing to answer
            return
        log.debug("%s: headers incomplete after %g s", self.client, self.limits.header_timeout_s)
        self._write_problem(
            RequestTimeout(
                f"the request headers did not arrive within {self.limits.header_timeout_s:g} s"
            )
        )
        # No lingering: this client is slow by definition, and what it sent has been read.
        self.transport.close()

    def _refuse(self, transport: asyncio.Transport) -> None:
        self.transport = transport  # connection_lost closes it again, harmlessly
        self._closing = True
        cap = self.limits.max_connections
        if _refusals.ready():
            log.warning(
                "refusing connections: %d are open, the most allowed (max_connections); "
                "%d more refused since the last warning",
                cap,
                _refusals.suppressed,
            )
            _refusals.suppressed = 0
        self._write_problem(
            ServiceUnavailable(
                f"the server holds its maximum of {cap} connections; retry shortly",
                retry_after=RETRY_AFTER_S,
            )
        )
        transport.close()

    def _linger_close(self) -> None:
        self._closing = True
        self._unset_keepalive_if_required()
        self._cancel_header_deadline()
        if not self.transport.can_write_eof():  # TLS has no half-close
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()  # drain: unread data at close() would send a reset
        self._linger_end = self.loop.time() + LINGER_S
        self._arm_linger()

    def _arm_linger(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        delay = min(LINGER_IDLE_S, self._linger_end - self.loop.time())
        self._linger_timer = self.loop.call_later(max(0.0, delay), self.transport.close)

    def _write_problem(self, problem: ProblemError) -> None:
        """An answer written straight to the transport (no request cycle to answer through)."""
        body = encode_json(problem.to_problem())
        lines = [f"HTTP/1.1 {problem.status} {HTTPStatus(problem.status).phrase}".encode()]
        lines += [name + b": " + value for name, value in self.server_state.default_headers]
        lines += [f"{name}: {value}".encode("latin-1") for name, value in problem.headers.items()]
        lines += [
            f"content-type: {PROBLEM}".encode(),
            b"content-length: %d" % len(body),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)


class _OneWrite:
    """The transport as one response sees it: the status line and headers are held back and go
    out with the body, in one write (one syscall, and with TCP_NODELAY one segment where
    uvicorn's two writes make two, which the client reads with two wake-ups). Large bodies are
    not joined to the head (that would copy them) but go out with it in one ``writev``.

    Its only user is uvicorn's response cycle (write, close, is_closing), which writes every
    answer's body, an empty one too, except a HEAD request's: those are not given one."""

    JOIN_BYTES = 64 << 10

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head: bytes | None = None
        self.started = False  # the head was written (held, or sent)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.started:  # the head
            self.started = True
            self.head = bytes(data)
            return
        head, self.head = self.head, None
        if head is None:
            self.transport.write(data)
        elif len(data) <= self.JOIN_BYTES:
            self.transport.write(head + data)
        else:
            self.transport.writelines((head, data))

    def close(self) -> None:
        head, self.head = self.head, None
        if head is not None:  # closed before its body (an error): the head still goes out
            self.transport.write(head)
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


#: Per thread (event loop): what one read outside a direct body lands in.
_scratch_buffers = threading.local()
SCRATCH_BYTES = 256 << 10  # as much as asyncio reads at a time


def _scratch() -> memoryview:
    view: memoryview | None = getattr(_scratch_buffers, "view", None)
    if view is None:
        view = _scratch_buffers.view = memoryview(bytearray(SCRATCH_BYTES))
    return view


def _parser(protocol: HttpToolsProtocol) -> httptools.HttpRequestParser:
    """A request parser for ``protocol``, set up as uvicorn sets up its own."""
    parser = httptools.HttpRequestParser(protocol)
    with contextlib.suppress(AttributeError):  # httptools < 0.6.3
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
    return parser


class _Buffered(asyncio.BufferedProtocol):
    """What the event loop sees of a connection: a buffered protocol in front of the HTTP one.

    uvloop reads into a protocol's buffer only if it is not also an ``asyncio.Protocol``, and
    uvicorn's protocols are; this forwards every event, nothing else."""

    protocol_class: ClassVar[type[GuardedHttpProtocol]]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.http = self.protocol_class(config, server_state, app_state, _loop)
        # Bound once: these run for every read.
        self.get_buffer = self.http.get_buffer  # type: ignore[method-assign]
        self.buffer_updated = self.http.buffer_updated  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.http.connection_made(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def eof_received(self) -> bool | None:
        self.http.eof_received()
        return None  # close the transport, as uvicorn's protocol does

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()


def protocol_class(limits: ConnectionLimits) -> type[asyncio.BaseProtocol]:
    """The protocol factory with ``limits`` bound (uvicorn builds one per connection)."""

    class BoundHttpProtocol(GuardedHttpProtocol):
        pass

    BoundHttpProtocol.limits = limits

    class BoundBuffered(_Buffered):
        pass

    BoundBuffered.protocol_class = BoundHttpProtocol
    return BoundBuffered


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one, as many servers do (the common soft
    default of 1024 is far below what the kernel allows); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def derived_max_connections(open_files: int) -> int:
    """A connection cap that leaves descriptors free for files, the journal, the thread pool,
    accepting (and refusing) more connections: an eighth of the limit, at least 64."""
    reserve = max(64, open_files // 8)
    return max(16, min(MAX_DERIVED_CONNECTIONS, open_files - reserve))


def run(
    app: ASGIApp,
    settings: Settings,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    """Serve ``app`` until interrupted, like ``uvicorn.run`` with the guarded protocol."""
    open_files = raise_fd_limit()
    cap = settings.max_connections or derived_max_connections(open_files)
    if cap > open_files - 64:
        log.warning(
            "max_connections=%d leaves under 64 of the %d open files for everything else: "
            "new connections may fail (EMFILE) before they can be refused",
            cap,
            open_files,
        )
    log.info("accepting at most %d connections (open-file limit %d)", cap, open_files)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Access lines are logged at info: above it, not even formatted for nothing.
        access_log=logging.getLevelName(settings.log_level.upper()) <= logging.INFO,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        # A factory uvicorn calls as it would a protocol class.
        http=cast(Any, protocol_class(ConnectionLimits.from_settings(settings, cap))),
    )
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
