"""The client's own HTTP/1.1 transport (``optserver_client._wire``) and the pieces it sends.

- The sans-I/O response parser: framing (Content-Length, chunked with extensions and trailers,
  until-close), interim responses, keep-alive, limits and malformed input; property tests that a
  response parses the same however it is split, and that no input raises anything but
  ``WireError``.
- The socket transports, sync and async, against tiny threaded servers on 127.0.0.1: keep-alive
  reuse, stale idle connections, truncated answers, timeouts, refused connections, scatter-gather
  bodies, the idle bound, and every failure as the httpx exception the retry policy expects.
- The scatter-gather body: ``safetensors_io.encode_parts`` against ``encode``, and
  ``Call.request_content`` for httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import string
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optserver_client import Client, TransportError, __version__, _wire
from optserver_client._protocol import SEND_CHUNK, Call
from optserver_client._wire import (
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    MAX_IDLE,
    AsyncTransport,
    Response,
    ResponseParser,
    Transport,
    WireError,
    usable,
)
from optserver_client.buffers import BufferPool
from optserver_client.safetensors_io import encode, encode_parts

PROPERTY_SETTINGS = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
WAIT_S = 5.0  # bound on any wait for the other side of a loopback connection


# -- the parser ---------------------------------------------------------------------------------


def parse(*pieces: bytes, method: str = "GET", eof: bool = False) -> Response:
    parser = ResponseParser(method)
    for piece in pieces:
        parser.feed(piece)
    if eof:
        parser.feed_eof()
    return parser.response()


def test_content_length_body() -> None:
    raw = b"HTTP/1.1 201 Created\r\nContent-Type: x/y\r\ncontent-length: 5\r\n\r\nhello"
    response = parse(raw)
    assert response.status == 201 and response.reason == "Created"
    assert response.headers == [("Content-Type", "x/y"), ("content-length", "5")]
    assert bytes(response.body) == b"hello"
    assert response.keep_alive
    assert not memoryview(response.body).readonly  # decoded arrays must be writable


def test_body_read_into_its_window() -> None:
    """The socket layer's path: the body's buffer is filled in place, not through feed."""
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
    window = parser.body_window()
    assert window is not None and len(window) == 4
    window[:3] = b"cde"
    parser.body_received(3)
    assert not parser.done
    window = parser.body_window()
    assert window is not None and len(window) == 1
    window[:] = b"f"
    parser.body_received(1)
    assert parser.done and parser.body_window() is None
    assert bytes(parser.response().body) == b"abcdef"


def test_chunked_with_extensions_and_trailers() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n"
        b"1 ; a=b ; c\r\n \r\n"
        b"A\r\n0123456789\r\n"
        b"0\r\nExpires: never\r\nX-Digest: abc\r\n\r\n"
    )
    response = parse(raw)
    assert bytes(response.body) == b"hello 0123456789"
    assert response.keep_alive
    assert ("Transfer-Encoding", "chunked") in response.headers
    assert parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n").body == b""


def test_interim_responses_are_skipped() -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    response = parse(raw)
    assert response.status == 200 and response.headers == [("Content-Length", "2")]
    assert bytes(response.body) == b"ok"


def test_switching_protocols_is_refused() -> None:
    with pytest.raises(WireError, match="101"):
        parse(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")


@pytest.mark.parametrize(
    "connection", ["close", "Close", "keep-alive, close", "upgrade,CLOSE"], ids=str
)
def test_connection_close_is_not_kept_alive(connection: str) -> None:
    raw = f"HTTP/1.1 200 OK\r\nConnection: {connection}\r\nContent-Length: 0\r\n\r\n".encode()
    assert not parse(raw).keep_alive
    assert parse(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    ).keep_alive


def test_http_1_0_is_never_kept_alive() -> None:
    response = parse(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx")
    assert bytes(response.body) == b"x" and not response.keep_alive


def test_a_body_without_length_ends_with_the_connection() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.0 200 OK\r\n\r\nsome ")
    parser.feed(b"bytes")
    assert not parser.done
    parser.feed_eof()
    response = parser.response()
    assert bytes(response.body) == b"some bytes" and not response.keep_alive


@pytest.mark.parametrize("status", [204, 304])
def test_statuses_without_body(status: int) -> None:
    raw = f"HTTP/1.1 {status} X\r\nContent-Length: 10\r\n\r\n".encode()
    response = parse(raw)
    assert response.status == status and response.body == b"" and response.keep_alive


def test_answers_to_head_have_no_body() -> None:
    response = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", method="HEAD")
    assert response.body == b"" and response.keep_alive


def test_bytes_after_the_response_forbid_reuse() -> None:
    response = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK\r\n")
    assert bytes(response.body) == b"x" and not response.keep_alive


def test_header_size_is_bounded() -> None:
    line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    fits = b"HTTP/1.1 200 OK\r\n" + line * ((MAX_HEAD_BYTES - 100) // len(line))
    assert parse(fits + b"Content-Length: 0\r\n\r\n").status == 200
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\n")
    for _ in range(MAX_HEAD_BYTES // len(line) - 1):
        parser.feed(line)
    with pytest.raises(WireError, match="longer than"):  # a head that never ends: refused
        parser.feed(line * 2)
    # Interim responses count towards the same bound: an endless stream of them is refused.
    interim = b"HTTP/1.1 100 Continue\r\n" + line + b"\r\n"
    with pytest.raises(WireError, match="longer than"):
        parse(*[interim] * (MAX_HEAD_BYTES // len(interim) + 1))


def test_header_count_is_bounded() -> None:
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_FIELDS + 1))
    with pytest.raises(WireError, match="header fields"):
        parse(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_FIELDS - 1))
    assert parse(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n").status == 200


@pytest.mark.parametrize(
    "status_line",
    [
        b"HTTP/2 200 OK",
        b"HTTP/1.2 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 099 Low",
        b"http/1.1 200 OK",
        b"ICY 200 OK",
        b" HTTP/1.1 200 OK",
        b"HTTP/1.1 200 O\x00K",
        b"HTTP/1.1  200 OK",
        b"",
    ],
)
def test_bad_status_lines(status_line: bytes) -> None:
    with pytest.raises(WireError, match="status"):
        parse(status_line + b"\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize(
    "field",
    [b"Bad Name: x", b"Name : x", b" folded: x", b"NoColon", b"X: a\rb", b"X: \x01", b": x"],
)
def test_bad_header_lines(field: bytes) -> None:
    with pytest.raises(WireError, match="header line"):
        parse(b"HTTP/1.1 200 OK\r\n" + field + b"\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize(
    "lengths",
    [
        ["abc"],
        ["-1"],
        ["+5"],
        ["1.5"],
        ["0x10"],
        [""],
        ["1" * 19],
        ["\u0665"],  # a digit, but not an ASCII one
        ["5, 6"],
        ["5", "6"],
        ["5,"],
    ],
    ids=repr,
)
def test_bad_content_lengths(lengths: list[str]) -> None:
    fields = "".join(f"Content-Length: {value}\r\n" for value in lengths).encode("utf-8")
    with pytest.raises(WireError, match="Content-Length"):
        parse(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n12345")


def test_repeated_equal_content_lengths_are_one() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3, 3\r\n\r\nabc"
    assert bytes(parse(raw).body) == b"abc"


@pytest.mark.parametrize(
    "fields",
    [
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: identity\r\n",
    ],
)
def test_unsupported_framing(fields: bytes) -> None:
    with pytest.raises(WireError, match="framing"):
        parse(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n0\r\n\r\n")


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        (b"5\r\nhello!\r\n0\r\n\r\n", "longer than its size"),
        (b"z\r\n", "chunk size"),
        (b"-5\r\nhello\r\n", "chunk size"),
        (b"\r\n", "chunk size"),
        (b"10000000000000000\r\n", "chunk size"),
        (b"0\r\nBad Trailer\r\n\r\n", "header line"),
    ],
)
def test_bad_chunks(chunks: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "without sending a response"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "before the response ended"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "before the response ended"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "before the response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n", "before the response"),
    ],
)
def test_truncated_responses(raw: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        parse(raw, eof=True)
    with pytest.raises(WireError, match="not complete"):
        parse(raw)


# -- properties of the parser -------------------------------------------------------------------

TOKEN = st.text(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1, max_size=12)
FIELD_VALUE = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=24,
).map(lambda value: value.strip(" "))
FRAMING = {"content-length", "transfer-encoding", "connection"}


@st.composite
def valid_responses(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """A well-formed response, and what parsing it must give."""
    raw = b"".join(
        f"HTTP/1.1 {status} Interim\r\n\r\n".encode()
        for status in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2))
    )
    status = draw(st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    reason = draw(st.text(string.ascii_letters + " ", max_size=12))
    fields = draw(st.lists(st.tuples(TOKEN, FIELD_VALUE), max_size=6))
    fields = [(n, v) for n, v in fields if n.lower() not in FRAMING]
    body = draw(st.binary(max_size=600))
    framing = draw(st.sampled_from(["length", "chunked", "until-close"]))
    minor = 0 if framing == "until-close" and draw(st.booleans()) else 1
    tail = b""
    if framing == "length":
        fields.append(("Content-Length", str(len(body))))
        payload = body
    elif framing == "chunked":
        fields.append(("Transfer-Encoding", "chunked"))
        sizes = draw(st.lists(st.integers(1, 64), max_size=12))
        payload, position = b"", 0
        for size in [*sizes, len(body)]:
            piece = body[position : position + size]
            position += len(piece)
            if piece:
                extension = draw(st.sampled_from(["", ";a", ";a=b", ' ; q="x"']))
                payload += f"{len(piece):x}{extension}\r\n".encode() + piece + b"\r\n"
        trailers = draw(st.lists(st.tuples(TOKEN, FIELD_VALUE), max_size=2))
        tail = b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in trailers)
        payload += b"0\r\n" + tail + b"\r\n"
    else:
        payload = body
    head = f"HTTP/1.{minor} {status} {reason}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields)
    raw += head.encode("latin-1") + b"\r\n" + payload
    expected = {
        "status": status,
        "reason": reason,
        "headers": fields,
        "body": body,
        "keep_alive": framing != "until-close",
        "eof": framing == "until-close",
    }
    return raw, expected


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(raw) + 1) for c in cuts), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def outcome(response: Response) -> dict[str, Any]:
    return {
        "status": response.status,
        "reason": response.reason,
        "headers": response.headers,
        "body": bytes(response.body),
        "keep_alive": response.keep_alive,
    }


@PROPERTY_SETTINGS
@given(valid_responses(), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_parses_the_same(case: tuple[bytes, dict[str, Any]], cuts: list[int]) -> None:
    raw, expected = case
    eof = expected.pop("eof")
    whole = outcome(parse(raw, eof=eof))
    assert whole == expected
    assert outcome(parse(*split(raw, cuts), eof=eof)) == whole
    assert outcome(parse(*(raw[i : i + 1] for i in range(len(raw))), eof=eof)) == whole


PREFIXES = [
    b"",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n",
    b"HTTP/1.0 200 OK\r\n\r\n",
]


@PROPERTY_SETTINGS
@given(
    st.sampled_from(PREFIXES),
    st.binary(max_size=300)
    | st.lists(st.sampled_from([b"\r\n", b":", b" ", b"1", b"a"])).map(b"".join),
    st.lists(st.integers(0, 10_000), max_size=6),
    st.booleans(),
)
def test_arbitrary_bytes_raise_only_wire_errors(
    prefix: bytes, junk: bytes, cuts: list[int], eof: bool
) -> None:
    parser = ResponseParser()
    try:
        for piece in split(prefix + junk, cuts):
            parser.feed(piece)
        if eof:
            parser.feed_eof()
        parser.response()
    except WireError:
        pass


# -- a loopback server ----------------------------------------------------------------------------


class Peer:
    """The server's side of one connection: reads requests framed by Content-Length."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def request(self) -> tuple[bytes, bytes] | None:
        """The next request's head and body; None at EOF."""
        pieces = [self.buffer]
        while b"\r\n\r\n" not in pieces[-1] and b"\r\n\r\n" not in b"".join(pieces):
            data = self.conn.recv(1 << 16)
            if not data:
                return None
            pieces.append(data)
        head, _, rest = b"".join(pieces).partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        chunks, have = [rest], len(rest)
        while have < length:
            data = self.conn.recv(1 << 20)
            if not data:
                return None
            chunks.append(data)
            have += len(data)
        body = b"".join(chunks)
        self.buffer = body[length:]
        return head, body[:length]

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)


