"""Per-request cost of HTTP client transports, against a bare uvicorn echo.

    python benchmarks/client_transport.py [--quick] [--sizes 1e3 1e6] [--iterations N]

A bare ASGI app under uvicorn (``http="httptools"``, in a subprocess: a core of its own) reads
each request body and sends it back as application/octet-stream with a Content-Length. Every
client POSTs the same body of P float32 over one kept-alive loopback connection:

- ``raw socket``: ``sendall`` of a prebuilt head and the body, ``recv_into`` a preallocated
  buffer, the head parsed by hand: the floor, no HTTP library at all;
- ``http.client``: the standard library's ``HTTPConnection`` (TCP_NODELAY set, ``readinto``);
- ``urllib3``: urllib3 2's ``HTTPConnectionPool`` (when installed);
- ``httpx``: ``httpx.Client``, which ``Client(fast_path=False)`` uses;
- ``wire``: the client's own transport (``optserver_client._wire``), which ``Client`` uses.

The clients take turns in rounds (so that a slower stretch of a shared machine hits them all),
and each answer is checked once. Printed per size: p50 and p90 latency, requests per second, and
the p50 ratio to ``wire`` (above 1: slower than it).
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
from optserver_client._wire import Transport

HEADERS = {"Content-Type": "application/octet-stream"}
ROUNDS = 5


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI app: the request body back, whole."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = bytearray()
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": bytes(body)})


def serve() -> None:
    """The child process: bind a free loopback port, print it, serve the echo until killed."""
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(echo, http="httptools", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


class RawSocket:
    """HTTP/1.1 by hand over one socket: prebuilt head, sendall, recv_into, minimal parsing."""

    def __init__(self, port: int, size: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = (
            f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
        ).encode()
        self.scratch = memoryview(bytearray(1 << 16))

    def __call__(self, payload: bytes) -> memoryview:
        self.sock.sendall(self.head)
        self.sock.sendall(payload)
        received = self.sock.recv_into(self.scratch)
        end = bytes(self.scratch[: min(received, 4096)]).find(b"\r\n\r\n") + 4
        head = bytes(self.scratch[:end]).lower()
        start = head.index(b"content-length:") + 15
        size = int(head[start : head.index(b"\r\n", start)])
        body = memoryview(np.empty(size, np.uint8).data)
        have = received - end
        body[:have] = self.scratch[end:received]
        while have < size:
            have += self.sock.recv_into(body[have:])
        return body

    def close(self) -> None:
        self.sock.close()


class StdlibClient:
    def __init__(self, port: int, size: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port)
        self.conn.connect()
        assert self.conn.sock is not None
        # Head and body go in two sends: without this, Nagle holds the body back (~40 ms).
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __call__(self, payload: bytes) -> memoryview:
        self.conn.request("POST", "/", body=payload, headers=HEADERS)
        response = self.conn.getresponse()
        body = memoryview(np.empty(int(response.headers["content-length"]), np.uint8).data)
        have = 0
        while have < len(body):
            have += response.readinto(body[have:])
        return body

    def close(self) -> None:
        self.conn.close()


class Urllib3Client:
    def __init__(self, port: int, size: int) -> None:
        import urllib3

        self.pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1)

    def __call__(self, payload: bytes) -> bytes:
        return bytes(self.pool.request("POST", "/", body=payload, headers=HEADERS).data)

    def close(self) -> None:
        self.pool.close()


class HttpxClient:
    def __init__(self, port: int, size: int) -> None:
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}")

    def __call__(self, payload: bytes) -> bytes:
        return self.client.post("/", content=payload, headers=HEADERS).content

    def close(self) -> None:
        self.client.close()


class WireClient:
    def __init__(self, port: int, size: int) -> None:
        self.transport = Transport(httpx.URL(f"http://127.0.0.1:{port}"), 60.0)

    def __call__(self, payload: bytes) -> Any:
        return self.transport.request("POST", "/", None, HEADERS, (payload,)).body

    def close(self) -> None:
        self.transport.close()


def urllib3_available() -> bool:
    """Whether urllib3 2 is installed (1.x has another API, and is not measured)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("urllib3").split(".")[0]) >= 2
    except PackageNotFoundError:
        return False


CLIENTS: dict[str, Callable[[int, int], Any]] = {
    "raw socket": RawSocket,
    "http.client": StdlibClient,
    "urllib3": Urllib3Client,
    "httpx": HttpxClient,
    "wire": WireClient,
}


def measure(port: int, floats: int, iterations: int, names: list[str]) -> dict[str, list[float]]:
    payload = np.random.default_rng(0).standard_normal(floats).astype(np.float32).tobytes()
    clients = {name: CLIENTS[name](port, len(payload)) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for name, client in clients.items():  # warm up, and check the echo once
            assert bytes(client(payload)) == payload, name
        per_round = max(1, iterations // ROUNDS)
        for _ in range(ROUNDS):
            for name, client in clients.items():
                out = times[name]
                for _ in range(per_round):
                    start = time.perf_counter()
                    client(payload)
                    out.append(time.perf_counter() - start)
    finally:
        for client in clients.values():
            client.close()
    return times


def report(floats: int, times: dict[str, list[float]], missing: list[str]) -> None:
    size = floats * 4
    label = f"{size / 1e6:.0f} MB" if size >= 1e6 else f"{size / 1e3:.0f} KB"
    reference = statistics.median(times["wire"])
    print(f"\n{floats:.0e} float32 ({label}), {len(times['wire'])} requests each")
    print(f"{'client':<12} {'p50 ms':>9} {'p90 ms':>9} {'req/s':>9} {'vs wire':>8}")
    for name, samples in times.items():
        p50 = statistics.median(samples)
        p90 = sorted(samples)[int(0.9 * (len(samples) - 1))]
        print(f"{name:<12} {p50 * 1e3:9.3f} {p90 * 1e3:9.3f} {1 / p50:9.0f} {p50 / reference:8.2f}")
    for name in missing:
        print(f"{name:<12} not installed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the iterations")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e6], help="float32s")
    parser.add_argument("--iterations", type=int, help="requests per client (default by size)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    names = list(CLIENTS)
    missing = [] if urllib3_available() else ["urllib3"]
    names = [name for name in names if name not in missing]
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        for size in args.sizes:
            floats = int(size)
            iterations = args.iterations or (2000 if floats <= 100_000 else 200)
            if args.quick and not args.iterations:
                iterations //= 10
            report(floats, measure(port, floats, iterations, names), missing)
    finally:
        child.terminate()
        child.wait(timeout=10)


if __name__ == "__main__":
    main()
