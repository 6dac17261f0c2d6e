"""The HTTP API end to end against a real server: every route, both encodings, every error."""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import safetensors.numpy as stn

from optserver.optim import create as create_optimizer
from tests.live import LiveServer, live_server

ST = "application/octet-stream"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_session(server: LiveServer, **body: Any) -> dict[str, Any]:
    body.setdefault("optimizer", {"name": "sgd", "lr": 0.1})
    r = httpx.post(server.url + "/v1/sessions", json=body, headers=server.admin_headers())
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def step_json(
    server: LiveServer,
    s: dict[str, Any],
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/sessions/{s['id']}/step",
        json=body,
        headers={**auth(s["token"]), **(headers or {})},
        **kw,
    )


def step_st(
    server: LiveServer,
    s: dict[str, Any],
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/sessions/{s['id']}/step",
        content=stn.save(tensors, metadata),
        headers={**auth(s["token"]), "Content-Type": ST, "Accept": ST, **(headers or {})},
        params=params,
    )


def pull(server: LiveServer, s: dict[str, Any]) -> dict[str, np.ndarray]:
    r = httpx.get(
        f"{server.url}/v1/sessions/{s['id']}/params", headers={**auth(s["token"]), "Accept": ST}
    )
    assert r.status_code == 200, r.text
    return stn.load(r.content)


def export(server: LiveServer, s: dict[str, Any]) -> bytes:
    r = httpx.get(f"{server.url}/v1/sessions/{s['id']}/state", headers=auth(s["token"]))
    assert r.status_code == 200, r.text
    return r.content


