"""Hostile input against a real server: every class is refused with a problem that says what is
wrong, and changes nothing (weights, optimizer state, version; only the counters of rejected
pushes move). Requests are raw bytes over ``httpx`` or a socket, never the client library.
"""

from __future__ import annotations

import json
import pickle
import re
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import safetensors.numpy as stn

from tests.live import LiveServer, live_server
from tests.rawhttp import read_response

ST = "application/octet-stream"
JSON = "application/json"
LIMIT = 1 << 20
MAX_ELEMENTS = 100_000
MAX_TENSORS = 8
MAX_DEPTH = 4


@pytest.fixture(scope="module")
def hostile() -> Iterator[LiveServer]:
    with live_server(
        max_body_bytes=LIMIT,
        max_tensor_elements=MAX_ELEMENTS,
        max_tensors_per_session=MAX_TENSORS,
        max_json_depth=MAX_DEPTH,
    ) as s:
        yield s


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_session(server: LiveServer) -> dict[str, Any]:
    """Adam on ``w`` [4, 3] and ``b`` [3], one step taken: weights, state and version all
    differ from their initial values, so that any change shows."""
    r = httpx.post(
        server.url + "/v1/sessions",
        json={
            "optimizer": {"name": "adam", "lr": 0.01},
            "params": {"w": np.linspace(-1, 1, 12).reshape(4, 3).tolist(), "b": [0.5, 0.0, -0.5]},
        },
    )
    assert r.status_code == 201, r.text
    s: dict[str, Any] = r.json()
    r = httpx.post(
        f"{server.url}/v1/sessions/{s['id']}/step",
        json={"grads": {"w": [[0.1, -0.2, 0.3]] * 4, "b": [1.0, 2.0, 3.0]}},
        headers=auth(s["token"]),
    )
    assert r.status_code == 200, r.text
    return s


@pytest.fixture
def session(hostile: LiveServer) -> dict[str, Any]:
    return new_session(hostile)


