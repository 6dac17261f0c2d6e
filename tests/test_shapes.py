"""Zero-element tensors: every dimension is bounded (the element limit applies to the non-zero
dimensions too, and each must fit numpy's index type), and what the server accepts comes back
with its shape in both encodings. JSON nested lists carry a zero-element shape only when its
one zero dimension is the last (``[]`` is ``(0,)``, ``[[], []]`` is ``(2, 0)``), so the server
refuses the others when they arrive as safetensors. Bodies are hand-made safetensors.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import safetensors.numpy as stn
from optserver_client import safetensors_io
from optserver_client.safetensors_io import SafetensorsError

from optserver.errors import InvalidTensor
from optserver.wire import Limits, decode_safetensors
from tests.live import LiveServer, live_server

ST = "application/octet-stream"
MAX_ELEMENTS = 100_000
#: Shapes that hold nothing but whose dimensions no limit (or no index) allows.
ABSURD = [[0, 2**70], [0, 2**62, 2**62], [0, 2**63], [0, 2**40]]
#: Zero-element shapes that JSON nested lists cannot carry.
UNCARRIABLE = [[0, 5], [2, 0, 3], [0, 0]]
#: Zero-element shapes that both encodings carry.
CARRIABLE = [[0], [3, 0], [2, 1, 0]]
REFUSED = {"urn:optserver:problem:tensor-too-large", "urn:optserver:problem:unsupported-shape"}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(max_tensor_elements=MAX_ELEMENTS) as s:
        yield s


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def document(header: Any, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def empty(name: str, shape: list[int]) -> dict[str, Any]:
    return {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}


def new_session(server: LiveServer) -> dict[str, Any]:
    r = httpx.post(
        server.url + "/v1/sessions", json={"optimizer": "sgd", "params": {"w": [1.0, 2.0]}}
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def info(server: LiveServer, s: dict[str, Any]) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1/sessions/{s['id']}", headers=auth(s["token"]))
    assert r.status_code == 200, r.text
    return {k: r.json()[k] for k in ("version", "params", "counters")}


def assert_refused(r: httpx.Response, name: str, shape: list[int]) -> None:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["type"] in REFUSED, problem
    assert f"'{name}'" in problem["detail"], problem["detail"]
    assert str(shape) in problem["detail"], problem["detail"]


@pytest.mark.parametrize("shape", ABSURD + UNCARRIABLE, ids=str)
@pytest.mark.parametrize("route", ["step", "step with params", "params"])
def test_refused_shapes_in_a_step_or_a_put(
    server: LiveServer, route: str, shape: list[int]
) -> None:
    s = new_session(server)
    before = info(server, s)
    if route == "step":
        body, name, method, path = document(empty("w", shape)), "w", "POST", "step"
    elif route == "step with params":
        header = {**empty("e", shape), **empty("params/e", shape)}
        body, name, method, path = document(header), "e", "POST", "step"
    else:
        body, name, method, path = document(empty("e", shape)), "e", "PUT", "params"
    r = httpx.request(
        method,
        f"{server.url}/v1/sessions/{s['id']}/{path}",
        content=body,
        headers={**auth(s["token"]), "Content-Type": ST},
    )
    assert_refused(r, name, shape)
    after = info(server, s)
    # Only the count of refused pushes may move.
    assert {k: after[k] for k in ("version", "params")} == {
        k: before[k] for k in ("version", "params")
    }


def export_with(server: LiveServer, shape: list[int]) -> bytes:
    """An export of a session holding an empty ``e`` of shape [3, 0], its header rewritten
    to say ``shape`` (the data, none, stays valid)."""
    r = httpx.post(
        server.url + "/v1/sessions",
        json={"optimizer": "sgd", "params": {"w": [1.0], "e": [[], [], []]}},
    )
    assert r.status_code == 201, r.text
    s = r.json()
    blob = httpx.get(f"{server.url}/v1/sessions/{s['id']}/state", headers=auth(s["token"])).content
    length = struct.unpack("<Q", blob[:8])[0]
    header = orjson.loads(blob[8 : 8 + length])
    assert header["params/e"]["shape"] == [3, 0]
    header["params/e"]["shape"] = shape
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + blob[8 + length :]


def sessions_count(server: LiveServer) -> int:
    return int(httpx.get(server.url + "/readyz").json()["sessions"])


@pytest.mark.parametrize("shape", ABSURD + UNCARRIABLE, ids=str)
def test_refused_shapes_in_an_import(server: LiveServer, shape: list[int]) -> None:
    body = export_with(server, shape)
    before = sessions_count(server)
    r = httpx.post(server.url + "/v1/sessions/import", content=body, headers={"Content-Type": ST})
    assert_refused(r, "params/e", shape)
    assert sessions_count(server) == before


def pulled_shapes(server: LiveServer, s: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """The shape of ``e`` as a JSON pull, a safetensors pull, a JSON step's answer and a
    safetensors step's answer carry it."""
    url = f"{server.url}/v1/sessions/{s['id']}"
    headers = auth(s["token"])
    as_json = httpx.get(url + "/params?names=e", headers=headers).json()["params"]["e"]
    as_st = httpx.get(url + "/params?names=e", headers={**headers, "Accept": ST}).content
    grad = np.zeros(np.array(as_json, np.float32).shape, np.float32)
    stepped = httpx.post(url + "/step", json={"grads": {"e": grad.tolist()}}, headers=headers)
    assert stepped.status_code == 200, stepped.text
    stepped_st = httpx.post(
        url + "/step",
        content=stn.save({"e": grad}),
        headers={**headers, "Content-Type": ST, "Accept": ST},
    )
    assert stepped_st.status_code == 200, stepped_st.text
    return (
        np.array(as_json, np.float32).shape,
        stn.load(as_st)["e"].shape,
        np.array(stepped.json()["params"]["e"], np.float32).shape,
        stn.load(stepped_st.content)["e"].shape,
    )


