"""The server protocol's response writes (optserver.api.server): head and body in one write.

Unit tests of the wrapper the response cycle writes through, and over real sockets the answers
whose shape differs: HEAD (no body written), an expected 100-continue (its interim answer
must not wait for the response), pipelined requests, and answers with an empty body.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator

import pytest

from optserver.api.server import _OneWrite
from tests.live import LiveServer, live_server


class Recording:
    """A transport that records what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []  # each call's bytes, joined
        self.pieces: list[
            list[bytes | bytearray | memoryview]
        ] = []  # each call's buffers, as given
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines([data])

    def writelines(self, pieces: Iterable[bytes | bytearray | memoryview]) -> None:
        given = list(pieces)
        self.pieces.append(given)
        self.writes.append(b"".join(bytes(p) for p in given))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def wrapped() -> tuple[_OneWrite, Recording]:
    recording = Recording()
    return _OneWrite(recording), recording  # type: ignore[arg-type]


def test_the_head_goes_out_with_a_small_body() -> None:
    one, recording = wrapped()
    one.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert recording.writes == []
    one.write(memoryview(b"body"))
    assert recording.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    one.write(b"more")  # later writes pass straight through
    assert recording.writes[-1] == b"more"


def test_a_large_body_goes_out_with_the_head_in_one_call_uncopied() -> None:
    one, recording = wrapped()
    body = memoryview(bytearray(_OneWrite.JOIN_BYTES + 1))
    one.write(b"head")
    one.write(body)
    assert recording.writes == [b"head" + body]
    assert recording.pieces[0][1] is body  # a writev of both: the body is not joined


def test_closing_before_the_body_still_sends_the_head() -> None:
    one, recording = wrapped()
    one.write(b"head")
    one.close()
    assert recording.writes == [b"head"] and recording.closed and one.is_closing()


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server() as s:
        yield s


def _connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    sock.settimeout(10)
    return sock


def _read_all(sock: socket.socket, until: bytes, count: int) -> bytes:
    data = b""
    while data.count(until) < count:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_head_answers_carry_no_body_and_the_connection_goes_on(server: LiveServer) -> None:
    with _connect(server) as sock:
        sock.sendall(b"HEAD /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        head = _read_all(sock, b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _read_all(sock, b'"ok"', 1)
        assert answer.startswith(b"HTTP/1.1 200")


def test_pipelined_answers_come_whole_and_in_order(server: LiveServer) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        data = _read_all(sock, b"HTTP/1.1 ", 3)
        while data.count(b'"ok"') < 2:
            data += sock.recv(65536)
    statuses = [part[:3] for part in data.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [b"200", b"404", b"200"]


def test_an_expected_continue_is_answered_before_the_body(server: LiveServer) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 20\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = _read_all(sock, b"\r\n\r\n", 1)
        assert interim.startswith(b"HTTP/1.1 100")
        sock.sendall(b'{"optimizer": "sgd"}')
        answer = _read_all(sock, b"}", 1)
        assert b"HTTP/1.1 201" in interim + answer