def state(server: LiveServer, s: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Everything an export holds, minus the counters that count rejected pushes."""
    r = httpx.get(f"{server.url}/v1/sessions/{s['id']}/state", headers=auth(s["token"]))
    assert r.status_code == 200, r.text
    blob = r.content
    header = orjson.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])
    record = orjson.loads(header["__metadata__"]["optserver.session"])
    for key in ("pushes_received", "rejected"):
        record.pop(key, None)
    tensors = {name: array.tobytes() for name, array in stn.load(blob).items()}
    return tensors, record


@contextmanager
def unchanged(server: LiveServer, s: dict[str, Any]) -> Iterator[None]:
    before = state(server, s)
    yield
    after = state(server, s)
    assert after[1] == before[1], "the session record changed"
    assert after[0].keys() == before[0].keys(), "the session's tensors changed"
    for name, data in before[0].items():
        assert after[0][name] == data, f"tensor {name!r} changed"


def sessions_count(server: LiveServer) -> int:
    return int(httpx.get(server.url + "/readyz").json()["sessions"])


def assert_problem(r: httpx.Response, status: int | tuple[int, ...], *words: str) -> dict[str, Any]:
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    problem: dict[str, Any] = r.json()
    assert problem["status"] == r.status_code
    assert {"type", "title", "detail"} <= problem.keys()
    for word in words:
        assert word in problem["detail"], (word, problem["detail"])
    return problem


def send(
    server: LiveServer,
    s: dict[str, Any],
    route: str,
    body: bytes,
    content_type: str = JSON,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """Raw bytes to ``step`` (POST) or ``params`` (PUT) of a session."""
    method = "POST" if route == "step" else "PUT"
    return httpx.request(
        method,
        f"{server.url}/v1/sessions/{s['id']}/{route}",
        content=body,
        headers={**auth(s["token"]), "Content-Type": content_type, **(headers or {})},
    )


# --- body size -----------------------------------------------------------------------------


def _port(server: LiveServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


BODY_ROUTES = [
    ("POST", "/v1/sessions/{id}/step", JSON),
    ("POST", "/v1/sessions/{id}/step", ST),
    ("PUT", "/v1/sessions/{id}/params", JSON),
    ("PUT", "/v1/sessions/{id}/params", ST),
    ("PATCH", "/v1/sessions/{id}", JSON),
    ("POST", "/v1/sessions", JSON),
    ("POST", "/v1/sessions/import", ST),
]


@pytest.mark.parametrize(("method", "path", "content_type"), BODY_ROUTES)
def test_declared_length_over_the_limit_is_refused_before_the_body(
    hostile: LiveServer, session: dict[str, Any], method: str, path: str, content_type: str
) -> None:
    """Only the headers and a few bytes of a 'terabyte' body are sent: the 413 comes at once."""
    sessions = sessions_count(hostile)
    with (
        unchanged(hostile, session),
        socket.create_connection(("127.0.0.1", _port(hostile))) as sock,
    ):
        sock.settimeout(5)
        head = _request_head(
            method,
            path.format(id=session["id"]),
            {**auth(session["token"]), "Content-Type": content_type, "Content-Length": str(10**12)},
        )
        start = time.monotonic()
        sock.sendall(head + b'{"grads": {"b": [1')
        status, headers, body = read_response(sock)
        elapsed = time.monotonic() - start
    assert status == 413, body
    assert headers["content-type"].startswith("application/problem+json")
    problem = json.loads(body)
    assert problem["status"] == 413
    assert str(10**12) in problem["detail"] and str(LIMIT) in problem["detail"]
    assert elapsed < 2, elapsed
    assert sessions_count(hostile) == sessions


@pytest.mark.parametrize(("method", "path", "content_type"), BODY_ROUTES)
def test_chunked_body_over_the_limit_is_refused_while_streaming(
    hostile: LiveServer, session: dict[str, Any], method: str, path: str, content_type: str
) -> None:
    """No Content-Length: the 413 arrives while the client is still sending (the server does
    not read the 64 MiB first)."""
    total = 64 << 20
    piece = b"0" * 65536
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sessions = sessions_count(hostile)
    with (
        unchanged(hostile, session),
        socket.create_connection(("127.0.0.1", _port(hostile))) as sock,
    ):
        sock.settimeout(5)
        head = _request_head(
            method,
            path.format(id=session["id"]),
            {
                **auth(session["token"]),
                "Content-Type": content_type,
                "Transfer-Encoding": "chunked",
            },
        )
        sock.sendall(head)
        sent = 0
        while sent < total and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(chunk)
            except OSError:  # the server stopped reading, or closed after answering
                break
            sent += len(piece)
        status, headers, body = read_response(sock)
    assert status == 413, body
    assert headers["content-type"].startswith("application/problem+json")
    assert str(LIMIT) in json.loads(body)["detail"]
    assert sent < total // 2, sent
    assert sessions_count(hostile) == sessions


def test_server_still_serves_after_oversized_bodies(hostile: LiveServer) -> None:
    s = new_session(hostile)
    assert state(hostile, s)[1]["version"] == 1


# --- JSON ----------------------------------------------------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "1.0" + "]" * depth


#: (body, status, words in the detail)
JSON_CASES: dict[str, tuple[bytes, int, tuple[str, ...]]] = {
    "malformed": (b'{"grads": {"b": [1, 2', 400, ("not valid JSON",)),
    "not utf-8": (b'{"grads": {"b": [1\xff]}}', 400, ("not valid JSON",)),
    "empty": (b"", 400, ("not valid JSON",)),
    "top-level list": (b"[1, 2, 3]", 422, ("body", "dictionary")),
    "top-level string": (b'"grads"', 422, ("body", "dictionary")),
    "top-level null": (b"null", 422, ("body",)),
    "deeper than the limit": (
        f'{{"grads": {{"b": {_nested(MAX_DEPTH + 1)}}}}}'.encode(),
        422,
        ("'b'", f"deeper than {MAX_DEPTH}"),
    ),
    "deeper than any parser": (
        b'{"grads": {"b": ' + _nested(100_000).encode() + b"}}",
        400,
        ("not valid JSON",),
    ),
    "too many elements": (
        orjson.dumps({"grads": {"b": [0] * (MAX_ELEMENTS * 2)}}),
        422,
        ("'b'", str(MAX_ELEMENTS * 2), str(MAX_ELEMENTS)),
    ),
    "ragged": (b'{"grads": {"w": [[1, 2, 3], [4, 5]]}}', 422, ("'w'", "rectangular")),
    "ragged depth": (b'{"grads": {"w": [[1, 2, 3], 4]}}', 422, ("'w'", "rectangular")),
    "string inside": (b'{"grads": {"b": [1, "2", 3]}}', 422, ("'b'", "numbers")),
    "boolean inside": (b'{"grads": {"b": [1, true, 0]}}', 422, ("'b'", "numbers")),
    "booleans nested": (
        b'{"grads": {"w": [[0.5, 1, 2], [0.5, 1, 2], [0.5, 1, 2], [0.5, false, 2]]}}',
        422,
        ("'w'", "numbers"),
    ),
    # null is how this server writes NaN or Inf (allow policy): read back as NaN, refused here.
    "null inside": (b'{"grads": {"b": [1, null, 3]}}', 422, ("'b'", "NaN or Inf")),
    "object inside": (b'{"grads": {"b": [1, {"x": 1}, 3]}}', 422, ("'b'", "numbers")),
    "bare boolean": (b'{"grads": {"b": true}}', 422, ("'b'", "bool")),
    "bare string": (b'{"grads": {"b": "1, 2, 3"}}', 422, ("'b'", "str")),
    "beyond float64": (b'{"grads": {"b": [1, 1e400, 3]}}', 400, ("not valid JSON", "infinity")),
    "NaN literal": (b'{"grads": {"b": [1, NaN, 3]}}', 400, ("not valid JSON",)),
    "beyond float32": (b'{"grads": {"b": [1, 1e39, 3]}}', 422, ("'b'", "range", "float32")),
    "integer beyond float32": (
        b'{"grads": {"b": [1, ' + str(10**39).encode() + b", 3]}}",
        422,
        ("'b'", "range", "float32"),
    ),
    "integer beyond float64": (
        b'{"grads": {"b": [1, ' + str(10**400).encode() + b", 3]}}",
        400,
        ("not valid JSON",),
    ),
    "base_version beyond 64 bits": (
        b'{"grads": {"b": [1, 2, 3]}, "base_version": ' + str(2**64).encode() + b"}",
        422,
        ("base_version", "integer"),
    ),
    "base_version as a string": (
        b'{"grads": {"b": [1, 2, 3]}, "base_version": "0"}',
        422,
        ("base_version", "integer"),
    ),
    "lr as a boolean": (b'{"grads": {"b": [1, 2, 3]}, "lr": true}', 422, ("lr", "number")),
    "unknown field": (b'{"grads": {"b": [1, 2, 3]}, "colour": 1}', 422, ("colour",)),
    "grads not an object": (b'{"grads": [1, 2, 3]}', 422, ("grads", "dictionary")),
    "no grads": (b'{"lr": 0.1}', 422, ("grads",)),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_hostile_json_step(hostile: LiveServer, session: dict[str, Any], case: str) -> None:
    body, status, words = JSON_CASES[case]
    with unchanged(hostile, session):
        assert_problem(send(hostile, session, "step", body), status, *words)


@pytest.mark.parametrize(
    "case",
    [
        "malformed",
        "top-level list",
        "deeper than the limit",
        "too many elements",
        "ragged",
        "boolean inside",
        "null inside",
        "beyond float32",
    ],
)
def test_hostile_json_params(hostile: LiveServer, session: dict[str, Any], case: str) -> None:
    body, status, words = JSON_CASES[case]
    body = body.replace(b'"grads"', b'"params"')
    with unchanged(hostile, session):
        assert_problem(send(hostile, session, "params", body), status, *words)


def test_wide_integers_are_read_as_the_numbers_they_are(
    hostile: LiveServer, session: dict[str, Any]
) -> None:
    """Integers beyond 64 bits but inside the float32 range are numbers like any other: they
    are stored rounded to float32, never wrapped around or truncated."""
    values = [2**64, -(2**63) - 1, 10**30]
    body = b'{"params": {"b": [' + b", ".join(str(v).encode() for v in values) + b"]}}"
    r = send(hostile, session, "params", body)
    assert r.status_code == 200, r.text
    r = httpx.get(
        f"{hostile.url}/v1/sessions/{session['id']}/params",
        params={"names": "b"},
        headers={**auth(session["token"]), "Accept": ST},
    )
    np.testing.assert_array_equal(stn.load(r.content)["b"], np.array(values, dtype=np.float32))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[]", ("body", "dictionary")),
        (b'{"optimizer": {"name": "sgd", "lr": 0.1}, "mode": {"name": "ssp", '
         b'"max_staleness": false}}', ("max_staleness", "integer")),
        (b'{"optimizer": {"name": "sgd", "lr": 0.1}, "mode": {"name": "sync", '
         b'"workers": "2", "timeout_s": 1}}', ("workers", "integer")),
        (b'{"optimizer": "sgd", "params": {"w": [1, true]}}', ("'w'", "numbers")),
        (b'{"optimizer": "sgd", "params": {"w": ' + _nested(MAX_DEPTH + 1).encode() + b"}}",
         ("'w'", "deeper")),
    ],
)  # fmt: skip
def test_hostile_json_create(hostile: LiveServer, body: bytes, words: tuple[str, ...]) -> None:
    before = sessions_count(hostile)
    r = httpx.post(hostile.url + "/v1/sessions", content=body, headers={"Content-Type": JSON})
    assert_problem(r, 422, *words)
    assert sessions_count(hostile) == before


def test_huge_integer_options_do_not_break_the_session_list(hostile: LiveServer) -> None:
    """A schedule option beyond 64 bits is refused as a hyperparameter (422, nothing created,
    the session list still answers); the largest one accepted, 2**63 - 1, creates a session
    that is listed, shown and exported with that exact value."""

    def create(step_size: int) -> httpx.Response:
        return httpx.post(
            hostile.url + "/v1/sessions",
            content=b'{"optimizer": "sgd", "schedule": {"name": "step", "step_size": '
            + str(step_size).encode()
            + b', "gamma": 0.5}, "params": {"b": [1.0]}}',
            headers={"Content-Type": JSON},
        )

    def listed() -> list[str]:
        r = httpx.get(hostile.url + "/v1/sessions")
        assert r.status_code == 200, r.text
        return [s["id"] for s in r.json()["sessions"]]

    before = listed()
    r = create(2**70)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["type"] == "urn:optserver:problem:invalid-hyperparameter"
    assert problem["option"] == "step_size"
    assert listed() == before

    r = create(2**63 - 1)
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["schedule"]["step_size"] == 2**63 - 1
    assert listed() == [*before, s["id"]]
    shown = httpx.get(f"{hostile.url}/v1/sessions/{s['id']}", headers=auth(s["token"]))
    assert shown.status_code == 200, shown.text
    assert shown.json()["schedule"]["step_size"] == 2**63 - 1
    assert state(hostile, s)[1]["schedule"]["step_size"] == 2**63 - 1


# --- safetensors ---------------------------------------------------------------------------


def document(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def f32(*values: float) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


B = {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}
DEEP = b'{"b": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"

#: (document, status, words in the detail)
SAFETENSORS_CASES: dict[str, tuple[bytes, int, tuple[str, ...]]] = {
    "zero-length document": (b"", 400, ("0 bytes", "8-byte header")),
    "shorter than the length prefix": (b"\x10\x00\x00", 400, ("3 bytes",)),
    "header length past the end": (document({"b": B}, f32(1, 2, 3), length=4096), 400,
                                   ("header length 4096",)),
    "header length 2**63": (document({"b": B}, f32(1, 2, 3), length=2**63), 400,
                            (f"header length {2**63}",)),
    "header length 2**64-1": (b"\xff" * 8 + b"{}", 400, (f"header length {2**64 - 1}",)),
    "non-UTF-8 header": (document(b'{"b": "\xff\xfe"}'), 400, ("not valid JSON",)),
    "non-JSON header": (document(b"b: F32 [3]"), 400, ("not valid JSON",)),
    "header nested too deeply": (document(DEEP), 400, ("not valid JSON",)),
    "header is a list": (document([B]), 400, ("JSON object",)),
    "header is a string": (document("b"), 400, ("JSON object",)),
    "metadata with a number": (document({"__metadata__": {"lr": 0.1}, "b": B}, f32(1, 2, 3)),
                               400, ("__metadata__",)),
    "metadata with null": (document({"__metadata__": {"lr": None}, "b": B}, f32(1, 2, 3)),
                           400, ("__metadata__",)),
    "metadata is a list": (document({"__metadata__": [], "b": B}, f32(1, 2, 3)), 400,
                           ("__metadata__",)),
    "metadata is a string": (document({"__metadata__": "lr=1", "b": B}, f32(1, 2, 3)), 400,
                             ("__metadata__",)),
    "entry is not an object": (document({"b": [0, 12]}, f32(1, 2, 3)), 400, ("'b'", "object")),
    "dtype I64": (document({"b": {**B, "dtype": "I64", "data_offsets": [0, 24]}},
                           bytes(24)), 422, ("'b'", "I64", "F32")),
    "dtype BF16": (document({"b": {**B, "dtype": "BF16", "data_offsets": [0, 6]}},
                            bytes(6)), 422, ("'b'", "BF16")),
    "dtype BOOL": (document({"b": {**B, "dtype": "BOOL", "data_offsets": [0, 3]}},
                            bytes(3)), 422, ("'b'", "BOOL")),
    "dtype missing": (document({"b": {"shape": [3], "data_offsets": [0, 12]}}, f32(1, 2, 3)),
                      422, ("'b'", "None")),
    "negative shape": (document({"b": {**B, "shape": [-3]}}, f32(1, 2, 3)), 400,
                       ("'b'", "shape")),
    "fractional shape": (document({"b": {**B, "shape": [1.5, 2]}}, f32(1, 2, 3)), 400,
                         ("'b'", "shape")),
    "string shape": (document({"b": {**B, "shape": ["3"]}}, f32(1, 2, 3)), 400,
                     ("'b'", "shape")),
    "boolean shape": (document({"b": {**B, "shape": [True, 3]}}, f32(1, 2, 3)), 400,
                      ("'b'", "shape")),
    "shape not a list": (document({"b": {**B, "shape": 3}}, f32(1, 2, 3)), 400,
                         ("'b'", "shape")),
    "shape and bytes disagree": (document({"b": {**B, "shape": [2]}}, f32(1, 2, 3)), 400,
                                 ("'b'", "12")),
    "offsets past the end": (document({"b": {**B, "data_offsets": [0, 16]}}, f32(1, 2, 3)),
                             400, ("'b'", "data_offsets")),
    "offsets reversed": (document({"b": {**B, "data_offsets": [12, 0]}}, f32(1, 2, 3)), 400,
                         ("'b'", "data_offsets")),
    "negative offsets": (document({"b": {**B, "data_offsets": [-12, 0]}}, f32(1, 2, 3)), 400,
                         ("'b'", "data_offsets")),
    "offsets not integers": (document({"b": {**B, "data_offsets": [0.0, 12.0]}}, f32(1, 2, 3)),
                             400, ("'b'", "data_offsets")),
    "overlapping tensors": (
        document({"b": B, "w": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]}},
                 f32(*range(12))),
        400, ("overlaps",)),
    "gap between tensors": (
        document({"b": {**B, "data_offsets": [4, 16]}}, f32(0, 1, 2, 3)), 400, ("gap",)),
    "trailing bytes": (document({"b": B}, f32(1, 2, 3) + b"\x00" * 4), 400,
                       ("4 bytes follow",)),
    "2**40 elements": (document({"b": {**B, "shape": [2**20, 2**20]}}, f32(1, 2, 3)), 422,
                       ("'b'", str(2**40), str(MAX_ELEMENTS))),
    "10**100 elements": (document({"b": {**B, "shape": [10**100]}}, f32(1, 2, 3)), 422,
                         ("'b'", str(MAX_ELEMENTS))),
    "empty name": (document({"": B}, f32(1, 2, 3)), 400, ("invalid tensor name",)),
    "very long name": (document({"b" * 100_000: B}, f32(1, 2, 3)), 400,
                       ("invalid tensor name",)),
    "thousands of tensors": (
        document({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                  for i in range(5000)}),
        429, ("5000 tensors", str(MAX_TENSORS))),
}  # fmt: skip


@pytest.mark.parametrize("route", ["step", "params"])
@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_hostile_safetensors(
    hostile: LiveServer, session: dict[str, Any], case: str, route: str
) -> None:
    body, status, words = SAFETENSORS_CASES[case]
    with unchanged(hostile, session):
        assert_problem(send(hostile, session, route, body, ST), status, *words)


@pytest.mark.parametrize(
    "case",
    [
        "zero-length document",
        "header length 2**63",
        "header nested too deeply",
        "dtype I64",
        "overlapping tensors",
        "2**40 elements",
        "thousands of tensors",
    ],
)
def test_hostile_safetensors_import(hostile: LiveServer, case: str) -> None:
    body, status, words = SAFETENSORS_CASES[case]
    before = sessions_count(hostile)
    r = httpx.post(hostile.url + "/v1/sessions/import", content=body, headers={"Content-Type": ST})
    assert_problem(r, status, *words)
    assert sessions_count(hostile) == before


def _memory_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        pytest.skip("needs /proc")
    fields = dict(re.findall(r"^(Vm\w+):\s+(\d+) kB", status.read_text(), re.M))
    return {k: int(v) for k, v in fields.items()}


def test_enormous_declared_shapes_allocate_nothing(
    hostile: LiveServer, session: dict[str, Any]
) -> None:
    """Shapes worth terabytes are refused from the header alone: the server's peak memory
    (resident and virtual) does not move, and it answers at once."""
    headers = [
        {"b": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 12]}},
        {"b": {"dtype": "F64", "shape": [2**40], "data_offsets": [0, 12]}},
        {"b": {"dtype": "F16", "shape": [2**62, 4], "data_offsets": [0, 2**65]}},
        {"params/b": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 12]}},
    ]
    send(hostile, session, "step", document(headers[0], f32(1, 2, 3)), ST)  # warm up
    before = _memory_kib(hostile.process.pid)
    with unchanged(hostile, session):
        for _ in range(5):
            for header in headers:
                start = time.monotonic()
                r = send(hostile, session, "step", document(header, f32(1, 2, 3)), ST)
                assert_problem(r, (400, 422))
                assert time.monotonic() - start < 2
    after = _memory_kib(hostile.process.pid)
    assert after["VmHWM"] - before["VmHWM"] < 64 << 10, (before, after)  # KiB
    assert after["VmPeak"] - before["VmPeak"] < 1 << 20, (before, after)  # 1 GiB virtual
    metrics = httpx.get(hostile.url + "/metrics", timeout=2)
    assert metrics.status_code == 200
    assert httpx.get(hostile.url + "/healthz", timeout=2).status_code == 200


# --- never pickle, never eval --------------------------------------------------------------


class _Touch:
    """Unpickling this creates ``path``: the proof that someone unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize(
    ("route", "content_type", "status"),
    [
        ("step", ST, 400),
        ("params", ST, 400),
        ("step", "application/x-python-pickle", 415),
        ("params", "application/x-python-pickle", 415),
        ("step", "application/python-pickle", 415),
    ],
)
def test_pickles_are_never_loaded(
    hostile: LiveServer,
    session: dict[str, Any],
    tmp_path: Path,
    protocol: int,
    route: str,
    content_type: str,
    status: int,
) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"grads": {"b": _Touch(marker)}}, protocol=protocol)
    with unchanged(hostile, session):
        problem = assert_problem(send(hostile, session, route, payload, content_type), status)
    if status == 415:
        assert content_type in problem["detail"]
    assert not marker.exists()