def state_of(blob: bytes) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Tensors and session record of an export, minus the counters (which count rejections)."""
    tensors = {k: v.tolist() for k, v in stn.load(blob).items()}
    header = orjson.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])
    record = orjson.loads(header["__metadata__"]["optserver.session"])
    for key in ("pushes_received", "rejected"):
        record.pop(key)
    return tensors, record


def assert_problem(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["status"] == status
    assert {"type", "title", "detail"} <= problem.keys()
    for word in words:
        assert word in problem["detail"], (word, problem["detail"])
    return problem  # type: ignore[no-any-return]


# --- sessions ------------------------------------------------------------------------------


def test_session_lifecycle(server: LiveServer) -> None:
    s = new_session(
        server,
        name="mlp",
        optimizer={"name": "adam", "lr": 0.01, "amsgrad": True},
        params={"w": [[1.0, 2.0], [3.0, 4.0]], "b": 0.5},
        schedule={"name": "step", "step_size": 2, "gamma": 0.5},
    )
    assert s["version"] == 0 and s["name"] == "mlp" and s["token"]
    assert s["optimizer"]["amsgrad"] is True and s["optimizer"]["betas"] == [0.9, 0.999]
    assert s["params"] == [
        {"name": "w", "shape": [2, 2], "dtype": "float32", "step": 0, "group": "default"},
        {"name": "b", "shape": [], "dtype": "float32", "step": 0, "group": "default"},
    ]
    base = f"{server.url}/v1/sessions/{s['id']}"
    info = httpx.get(base, headers=auth(s["token"])).json()
    assert "token" not in info and info["mode"] == {"name": "async"} and info["lr"] == 0.01
    listed = httpx.get(server.url + "/v1/sessions").json()["sessions"]
    assert s["id"] in [x["id"] for x in listed] and all("token" not in x for x in listed)

    r = httpx.patch(base, json={"optimizer": {"lr": 0.02}}, headers=auth(s["token"]))
    assert r.status_code == 200 and r.json()["optimizer"]["lr"] == 0.02
    assert r.json()["schedule"]["step_size"] == 2  # untouched
    r = httpx.patch(
        base,
        json={"schedule": None, "mode": {"name": "ssp", "max_staleness": 3}},
        headers=auth(s["token"]),
    )
    assert r.json()["schedule"] is None and r.json()["mode"]["max_staleness"] == 3
    assert_problem(
        httpx.patch(base, json={"optimizer": {"name": "sgd"}}, headers=auth(s["token"])),
        422,
        "adam",
        "sgd",
    )
    assert_problem(
        httpx.patch(base, json={"optimizer": {"lr": -1}}, headers=auth(s["token"])), 422, "lr", "-1"
    )

    assert_problem(httpx.get(base, headers={**auth(s["token"]), "Accept": ST}), 406, ST)
    assert httpx.get(base, headers={**auth(s["token"]), "Accept": "*/*"}).status_code == 200
    assert httpx.delete(base, headers=auth(s["token"])).status_code == 204
    assert_problem(httpx.get(base, headers=auth(s["token"])), 404, s["id"])


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"optimizer": "lbfgs"}, ["lbfgs", "adam"]),
        ({"optimizer": {"name": "adam", "betas": [0.9, 1.5]}}, ["betas[1]", "1.5"]),
        ({"optimizer": {"name": "sgd", "nesterov": True}}, ["nesterov"]),
        ({"optimizer": "sgd", "mode": {"name": "ssp"}}, ["max_staleness"]),
        ({"optimizer": "sgd", "mode": {"name": "warp"}}, ["mode"]),
        ({"optimizer": "sgd", "schedule": {"name": "step"}}, ["step_size"]),
        ({"optimizer": "sgd", "params": {"w": [[1, 2], [3]]}}, ["'w'", "rectangular"]),
        ({"optimizer": "sgd", "params": {"w": ["a"]}}, ["'w'", "numbers"]),
        ({"optimizer": "sgd", "colour": "red"}, ["colour"]),
        ({}, ["optimizer"]),
    ],
)
def test_create_rejects_bad_specs(
    server: LiveServer, body: dict[str, Any], words: list[str]
) -> None:
    before = len(httpx.get(server.url + "/v1/sessions").json()["sessions"])
    assert_problem(httpx.post(server.url + "/v1/sessions", json=body), 422, *words)
    assert len(httpx.get(server.url + "/v1/sessions").json()["sessions"]) == before


# --- tensors in both encodings -------------------------------------------------------------


def test_params_put_and_get_in_both_encodings(server: LiveServer) -> None:
    s = new_session(server)
    base = f"{server.url}/v1/sessions/{s['id']}/params"
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    r = httpx.put(
        base,
        content=stn.save({"w": w, "v": np.ones(2)}),
        headers={**auth(s["token"]), "Content-Type": ST},
    )
    assert r.status_code == 200, r.text
    assert {p["name"]: p["dtype"] for p in r.json()["params"]} == {"w": "float32", "v": "float64"}
    r = httpx.put(base, json={"params": {"s": 2.5}, "dtype": "float64"}, headers=auth(s["token"]))
    assert r.status_code == 200

    got = pull(server, s)
    np.testing.assert_array_equal(got["w"], w)
    assert got["v"].dtype == np.float64 and got["s"].shape == () and got["s"] == 2.5
    r = httpx.get(base, params={"names": "s,w"}, headers=auth(s["token"]))
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"version": 0, "params": {"s": 2.5, "w": w.tolist()}}
    assert r.headers["optserver-version"] == "0"
    r = httpx.get(
        base,
        params={"names": "w"},
        headers={**auth(s["token"]), "Accept": "text/html;q=0.9, application/octet-stream"},
    )
    assert list(stn.load(r.content)) == ["w"]
    assert_problem(httpx.get(base, params={"names": "w,zz"}, headers=auth(s["token"])), 422, "'zz'")
    assert_problem(
        httpx.get(base, headers={**auth(s["token"]), "Accept": "text/html"}), 406, "text/html"
    )
    assert_problem(
        httpx.put(base, content=b"w=1", headers={**auth(s["token"]), "Content-Type": "text/plain"}),
        415,
        "text/plain",
    )


def test_step_json_and_safetensors_match_the_core(server: LiveServer) -> None:
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    b0 = rng.standard_normal(3).astype(np.float32)
    config = {"name": "adam", "lr": 0.01, "weight_decay": 0.1}
    s = new_session(server, optimizer=config, params={"w": w0.tolist(), "b": b0.tolist()})
    opt = create_optimizer(config)
    params = {"w": w0.copy(), "b": b0.copy()}
    state = opt.init(params)
    for i in range(6):
        g = {
            "w": rng.standard_normal((5, 3)).astype(np.float32),
            "b": rng.standard_normal(3).astype(np.float32),
        }
        if i % 2:
            r = step_json(server, s, {"grads": {k: v.tolist() for k, v in g.items()}})
            assert r.status_code == 200, r.text
            body = r.json()
            got = {k: np.asarray(v, dtype=np.float32) for k, v in body["params"].items()}
            assert body["applied"] is True
        else:
            r = step_st(server, s, g)
            assert r.status_code == 200, r.text
            got = stn.load(r.content)
        opt.update(g, state, params)
        assert int(r.headers["optserver-version"]) == i + 1
        for k in params:
            np.testing.assert_array_equal(got[k], params[k])


def test_step_return_modes_and_subsets(server: LiveServer) -> None:
    s = new_session(server, params={"w": [1.0, 1.0], "b": [0.0]})
    r = step_json(server, s, {"grads": {"w": [1.0, 1.0]}}, params={"return": "all"})
    assert set(r.json()["params"]) == {"w", "b"}
    r = step_json(server, s, {"grads": {"w": [1.0, 1.0]}})
    assert set(r.json()["params"]) == {"w"}
    r = step_json(server, s, {"grads": {"w": [1.0, 1.0]}}, params={"return": "none"})
    assert r.json() == {"version": 3, "applied": True}
    r = step_st(server, s, {"b": np.ones(1, np.float32)}, params={"return": "none"})
    assert stn.load(r.content) == {} and r.headers["optserver-version"] == "4"
    info = httpx.get(f"{server.url}/v1/sessions/{s['id']}", headers=auth(s["token"])).json()
    assert {p["name"]: p["step"] for p in info["params"]} == {"w": 3, "b": 1}
    assert_problem(
        step_json(server, s, {"grads": {"w": [1.0, 1.0]}}, params={"return": "x"}), 422, "return"
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_json_numbers_are_the_shortest_that_read_back_as_the_tensor(
    server: LiveServer, dtype: str
) -> None:
    """float32 0.49 is written 0.49, not as the float64 0.49000000953674316 (rank 0 too)."""
    s = new_session(server, params={"w": [1.0, 2.0], "b": 0.5}, dtype=dtype)
    r = step_json(server, s, {"grads": {"w": [0.1, 0.1], "b": 0.1}, "lr": 0.1})
    assert r.status_code == 200, r.text
    kind = np.dtype(dtype).type
    b, w0 = kind(0.5) - kind(0.1) * kind(0.1), kind(1.0) - kind(0.1) * kind(0.1)

    def shortest(value: np.floating[Any]) -> str:  # numpy's shortest round trip in its dtype
        return np.format_float_positional(value, unique=True, trim="-")

    assert f'"b":{shortest(b)}' in r.text and f'"w":[{shortest(w0)},' in r.text, r.text
    answer = r.json()["params"]
    assert kind(answer["b"]) == b and kind(answer["w"][0]) == w0


def test_float16_gradients_for_float32_parameters(server: LiveServer) -> None:
    s = new_session(server, params={"w": [1.0, 2.0, 3.0]})
    g = np.array([0.5, 0.25, -1.0], np.float16)
    r = step_st(server, s, {"w": g})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(
        stn.load(r.content)["w"], np.array([0.95, 1.975, 3.1], np.float32)
    )
    assert_problem(step_st(server, s, {"w": np.ones(3)}), 422, "'w'", "float64", "float32")


def test_optimizer_as_a_service(server: LiveServer) -> None:
    """An empty session: every step carries the weights (the seed's update(w, lr, dw))."""
    s = new_session(
        server, optimizer={"name": "rmsprop", "alpha": 0.9, "eps": 1e-5, "eps_inside_sqrt": True}
    )
    assert s["params"] == []
    rng = np.random.default_rng(1)
    w = rng.standard_normal(4).astype(np.float32)
    opt = create_optimizer(s["optimizer"])
    local = {"w": w.copy()}
    state = opt.init(local)
    for _ in range(3):
        g = rng.standard_normal(4).astype(np.float32)
        r = step_st(server, s, {"w": g, "params/w": w}, {"lr": "0.05"})
        assert r.status_code == 200, r.text
        w = stn.load(r.content)["w"]
        opt.update({"w": g}, state, local, lr=0.05)
        np.testing.assert_array_equal(w, local["w"])
    r = step_json(server, s, {"grads": {"v": [1.0]}, "params": {"v": [2.0]}, "lr": 0.5})
    # The seed's RMSProp, first step: r = (1-rho)*g^2, w -= lr*g/sqrt(eps + r).
    assert r.json()["params"]["v"] == pytest.approx([2 - 0.5 / np.sqrt(0.1 + 1e-5)], rel=1e-6)
    assert_problem(step_json(server, s, {"grads": {"u": [1.0]}}), 422, "'u'", "params")
    assert_problem(
        step_json(server, s, {"grads": {"w": [1.0] * 4}, "params": {"x": [1.0]}}),
        422,
        "'x'",
        "without a gradient",
    )


# --- errors change nothing -----------------------------------------------------------------


def _bad_safetensors(kind: str) -> bytes:
    good = stn.save({"w": np.ones(2, np.float32)})
    header_len = struct.unpack("<Q", good[:8])[0]
    header = orjson.loads(good[8 : 8 + header_len])
    if kind == "length":
        return struct.pack("<Q", 10**12) + good[8:]
    if kind == "json":
        return struct.pack("<Q", 5) + b"{oops" + good[8 + header_len :]
    if kind == "offsets":
        header["w"]["data_offsets"] = [0, 400]
    if kind == "overlap":
        header["v"] = {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}
    if kind == "dtype":
        header["w"]["dtype"] = "I64"
    if kind == "size":
        header["w"]["shape"] = [3]
    raw = orjson.dumps(header)
    return struct.pack("<Q", len(raw)) + raw + good[8 + header_len :]


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda s: {"json": {"grads": {"zz": [1.0, 1.0]}}}, 422, ["'zz'", "'w'"]),
        (lambda s: {"json": {"grads": {"w": [1.0, 1.0, 1.0]}}}, 422, ["'w'", "[3]", "[2]"]),
        (lambda s: {"json": {"grads": {"w": [[1.0, 1.0]]}}}, 422, ["'w'", "[1, 2]"]),
        (lambda s: {"json": {"grads": {}}}, 422, ["no gradients"]),
        (lambda s: {"json": {"grads": {"w": [1.0, 1.0]}, "lr": -1}}, 422, ["lr", "-1"]),
        (lambda s: {"json": {"grads": {"w": [1.0, 1e39]}}}, 422, ["'w'", "NaN or Inf"]),
        (lambda s: {"json": {"grads": {"w": [1.0, 1.0]}, "base_version": 99}}, 409, ["99"]),
        (
            lambda s: {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            ["JSON"],
        ),
        (
            lambda s: {"content": _bad_safetensors("length"), "headers": {"Content-Type": ST}},
            400,
            ["header length"],
        ),
        (
            lambda s: {"content": _bad_safetensors("json"), "headers": {"Content-Type": ST}},
            400,
            ["JSON"],
        ),
        (
            lambda s: {"content": _bad_safetensors("offsets"), "headers": {"Content-Type": ST}},
            400,
            ["data_offsets"],
        ),
        (
            lambda s: {"content": _bad_safetensors("overlap"), "headers": {"Content-Type": ST}},
            400,
            ["overlaps"],
        ),
        (
            lambda s: {"content": _bad_safetensors("dtype"), "headers": {"Content-Type": ST}},
            422,
            ["I64"],
        ),
        (
            lambda s: {"content": _bad_safetensors("size"), "headers": {"Content-Type": ST}},
            400,
            ["'w'"],
        ),
        (lambda s: {"content": b"\x01" * 4, "headers": {"Content-Type": ST}}, 400, ["8-byte"]),
        (
            lambda s: {
                "content": stn.save({"w": np.ones(2, np.float32)}, {"lr": "fast"}),
                "headers": {"Content-Type": ST},
            },
            422,
            ["lr", "fast"],
        ),
    ],
)
def test_rejected_step_changes_nothing(
    server: LiveServer, make: Any, status: int, words: list[str]
) -> None:
    s = new_session(server, optimizer={"name": "adam", "lr": 0.1}, params={"w": [1.0, 2.0]})
    assert step_json(server, s, {"grads": {"w": [0.5, -0.5]}}).status_code == 200
    before = state_of(export(server, s))
    kwargs = make(s)
    headers = {**auth(s["token"]), **kwargs.pop("headers", {})}
    r = httpx.post(f"{server.url}/v1/sessions/{s['id']}/step", headers=headers, **kwargs)
    assert_problem(r, status, *words)
    assert state_of(export(server, s)) == before
    info = httpx.get(f"{server.url}/v1/sessions/{s['id']}", headers=auth(s["token"])).json()
    assert info["version"] == 1
    assert info["counters"]["pushes_rejected"] == 1
    assert sum(info["counters"]["rejected_by_reason"].values()) == 1


