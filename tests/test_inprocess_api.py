"""The HTTP API in process: the app over httpx's ASGI transport, with its lifespan running.

No socket and no child process: each test builds an app from ``Settings``, runs its lifespan
(the maintenance task, the data directory's close) as a server would, and talks to it through
``httpx.ASGITransport``. Expected weights are computed here from the optimizers' update rules,
with values chosen so that float32 represents every intermediate result exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import safetensors.numpy as stn
from pydantic import SecretStr

from optserver.api.app import create_app
from optserver.config import Settings

ST = "application/octet-stream"
JSON = "application/json"
PROBLEM = "application/problem+json"
ADMIN = "in-process-admin-key"

Scenario = Callable[[httpx.AsyncClient], Awaitable[None]]


def run(scenario: Scenario, **settings: Any) -> None:
    """Run ``scenario`` against a fresh app, between its lifespan's start and end."""

    async def main() -> None:
        app = create_app(Settings(**settings))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://optserver.test"
            ) as client:
                await scenario(client)

    asyncio.run(main())


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    body.setdefault("optimizer", {"name": "sgd", "lr": 0.5})
    r = await client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    assert r.headers["content-type"] == JSON
    created: dict[str, Any] = r.json()
    assert r.headers["Optserver-Version"] == str(created["version"]) == "0"
    return created


async def step(
    client: httpx.AsyncClient, s: dict[str, Any], body: dict[str, Any], **kw: Any
) -> httpx.Response:
    headers = {**auth(s["token"]), **kw.pop("headers", {})}
    return await client.post(f"/v1/sessions/{s['id']}/step", json=body, headers=headers, **kw)


async def step_st(
    client: httpx.AsyncClient,
    s: dict[str, Any],
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
    **kw: Any,
) -> httpx.Response:
    headers = {**auth(s["token"]), "Content-Type": ST, "Accept": ST, **kw.pop("headers", {})}
    return await client.post(
        f"/v1/sessions/{s['id']}/step",
        content=stn.save(tensors, metadata),
        headers=headers,
        **kw,
    )