@pytest.mark.parametrize("content_type", [ST, "application/x-python-pickle"])
def test_pickles_are_never_imported(hostile: LiveServer, tmp_path: Path, content_type: str) -> None:
    marker = tmp_path / "unpickled"
    before = sessions_count(hostile)
    r = httpx.post(
        hostile.url + "/v1/sessions/import",
        content=pickle.dumps(_Touch(marker)),
        headers={"Content-Type": content_type},
    )
    assert_problem(r, (400, 415))
    assert sessions_count(hostile) == before
    assert not marker.exists()


def _reduce_payload(marker: Path) -> list[Any]:
    return ["pathlib.Path.touch", [str(marker)]]


@pytest.mark.parametrize(
    ("route", "body", "words"),
    [
        ("step", lambda m: {"grads": {"b": [1, 2, 3]}, "__reduce__": _reduce_payload(m)},
         ("__reduce__",)),
        ("step", lambda m: {"grads": {"__reduce__": _reduce_payload(m)}}, ("__reduce__",)),
        ("step", lambda m: {"grads": {"b": {"__reduce__": _reduce_payload(m)}}}, ("'b'",)),
        ("step", lambda m: {"grads": {"b": [1, 2, 3]}, "__class__": "os.system"},
         ("__class__",)),
        ("params", lambda m: {"params": {"__reduce__": _reduce_payload(m)}}, ("__reduce__",)),
        ("params", lambda m: {"params": {"b": [1, 2, 3]}, "__reduce__": _reduce_payload(m)},
         ("__reduce__",)),
        ("params", lambda m: {"params": {"b": [1, 2, 3]}, "dtype": "__import__('os')"},
         ("dtype",)),
    ],
)  # fmt: skip
def test_reduce_style_keys_change_nothing(
    hostile: LiveServer,
    session: dict[str, Any],
    tmp_path: Path,
    route: str,
    body: Callable[[Path], dict[str, Any]],
    words: tuple[str, ...],
) -> None:
    marker = tmp_path / "evaluated"
    with unchanged(hostile, session):
        r = send(hostile, session, route, orjson.dumps(body(marker)))
        assert_problem(r, 422, *words)
    assert not marker.exists()