def test_nonfinite_policies(server: LiveServer) -> None:
    # JSON has no NaN or Inf: these go as safetensors.
    g = {"w": np.array([1.0, np.nan], np.float32)}
    reject = new_session(server, params={"w": [1.0, 2.0]})
    assert_problem(step_st(server, reject, g), 422, "NaN or Inf", "'w'")
    skip = new_session(server, params={"w": [1.0, 2.0]}, nonfinite="skip")
    r = step_st(server, skip, g)
    assert r.status_code == 200 and stn.load(r.content)["w"].tolist() == [1.0, 2.0]
    assert r.headers["optserver-version"] == "0"
    allow = new_session(server, params={"w": [1.0, 2.0]}, nonfinite="allow")
    r = step_st(server, allow, g)
    assert r.headers["optserver-version"] == "1" and np.isnan(stn.load(r.content)["w"][1])


# --- credentials -----------------------------------------------------------------------------


def test_tokens(server: LiveServer) -> None:
    a = new_session(server, params={"w": [1.0]})
    b = new_session(server, params={"w": [1.0]})
    url = f"{server.url}/v1/sessions/{a['id']}/params"
    assert httpx.get(url, headers=auth(a["token"])).status_code == 200
    p = assert_problem(httpx.get(url), 401, "Bearer")
    assert p["type"].endswith("unauthorized")
    assert httpx.get(url).headers["www-authenticate"].startswith("Bearer")
    assert_problem(httpx.get(url, headers=auth("x" * 43)), 401, a["id"])
    assert_problem(httpx.get(url, headers=auth(b["token"])), 403, "another session")
    assert_problem(httpx.get(url, headers={"Authorization": f"Basic {a['token']}"}), 401)
    assert_problem(
        httpx.get(f"{server.url}/v1/sessions/nope/params", headers=auth(a["token"])), 404, "nope"
    )