def answer(body: bytes = b"", *fields: str, status: str = "200 OK") -> bytes:
    head = "".join(f"{field}\r\n" for field in (*fields, f"Content-Length: {len(body)}"))
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


Handler = Callable[[Peer, "Server"], None]


class Server:
    """A loopback server running ``handler`` on each connection, in a thread of its own."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.connections: list[socket.socket] = []
        self.closed_by_client = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(Peer(conn), self)

    def record(self, request: tuple[bytes, bytes]) -> None:
        with self.lock:
            self.heads.append(request[0])
            self.bodies.append(request[1])

    def eof(self) -> None:
        with self.lock:
            self.closed_by_client += 1

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept
        self.listener.close()
        with self.lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv
            conn.close()
        for thread in self.threads:
            thread.join(WAIT_S)


@contextlib.contextmanager
def serve(handler: Handler) -> Iterator[Server]:
    server = Server(handler)
    try:
        yield server
    finally:
        server.close()


def echo(peer: Peer, server: Server) -> None:
    """Answers each request with its body, keeping the connection open."""
    while (request := peer.request()) is not None:
        server.record(request)
        peer.send(answer(request[1], "Content-Type: application/octet-stream"))
    server.eof()


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def refused_port() -> int:
    """A loopback port nothing listens on (just released by this process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.contextmanager
def transport(url: str, timeout: float | httpx.Timeout = WAIT_S) -> Iterator[Transport]:
    wire = Transport(httpx.URL(url), timeout)
    try:
        yield wire
    finally:
        wire.close()


# -- the sync transport -------------------------------------------------------------------------


def test_requests_are_framed_and_connections_kept_alive() -> None:
    with serve(echo) as server, transport(server.url + "/prefix/") as wire:
        headers = {"Accept": "application/json", "Idempotency-Key": "k1"}
        for i in range(3):
            response = wire.request(
                "POST",
                "/v1/x y",
                {"return": "all", "n": str(i)},
                headers,
                (
                    b"ab",
                    memoryview(b"cd"),
                ),
            )
            assert response.status == 200 and bytes(response.body) == b"abcd"
            assert ("Content-Type", "application/octet-stream") in response.headers
        get = wire.request("GET", "/healthz", None, {})
        assert get.status == 200 and get.body == b""
        assert len(server.connections) == 1
    first = server.heads[0].decode().split("\r\n")
    assert first[0] == "POST /prefix/v1/x%20y?return=all&n=0 HTTP/1.1"
    assert first[1] == f"Host: 127.0.0.1:{server.port}"
    assert sorted(first[2:]) == sorted(
        [
            "Content-Length: 4",
            f"User-Agent: optserver-client/{__version__}",
            "Accept: application/json",
            "Idempotency-Key: k1",
        ]
    )
    assert server.bodies[:3] == [b"abcd"] * 3
    assert server.heads[3].decode().split("\r\n")[0] == "GET /prefix/healthz HTTP/1.1"
    assert "content-length" not in server.heads[3].decode().lower()  # a GET has no body


def test_an_empty_post_says_content_length_zero() -> None:
    with serve(echo) as server, transport(server.url) as wire:
        assert wire.request("POST", "/", None, {}).status == 200
        assert wire.request("DELETE", "/", None, {}).status == 200
    assert "\r\nContent-Length: 0" in server.heads[0].decode()
    assert "content-length" not in server.heads[1].decode().lower()


def test_scatter_gather_body_arrives_byte_identical() -> None:
    rng = np.random.default_rng(0)
    parts: list[Any] = [rng.bytes(int(n)) for n in rng.integers(0, 50, 1500)]  # > one sendmsg
    parts += [b"", rng.standard_normal(1_500_000).astype(np.float32).data, rng.bytes(3 << 20)]
    parts += [np.arange(7, dtype=np.float64).data, bytearray(b"end")]
    expected = b"".join(memoryview(p).cast("B") for p in parts)
    with serve(echo) as server, transport(server.url) as wire:
        response = wire.request("PUT", "/", None, {}, parts)
    assert server.bodies == [expected]
    assert bytes(response.body) == expected


def test_chunked_response_over_a_socket() -> None:
    def chunked(peer: Peer, server: Server) -> None:
        while peer.request() is not None:
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            peer.send(b"3;x=y\r\nabc\r\n")
            peer.send(b"2\r\nde\r\n0\r\nTrailer: t\r\n\r\n")

    with serve(chunked) as server, transport(server.url) as wire:
        assert bytes(wire.request("GET", "/", None, {}).body) == b"abcde"
        assert bytes(wire.request("GET", "/", None, {}).body) == b"abcde"
        assert len(server.connections) == 1


def test_a_large_response_is_read_into_one_writable_buffer() -> None:
    payload = np.random.default_rng(1).bytes(5 << 20)

    def big(peer: Peer, server: Server) -> None:
        while peer.request() is not None:
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            peer.send(head + payload[:100])
            time.sleep(0.01)  # the rest comes later, in recv_into the body itself
            peer.send(payload[100:])

    pool = BufferPool(64 << 20)
    with serve(big) as server:
        wire = Transport(httpx.URL(server.url), WAIT_S, pool)
        try:
            body = wire.request("GET", "/", None, {}).body
        finally:
            wire.close()
    assert bytes(body) == payload
    # One buffer of exactly the body's size, from the allocator it was given: not assembled.
    assert pool.held_bytes == len(payload)
    array = np.frombuffer(body, np.uint8)
    held = pool.reuse(len(payload))
    assert held is None  # the body is that buffer, still in use
    array[0] ^= 1  # writable


def test_connection_close_is_honoured() -> None:
    """The server says close but keeps the connection open: the client must not reuse it."""

    def says_close(peer: Peer, server: Server) -> None:
        while peer.request() is not None:
            peer.send(answer(b"bye", "Connection: close"))
        server.eof()

    with serve(says_close) as server, transport(server.url) as wire:
        for _ in range(2):
            assert bytes(wire.request("GET", "/", None, {}).body) == b"bye"
        assert len(server.connections) == 2
        wait_for(lambda: server.closed_by_client == 2)


def test_no_reuse_after_an_error_answer_to_a_body() -> None:
    """The server may have refused the body unread, and close unannounced (uvicorn does after a
    413): the next request must not race that close on the same connection."""

    def refusing(peer: Peer, server: Server) -> None:
        while (request := peer.request()) is not None:
            server.record(request)
            status = "413 Payload Too Large" if request[1] else "404 Not Found"
            peer.send(answer(b"no", status=status))

    with serve(refusing) as server, transport(server.url) as wire:
        assert wire.request("GET", "/", None, {}).status == 404
        assert wire.request("GET", "/", None, {}).status == 404
        assert len(server.connections) == 1  # an error without a body sent: kept alive
        assert wire.request("PUT", "/", None, {}, (b"body",)).status == 413
        assert wire.request("GET", "/", None, {}).status == 404
        assert len(server.connections) == 2


def test_a_stale_idle_connection_is_dropped() -> None:
    """A server that closes idle connections (a keep-alive timeout) after each answer."""

    def one_answer(peer: Peer, server: Server) -> None:
        if (request := peer.request()) is not None:
            server.record(request)
            peer.send(answer(b"ok"))  # kept alive, as far as the answer says
        time.sleep(0.05)
        peer.conn.close()
        server.eof()

    with serve(one_answer) as server, transport(server.url) as wire:
        assert bytes(wire.request("POST", "/", None, {}, (b"1",)).body) == b"ok"
        wait_for(lambda: server.closed_by_client == 1)
        time.sleep(0.05)  # the FIN has reached the client's socket
        assert bytes(wire.request("POST", "/", None, {}, (b"2",)).body) == b"ok"
        assert len(server.connections) == 2
    assert server.bodies == [b"1", b"2"]


def test_a_server_closing_mid_response_is_a_protocol_error() -> None:
    def truncating(peer: Peer, server: Server) -> None:
        if peer.request() is not None:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        peer.conn.shutdown(socket.SHUT_WR)
        peer.request()  # until the client gives up

    with serve(truncating) as server, transport(server.url) as wire:
        with pytest.raises(httpx.RemoteProtocolError, match="before the response ended") as info:
            wire.request("GET", "/step", None, {})
        assert info.value.request.url == f"{server.url}/step"


def test_a_server_closing_without_answer_is_a_protocol_error() -> None:
    def silent(peer: Peer, server: Server) -> None:
        peer.request()
        peer.conn.close()

    error = pytest.raises(httpx.RemoteProtocolError, match="without sending a response")
    with serve(silent) as server, transport(server.url) as wire, error:
        wire.request("GET", "/", None, {})


def test_garbage_is_a_protocol_error_and_the_connection_is_closed() -> None:
    def garbage(peer: Peer, server: Server) -> None:
        if peer.request() is not None:
            peer.send(b"SSH-2.0-OpenSSH\r\n\r\n")
        if peer.request() is None:
            server.eof()

    with serve(garbage) as server, transport(server.url) as wire:
        with pytest.raises(httpx.RemoteProtocolError, match="status line"):
            wire.request("GET", "/", None, {})
        wait_for(lambda: server.closed_by_client == 1)


def test_a_server_that_never_answers_is_a_read_timeout() -> None:
    def mute(peer: Peer, server: Server) -> None:
        peer.request()
        server.stop.wait(WAIT_S)

    with serve(mute) as server:
        limits = httpx.Timeout(WAIT_S, read=0.2)
        with transport(server.url, limits) as wire:
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                wire.request("GET", "/", None, {})
            assert 0.15 < time.monotonic() - start < 2.0


def test_a_refused_connection_is_a_connect_error() -> None:
    url = f"http://127.0.0.1:{refused_port()}"
    with transport(url) as wire, pytest.raises(httpx.ConnectError) as info:
        wire.request("GET", "/", None, {})
    assert isinstance(info.value.request, httpx.Request)


def test_an_unroutable_address_is_a_connect_failure() -> None:
    # TEST-NET-1 (RFC 5737): no host answers; either the connect times out, or it fails at once
    # where the network has no route at all.
    limits = httpx.Timeout(WAIT_S, connect=0.1)
    error = pytest.raises((httpx.ConnectTimeout, httpx.ConnectError))
    with transport("http://192.0.2.1:81", limits) as wire, error:
        wire.request("GET", "/", None, {})


def test_a_server_that_stops_reading_is_a_write_timeout() -> None:
    def stuck(peer: Peer, server: Server) -> None:
        server.stop.wait(WAIT_S)  # accepts, never reads

    limits = httpx.Timeout(WAIT_S, write=0.2)
    error = pytest.raises(httpx.WriteTimeout)
    with serve(stuck) as server, transport(server.url, limits) as wire, error:
        wire.request("PUT", "/", None, {}, (bytes(64 << 20),))


def test_an_early_answer_to_a_body_it_refuses_is_read() -> None:
    """As httpcore does: a server may answer (413) and close before reading the whole body."""

    def refuse(peer: Peer, server: Server) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += peer.conn.recv(1024)
        peer.send(answer(b"too large", "Connection: close", status="413 Payload Too Large"))
        peer.conn.shutdown(socket.SHUT_WR)
        time.sleep(0.2)  # reads nothing more: the client's writes fail
        peer.conn.close()

    with serve(refuse) as server, transport(server.url) as wire:
        response = wire.request("PUT", "/", None, {}, (bytes(32 << 20),))
        assert response.status == 413 and bytes(response.body) == b"too large"


def test_a_write_failure_without_answer_is_a_write_error() -> None:
    def reset(peer: Peer, server: Server) -> None:
        peer.conn.recv(1024)
        # RST at once, unread bytes discarded: the client's writes fail and nothing comes back.
        peer.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
        peer.conn.close()

    with serve(reset) as server, transport(server.url) as wire, pytest.raises(httpx.WriteError):
        wire.request("PUT", "/", None, {}, (bytes(32 << 20),))


def test_invalid_header_values_are_refused_before_sending() -> None:
    with serve(echo) as server, transport(server.url) as wire:
        with pytest.raises(httpx.LocalProtocolError):
            wire.request("GET", "/", None, {"Authorization": "Bearer x\r\nInjected: 1"})
        with pytest.raises(httpx.LocalProtocolError):
            wire.request("GET", "/", None, {"Bad Name": "x"})
        assert wire.request("GET", "/", None, {}).status == 200
    assert len(server.heads) == 1


def test_the_idle_pool_is_bounded_and_closed() -> None:
    count = MAX_IDLE + 4
    barrier = threading.Barrier(count, timeout=WAIT_S)

    def together(peer: Peer, server: Server) -> None:
        first = True
        while (request := peer.request()) is not None:
            if first:
                barrier.wait()  # every connection is open at once
                first = False
            peer.send(answer(request[1]))
        server.eof()

    with serve(together) as server:
        wire = Transport(httpx.URL(server.url), WAIT_S)
        try:
            results: list[bytes] = []

            def call(i: int) -> None:
                results.append(bytes(wire.request("POST", "/", None, {}, (b"%d" % i,)).body))

            threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT_S)
            assert sorted(results) == sorted(b"%d" % i for i in range(count))
            wait_for(lambda: server.closed_by_client == count - MAX_IDLE)
            for _ in range(MAX_IDLE * 3):  # the kept ones are reused, and no new one opens
                wire.request("POST", "/", None, {}, (b"x",))
            assert len(server.connections) == count
            assert server.closed_by_client == count - MAX_IDLE
        finally:
            wire.close()
        wait_for(lambda: server.closed_by_client == count)