async def pull(client: httpx.AsyncClient, s: dict[str, Any]) -> tuple[int, dict[str, np.ndarray]]:
    r = await client.get(
        f"/v1/sessions/{s['id']}/params", headers={**auth(s["token"]), "Accept": ST}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == ST
    return int(r.headers["Optserver-Version"]), stn.load(r.content)


def metadata_of(document: bytes) -> dict[str, str]:
    length = int.from_bytes(document[:8], "little")
    header: dict[str, Any] = orjson.loads(document[8 : 8 + length])
    return dict(header.get("__metadata__", {}))


def assert_problem(r: httpx.Response, status: int, slug: str | None) -> dict[str, Any]:
    """An RFC 9457 problem: its media type, the members it must have, the status repeated."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = r.json()
    assert problem["status"] == status
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    expected = "about:blank" if slug is None else f"urn:optserver:problem:{slug}"
    assert problem["type"] == expected
    return problem


# --- health -----------------------------------------------------------------------------------


def test_health_readiness_and_metrics() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "sessions": 0, "journal": "none"}
        s = await create(client, params={"w": [1.0, 2.0]})
        assert (await step(client, s, {"grads": {"w": [0.5, 0.5]}})).status_code == 200
        assert (await client.get("/readyz")).json()["sessions"] == 1
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        lines = metrics.text.splitlines()
        assert "optserver_steps_applied_total 1.0" in lines
        assert "optserver_pushes_received_total 1.0" in lines
        assert "optserver_sessions 1.0" in lines

    run(scenario)


# --- both encodings end to end ------------------------------------------------------------------


def test_json_session_lifecycle() -> None:
    """sgd: w <- w - lr * g, in JSON from creation to deletion."""

    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(client, name="json", params={"w": [1.0, 2.0], "b": 3.0})
        assert s["name"] == "json" and isinstance(s["token"], str)
        info = (await client.get(f"/v1/sessions/{s['id']}", headers=auth(s["token"]))).json()
        assert {p["name"]: (p["shape"], p["dtype"], p["step"]) for p in info["params"]} == {
            "w": ([2], "float32", 0),
            "b": ([], "float32", 0),
        }
        assert "token" not in info

        r = await step(client, s, {"grads": {"w": [0.5, -1.0]}})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == JSON
        assert r.headers["Optserver-Version"] == "1"
        assert r.json() == {"version": 1, "applied": True, "params": {"w": [0.75, 2.5]}}

        r = await step(client, s, {"grads": {"b": 1.0}}, params={"return": "all"})
        assert r.json() == {"version": 2, "applied": True, "params": {"w": [0.75, 2.5], "b": 2.5}}
        r = await step(client, s, {"grads": {"b": 1.0}}, params={"return": "none"})
        assert r.json() == {"version": 3, "applied": True}

        r = await client.get(f"/v1/sessions/{s['id']}/params", headers=auth(s["token"]))
        assert r.json() == {"version": 3, "params": {"w": [0.75, 2.5], "b": 2.0}}
        r = await client.get(
            f"/v1/sessions/{s['id']}/params", params={"names": "b"}, headers=auth(s["token"])
        )
        assert r.json() == {"version": 3, "params": {"b": 2.0}}

        listed = (await client.get("/v1/sessions")).json()["sessions"]
        assert [x["id"] for x in listed] == [s["id"]]
        assert listed[0]["counters"]["steps_applied"] == 3

        r = await client.delete(f"/v1/sessions/{s['id']}", headers=auth(s["token"]))
        assert r.status_code == 204 and r.content == b""
        gone = await client.get(f"/v1/sessions/{s['id']}", headers=auth(s["token"]))
        assert_problem(gone, 404, "unknown-session")
        assert (await client.get("/v1/sessions")).json() == {"sessions": []}

    run(scenario)


def test_safetensors_end_to_end() -> None:
    """Weights put, pushed and pulled as safetensors keep their dtype; metadata carries the
    version and whether the step applied."""

    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(client)
        w = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float64)
        r = await client.put(
            f"/v1/sessions/{s['id']}/params",
            content=stn.save({"w": w}),
            headers={**auth(s["token"]), "Content-Type": ST},
        )
        assert r.status_code == 200, r.text
        assert r.json() == {
            "version": 0,
            "params": [
                {"name": "w", "shape": [2, 2], "dtype": "float64", "step": 0, "group": "default"}
            ],
        }
        g = np.array([[0.5, 1.0], [-2.0, 0.25]], dtype=np.float64)
        r = await step_st(client, s, {"w": g})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == ST
        assert metadata_of(r.content) == {"version": "1", "applied": "true"}
        answered = stn.load(r.content)["w"]
        assert answered.dtype == np.float64
        np.testing.assert_array_equal(answered, w - 0.5 * g)

        # The current weights ride along under params/NAME; lr and base_version as metadata.
        v = np.array([1.0, 1.0], dtype=np.float32)
        r = await step_st(
            client,
            s,
            {"v": np.array([4.0, -4.0], dtype=np.float32), "params/v": v},
            {"lr": "0.25", "base_version": "1", "worker": "st"},
        )
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(stn.load(r.content)["v"], np.array([0.0, 2.0], np.float32))

        version, pulled = await pull(client, s)
        assert version == 2
        assert set(pulled) == {"w", "v"}
        np.testing.assert_array_equal(pulled["w"], w - 0.5 * g)

        # JSON in, safetensors out and the other way round.
        r = await step(client, s, {"grads": {"v": [1.0, 1.0]}}, headers={"Accept": ST})
        assert r.headers["content-type"] == ST
        np.testing.assert_array_equal(stn.load(r.content)["v"], np.array([-0.5, 1.5]))
        r = await step_st(client, s, {"v": np.ones(2, np.float32)}, headers={"Accept": JSON})
        assert r.json() == {"version": 4, "applied": True, "params": {"v": [-1.0, 1.0]}}

    run(scenario)


def test_momentum_and_adam_follow_their_update_rules() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        # sgd with momentum mu: b1 = g1, b2 = mu*b1 + g2, w <- w - lr*b.
        s = await create(
            client,
            optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.5},
            params={"w": [1.0, -1.0]},
        )
        g1, g2 = np.array([1.0, 2.0]), np.array([0.5, -1.0])
        w = np.array([1.0, -1.0]) - 0.5 * g1
        assert (await step(client, s, {"grads": {"w": g1.tolist()}})).json()["params"] == {
            "w": w.tolist()
        }
        w = w - 0.5 * (0.5 * g1 + g2)
        assert (await step(client, s, {"grads": {"w": g2.tolist()}})).json()["params"] == {
            "w": w.tolist()
        }

        # adam's first step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected to g and g^2, so
        # w <- w - lr * g / (|g| + eps).
        a = await create(
            client,
            optimizer={"name": "adam", "lr": 0.01, "eps": 1e-8},
            params={"w": [1.0, 2.0, 3.0]},
            dtype="float64",
        )
        g = np.array([0.5, -0.25, 4.0])
        r = await step(client, a, {"grads": {"w": g.tolist()}})
        expected = np.array([1.0, 2.0, 3.0]) - 0.01 * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(r.json()["params"]["w"], expected, rtol=1e-15)

    run(scenario)


def test_patch_changes_options_but_not_the_version() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(client, params={"w": [1.0]})
        assert (await step(client, s, {"grads": {"w": [1.0]}})).json()["params"] == {"w": [0.5]}
        r = await client.patch(
            f"/v1/sessions/{s['id']}",
            json={"optimizer": {"lr": 0.25}, "schedule": {"name": "step", "step_size": 1}},
            headers=auth(s["token"]),
        )
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["version"] == 1 and info["optimizer"]["lr"] == 0.25
        # StepLR after one step with gamma 0.1: the next step uses 0.25 * 0.1.
        assert info["lr"] == pytest.approx(0.025)
        r = await client.patch(
            f"/v1/sessions/{s['id']}", json={"schedule": None}, headers=auth(s["token"])
        )
        assert r.json()["schedule"] is None and r.json()["lr"] == 0.25
        assert (await step(client, s, {"grads": {"w": [1.0]}})).json()["params"] == {"w": [0.25]}
        r = await client.patch(
            f"/v1/sessions/{s['id']}",
            json={"optimizer": {"name": "adam"}},
            headers=auth(s["token"]),
        )
        assert_problem(r, 422, "invalid-request")

    run(scenario)


def test_export_and_import_continue_bit_for_bit() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(
            client, optimizer={"name": "adam", "lr": 0.1}, params={"w": [0.3, -0.7, 1.1]}
        )
        for g in ([0.1, 0.2, 0.3], [-0.3, 0.05, 0.9]):
            assert (await step(client, s, {"grads": {"w": g}})).status_code == 200
        r = await client.get(f"/v1/sessions/{s['id']}/state", headers=auth(s["token"]))
        assert r.status_code == 200 and r.headers["content-type"] == ST
        assert r.headers["Optserver-Version"] == "2"
        r = await client.post(
            "/v1/sessions/import", content=r.content, params={"name": "copy"},
            headers={"Content-Type": ST},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        copy = r.json()
        assert copy["id"] != s["id"] and copy["name"] == "copy" and copy["version"] == 2
        push = {"grads": {"w": [0.5, 0.5, -0.5]}}
        one, other = await step(client, s, push), await step(client, copy, push)
        assert one.content == other.content
        assert one.json()["version"] == 3

    run(scenario)


# --- idempotent replay --------------------------------------------------------------------------


def test_idempotent_replay_in_either_encoding() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(client, params={"w": [1.0, 2.0]})
        key = {"Idempotency-Key": "push-1"}
        body = {"grads": {"w": [1.0, 1.0]}}
        first = await step(client, s, body, headers=key)
        assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
        assert first.json() == {"version": 1, "applied": True, "params": {"w": [0.5, 1.5]}}

        again = await step(client, s, body, headers=key)
        assert again.status_code == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.content == first.content
        # The retry may ask for the other encoding: the same answer, as safetensors.
        binary = await step(client, s, body, headers={**key, "Accept": ST})
        assert binary.headers["Idempotent-Replayed"] == "true"
        assert metadata_of(binary.content) == {"version": "1", "applied": "true"}
        np.testing.assert_array_equal(stn.load(binary.content)["w"], [0.5, 1.5])
        assert (await pull(client, s))[0] == 1  # nothing applied twice

        # The same key with another request changes nothing and says so.
        other = await step(client, s, {"grads": {"w": [2.0, 2.0]}}, headers=key)
        problem = assert_problem(other, 422, "idempotency-key-reused")
        assert problem["key"] == "push-1"
        version, weights = await pull(client, s)
        assert version == 1
        np.testing.assert_array_equal(weights["w"], [0.5, 1.5])

        # A safetensors push is remembered too, whatever the answer's encoding.
        g = {"w": np.array([1.0, 1.0], np.float32)}
        st_first = await step_st(client, s, g, headers={"Idempotency-Key": "push-2"})
        st_again = await step_st(client, s, g, headers={"Idempotency-Key": "push-2"})
        assert st_again.headers["Idempotent-Replayed"] == "true"
        assert st_again.content == st_first.content
        assert (await pull(client, s))[0] == 2

    run(scenario)


# --- modes ----------------------------------------------------------------------------------------


def test_sync_round_applies_the_mean_once() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(
            client,
            mode={"name": "sync", "workers": 2, "timeout_s": 30},
            params={"w": [1.0, 1.0]},
        )
        first = asyncio.create_task(step(client, s, {"grads": {"w": [1.0, 0.0]}, "worker": "a"}))
        await asyncio.sleep(0.25)  # time to be decoded and checked, and to join the round
        assert not first.done()  # waits for the second worker
        duplicate = await step(client, s, {"grads": {"w": [9.0, 9.0]}, "worker": "a"})
        problem = assert_problem(duplicate, 409, "duplicate-push")
        assert problem["round"] == 1
        second = await step(client, s, {"grads": {"w": [0.0, 3.0]}, "worker": "b"})
        a, b = (await first).json(), second.json()
        w = (1.0 - 0.5 * np.array([0.5, 1.5])).tolist()  # the mean gradient, one step
        assert a == b == {"version": 1, "applied": True, "params": {"w": w}}

        # A gradient for a round that has closed is stale.
        stale = await step(
            client, s, {"grads": {"w": [1.0, 1.0]}, "worker": "a", "base_version": 0}
        )
        assert assert_problem(stale, 409, "stale-gradient")["current_version"] == 1

    run(scenario)


def test_sync_round_deadline_with_and_without_enough_workers() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        enough = await create(
            client,
            mode={"name": "sync", "workers": 3, "timeout_s": 0.2, "min_workers": 1},
            params={"w": [2.0]},
        )
        r = await step(client, enough, {"grads": {"w": [2.0]}, "worker": "only"})
        assert r.json() == {"version": 1, "applied": True, "params": {"w": [1.0]}}

        short = await create(
            client, mode={"name": "sync", "workers": 2, "timeout_s": 0.2}, params={"w": [2.0]}
        )
        r = await step(client, short, {"grads": {"w": [2.0]}, "worker": "alone"})
        problem = assert_problem(r, 409, "round-failed")
        assert (problem["workers"], problem["needed"]) == (1, 2)
        assert (await pull(client, short))[0] == 0

    run(scenario)


def test_ssp_bounds_staleness_and_scales_the_rate() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(
            client,
            mode={"name": "ssp", "max_staleness": 1, "staleness_scaling": "inverse"},
            params={"w": [4.0]},
        )
        # base_version 0 at version 0: staleness 0, lr 0.5.
        r = await step(client, s, {"grads": {"w": [1.0]}, "base_version": 0})
        assert r.json()["params"] == {"w": [3.5]}
        # base_version 0 at version 1: staleness 1, lr 0.5 / (1 + 1).
        r = await step(client, s, {"grads": {"w": [1.0]}, "base_version": 0})
        assert r.json() == {"version": 2, "applied": True, "params": {"w": [3.25]}}
        # base_version 0 at version 2: staleness 2 > 1.
        r = await step(client, s, {"grads": {"w": [1.0]}, "base_version": 0})
        assert assert_problem(r, 409, "stale-gradient")["current_version"] == 2
        assert (await pull(client, s))[0] == 2

    run(scenario)


# --- errors as problems ---------------------------------------------------------------------------


def test_errors_are_problems() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(client, params={"w": [1.0, 2.0]})
        other = await create(client)
        sid = s["id"]
        url = f"/v1/sessions/{sid}"

        assert_problem(await client.get(url), 401, "unauthorized")
        assert (await client.get(url)).headers["WWW-Authenticate"].startswith("Bearer")
        assert_problem(await client.get(url, headers=auth("not-a-token")), 401, "unauthorized")
        assert_problem(await client.get(url, headers=auth(other["token"])), 403, "forbidden")
        missing = await client.get("/v1/sessions/0000", headers=auth(s["token"]))
        assert_problem(missing, 404, "unknown-session")
        assert_problem(await client.get("/v1/nowhere"), 404, None)
        assert_problem(await client.put("/healthz"), 405, None)

        bad = await client.post(
            f"{url}/step", content=b'{"grads": {"w": [1, 2', headers={**auth(s["token"]),
            "Content-Type": JSON},
        )  # fmt: skip
        assert_problem(bad, 400, "malformed-json")
        truncated = await client.post(
            f"{url}/step", content=b"\x10\x00", headers={**auth(s["token"]), "Content-Type": ST}
        )
        assert_problem(truncated, 400, "malformed-body")
        text = await client.post(
            f"{url}/step",
            content=b"w=1",
            headers={**auth(s["token"]), "Content-Type": "text/plain"},
        )
        assert_problem(text, 415, "unsupported-media-type")
        xml = await step(client, s, {"grads": {"w": [1.0, 1.0]}}, headers={"Accept": "text/xml"})
        assert_problem(xml, 406, "not-acceptable")
        shape = await step(client, s, {"grads": {"w": [1.0, 1.0, 1.0]}})
        assert assert_problem(shape, 422, "shape-mismatch")["tensor"] == "w"
        unknown = await client.post("/v1/sessions", json={"optimizer": {"name": "nope"}})
        assert assert_problem(unknown, 422, "invalid-hyperparameter")["option"] == "name"
        nan = await step_st(client, s, {"w": np.array([np.inf, 1.0], np.float32)})
        assert assert_problem(nan, 422, "nonfinite")["tensor"] == "w"
        pulled = await client.get(f"{url}/params", params={"names": "w"}, headers={
            **auth(s["token"]), "Idempotency-Key": "k" * 300})  # fmt: skip
        assert pulled.status_code == 200  # only step reads the key
        long_key = await step(client, s, {"grads": {"w": [1.0, 1.0]}}, headers={
            "Idempotency-Key": "k" * 300})  # fmt: skip
        assert assert_problem(long_key, 422, "invalid-request")["errors"]

        # None of it changed the session.
        version, weights = await pull(client, s)
        assert version == 0
        np.testing.assert_array_equal(weights["w"], [1.0, 2.0])

    run(scenario)


def test_limits_are_problems() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(client, params={"w": [1.0]})
        big = await client.put(
            f"/v1/sessions/{s['id']}/params",
            content=stn.save({"x": np.zeros(2048, np.float32)}),
            headers={**auth(s["token"]), "Content-Type": ST},
        )
        assert_problem(big, 413, "payload-too-large")
        await create(client)
        third = await client.post("/v1/sessions", json={"optimizer": "sgd"})
        assert_problem(third, 429, "too-many-sessions")

    run(scenario, max_body_bytes=4096, max_sessions=2)


def test_admin_key_guards_the_server_wide_routes() -> None:
    admin = auth(ADMIN)

    async def scenario(client: httpx.AsyncClient) -> None:
        refused = await client.post("/v1/sessions", json={"optimizer": "sgd"})
        assert_problem(refused, 401, "unauthorized")
        r = await client.post("/v1/sessions", json={"optimizer": "sgd"}, headers=admin)
        assert r.status_code == 201, r.text
        s = r.json()
        assert_problem(await client.get("/v1/sessions"), 401, "unauthorized")
        wrong = await client.get("/v1/sessions", headers=auth(s["token"]))
        assert_problem(wrong, 401, "unauthorized")
        listed = await client.get("/v1/sessions", headers=admin)
        assert [x["id"] for x in listed.json()["sessions"]] == [s["id"]]
        # The admin key opens every session; metrics need it too.
        assert (await client.get(f"/v1/sessions/{s['id']}", headers=admin)).status_code == 200
        assert_problem(await client.get("/metrics"), 401, "unauthorized")
        assert (await client.get("/metrics", headers=admin)).status_code == 200

    run(scenario, admin_key=SecretStr(ADMIN))


# --- a data directory through the app -------------------------------------------------------------


def test_data_directory_survives_the_app(tmp_path: Path) -> None:
    """Changes made through one app are there, bit for bit, in the next on the same directory."""
    seen: dict[str, Any] = {}

    async def before(client: httpx.AsyncClient) -> None:
        s = await create(client, optimizer={"name": "adam", "lr": 0.1}, params={"w": [0.5, -0.5]})
        for g in ([0.1, 0.2], [0.3, -0.4]):
            assert (await step(client, s, {"grads": {"w": g}})).status_code == 200
        r = await client.get(f"/v1/sessions/{s['id']}/state", headers=auth(s["token"]))
        seen.update(session=s, state=r.content)
        assert (await client.get("/readyz")).json()["journal"] == "ok"

    async def after(client: httpx.AsyncClient) -> None:
        s = seen["session"]
        r = await client.get(f"/v1/sessions/{s['id']}/state", headers=auth(s["token"]))
        assert r.status_code == 200
        assert r.content == seen["state"]

    run(before, data_dir=tmp_path, fsync="never")
    run(after, data_dir=tmp_path, fsync="never")