def test_admin_key(admin_server: LiveServer) -> None:
    url = admin_server.url + "/v1/sessions"
    assert_problem(httpx.post(url, json={"optimizer": "sgd"}), 401, "admin key")
    assert_problem(httpx.post(url, json={"optimizer": "sgd"}, headers=auth("guess")), 401)
    assert_problem(httpx.get(url), 401)
    s = new_session(admin_server, params={"w": [1.0]})
    assert_problem(httpx.get(url, headers=auth(s["token"])), 401)  # a session token is no admin
    listed = httpx.get(url, headers=admin_server.admin_headers())
    assert listed.status_code == 200 and s["id"] in [x["id"] for x in listed.json()["sessions"]]
    # The admin key opens every session.
    r = httpx.get(f"{url}/{s['id']}/params", headers=admin_server.admin_headers())
    assert r.status_code == 200 and r.json()["params"] == {"w": [1.0]}
    assert_problem(
        httpx.post(url + "/import", content=b"x", headers={"Content-Type": ST}), 401, "admin key"
    )


# --- limits ----------------------------------------------------------------------------------


def test_body_size_limit(admin_server: LiveServer) -> None:
    s = new_session(admin_server, params={"w": [1.0]})
    url = f"{admin_server.url}/v1/sessions/{s['id']}/params"
    big = stn.save({"w": np.ones(300_000, np.float32)})  # 1.2 MB > the 1 MiB limit
    p = assert_problem(
        httpx.put(url, content=big, headers={**auth(s["token"]), "Content-Type": ST}),
        413,
        str(1 << 20),
    )
    assert p["type"].endswith("payload-too-large")

    def chunks() -> Any:  # no Content-Length: the limit is enforced while streaming
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = httpx.put(url, content=chunks(), headers={**auth(s["token"]), "Content-Type": ST})
    assert_problem(r, 413)
    assert pull(admin_server, s)["w"].tolist() == [1.0]