def test_a_connection_left_by_a_timeout_is_not_reused() -> None:
    def slow_first(peer: Peer, server: Server) -> None:
        while (request := peer.request()) is not None:
            server.record(request)
            if len(server.heads) == 1:  # the first request of all is answered late
                time.sleep(0.4)
                peer.send(answer(b"late"))
            else:
                peer.send(answer(b"ok"))

    with serve(slow_first) as server, transport(server.url, httpx.Timeout(1, read=0.2)) as wire:
        with pytest.raises(httpx.ReadTimeout):
            wire.request("GET", "/", None, {})
        # The late answer to the first request must not be taken for the second one's.
        assert bytes(wire.request("GET", "/", None, {}).body) == b"ok"
        assert len(server.connections) == 2


def test_threads_share_one_transport() -> None:
    with serve(echo) as server, transport(server.url) as wire:
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                for i in range(50):
                    body = b"%d-%d" % (n, i) * (i + 1)
                    assert bytes(wire.request("POST", "/", None, {}, (body,)).body) == body
            except BaseException as error:  # reported below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S * 4)
        assert not errors
        assert len(server.connections) <= 8


def test_proxies_send_requests_through_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    url = httpx.URL("http://optserver.test:8000/")
    assert usable(url)
    assert not usable(httpx.URL("https://optserver.test/"))
    monkeypatch.setenv("http_proxy", "http://proxy.test:3128")
    assert not usable(url)
    with Client("http://optserver.test:8000") as client:
        assert not client.fast_path
    monkeypatch.setenv("no_proxy", "optserver.test")
    assert usable(url)
    monkeypatch.delenv("http_proxy")
    monkeypatch.setenv("ALL_PROXY", "socks5://proxy.test")
    monkeypatch.delenv("no_proxy")
    assert not usable(url)


