"""Large bodies read straight into their buffer (optserver.api.direct), over real sockets.

A body of more than DIRECT_MIN_BYTES with a Content-Length bypasses uvicorn's chunk-by-chunk
path: the protocol has the kernel write it into the body's mapping and starts the next request
on a fresh parser. These tests send such bodies the ways clients do and the ways they should
not: in one piece, dribbled in odd slices, together with the next request (pipelined), cut
short, abandoned, and too slowly; the answers and the session must be exactly those of the
ordinary path, and the connection must stay usable wherever HTTP allows.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import httpx
import numpy as np
import pytest
import safetensors.numpy as stn
from prometheus_client.parser import text_string_to_metric_families

from optserver.api.direct import DIRECT_MIN_BYTES
from tests.live import LiveServer, live_server
from tests.rawhttp import read_response

ST = "application/octet-stream"
#: Enough floats for a body past the direct threshold.
N = DIRECT_MIN_BYTES // 4 + 4096
BODY_IDLE = 1.5


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(body_idle_timeout_s=BODY_IDLE, max_body_bytes=64 << 20) as s:
        yield s


def _port(server: LiveServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _session(server: LiveServer) -> dict[str, Any]:
    r = httpx.post(
        server.url + "/v1/sessions",
        json={"optimizer": {"name": "sgd", "lr": 0.5}},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    s: dict[str, Any] = r.json()
    put = httpx.put(
        f"{server.url}/v1/sessions/{s['id']}/params",
        content=stn.save({"w": np.zeros(N, np.float32)}),
        headers={"Authorization": f"Bearer {s['token']}", "Content-Type": ST},
        timeout=30,
    )
    assert put.status_code == 200, put.text
    return s


def _request(s: dict[str, Any], body: bytes, *, length: int | None = None) -> bytes:
    head = (
        f"POST /v1/sessions/{s['id']}/step HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {s['token']}\r\nContent-Type: {ST}\r\nAccept: {ST}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


def _grads(value: float) -> bytes:
    return stn.save({"w": np.full(N, value, np.float32)})


def _weights(server: LiveServer, s: dict[str, Any]) -> tuple[int, np.ndarray]:
    r = httpx.get(
        f"{server.url}/v1/sessions/{s['id']}/params",
        headers={"Authorization": f"Bearer {s['token']}", "Accept": ST},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return int(r.headers["optserver-version"]), stn.load(r.content)["w"]


def _read(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One answer from a buffered stream, leaving what follows it in the stream."""
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers.get("content-length", "0")))


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(30)
    return read_response(sock)


def test_a_body_in_one_piece_then_more_requests_on_the_same_connection(
    server: LiveServer,
) -> None:
    s = _session(server)
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        for step, grad in enumerate((1.0, 2.0, -4.0), start=1):
            sock.sendall(_request(s, _grads(grad)))
            status, headers, body = _answer(sock)
            assert status == 200, body[:300]
            assert headers["optserver-version"] == str(step)
        # A small request after large ones: the parser starts afresh each time.
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body = _answer(sock)
        assert status == 200 and json.loads(body)["status"] == "ok"
    version, w = _weights(server, s)
    assert version == 3
    np.testing.assert_array_equal(w, np.full(N, 0.5, np.float32))  # -0.5 * (1 + 2 - 4)


def test_a_body_in_odd_slices_with_pauses(server: LiveServer) -> None:
    s = _session(server)
    data = _request(s, _grads(2.0))
    cuts = [0, 7, 190, 65_537, 65_600, 300_001, 1_000_000, len(data) - 1, len(data)]
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for begin, end in itertools.pairwise(cuts):
            sock.sendall(data[begin:end])
            time.sleep(0.02)
        status, _, body = _answer(sock)
    assert status == 200, body[:300]
    np.testing.assert_array_equal(stn.load(body)["w"], np.full(N, -1.0, np.float32))


def test_a_pipelined_request_after_a_large_body_is_answered_in_order(server: LiveServer) -> None:
    s = _session(server)
    health = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.sendall(_request(s, _grads(1.0)) + health + _request(s, _grads(1.0)))
        sock.settimeout(30)
        with sock.makefile("rb") as stream:  # buffered: answers follow each other closely
            first, second, third = (_read(stream) for _ in range(3))
    assert first[0] == 200 and first[1]["optserver-version"] == "1"
    assert second[0] == 200 and json.loads(second[2])["status"] == "ok"
    assert third[0] == 200 and third[1]["optserver-version"] == "2"


def test_a_body_cut_short_changes_nothing_and_the_server_goes_on(server: LiveServer) -> None:
    s = _session(server)
    data = _request(s, _grads(1.0))
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.sendall(data[: len(data) // 2])
        time.sleep(0.2)
    # The half-closed request left no trace; the next one on a new connection works.
    assert _weights(server, s)[0] == 0
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.sendall(data)
        assert _answer(sock)[0] == 200
    assert _weights(server, s)[0] == 1


def test_a_body_that_stops_arriving_gets_408_with_its_progress(server: LiveServer) -> None:
    s = _session(server)
    data = _request(s, _grads(1.0))
    sent = len(data) - 1000
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.sendall(data[:sent])
        start = time.monotonic()
        status, _, body = _answer(sock)
        elapsed = time.monotonic() - start
    problem = json.loads(body)
    assert status == 408, problem
    assert "no part of the body arrived" in problem["detail"]
    head = len(data) - len(_grads(1.0))
    assert f"{sent - head} of {len(data) - head} bytes" in problem["detail"]
    assert BODY_IDLE - 0.3 < elapsed < BODY_IDLE + 1.5
    assert _weights(server, s)[0] == 0


def test_a_refused_large_body_closes_the_connection_after_the_answer(server: LiveServer) -> None:
    s = _session(server)
    data = _request({**s, "token": "not-the-token"}, _grads(1.0))
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.sendall(data[: 2 * DIRECT_MIN_BYTES // 3])
        status, _, _ = _answer(sock)
        assert status == 401
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # read as body: ignored
        sock.settimeout(5)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert rest == b""
    assert _weights(server, s)[0] == 0


def test_direct_bytes_are_counted_in_the_metrics(server: LiveServer) -> None:
    def received() -> float:
        text = httpx.get(server.url + "/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == "optserver_http_bytes_total"
                    and sample.labels["direction"] == "in"
                ):
                    return sample.value
        raise AssertionError("no bytes counter")

    s = _session(server)
    before = received()
    body = _grads(1.0)
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.sendall(_request(s, body))
        assert _answer(sock)[0] == 200
    assert received() - before == len(body)
