"""Slow and greedy clients against a real server: headers and bodies have deadlines (408, then
the connection is closed), connections beyond the cap are refused at once (503), a declared
Content-Length commits no memory, and /healthz keeps answering throughout.

Raw sockets throughout: the point is what a client that does not play by the rules gets.
"""

from __future__ import annotations

import contextlib
import json
import resource
import select
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.live import LiveServer, live_server
from tests.rawhttp import read_response

ST = "application/octet-stream"
JSON = "application/json"
HEADER_TIMEOUT = 2.5
BODY_IDLE = 1.5
BODY_RATE = 1000  # bytes/s
SLOW = 1500  # connections that drip their headers


def _port(server: LiveServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _proc_status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/PID/status, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _read_answer(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one whole answer, and nothing after it so far."""
    sock.settimeout(timeout)
    return read_response(sock, strict=True)


def _closed_within(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes the connection (EOF) within ``timeout``, sending nothing."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _new_session(server: LiveServer) -> dict[str, Any]:
    r = httpx.post(
        server.url + "/v1/sessions",
        json={"optimizer": {"name": "sgd", "lr": 0.1}, "params": {"b": [0.5, 0.0, -0.5]}},
    )
    assert r.status_code == 201, r.text
    s: dict[str, Any] = r.json()
    return s


def _version(server: LiveServer, s: dict[str, Any]) -> int:
    r = httpx.get(f"{server.url}/v1/sessions/{s['id']}", headers=_auth(s["token"]))
    assert r.status_code == 200, r.text
    return int(r.json()["version"])


class _Prober:
    """GET /healthz on a new connection every ``period`` seconds, in a thread, until stopped."""

    def __init__(self, url: str, period: float = 0.05) -> None:
        self.url, self.period = url, period
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.url, timeout=5, limits=no_reuse) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    status = client.get("/healthz").status_code
                    if status != 200:
                        self.failures.append(f"status {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.latencies.append(time.perf_counter() - start)
                self._stop.wait(self.period)

    def __enter__(self) -> _Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> str:
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return (
            f"/healthz n={len(ordered)} p50={statistics.median(ordered) * 1e3:.1f} ms "
            f"p99={p99 * 1e3:.1f} ms max={ordered[-1] * 1e3:.1f} ms failures={len(self.failures)}"
        )

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for the slow connections, in this process and the server it starts (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = SLOW + 1000
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-file limit ({hard}) is below {wanted}")
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        yield
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def slow_server() -> Iterator[LiveServer]:
    with live_server(
        header_timeout_s=HEADER_TIMEOUT,
        body_idle_timeout_s=BODY_IDLE,
        body_min_bytes_per_s=BODY_RATE,
    ) as s:
        yield s


# --- headers ---------------------------------------------------------------------------------


def test_dripped_headers_are_cut_at_the_deadline_while_healthz_answers(
    many_files: None,
) -> None:
    """1,500 connections each send a header line every second, forever: every one is answered
    408 and closed at the header deadline, and /healthz (new connections) answers throughout."""
    with live_server(header_timeout_s=HEADER_TIMEOUT) as server, _Prober(server.url) as prober:
        port = _port(server)
        selector = selectors.DefaultSelector()
        opened: dict[socket.socket, float] = {}
        try:
            for _ in range(SLOW):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                sock.setblocking(False)
                opened[sock] = time.monotonic()
                selector.register(sock, selectors.EVENT_READ, data=sock)
            answers: dict[socket.socket, bytes] = {}
            lifetimes: list[float] = []
            end = time.monotonic() + HEADER_TIMEOUT + 8
            next_drip = time.monotonic() + 1
            while len(lifetimes) < SLOW and time.monotonic() < end:
                for key, _ in selector.select(timeout=0.1):
                    conn: socket.socket = key.data
                    try:
                        data = conn.recv(65536)
                    except ConnectionResetError:
                        data = b""
                    if data:
                        answers[conn] = answers.get(conn, b"") + data
                        continue
                    lifetimes.append(time.monotonic() - opened[conn])
                    selector.unregister(conn)
                if time.monotonic() >= next_drip:  # the next line of every open request
                    next_drip += 1
                    for key in list(selector.get_map().values()):
                        with contextlib.suppress(OSError):  # full buffer, or closed
                            key.data.send(b"X-Slow: 1\r\n")
            still_open = len(selector.get_map())
        finally:
            for sock in opened:
                sock.close()
            selector.close()
    print(
        f"\n{SLOW} dripping connections: closed {len(lifetimes)}, lifetimes "
        f"{min(lifetimes, default=0):.2f}-{max(lifetimes, default=0):.2f} s; {prober.summary()}"
    )
    assert still_open == 0, f"{still_open} of {SLOW} slow connections still open"
    assert min(lifetimes) > HEADER_TIMEOUT - 0.5, min(lifetimes)
    assert max(lifetimes) < HEADER_TIMEOUT + 4, max(lifetimes)
    timed_out = [a for a in answers.values() if a.startswith(b"HTTP/1.1 408 ")]
    assert len(timed_out) == SLOW, f"{len(timed_out)} of {SLOW} got 408"
    problem = json.loads(timed_out[0].partition(b"\r\n\r\n")[2])
    assert problem["type"].endswith(":request-timeout") and problem["status"] == 408
    assert not prober.failures, prober.failures[:5]
    assert prober.p99() < 0.25, prober.summary()
    assert max(prober.latencies) < 1.0, prober.summary()


def test_kept_alive_connections_have_a_header_deadline_too(slow_server: LiveServer) -> None:
    """After an answer, the next request's headers are due within the deadline as well."""
    with socket.create_connection(("127.0.0.1", _port(slow_server))) as sock:
        sock.sendall(_head("GET", "/healthz", {}))
        assert _read_answer(sock, 2)[0] == 200
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        while time.monotonic() - start < HEADER_TIMEOUT + 3:
            if select.select([sock], [], [], 0.5)[0]:
                break
            sock.sendall(b"X-Slow: 1\r\n")
        elapsed = time.monotonic() - start
        status, _, body = _read_answer(sock, 1)
        assert _closed_within(sock, 2)
    assert status == 408, body
    assert HEADER_TIMEOUT - 0.5 < elapsed < HEADER_TIMEOUT + 1, elapsed


def test_endless_headers_get_431(slow_server: LiveServer) -> None:
    """Headers are held in memory until complete: sent fast and without end, they are cut at
    max_header_bytes (1 MiB by default), long before the header deadline."""
    pid = slow_server.process.pid
    before = _proc_status(pid)["VmRSS"]
    line = b"X-Big: " + b"a" * 8000 + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", _port(slow_server))) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        while sent < 64 << 20 and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(line * 16)
            except OSError:
                break
            sent += 16 * len(line)
        status, _, body = _read_answer(sock, 2)
        elapsed = time.monotonic() - start
        assert _closed_within(sock, 3)
    grown = _proc_status(pid)["VmRSS"] - before
    assert status == 431, body
    assert json.loads(body)["type"].endswith(":headers-too-large")
    # The server answered while the client was still sending. How much it sent by then is the
    # kernel's business as much as the server's (loopback socket buffers grow to tens of MiB
    # when the server is slow to be scheduled): what the server held is bounded below.
    assert sent < 64 << 20, sent
    assert elapsed < HEADER_TIMEOUT, elapsed
    assert grown < 32 << 20, grown


# --- bodies ----------------------------------------------------------------------------------


def _step_head(s: dict[str, Any], length: int, content_type: str = JSON) -> bytes:
    return _head(
        "POST",
        f"/v1/sessions/{s['id']}/step",
        {**_auth(s["token"]), "Content-Type": content_type, "Content-Length": str(length)},
    )


def test_a_trickling_body_gets_408_at_its_total_deadline(slow_server: LiveServer) -> None:
    """A byte every half second never trips the idle timeout, but the whole body of 2,000 bytes
    is due within idle + 2,000 / rate seconds: 408, and the connection is closed."""
    s = _new_session(slow_server)
    length = 2000
    deadline = BODY_IDLE + length / BODY_RATE
    with socket.create_connection(("127.0.0.1", _port(slow_server))) as sock:
        sock.sendall(_step_head(s, length))
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < deadline + 3:
            if select.select([sock], [], [], 0.5)[0]:
                break
            sock.sendall(b" ")
            sent += 1
        elapsed = time.monotonic() - start
        status, headers, body = _read_answer(sock, 1)
        assert _closed_within(sock, 2), "the connection stayed open after the 408"
    assert status == 408, body
    assert headers["content-type"].startswith("application/problem+json")
    problem = json.loads(body)
    assert problem["type"].endswith(":request-timeout"), problem
    assert str(length) in problem["detail"] and "did not arrive within" in problem["detail"]
    assert deadline - 0.5 < elapsed < deadline + 1.5, elapsed
    assert sent < length
    assert _version(slow_server, s) == 0


def test_a_stalled_body_gets_408_after_the_idle_timeout(slow_server: LiveServer) -> None:
    s = _new_session(slow_server)
    with socket.create_connection(("127.0.0.1", _port(slow_server))) as sock:
        sock.sendall(_step_head(s, 100) + b'{"grads": ')
        start = time.monotonic()
        status, _, body = _read_answer(sock, BODY_IDLE + 3)
        elapsed = time.monotonic() - start
        assert _closed_within(sock, 2), "the connection stayed open after the 408"
    assert status == 408, body
    assert "no part of the body arrived" in json.loads(body)["detail"]
    assert BODY_IDLE - 0.3 < elapsed < BODY_IDLE + 1.5, elapsed
    assert _version(slow_server, s) == 0


def test_an_early_answer_closes_the_connection(slow_server: LiveServer) -> None:
    """Answered before its body is read (413 on the declared length), a connection is not kept
    alive: what follows on it would be read as more of the body, for as long as the client
    sends. The server shuts its side at once (the client still reads the whole answer)."""
    s = _new_session(slow_server)
    with socket.create_connection(("127.0.0.1", _port(slow_server))) as sock:
        sock.sendall(_step_head(s, 10**9) + b'{"grads": {"b": [1')
        status, _, body = _read_answer(sock, 2)
        assert status == 413, body
        sock.sendall(_head("GET", "/healthz", {}))  # ignored: the connection is done
        assert _closed_within(sock, 1.5)


def test_declared_lengths_commit_no_memory() -> None:
    """Connections that each declare a 1 GiB body (the limit) and send 1.5 MiB of it: the
    server maps memory for what arrived, not for what was announced. Its address space is
    capped at 6 GiB above its size, far below the 32 GiB declared: nothing fails, /healthz
    answers, and neither its size nor its RSS grows by the declared amounts."""
    declared, count, sent = 1 << 30, 32, 3 << 19  # 1.5 MiB each: past the first mapping
    with live_server() as server:
        s = _new_session(server)
        pid = server.process.pid
        before = _proc_status(pid)
        cap = before["VmSize"] + (6 << 30)
        resource.prlimit(pid, resource.RLIMIT_AS, (cap, cap))
        socks = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", _port(server)))
                sock.sendall(_step_head(s, declared, ST) + b"\0" * sent)
                socks.append(sock)
            time.sleep(1.0)
            during = _proc_status(pid)
            answered = select.select(socks, [], [], 0)[0]
            health = httpx.get(server.url + "/healthz", timeout=5)
        finally:
            for sock in socks:
                sock.close()
        time.sleep(0.5)
        after = httpx.get(server.url + "/healthz", timeout=5)
    grown_size = during["VmSize"] - before["VmSize"]
    grown_rss = during["VmRSS"] - before["VmRSS"]
    print(
        f"\n{count} x {declared} bytes declared: VmSize +{grown_size / 2**20:.0f} MiB, "
        f"VmRSS +{grown_rss / 2**20:.0f} MiB"
    )
    assert not answered, "some connections were answered (out of memory?) before their body"
    assert health.status_code == 200 and after.status_code == 200
    assert grown_size < count * declared // 16, grown_size
    assert grown_rss < 256 << 20, grown_rss


# --- the connection cap ----------------------------------------------------------------------


def test_connections_beyond_the_cap_are_refused_at_once() -> None:
    cap = 40
    with live_server(max_connections=cap) as server:
        port = _port(server)
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(cap)]
        try:
            time.sleep(0.5)  # all accepted
            with socket.create_connection(("127.0.0.1", port)) as extra:
                start = time.monotonic()
                status, headers, body = _read_answer(extra, 2)
                elapsed = time.monotonic() - start
                assert _closed_within(extra, 1)
            assert status == 503, body
            assert int(headers["retry-after"]) >= 1
            problem = json.loads(body)
            assert problem["status"] == 503 and str(cap) in problem["detail"]
            assert elapsed < 0.5, elapsed
        finally:
            for sock in held[:10]:
                sock.close()
        try:
            time.sleep(0.5)  # their slots are free again
            assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
        finally:
            for sock in held[10:]:
                sock.close()