def test_client_retries_through_the_fast_path() -> None:
    """The failures map to the httpx exceptions the retry policy knows: a dropped answer to a
    GET is retried on a new connection."""

    def flaky(peer: Peer, server: Server) -> None:
        if (request := peer.request()) is not None:
            server.record(request)
            if len(server.heads) == 1:
                peer.conn.close()  # the first request gets no answer
                return
            peer.send(answer(b'{"status": "ok"}', "Content-Type: application/json"))

    with serve(flaky) as server, Client(server.url, backoff=0.0) as client:
        assert client.fast_path
        assert client.health() == {"status": "ok"}
    assert len(server.heads) == 2 and len(server.connections) == 2
    client = Client(f"http://127.0.0.1:{refused_port()}", retries=2, backoff=0.0)
    with client, pytest.raises(TransportError) as info:
        client.health()
    assert isinstance(info.value.error, httpx.ConnectError) and info.value.attempts == 3


# -- the async transport ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def async_transport(url: str, timeout: float | httpx.Timeout = WAIT_S) -> Any:
    wire = AsyncTransport(httpx.URL(url), timeout)
    try:
        yield wire
    finally:
        wire.close()


def test_async_keep_alive_and_scatter_gather() -> None:
    parts: list[Any] = [np.random.default_rng(2).bytes(int(n)) for n in range(0, 3000, 3)]
    parts.append(np.ones(2_000_000, np.float32).data)  # several MB: the socket blocks midway
    expected = b"".join(memoryview(p).cast("B") for p in parts)

    async def main(url: str) -> list[bytes]:
        async with async_transport(url + "/p") as wire:
            out = []
            for _ in range(2):
                response = await wire.request("PUT", "/big", {"a": "1"}, {"X-A": "b"}, parts)
                out.append(bytes(response.body))
            small = await wire.request("GET", "/small", None, {})
            out.append(bytes(small.body))
            return out

    with serve(echo) as server:
        assert asyncio.run(main(server.url)) == [expected, expected, b""]
        assert len(server.connections) == 1
    assert server.bodies == [expected, expected, b""]
    assert server.heads[0].split(b"\r\n")[0] == b"PUT /p/big?a=1 HTTP/1.1"
    assert f"User-Agent: optserver-client/{__version__}".encode() in server.heads[0]


