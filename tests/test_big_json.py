"""JSON bodies have their own, small limit: parsing one holds the interpreter until it is done,
so the largest allowed must not stall other sessions (measured here against a real server);
anything larger is refused at once, pointing to safetensors.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from optserver_client import safetensors_io

from tests.live import LiveServer, live_server
from tests.rawhttp import read_response

JSON = "application/json"
ST = "application/octet-stream"
#: The default max_json_body_bytes.
JSON_LIMIT = 4 << 20
BIG_STEPS = 8


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _new_session(server: LiveServer, **params: Any) -> dict[str, Any]:
    r = httpx.post(
        server.url + "/v1/sessions", json={"optimizer": {"name": "sgd", "lr": 1e-3}, **params}
    )
    assert r.status_code == 201, r.text
    s: dict[str, Any] = r.json()
    return s


def _digits(n: int) -> bytes:
    """``n`` one-digit numbers as a JSON list: the most numbers per byte, the slowest parse."""
    return b"[" + b",".join(b"%d" % d for d in np.arange(n) % 10) + b"]"


def _read_answer(sock: socket.socket) -> tuple[int, bytes]:
    status, _, body = read_response(sock, strict=True)
    return status, body


ROUTES = [
    ("POST", "/v1/sessions/{id}/step", "safetensors"),
    ("PUT", "/v1/sessions/{id}/params", "safetensors"),
    ("POST", "/v1/sessions", "PUT them to its /params"),
    ("PATCH", "/v1/sessions/{id}", None),  # options only: nothing else to suggest
]


@pytest.mark.parametrize(("method", "path", "hint"), ROUTES)
def test_json_over_its_limit_is_refused_before_the_body(
    server: LiveServer, method: str, path: str, hint: str | None
) -> None:
    """One byte over the JSON limit (far below the binary one): 413 at once, saying what to
    send instead, and the connection is closed rather than read to the end."""
    s = _new_session(server)
    size = JSON_LIMIT + 1
    head = (
        f"{method} {path.format(id=s['id'])} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {s['token']}\r\nContent-Type: {JSON}\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        sock.settimeout(2)
        start = time.monotonic()
        sock.sendall(head + b'{"grads": {"w": [1')
        status, body = _read_answer(sock)
        elapsed = time.monotonic() - start
        assert sock.recv(65536) == b"", "the connection stayed open"
    assert status == 413, body
    problem = json.loads(body)
    assert problem["type"].endswith(":payload-too-large") and problem["limit"] == JSON_LIMIT
    words = [str(size), str(JSON_LIMIT)]
    if hint is not None:
        words += [hint, "application/octet-stream"]
    for word in words:
        assert word in problem["detail"], (word, problem["detail"])
    assert elapsed < 1, elapsed


def test_a_tensor_too_large_for_json_goes_through_as_safetensors(server: LiveServer) -> None:
    s = _new_session(server)
    weights = np.zeros(JSON_LIMIT // 4, np.float32)  # 4 MiB as float32, ~8 MiB as JSON
    url = f"{server.url}/v1/sessions/{s['id']}/params"
    r = httpx.put(url, json={"params": {"w": weights.tolist()}}, headers=_auth(s["token"]))
    assert r.status_code == 413, r.text
    assert "application/octet-stream" in r.json()["detail"]
    r = httpx.put(
        url,
        content=bytes(safetensors_io.encode({"w": weights})),
        headers={**_auth(s["token"]), "Content-Type": ST},
    )
    assert r.status_code == 200, r.text


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_the_largest_json_body_stalls_no_one() -> None:
    """With the default limits, one thread sends the largest JSON bodies allowed (one-digit
    numbers: the most work per byte) to every route that parses JSON, while another times
    /healthz and small steps on another session: they stay fast. A byte more is refused."""
    with live_server() as server:
        url, pid = server.url, server.process.pid
        n = (JSON_LIMIT - 64) // 2
        numbers = _digits(n)
        create = b'{"optimizer": {"name": "sgd", "lr": 0.001}, "params": {"w": ' + numbers + b"}}"
        step = b'{"grads": {"w": ' + numbers + b"}}"
        params = b'{"params": {"w": ' + numbers + b"}}"
        patch = b'{"optimizer": {"lr": 0.01, "momentum": ' + numbers + b"}}"
        assert max(map(len, (create, step, params, patch))) <= JSON_LIMIT
        small = _new_session(server, params={"v": [1.0, 2.0]})
        baseline = _vm(pid, "VmRSS")

        results: list[tuple[str, int, float]] = []
        healthz: list[float] = []
        steps: list[float] = []
        rss: list[int] = []
        done = threading.Event()

        def timed(name: str, call: Callable[[], httpx.Response]) -> httpx.Response:
            start = time.perf_counter()
            r = call()
            results.append((name, r.status_code, time.perf_counter() - start))
            return r

        def sender() -> None:
            try:
                with httpx.Client(base_url=url, timeout=60) as c:
                    json_body = {"Content-Type": JSON}
                    r = timed(
                        "create", lambda: c.post("/v1/sessions", content=create, headers=json_body)
                    )
                    big = r.json()
                    head = {**_auth(big["token"]), "Content-Type": JSON}
                    path = f"/v1/sessions/{big['id']}"
                    timed(
                        "put params", lambda: c.put(path + "/params", content=params, headers=head)
                    )
                    timed("patch", lambda: c.patch(path, content=patch, headers=head))
                    for _ in range(BIG_STEPS):
                        timed("step", lambda: c.post(path + "/step", content=step, headers=head))
                    over = step[:-1] + b" " * (JSON_LIMIT - len(step) + 1) + b"}"
                    timed("over", lambda: c.post(path + "/step", content=over, headers=head))
            finally:
                done.set()

        def prober() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not done.is_set():
                    start = time.perf_counter()
                    assert c.get("/healthz").status_code == 200
                    healthz.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    r = c.post(
                        f"/v1/sessions/{small['id']}/step",
                        json={"grads": {"v": [0.1, 0.1]}},
                        headers=_auth(small["token"]),
                    )
                    assert r.status_code == 200, r.text
                    steps.append(time.perf_counter() - start)
                    time.sleep(0.01)

        def sampler() -> None:
            while not done.is_set():
                rss.append(_vm(pid, "VmRSS"))
                time.sleep(0.005)

        threads = [threading.Thread(target=f, daemon=True) for f in (sender, prober, sampler)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "the measurement did not finish"
        peak = max(max(rss, default=0), _vm(pid, "VmHWM")) - baseline

    print(
        f"\nlargest JSON body {len(step)} bytes ({n} numbers): "
        + ", ".join(f"{name} {status} {s:.2f} s" for name, status, s in results)
        + f"\n/healthz n={len(healthz)} p50={statistics.median(healthz) * 1e3:.1f} ms "
        f"p99={_quantile(healthz, 0.99) * 1e3:.1f} ms max={max(healthz) * 1e3:.1f} ms; "
        f"small step n={len(steps)} p50={statistics.median(steps) * 1e3:.1f} ms "
        f"max={max(steps) * 1e3:.1f} ms; peak RSS growth {peak / 2**20:.0f} MiB"
    )
    statuses = {name: status for name, status, _ in results}
    assert statuses == {
        "create": 201,
        "put params": 200,
        "patch": 422,  # parsed, then refused: momentum is a number
        "step": 200,
        "over": 413,
    }, results
    assert len(healthz) >= 10
    assert _quantile(healthz, 0.99) < 0.25
    assert max(steps) < 0.5
