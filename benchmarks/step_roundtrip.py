"""One worker's step round trip (push gradients, get the new weights back) against a raw echo.

    python benchmarks/step_roundtrip.py [--sizes 1e3 1e6 1e7] [--repeat 15]

For each size P (float32 parameters, plain SGD so the optimizer costs next to nothing), the
latency of ``Session.step`` through the Python client over loopback HTTP, in the binary
(safetensors) and JSON encodings, next to a raw loopback TCP echo of the same bytes in the same
run (send the request body's bytes, receive as many back). GB/s counts the bytes moved both
ways; the ratio is throughput over the echo's.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from optserver_client import Client

from optserver.embedded import embedded_server


def echo_server() -> tuple[int, threading.Thread]:
    """A TCP server that sends back each length-prefixed message (one connection)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        listener.close()
        with conn:
            while True:
                head = conn.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    return
                size = int.from_bytes(head, "little")
                buffer = memoryview(np.empty(size, np.uint8).data)
                received = 0
                while received < size:
                    received += conn.recv_into(buffer[received:], size - received)
                conn.sendall(buffer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def echo_roundtrip(conn: socket.socket, payload: memoryview) -> None:
    conn.sendall(len(payload).to_bytes(8, "little"))
    conn.sendall(payload)
    buffer = memoryview(np.empty(len(payload), np.uint8).data)
    received = 0
    while received < len(payload):
        received += conn.recv_into(buffer[received:], len(payload) - received)


def timings(call: Callable[[], object], repeat: int) -> list[float]:
    call()  # warm up (kernel compilation, connection, allocator)
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def row(label: str, size: int, times: list[float], moved: int, echo_gbs: float | None) -> str:
    p50 = statistics.median(times)
    p90 = sorted(times)[int(0.9 * (len(times) - 1))]
    gbs = moved / p50 / 1e9
    ratio = f"{gbs / echo_gbs:9.2f}" if echo_gbs else f"{'':>9}"
    return f"{label:<7} {size:>6.0e} {p50 * 1e3:10.2f} {p90 * 1e3:10.2f} {gbs:8.3f} {ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e6, 1e7])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--json-max", type=float, default=1e7, help="skip JSON above this P")
    args = parser.parse_args()
    port, _ = echo_server()
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print(f"step round trip, float32 SGD, median/p90 of {args.repeat}; GB/s = bytes both ways")
    header = f"{'path':<7} {'params':>6} {'p50 ms':>10} {'p90 ms':>10} {'GB/s':>8} {'vs echo':>9}"
    print(header)
    print("-" * len(header))
    # JSON bodies have a small default limit (a big one stalls the server); the benchmark
    # measures the JSON path at sizes beyond it on purpose.
    with embedded_server(max_json_body_bytes=1 << 30) as server:
        for size in (int(s) for s in args.sizes):
            rng = np.random.default_rng(0)
            weights = {"w": rng.standard_normal(size, dtype=np.float32)}
            grads = {"w": rng.standard_normal(size, dtype=np.float32) * 1e-3}
            nbytes = 4 * size
            payload = memoryview(np.empty(nbytes + 100, np.uint8).data)  # the binary body size
            echo = timings(partial(echo_roundtrip, conn, payload), args.repeat)
            echo_gbs = 2 * len(payload) / statistics.median(echo) / 1e9
            print(row("echo", size, echo, 2 * len(payload), None))
            for binary in (True, False):
                if not binary and size > args.json_max:
                    continue
                with Client(server.url, binary=binary, timeout=300) as client:
                    session = client.create_session(weights, {"name": "sgd", "lr": 1e-3})
                    times = timings(partial(session.step, grads), args.repeat)
                    session.delete()
                print(row("binary" if binary else "json", size, times, 2 * len(payload), echo_gbs))
    conn.close()


if __name__ == "__main__":
    main()
