"""Idempotency keys are bound to their request (Stripe's semantics), replays follow ``Accept``,
and session ids cannot be probed without credentials."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy as stn

from optserver.replay import ReplayCache
from optserver.replies import Answer
from tests.live import LiveServer, live_server
from tests.test_hostile import assert_problem, auth, unchanged

ST = "application/octet-stream"


def created(server: LiveServer, **extra: Any) -> dict[str, Any]:
    r = httpx.post(
        server.url + "/v1/sessions",
        json={"optimizer": {"name": "sgd", "lr": 1.0}, "params": {"w": [0.0, 0.0]}, **extra},
        headers=server.admin_headers(),
    )
    assert r.status_code == 201, r.text
    s: dict[str, Any] = r.json()
    return s


def push(
    server: LiveServer,
    s: dict[str, Any],
    body: dict[str, Any],
    key: str,
    *,
    accept: str | None = None,
    query: str = "",
) -> httpx.Response:
    headers = {**auth(s["token"]), "Idempotency-Key": key}
    if accept is not None:
        headers["Accept"] = accept
    return httpx.post(f"{server.url}/v1/sessions/{s['id']}/step{query}", json=body, headers=headers)


@pytest.mark.parametrize(
    "other",
    [
        {"grads": {"w": [2.0, 0.0]}},  # another gradient
        {"grads": {"w": [1.0, 0.0]}, "lr": 0.5},  # another lr
        {"grads": {"nope": [1.0, 0.0]}},  # a gradient for an unknown tensor
        {"grads": {"w": [1.0, 0.0]}, "worker": "other"},
    ],
)
def test_a_key_reused_with_another_request_is_refused(
    server: LiveServer, other: dict[str, Any]
) -> None:
    s = created(server)
    key = uuid.uuid4().hex
    first = push(server, s, {"grads": {"w": [1.0, 0.0]}}, key)
    assert first.status_code == 200, first.text
    with unchanged(server, s):
        problem = assert_problem(push(server, s, other, key), 422, key, "different request")
    assert problem["type"] == "urn:optserver:problem:idempotency-key-reused"
    # The original request still replays, and nothing was applied twice.
    again = push(server, s, {"grads": {"w": [1.0, 0.0]}}, key)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() == {"version": 1, "applied": True, "params": {"w": [-1, 0]}}


def test_the_return_option_is_part_of_the_request(server: LiveServer) -> None:
    s = created(server)
    key = uuid.uuid4().hex
    assert push(server, s, {"grads": {"w": [1.0, 0.0]}}, key).status_code == 200
    r = push(server, s, {"grads": {"w": [1.0, 0.0]}}, key, query="?return=none")
    assert_problem(r, 422, "different request")


def test_a_replay_follows_accept(server: LiveServer) -> None:
    s = created(server)
    key = uuid.uuid4().hex
    body = {"grads": {"w": [0.25, -1.5]}}
    first = push(server, s, body, key)
    assert first.headers["content-type"].startswith("application/json")
    binary = push(server, s, body, key, accept=ST)
    assert binary.status_code == 200, binary.text
    assert binary.headers["content-type"] == ST
    assert binary.headers["idempotent-replayed"] == "true"
    tensors = stn.load(binary.content)
    np.testing.assert_array_equal(tensors["w"], np.array([-0.25, 1.5], np.float32))
    assert tensors["w"].dtype == np.float32
    assert push(server, s, body, key).json() == first.json()
    assert_problem(push(server, s, body, key, accept="text/csv"), 406)
    # And the other way round: a binary answer replayed as JSON.
    key = uuid.uuid4().hex
    assert push(server, s, body, key, accept=ST).status_code == 200
    replayed = push(server, s, body, key, accept="application/json")
    assert replayed.json() == {"version": 2, "applied": True, "params": {"w": [-0.5, 3.0]}}


def test_sync_round_retry_with_another_body_is_refused(server: LiveServer) -> None:
    """A retry of a push waiting in an open round must be the same request."""
    s = created(server, mode={"name": "sync", "workers": 2, "timeout_s": 10})
    key = uuid.uuid4().hex
    results: dict[str, httpx.Response] = {}
    first = threading.Thread(
        target=lambda: results.setdefault(
            "a", push(server, s, {"grads": {"w": [1.0, 0.0]}, "worker": "a"}, key)
        )
    )
    first.start()
    try:
        time.sleep(0.5)  # the first push is waiting in the round
        r = push(server, s, {"grads": {"w": [3.0, 0.0]}, "worker": "a"}, key)
        assert_problem(r, 422, "different request")
        b = push(server, s, {"grads": {"w": [0.0, 1.0]}, "worker": "b"}, uuid.uuid4().hex)
        assert b.status_code == 200, b.text
    finally:
        first.join(15)
    assert results["a"].status_code == 200, results["a"].text
    assert results["a"].json()["params"]["w"] == [-0.5, -0.5]  # the mean of a's and b's


def test_fingerprints_survive_a_restart(tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    with live_server(data_dir=tmp_path) as server:
        s = created(server)
        assert push(server, s, {"grads": {"w": [1.0, 0.0]}}, key).status_code == 200
        server.process.kill()
        server.process.wait()
    with live_server(data_dir=tmp_path) as server:
        assert_problem(push(server, s, {"grads": {"w": [5.0, 0.0]}}, key), 422)
        r = push(server, s, {"grads": {"w": [1.0, 0.0]}}, key, accept=ST)
        assert r.headers["idempotent-replayed"] == "true"
        np.testing.assert_array_equal(stn.load(r.content)["w"], [-1.0, 0.0])


def test_replay_cache_keeps_its_bounds() -> None:
    cache = ReplayCache(max_keys=3, max_bytes=1 << 20)
    answer = Answer("binary")
    for i in range(5):
        tensors = {"w": np.full(4, i, np.float32)}
        reply = answer(i, True, tensors)
        cache.remember(str(i), reply, answer, tensors, True, f"f{i}")
    assert [k for k, _ in cache.entries()] == ["2", "3", "4"]
    replay = cache.replay("3", Answer("json"), "f3", {})
    assert replay is not None and replay.replayed
    assert replay.body == b'{"version":3,"applied":true,"params":{"w":[3.0,3.0,3.0,3.0]}}'


# --- probing session ids (item 10) -----------------------------------------------------------


def test_unknown_sessions_need_credentials_too(admin_server: LiveServer) -> None:
    s = created(admin_server)
    unknown = f"{admin_server.url}/v1/sessions/{'0' * 32}"
    known = f"{admin_server.url}/v1/sessions/{s['id']}"
    for url in (unknown, known):
        for headers in ({}, auth("not-a-token"), {"Authorization": "Basic eA=="}):
            r = httpx.get(url, headers=headers)
            problem = assert_problem(r, 401)
            assert problem["type"] == "urn:optserver:problem:unauthorized"
        assert_problem(httpx.post(url + "/step", json={"grads": {}}), 401)
    # The same wording either way: nothing tells the two apart.
    a = httpx.get(unknown, headers=auth("x" * 43)).json()["detail"]
    b = httpx.get(known, headers=auth("x" * 43)).json()["detail"]
    assert a.replace("0" * 32, s["id"]) == b
    # Valid credentials learn that a session does not exist.
    assert_problem(httpx.get(unknown, headers=auth(s["token"])), 404)
    assert_problem(httpx.get(unknown, headers=admin_server.admin_headers()), 404)
    assert httpx.delete(known, headers=auth(s["token"])).status_code == 204
    assert_problem(httpx.get(known, headers=auth(s["token"])), 404)  # its own, deleted


def test_fingerprint_sees_any_one_change() -> None:
    """One changed element anywhere in a large body, one changed byte in an odd-length tail,
    another media type or return option: another fingerprint; the same request: the same."""
    from optserver_client import safetensors_io

    from optserver.idempotency import fingerprint

    g = np.random.default_rng(0).standard_normal(1_000_003).astype(np.float32)
    body = bytes(safetensors_io.encode({"w": g}, {"lr": "0.1"}))
    same = fingerprint(body, ST, "stepped")
    assert fingerprint(bytes(body), ST, "stepped") == same
    seen = {same}
    for position in (len(body) // 2, len(body) - 1, len(body) - 9, 200_000):
        changed = bytearray(body)
        changed[position] ^= 1
        seen.add(fingerprint(changed, ST, "stepped"))
    seen.add(fingerprint(body, "application/json", "stepped"))
    seen.add(fingerprint(body, ST, "all"))
    seen.add(fingerprint(body[:-1], ST, "stepped"))
    assert len(seen) == 8