def test_zero_element_tensors_round_trip_their_shape_or_are_refused(server: LiveServer) -> None:
    accepted = []
    for shape in CARRIABLE + UNCARRIABLE + ABSURD:
        s = new_session(server)
        r = httpx.put(
            f"{server.url}/v1/sessions/{s['id']}/params",
            content=document(empty("e", shape)),
            headers={**auth(s["token"]), "Content-Type": ST},
        )
        if r.status_code != 200:
            assert_refused(r, "e", shape)
            continue
        accepted.append(shape)
        assert set(pulled_shapes(server, s)) == {tuple(shape)}, shape
        # Moved to another server and back, through the export.
        blob = httpx.get(f"{server.url}/v1/sessions/{s['id']}/state", headers=auth(s["token"]))
        imported = httpx.post(
            server.url + "/v1/sessions/import", content=blob.content, headers={"Content-Type": ST}
        )
        assert imported.status_code == 201, imported.text
        assert set(pulled_shapes(server, imported.json())) == {tuple(shape)}, shape
    assert accepted == CARRIABLE
    # The same shapes written as JSON nested lists.
    nested: list[tuple[Any, tuple[int, ...]]] = [
        ([], (0,)),
        ([[], [], []], (3, 0)),
        ([[[]], [[]]], (2, 1, 0)),
    ]
    for value, expected in nested:
        s = new_session(server)
        r = httpx.put(
            f"{server.url}/v1/sessions/{s['id']}/params",
            json={"params": {"e": value}},
            headers=auth(s["token"]),
        )
        assert r.status_code == 200, r.text
        assert set(pulled_shapes(server, s)) == {expected}, value


def test_empty_json_rows_count_against_the_element_limit(server: LiveServer) -> None:
    s = new_session(server)
    r = httpx.put(
        f"{server.url}/v1/sessions/{s['id']}/params",
        json={"params": {"e": [[]] * (MAX_ELEMENTS + 1)}},
        headers=auth(s["token"]),
    )
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["type"] == "urn:optserver:problem:tensor-too-large"
    assert "'e'" in problem["detail"] and str(MAX_ELEMENTS) in problem["detail"]


def test_every_dimension_fits_an_index_whatever_the_element_limit() -> None:
    """A server configured with an enormous element limit still refuses what numpy cannot
    index (422, not a crash)."""
    limits = Limits(max_tensors=10, max_elements=2**200, max_depth=8)
    for shape in ([0, 2**70], [0, 2**63], [0, 2**62, 2**62], [0, 2**61, 2**61 - 1]):
        with pytest.raises(InvalidTensor, match="64-bit index") as caught:
            decode_safetensors(document(empty("e", shape)), limits)
        assert caught.value.to_problem()["tensor"] == "e"
        assert caught.value.status == 422


def test_the_client_decodes_any_shape_numpy_holds_and_refuses_the_rest() -> None:
    """The client decodes whatever a server may send (no JSON rule there), and a shape numpy
    cannot hold is a SafetensorsError, not a crash."""
    for shape in ([0, 5], [2, 0, 3], [0, 0], [0, 2**40], [0, (2**63 - 1) // 4]):
        tensors, _ = safetensors_io.decode(document(empty("e", shape)))
        assert tensors["e"].shape == tuple(shape)
    for shape in ([0, 2**70], [0, 2**63], [0, 2**62, 2**62], [0, 2**61]):
        with pytest.raises(SafetensorsError, match="64-bit index") as caught:
            safetensors_io.decode(document(empty("e", shape)))
        assert caught.value.kind == "too-large"
        assert caught.value.tensor == "e"