def test_tensor_limits(admin_server: LiveServer) -> None:
    s = new_session(admin_server)
    url = f"{admin_server.url}/v1/sessions/{s['id']}/params"
    many = {f"t{i}": [1.0] for i in range(9)}
    assert_problem(httpx.put(url, json={"params": many}, headers=auth(s["token"])), 429, "8")
    huge = stn.save({"w": np.ones(100_001, np.float16)})
    assert_problem(
        httpx.put(url, content=huge, headers={**auth(s["token"]), "Content-Type": ST}),
        422,
        "100001",
        "100000",
    )
    deep = {"params": {"w": [[[[[1.0]]]]]}}
    assert_problem(httpx.put(url, json=deep, headers=auth(s["token"])), 422, "deeper")
    assert (
        httpx.get(f"{admin_server.url}/v1/sessions/{s['id']}", headers=auth(s["token"])).json()[
            "params"
        ]
        == []
    )


def test_session_count_limit() -> None:
    with live_server(max_sessions=2) as server:
        new_session(server)
        s = new_session(server)
        assert_problem(httpx.post(server.url + "/v1/sessions", json={"optimizer": "sgd"}), 429, "2")
        httpx.delete(f"{server.url}/v1/sessions/{s['id']}", headers=auth(s["token"]))
        new_session(server)