@pytest.mark.parametrize(
    "spec",
    [
        {"optimizer": {"name": "sgd", "__reduce__": ["os.system", ["true"]]}},
        {"optimizer": {"name": "__import__('os').system('true')"}},
        {"optimizer": "sgd", "schedule": {"name": "step", "step_size": 1, "__init__": "x"}},
        {"optimizer": "sgd", "schedule": {"name": "eval", "expr": "1+1"}},
        {"optimizer": "sgd", "__reduce__": ["os.system", ["true"]]},
        {"optimizer": "sgd", "mode": {"name": "async", "__class__": "x"}},
    ],
)
def test_reduce_style_keys_create_nothing(hostile: LiveServer, spec: dict[str, Any]) -> None:
    before = sessions_count(hostile)
    assert_problem(httpx.post(hostile.url + "/v1/sessions", json=spec), 422)
    assert sessions_count(hostile) == before


@pytest.mark.parametrize(
    "patch",
    [
        {"optimizer": {"__reduce__": ["os.system", ["true"]]}},
        {"optimizer": {"lr": "__import__('os')"}},
        {"__class__": "os.system"},
        {"schedule": {"name": "__import__"}},
    ],
)
def test_reduce_style_patches_change_nothing(
    hostile: LiveServer, session: dict[str, Any], patch: dict[str, Any]
) -> None:
    with unchanged(hostile, session):
        r = httpx.patch(
            f"{hostile.url}/v1/sessions/{session['id']}", json=patch, headers=auth(session["token"])
        )
        assert_problem(r, 422)


