"""Large request bodies read straight from the socket into their final buffer.

uvicorn hands a body to the application chunk by chunk: the event loop reads 256 KiB into a
new ``bytes``, httptools copies the body's part of it into another, uvicorn appends that to
the request's pending bytes and pauses reading past 64 KiB, the application task wakes, takes
the chunk and copies it into its own buffer, and reading resumes. A 40 MB body so costs three
copies and some 160 wake-ups of the application. For a body of more than
:data:`DIRECT_MIN_BYTES` with a Content-Length, the server's protocol instead offers a
:class:`DirectBody` in the request's ASGI scope (``scope["extensions"][DIRECT_BODY]``). The
application claims it when it reads the body (:func:`optserver.api.http.read_body`); from then
on the protocol has the kernel write the body's bytes into the buffer itself (``recv_into``, a
buffered protocol: no copy in user space), and the application wakes once, when the body is
complete or the connection is lost. An unclaimed offer changes nothing: the body then reaches
the application through ``receive()`` as usual.

The buffer is an anonymous mapping that grows with the bytes, never on the word of
Content-Length alone (neither memory nor address space: see ``tests/test_slow_clients.py``): 2 MiB
at first, doubled as needed up to the declared size, by ``mremap`` (page tables move, bytes do
not), asking for huge pages as numpy does for large arrays. It can be resized because no view of
it outlives a read: the event loop lets go of the one it was given before it asks for the next.
A complete body's buffer goes to the server's pool (:mod:`optserver.buffers`), and the next
body of the same size is read into it once nothing holds it: no page faults, no growing.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
from collections.abc import Callable
from typing import Any

import numpy as np

from optserver import buffers
from optserver.errors import BadRequest, ServiceUnavailable

__all__ = [
    "DIRECT_BODY",
    "DIRECT_MIN_BYTES",
    "FIRST_MAPPING",
    "HUGE_PAGE",
    "DirectBody",
    "direct_bytes",
    "map_body",
    "offered",
    "resize_body",
    "rounded",
]

#: The scope extension under which the protocol offers a body.
DIRECT_BODY = "optserver.direct_body"
#: Bodies above this are offered (smaller ones take a few chunks: nothing to gain).
DIRECT_MIN_BYTES = 1 << 20
HUGE_PAGE = FIRST_MAPPING = 2 << 20


class DirectBody:
    """One request body of ``size`` bytes, written by the protocol, awaited by the application.

    ``start`` is the protocol's half of :meth:`claim`: it hands over the bytes it already holds
    (through :meth:`write`) and from then on fills :meth:`writable` and calls :meth:`advance`.
    ``position`` and ``last`` (the loop time of the latest bytes) tell the application's
    deadlines how the body is coming along."""

    def __init__(self, size: int, start: Callable[[DirectBody], None]) -> None:
        self.size = size
        self.position = 0
        self.claimed = False
        self.last = 0.0
        self._start: Callable[[DirectBody], None] | None = start
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] | None = None
        self._mapping: mmap.mmap | None = None
        #: The whole buffer, when it is one from the pool (or the mapping adopted into it).
        self._buffer: np.ndarray | None = None

    # --- the application's side -----------------------------------------------------------

    def claim(self) -> None:
        """Take the body: map its first part and let the protocol fill it (once only)."""
        if self.claimed:
            raise RuntimeError("a direct body is claimed once")
        self.claimed = True
        self._buffer = buffers.pool().reuse(self.size)  # memory already committed, if any
        if self._buffer is None:
            self._mapping = map_body(min(FIRST_MAPPING, rounded(self.size)), self.size)
        self._done = self._loop.create_future()
        self.last = self._loop.time()
        start, self._start = self._start, None  # it refers to the request: no cycle kept
        assert start is not None
        start(self)

    async def wait(self) -> None:
        """Return once every byte is in; ClientDisconnect (or BadRequest) if that cannot be."""
        assert self._done is not None, "claim() first"
        await asyncio.shield(self._done)  # a cancelled wait (a deadline) leaves it intact

    def value(self) -> memoryview:
        """Hand the body over (complete once :meth:`wait` returned): this object lets go of
        it, so that once its user does too, the pool can give the buffer to another body."""
        if self._buffer is not None:
            view = self._buffer.data[: self.position]
        else:  # cut short: what arrived
            assert self._mapping is not None, "claim() first"
            view = memoryview(self._mapping)[: self.position]
        self._buffer = self._mapping = None
        return view

    # --- the protocol's side ----------------------------------------------------------------

    def writable(self) -> memoryview:
        """Where the next bytes go: the rest of the mapping, grown first if it is full."""
        if self._buffer is not None:
            return self._buffer.data[self.position : self.size]
        self._reserve(self.position + 1)
        assert self._mapping is not None
        return memoryview(self._mapping)[self.position : min(len(self._mapping), self.size)]

    def advance(self, count: int) -> bool:
        """``count`` more bytes were written into :meth:`writable`; True once complete."""
        self.position += count
        self.last = self._loop.time()
        if self.position < self.size:
            return False
        self._adopt()
        self._settle(None)
        return True

    def write(self, data: bytes | bytearray) -> bool:
        """Bytes that arrived otherwise (before the claim); True once complete."""
        end = self.position + len(data)
        if end > self.size:  # the protocol never passes more: a bug
            raise BadRequest("the body is longer than its Content-Length")
        if self._buffer is not None:
            self._buffer[self.position : end] = np.frombuffer(data, dtype=np.uint8)
        else:
            self._reserve(end)
            assert self._mapping is not None
            self._mapping[self.position : end] = data
        return self.advance(len(data))

    def _adopt(self) -> None:
        """The body is complete: from now on it is seen through one array (so the pool can
        tell when nothing holds it), which the pool keeps for a later body of this size."""
        if self._buffer is None and self._mapping is not None:
            self._buffer = np.frombuffer(self._mapping, dtype=np.uint8, count=self.size)
            buffers.pool().adopt(self._buffer)

    def _reserve(self, end: int) -> None:
        """Grow the mapping to hold ``end`` bytes (doubling, up to the declared size)."""
        assert self._mapping is not None, "claim() first"
        capacity = len(self._mapping)
        if end <= capacity:
            return
        resize_body(self._mapping, rounded(min(self.size, max(end, 2 * capacity))), self.size)

    def fail(self, error: BaseException) -> None:
        """The body will not complete (the connection was lost, or the request ended short)."""
        self._settle(error)

    def _settle(self, error: BaseException | None) -> None:
        done = self._done
        if done is None or done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
            done.exception()  # retrieved here: a deadline may have stopped the waiter first


def rounded(size: int) -> int:
    """A body mapping's size: whole huge pages, so the kernel places (and moves) it on their
    boundaries; other sizes would split its huge pages (2-4 ms more on a 40 MB body)."""
    return max(HUGE_PAGE, -(-size // HUGE_PAGE) * HUGE_PAGE)


def map_body(capacity: int, size: int) -> mmap.mmap:
    """An anonymous private mapping of ``capacity`` bytes for (part of) a body of ``size``,
    asking for huge pages; 503 if there is no memory for it."""
    try:
        mapping = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, OverflowError):
        raise _no_memory(size) from None
    with contextlib.suppress(AttributeError, OSError):  # no THP: small pages
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


def resize_body(mapping: mmap.mmap, capacity: int, size: int) -> None:
    """Grow a body's mapping to ``capacity`` (page tables move, bytes do not); 503 if there is
    no memory for it."""
    try:
        mapping.resize(capacity)
    except (OSError, MemoryError):
        raise _no_memory(size) from None


def _no_memory(size: int) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"no memory for a body of {size} bytes right now; retry later", retry_after=5
    )


def offered(scope: Any) -> DirectBody | None:
    """The body offered in this request's scope, if any."""
    extensions = scope.get("extensions")
    body = extensions.get(DIRECT_BODY) if extensions else None
    return body if isinstance(body, DirectBody) else None


def direct_bytes(scope: Any) -> int:
    """How many body bytes reached the application directly (not through ``receive()``)."""
    body = offered(scope)
    return body.position if body is not None and body.claimed else 0