# --- modes, schedules, idempotency -------------------------------------------------------------


def test_ssp_refuses_stale_pushes(server: LiveServer) -> None:
    s = new_session(server, params={"w": [0.0]}, mode={"name": "ssp", "max_staleness": 1})
    for _ in range(3):
        assert step_json(server, s, {"grads": {"w": [1.0]}}).status_code == 200
    assert step_json(server, s, {"grads": {"w": [1.0]}, "base_version": 2}).status_code == 200
    p = assert_problem(
        step_json(server, s, {"grads": {"w": [1.0]}, "base_version": 1}),
        409,
        "version 1",
        "max_staleness",
    )
    assert p["type"].endswith("stale-gradient") and p["current_version"] == 4
    r = step_st(server, s, {"w": np.ones(1, np.float32)}, {"base_version": "4"})
    assert r.status_code == 200


def test_schedule_and_lr_override(server: LiveServer) -> None:
    s = new_session(
        server,
        optimizer={"name": "sgd", "lr": 1.0},
        params={"w": [0.0]},
        schedule={"name": "step", "step_size": 2, "gamma": 0.5},
    )
    values = []
    for _ in range(4):
        values.append(step_json(server, s, {"grads": {"w": [1.0]}}).json()["params"]["w"][0])
    assert values == [-1.0, -2.0, -2.5, -3.0]  # lr 1, 1, 0.5, 0.5
    r = step_json(server, s, {"grads": {"w": [1.0]}, "lr": 0.125})
    assert r.json()["params"]["w"] == [-3.125]
    info = httpx.get(f"{server.url}/v1/sessions/{s['id']}", headers=auth(s["token"])).json()
    assert info["lr"] == 0.25 and info["version"] == 5