# --- tokens --------------------------------------------------------------------------------


def _bad_credentials(other: dict[str, Any]) -> dict[str, tuple[dict[str, str], int, str]]:
    """name -> (headers, status, a word of the detail)."""
    return {
        "missing": ({}, 401, "Bearer"),
        "basic": ({"Authorization": "Basic dXNlcjpwYXNzd29yZA=="}, 401, "Bearer"),
        "bearer without a value": ({"Authorization": "Bearer"}, 401, "Bearer"),
        "lower-case scheme, wrong token": ({"Authorization": "bearer nope"}, 401, "token"),
        "10 KB token": ({"Authorization": "Bearer " + "A" * 10_240}, 401, "token"),
        "wrong token": ({"Authorization": "Bearer wrong-" + "x" * 40}, 401, "token"),
        "token with a comma": ({"Authorization": "Bearer a, Bearer b"}, 401, "token"),
        "another session's token": (auth(other["token"]), 403, "another session"),
    }


SESSION_ROUTES = [
    ("GET", "", None),
    ("PATCH", "", b'{"optimizer": {"lr": 0.5}}'),
    ("DELETE", "", None),
    ("GET", "/params", None),
    ("PUT", "/params", b'{"params": {"b": [9, 9, 9]}}'),
    ("POST", "/step", b'{"grads": {"b": [1, 1, 1]}}'),
    ("GET", "/state", None),
]