def test_async_concurrent_requests() -> None:
    async def main(url: str) -> list[bytes]:
        async with async_transport(url) as wire:
            calls = [wire.request("POST", "/", None, {}, (b"%d" % i,)) for i in range(30)]
            return [bytes(r.body) for r in await asyncio.gather(*calls)]

    with serve(echo) as server:
        assert asyncio.run(main(server.url)) == [b"%d" % i for i in range(30)]
        assert len(server.connections) <= 30


def test_async_stale_connection_is_dropped() -> None:
    def one_answer(peer: Peer, server: Server) -> None:
        if peer.request() is not None:
            peer.send(answer(b"ok"))
        peer.conn.close()
        server.eof()

    async def main(server: Server) -> list[bytes]:
        async with async_transport(server.url) as wire:
            first = await wire.request("GET", "/", None, {})
            while server.closed_by_client < 1:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            second = await wire.request("GET", "/", None, {})
            return [bytes(first.body), bytes(second.body)]

    with serve(one_answer) as server:
        assert asyncio.run(main(server)) == [b"ok", b"ok"]
        assert len(server.connections) == 2


def test_async_failures_are_httpx_errors() -> None:
    def truncating(peer: Peer, server: Server) -> None:
        if peer.request() is not None:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        peer.conn.close()

    def mute(peer: Peer, server: Server) -> None:
        peer.request()
        server.stop.wait(WAIT_S)

    async def call(url: str, timeout: float | httpx.Timeout = WAIT_S) -> None:
        async with async_transport(url, timeout) as wire:
            await wire.request("GET", "/", None, {})

    with serve(truncating) as server, pytest.raises(httpx.RemoteProtocolError):
        asyncio.run(call(server.url))
    with serve(mute) as server, pytest.raises(httpx.ReadTimeout):
        asyncio.run(call(server.url, httpx.Timeout(WAIT_S, read=0.2)))
    with pytest.raises(httpx.ConnectError):
        asyncio.run(call(f"http://127.0.0.1:{refused_port()}"))