def test_idempotent_retry(server: LiveServer) -> None:
    s = new_session(server, params={"w": [1.0, 2.0]})
    headers = {"Idempotency-Key": "push-1"}
    first = step_json(server, s, {"grads": {"w": [1.0, 1.0]}}, headers=headers)
    again = step_json(server, s, {"grads": {"w": [1.0, 1.0]}}, headers=headers)
    assert first.content == again.content and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    other = step_json(
        server, s, {"grads": {"w": [1.0, 1.0]}}, headers={"Idempotency-Key": "push-2"}
    )
    assert other.json()["version"] == 2
    replay = step_json(server, s, {"grads": {"w": [1.0, 1.0]}}, headers=headers)
    assert replay.content == first.content  # still the original answer, after other pushes
    assert pull(server, s)["w"].tolist() == pytest.approx([0.8, 1.8])


def test_concurrent_pushes_are_applied_once_each_in_order(server: LiveServer) -> None:
    threads, pushes = 8, 25
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal(1000)
    s = new_session(
        server, optimizer={"name": "sgd", "lr": 1.0}, params={"w": w0.tolist()}, dtype="float64"
    )
    grads = rng.standard_normal((threads, pushes, 1000))
    versions: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client() as client:
            for i in range(pushes):
                r = client.post(
                    f"{server.url}/v1/sessions/{s['id']}/step",
                    content=stn.save({"w": grads[k, i]}),
                    headers={**auth(s["token"]), "Content-Type": ST, "Accept": ST},
                    params={"return": "none"},
                )
                with lock:
                    if r.status_code != 200:
                        errors.append(r.text)
                    versions.append(int(r.headers.get("optserver-version", -1)))

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    assert sorted(versions) == list(range(1, threads * pushes + 1))
    final = pull(server, s)["w"]
    np.testing.assert_allclose(final, w0 - grads.sum(axis=(0, 1)), rtol=1e-12, atol=1e-12)


# --- state export and import ---------------------------------------------------------------


def test_export_import_continues_bit_for_bit(server: LiveServer, admin_server: LiveServer) -> None:
    rng = np.random.default_rng(3)
    config = {"name": "adam", "lr": 0.01, "amsgrad": True}
    s = new_session(
        server,
        optimizer=config,
        params={"w": rng.standard_normal(6).tolist()},
        schedule={"name": "cosine", "T_max": 10},
    )
    grads = rng.standard_normal((8, 6)).astype(np.float32)
    for g in grads[:4]:
        assert step_st(server, s, {"w": g}).status_code == 200
    blob = export(server, s)
    assert stn.load(blob).keys() == {
        "params/w",
        "state/w/exp_avg",
        "state/w/exp_avg_sq",
        "state/w/max_exp_avg_sq",
    }
    # Import on another server (with an admin key), then continue both the same way.
    r = httpx.post(
        admin_server.url + "/v1/sessions/import",
        content=blob,
        params={"name": "copy"},
        headers={**admin_server.admin_headers(), "Content-Type": ST},
    )
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["id"] != s["id"] and t["version"] == 4 and t["name"] == "copy"
    assert t["schedule"]["T_max"] == 10 and t["optimizer"] == s["optimizer"] | {"amsgrad": True}
    for g in grads[4:]:
        a = step_st(server, s, {"w": g})
        b = step_st(admin_server, t, {"w": g})
        assert a.content == b.content
    # Optimizer state too: both sessions' exports hold the same arrays.
    ours, theirs = stn.load(export(server, s)), stn.load(export(admin_server, t))
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_import_rejects_broken_exports(admin_server: LiveServer) -> None:
    url = admin_server.url + "/v1/sessions/import"
    headers = {**admin_server.admin_headers(), "Content-Type": ST}
    s = new_session(admin_server, optimizer="adam", params={"w": [1.0, 2.0]})
    step_json(admin_server, s, {"grads": {"w": [1.0, 1.0]}})
    blob = export(admin_server, s)
    tensors = stn.load(blob)
    with httpx.Client() as client:
        count = len(
            client.get(
                admin_server.url + "/v1/sessions", headers=admin_server.admin_headers()
            ).json()["sessions"]
        )
        meta = httpx.get(
            f"{admin_server.url}/v1/sessions/{s['id']}/state", headers=auth(s["token"])
        ).content
        assert meta == blob
        assert_problem(
            client.post(url, content=stn.save(tensors), headers=headers), 400, "optserver.format"
        )
        broken = dict(tensors)
        broken["state/w/exp_avg"] = np.zeros(3, np.float32)
        header = orjson.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])["__metadata__"]
        assert_problem(
            client.post(url, content=stn.save(broken, header), headers=headers),
            422,
            "exp_avg",
            "[3]",
        )
        after = len(
            client.get(
                admin_server.url + "/v1/sessions", headers=admin_server.admin_headers()
            ).json()["sessions"]
        )
    assert after == count


