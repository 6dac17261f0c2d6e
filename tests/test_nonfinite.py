"""Finite inputs never leave NaN or Inf behind under the ``reject`` policy, through the service:
422 ``nonfinite-result`` and an unchanged export, hyperparameters that cannot be finite in the
session's dtype refused at create and PATCH, ``PUT ?reset_state=true``, ``nonfinite_tensors``
under ``allow``, and refused steps replayed as refused from the journal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.live import LiveServer, live_server
from tests.test_hostile import assert_problem, auth, unchanged


def create_session(server: LiveServer, optimizer: Any, params: Any, **extra: Any) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/sessions", json={"optimizer": optimizer, "params": params, **extra}
    )


def created(server: LiveServer, optimizer: Any, params: Any, **extra: Any) -> dict[str, Any]:
    r = create_session(server, optimizer, params, **extra)
    assert r.status_code == 201, r.text
    s: dict[str, Any] = r.json()
    return s


def step(server: LiveServer, s: dict[str, Any], body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/sessions/{s['id']}/step", json=body, headers=auth(s["token"])
    )


def info(server: LiveServer, s: dict[str, Any]) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1/sessions/{s['id']}", headers=auth(s["token"]))
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.mark.parametrize(
    ("optimizer", "params", "dtype", "grads", "lr"),
    [
        ({"name": "sgd", "lr": 1e308}, [1.0, 2.0], "float64", [2.0, 1.0], None),
        ({"name": "sgd", "lr": 0.1}, [1.0, 2.0], "float64", [2.0, 1.0], 1e308),
        ({"name": "adamw", "weight_decay": 1e308, "lr": 10.0}, [1.0, 2.0], "float64",
         [1.0, 1.0], None),
        ({"name": "adam", "weight_decay": 1e38}, [3e38, 1.0], "float32", [3e38, 1.0], None),
        ({"name": "sgd", "lr": 2.0}, [3e38, -3e38], "float32", [-3e38, 3e38], None),
        ({"name": "adam", "eps": 0.0}, [1.0, 2.0], "float32", [0.0, 1.0], None),
        ({"name": "adagrad", "eps": 0.0}, [1.0, 2.0], "float32", [0.0, 0.0], None),
        ({"name": "rmsprop", "eps": 0.0}, [1.0, 2.0], "float64", [0.0, 1.0], None),
    ],
)  # fmt: skip
def test_a_step_that_would_not_be_finite_is_refused(
    server: LiveServer,
    optimizer: dict[str, Any],
    params: list[float],
    dtype: str,
    grads: list[float],
    lr: float | None,
) -> None:
    s = created(server, optimizer, {"w": params, "b": [0.5]}, dtype=dtype)
    body: dict[str, Any] = {"grads": {"b": [1.0], "w": grads}}
    if lr is not None:
        body["lr"] = lr
    with unchanged(server, s):
        problem = assert_problem(step(server, s, body), 422, "NaN or Inf", "nothing was changed")
    assert problem["type"] == "urn:optserver:problem:nonfinite-result"
    assert problem["tensor"] in ("w", "b")
    assert info(server, s)["counters"]["rejected_by_reason"] == {"nonfinite-result": 1}


def test_momentum_cannot_overflow_into_the_buffer(server: LiveServer) -> None:
    """Two gradients of 3e38 with momentum 0.9: the second would make the buffer Inf."""
    s = created(server, {"name": "sgd", "lr": 1e-3, "momentum": 0.9}, {"w": [1.0]})
    assert step(server, s, {"grads": {"w": [3e38]}}).status_code == 200
    with unchanged(server, s):
        assert_problem(step(server, s, {"grads": {"w": [3e38]}}), 422, "NaN or Inf")
    r = step(server, s, {"grads": {"w": [0.0]}})
    assert r.status_code == 200, r.text
    assert np.isfinite(r.json()["params"]["w"]).all()


def test_hyperparameters_beyond_the_dtype_are_refused(server: LiveServer) -> None:
    r = create_session(server, {"name": "sgd", "lr": 1e308}, {"w": [1.0]})
    assert_problem(r, 422, "lr", "float32")
    r = create_session(server, {"name": "adam", "eps": 1e39}, {}, dtype="float32")
    assert_problem(r, 422, "eps", "float32")
    s = created(server, {"name": "adamw"}, {"w": [1.0]})
    r = httpx.patch(
        f"{server.url}/v1/sessions/{s['id']}",
        json={"optimizer": {"weight_decay": 1e300}},
        headers=auth(s["token"]),
    )
    with unchanged(server, s):
        assert_problem(r, 422, "weight_decay", "float32")
    assert info(server, s)["optimizer"]["weight_decay"] == 0.01
    # A float64 session takes them, and refuses only the steps that overflow.
    s = created(server, {"name": "sgd", "lr": 1e300}, {"w": [1e-300]}, dtype="float64")
    assert step(server, s, {"grads": {"w": [1.0]}}).status_code == 200


def test_a_step_lr_beyond_the_tensors_dtype_is_refused(server: LiveServer) -> None:
    s = created(server, {"name": "sgd", "lr": 0.1}, {"w": [1.0], "d": [1.0]})
    with unchanged(server, s):
        r = step(server, s, {"grads": {"w": [1.0]}, "lr": 1e300})
        problem = assert_problem(r, 422, "lr", "float32")
    assert problem["type"] == "urn:optserver:problem:invalid-hyperparameter"
    # The same lr is finite for float64 weights: the step is taken.
    s = created(server, {"name": "sgd", "lr": 0.1}, {"w": [1e-300]}, dtype="float64")
    assert step(server, s, {"grads": {"w": [1.0]}, "lr": 1e300}).status_code == 200


def test_sync_round_with_a_nonfinite_result_applies_nothing(server: LiveServer) -> None:
    s = created(
        server,
        {"name": "sgd", "lr": 2.0},
        {"w": [3e38]},
        mode={"name": "sync", "workers": 1, "timeout_s": 5},
    )
    with unchanged(server, s):
        r = step(server, s, {"grads": {"w": [-3e38]}, "worker": "a"})
        assert_problem(r, 422, "NaN or Inf")
    assert info(server, s)["version"] == 0


def test_skip_policy_acknowledges_without_applying(server: LiveServer) -> None:
    s = created(server, {"name": "sgd", "lr": 2.0}, {"w": [3e38]}, nonfinite="skip")
    with unchanged(server, s):
        r = step(server, s, {"grads": {"w": [-3e38]}})
        assert r.status_code == 200, r.text
        assert r.json()["applied"] is False
    assert info(server, s)["counters"]["rejected_by_reason"] == {"nonfinite-result": 1}


def test_allow_policy_says_where_nonfinite_state_is_and_reset_clears_it(
    server: LiveServer,
) -> None:
    s = created(
        server,
        {"name": "sgd", "lr": 1e-3, "momentum": 0.9},
        {"w": [1.0, 2.0], "b": [1.0]},
        nonfinite="allow",
    )
    for _ in range(2):
        assert step(server, s, {"grads": {"w": [3e38, 1.0], "b": [1.0]}}).status_code == 200
    assert info(server, s)["nonfinite_tensors"] == ["w"]
    base = f"{server.url}/v1/sessions/{s['id']}"
    # Finite weights alone keep the Inf momentum buffer: the next step is Inf again.
    assert httpx.put(base + "/params", json={"params": {"w": [1.0, 1.0]}},
                     headers=auth(s["token"])).status_code == 200  # fmt: skip
    assert info(server, s)["nonfinite_tensors"] == ["w"]
    r = httpx.put(
        base + "/params?reset_state=true",
        json={"params": {"w": [1.0, 1.0]}},
        headers=auth(s["token"]),
    )
    assert r.status_code == 200, r.text
    tensors = {t["name"]: t for t in info(server, s)["params"]}
    assert info(server, s)["nonfinite_tensors"] == []
    assert tensors["w"]["step"] == 0 and tensors["b"]["step"] == 2
    r = step(server, s, {"grads": {"w": [0.0, 0.0]}})
    assert r.json()["params"]["w"] == [1.0, 1.0]


def test_a_refused_step_in_the_journal_replays_as_refused(tmp_path: Path) -> None:
    """The record of a push is written before it is applied; one refused for its result is
    refused again, identically, when the journal is replayed."""
    with live_server(data_dir=tmp_path) as server:
        s = created(server, {"name": "sgd", "lr": 2.0}, {"w": [3e38, 1.0]})
        assert step(server, s, {"grads": {"w": [-3e38, 1.0]}}).status_code == 422
        r = step(server, s, {"grads": {"w": [0.0, 1.0]}})
        assert r.status_code == 200, r.text
        expected = r.json()["params"]["w"]
        server.process.kill()
        server.process.wait()
    with live_server(data_dir=tmp_path) as server:
        r = httpx.get(f"{server.url}/v1/sessions/{s['id']}/params", headers=auth(s["token"]))
        assert r.status_code == 200, r.text
        assert r.json() == {"version": 1, "params": {"w": expected}}
        assert info(server, s)["counters"]["rejected_by_reason"] == {"nonfinite-result": 1}


def test_json_clients_can_send_back_what_they_receive(server: LiveServer) -> None:
    """NaN and Inf are written as null in JSON; null reads back as NaN, and the session's
    policy decides: stored under allow, refused (422 nonfinite, nothing changed) under reject."""
    s = created(server, {"name": "sgd"}, {"w": [1.0, 2.0]}, nonfinite="allow")
    base = f"{server.url}/v1/sessions/{s['id']}"
    r = httpx.put(base + "/params", json={"params": {"w": [None, 2.0]}}, headers=auth(s["token"]))
    assert r.status_code == 200, r.text
    pulled = httpx.get(base + "/params", headers=auth(s["token"])).json()
    assert pulled["params"]["w"] == [None, 2.0]
    r = httpx.put(base + "/params", json={"params": pulled["params"]}, headers=auth(s["token"]))
    assert r.status_code == 200, r.text
    assert info(server, s)["nonfinite_tensors"] == ["w"]
    strict = created(server, {"name": "sgd"}, {"w": [1.0, 2.0]})
    with unchanged(server, strict):
        r = httpx.put(
            f"{server.url}/v1/sessions/{strict['id']}/params",
            json={"params": {"w": [None, 2.0]}},
            headers=auth(strict["token"]),
        )
        assert_problem(r, 422, "NaN or Inf")