def test_async_cancelled_request_closes_its_connection() -> None:
    def slow(peer: Peer, server: Server) -> None:
        while peer.request() is not None:
            time.sleep(0.3)
            peer.send(answer(b"ok"))
        server.eof()

    async def main(server: Server) -> bytes:
        async with async_transport(server.url) as wire:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await wire.request("GET", "/", None, {})
            response = await wire.request("GET", "/", None, {})
            return bytes(response.body)

    with serve(slow) as server:
        assert asyncio.run(main(server)) == b"ok"
        assert len(server.connections) == 2  # the cancelled one was not reused
        wait_for(lambda: server.closed_by_client == 2)


# -- the body as pieces ---------------------------------------------------------------------------


ARRAYS: dict[str, Callable[[], np.ndarray]] = {
    "contiguous": lambda: np.arange(12, dtype=np.float32).reshape(3, 4),
    "transposed": lambda: np.arange(12, dtype=np.float64).reshape(3, 4).T,
    "strided": lambda: np.arange(20, dtype=np.float32)[::3],
    "big-endian": lambda: np.arange(5, dtype=">f4"),
    "float16": lambda: np.linspace(0, 1, 7, dtype=np.float16),
    "rank-0": lambda: np.array(2.5, np.float32),
    "empty": lambda: np.zeros((0, 3), np.float32),
}