# --- operations --------------------------------------------------------------------------------


def test_health_metrics_and_problem_routes(server: LiveServer) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json()["status"] == "ok"
    s = new_session(server, params={"w": [1.0]})
    step_json(server, s, {"grads": {"w": [1.0]}})
    step_json(server, s, {"grads": {"w": [1.0, 2.0]}})
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "optserver_steps_applied_total",
        "optserver_pushes_rejected_total{reason=",
        "optserver_step_seconds_bucket",
        'optserver_http_bytes_total{direction="in"}',
        "optserver_sessions ",
        "optserver_session_memory_bytes",
    ):
        assert name in text, name
    assert_problem(httpx.get(server.url + "/nope"), 404, "/nope")
    assert_problem(httpx.put(server.url + "/healthz"), 405, "PUT")


def test_openapi_describes_every_route(server: LiveServer) -> None:
    schema = httpx.get(server.url + "/openapi.json").json()
    paths = schema["paths"]
    expected = {
        ("post", "/v1/sessions"),
        ("get", "/v1/sessions"),
        ("get", "/v1/sessions/{session_id}"),
        ("patch", "/v1/sessions/{session_id}"),
        ("delete", "/v1/sessions/{session_id}"),
        ("put", "/v1/sessions/{session_id}/params"),
        ("get", "/v1/sessions/{session_id}/params"),
        ("post", "/v1/sessions/{session_id}/step"),
        ("get", "/v1/sessions/{session_id}/state"),
        ("post", "/v1/sessions/import"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    }
    assert {(m, p) for p, ops in paths.items() for m in ops} == expected
    step = paths["/v1/sessions/{session_id}/step"]["post"]
    assert set(step["requestBody"]["content"]) == {"application/json", ST}
    assert "StepRequest" in schema["components"]["schemas"]
    assert {"grads", "params", "lr", "base_version", "worker"} <= set(
        schema["components"]["schemas"]["StepRequest"]["properties"]
    )


def test_event_loop_stays_responsive_during_a_large_step(server: LiveServer) -> None:
    n = 10_000_000
    s = new_session(server, optimizer="adam")
    put = httpx.put(
        f"{server.url}/v1/sessions/{s['id']}/params",
        content=stn.save({"w": np.zeros(n, np.float32)}),
        headers={**auth(s["token"]), "Content-Type": ST},
        timeout=60,
    )
    assert put.status_code == 200
    g = stn.save({"w": np.ones(n, np.float32)})
    stop = threading.Event()

    def push() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                client.post(
                    f"{server.url}/v1/sessions/{s['id']}/step",
                    content=g,
                    headers={**auth(s["token"]), "Content-Type": ST, "Accept": ST},
                )

    pusher = threading.Thread(target=push)
    pusher.start()
    latencies = []
    try:
        time.sleep(0.2)
        with httpx.Client() as client:
            for _ in range(20):
                start = time.perf_counter()
                assert client.get(server.url + "/healthz").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)
    finally:
        stop.set()
        pusher.join()
    # A 10M-parameter round trip moves 80 MB; /healthz must not wait for it.
    assert sorted(latencies)[len(latencies) // 2] < 0.05, latencies