@pytest.mark.parametrize(("method", "suffix", "body"), SESSION_ROUTES)
def test_bad_credentials_open_nothing(
    hostile: LiveServer,
    session: dict[str, Any],
    method: str,
    suffix: str,
    body: bytes | None,
) -> None:
    other = new_session(hostile)
    url = f"{hostile.url}/v1/sessions/{session['id']}{suffix}"
    with unchanged(hostile, session):
        for name, (headers, status, word) in _bad_credentials(other).items():
            r = httpx.request(method, url, content=body, headers={**headers, "Content-Type": JSON})
            assert_problem(r, status, word)
            sent = headers.get("Authorization", "").partition(" ")[2]
            assert session["token"] not in r.text, name
            assert len(sent) < 8 or sent not in r.text, name  # credentials are never echoed
            if status == 401:
                assert r.headers["www-authenticate"].lower().startswith("bearer"), name


def test_unknown_session_with_a_valid_token(hostile: LiveServer, session: dict[str, Any]) -> None:
    r = httpx.get(f"{hostile.url}/v1/sessions/{'0' * 32}", headers=auth(session["token"]))
    assert_problem(r, 404, "0" * 32)
    r = httpx.get(f"{hostile.url}/v1/sessions/{'x' * 5000}", headers=auth(session["token"]))
    assert_problem(r, (404, 422))