@pytest.mark.parametrize("metadata", [None, {"lr": "0.1", "worker": "w"}])
def test_encode_parts_join_to_encode(metadata: dict[str, str] | None) -> None:
    tensors = {name: make() for name, make in ARRAYS.items()}
    parts = encode_parts(tensors, metadata)
    assert b"".join(parts) == bytes(encode(tensors, metadata))
    assert len(parts) == 1 + sum(1 for a in tensors.values() if a.size)


def test_encode_parts_are_views_of_contiguous_little_endian_arrays() -> None:
    array = np.arange(6, dtype="<f4")
    swapped = np.arange(6, dtype=">f4")
    parts = encode_parts({"a": array, "b": swapped}, None)
    assert np.shares_memory(np.frombuffer(parts[1], np.uint8), array)
    assert not np.shares_memory(np.frombuffer(parts[2], np.uint8), swapped)


def test_request_content_for_httpx() -> None:
    def call(content: Any) -> Call[None]:
        return Call("POST", "/", lambda reply: None, content=content)

    assert call(None).request_content() == (None, {})
    assert call(b"").request_content() == (b"", {})
    small = (b"head", np.arange(3, dtype=np.float32).data)
    assert call(small).request_content() == (b"head" + np.arange(3, dtype=np.float32).tobytes(), {})
    big = (b"h" * 10, np.ones(SEND_CHUNK // 2 + 7, np.float32).data, b"tail")
    slices, extra = call(big).request_content()
    assert not isinstance(slices, bytes | None)
    pieces = [bytes(s) for s in slices]
    total = 10 + (SEND_CHUNK // 2 + 7) * 4 + 4
    assert extra == {"Content-Length": str(total)}
    assert all(len(p) <= SEND_CHUNK for p in pieces)
    assert b"".join(pieces) == b"".join(bytes(memoryview(p).cast("B")) for p in big)


def _held_until(release: threading.Event) -> Handler:
    """Answers each request once ``release`` is set."""

    def handler(peer: Peer, server: Server) -> None:
        while (request := peer.request()) is not None:
            server.record(request)
            release.wait(WAIT_S)
            peer.send(answer(b"ok"))

    return handler


def test_connections_are_capped_and_a_request_waits_at_most_the_pool_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_wire, "MAX_CONNECTIONS", 2)
    release = threading.Event()
    with serve(_held_until(release)) as server:
        wire = Transport(httpx.URL(server.url), httpx.Timeout(WAIT_S, pool=0.3))
        try:
            busy = [
                threading.Thread(target=wire.request, args=("GET", "/", None, {})) for _ in range(2)
            ]
            for thread in busy:
                thread.start()
            wait_for(lambda: len(server.heads) == 2)
            start = time.monotonic()
            with pytest.raises(httpx.PoolTimeout, match="2 connections"):
                wire.request("GET", "/", None, {})
            assert 0.25 < time.monotonic() - start < WAIT_S
            assert len(server.connections) == 2  # the third never connected
            release.set()
            for thread in busy:
                thread.join(WAIT_S)
            assert bytes(wire.request("GET", "/", None, {}).body) == b"ok"
            assert len(server.connections) == 2  # a freed connection was reused
        finally:
            wire.close()


def test_the_async_transport_caps_connections_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_wire, "MAX_CONNECTIONS", 1)
    release = threading.Event()

    async def main(url: str) -> None:
        wire = AsyncTransport(httpx.URL(url), httpx.Timeout(WAIT_S, pool=0.3))
        try:
            first = asyncio.create_task(wire.request("GET", "/", None, {}))
            await asyncio.sleep(0.1)
            start = time.monotonic()
            with pytest.raises(httpx.PoolTimeout):
                await wire.request("GET", "/", None, {})
            assert 0.25 < time.monotonic() - start < WAIT_S  # it waited for the pool timeout
            release.set()
            assert bytes((await first).body) == b"ok"
            assert bytes((await wire.request("GET", "/", None, {})).body) == b"ok"
        finally:
            wire.close()

    with serve(_held_until(release)) as server:
        asyncio.run(main(server.url))
        assert len(server.connections) == 1