def test_tokens_never_reach_the_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    admin_key = "admin-key-" + "k" * 30
    secrets = [admin_key]
    with live_server(log_level="debug", log_file=log, admin_key=admin_key) as server:
        admin = auth(admin_key)
        r = httpx.post(
            server.url + "/v1/sessions",
            json={"optimizer": "sgd", "params": {"b": [1.0, 2.0]}},
            headers=admin,
        )
        assert r.status_code == 201, r.text
        s = r.json()
        secrets.append(s["token"])
        base = f"{server.url}/v1/sessions/{s['id']}"
        good = auth(s["token"])
        assert httpx.post(
            base + "/step", json={"grads": {"b": [1.0, 1.0]}}, headers=good
        ).is_success
        assert httpx.get(base + "/params", headers=good).is_success
        assert httpx.get(base, headers=admin).is_success
        wrong = "wrong-token-" + "w" * 30
        long = "L" * 10_240
        secrets += [wrong, long]
        for token in (wrong, long):
            assert httpx.get(base, headers=auth(token)).status_code == 401
            assert (
                httpx.post(server.url + "/v1/sessions", json={}, headers=auth(token)).status_code
                == 401
            )
        r = httpx.post(base + "/step", content=b"{", headers={**good, "Content-Type": JSON})
        assert r.status_code == 400
        assert httpx.get(base, headers={"Authorization": "Basic " + admin_key}).status_code == 401
        assert httpx.delete(base, headers=good).status_code == 204
    text = log.read_text(errors="replace")
    assert s["id"] in text, "the debug log shows no requests: nothing was checked"
    for secret in secrets:
        assert secret not in text
        assert secret[:16] not in text
    assert "authorization" not in text.lower()
    assert "bearer" not in text.lower()
