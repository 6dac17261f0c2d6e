"""The service on its own (no HTTP server): a push end to end, its bookkeeping and metrics; and
every JSON answer of every route, in process, against the model that documents it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import numpy as np
import orjson
import pytest
from optserver_client import safetensors_io
from pydantic import BaseModel

from optserver import schemas
from optserver.api.app import create_app
from optserver.config import Settings
from optserver.coordinator import Coordinator
from optserver.errors import ProblemError
from optserver.metrics import Metrics
from optserver.replies import Format
from optserver.service import Service
from optserver.session import Session
from optserver.store import SessionStore, StoreLimits
from optserver.wire import Buffer

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def service() -> tuple[Service, Session]:
    settings = Settings()
    store = SessionStore(StoreLimits.from_settings(settings))
    session, _ = store.create(
        optimizer={"name": "sgd", "lr": 0.5}, params={"w": np.ones(2, np.float32)}
    )
    return Service(store, Coordinator(), settings, Metrics(store)), session


def body(payload: object, fmt: Format = "json") -> Any:
    async def read() -> tuple[Format, Buffer]:
        return fmt, payload if isinstance(payload, bytes) else orjson.dumps(payload)

    return read


def test_a_push_end_to_end() -> None:
    svc, session = service()
    reply = run(svc.push(session, body({"grads": {"w": [1.0, 2.0]}}), fmt_out="json"))
    assert orjson.loads(bytes(reply.body)) == {
        "version": 1,
        "applied": True,
        "params": {"w": [0.5, 0.0]},
    }
    assert reply.version == session.version == 1 and not reply.replayed


def test_a_binary_answer_is_a_safetensors_document() -> None:
    svc, session = service()
    grads = safetensors_io.encode({"w": np.ones(2, np.float32)}, {"lr": "1.0"})
    reply = run(svc.push(session, body(bytes(grads), "binary"), fmt_out="binary", returns="all"))
    tensors, metadata = safetensors_io.decode(reply.body)
    np.testing.assert_array_equal(tensors["w"], [0.0, 0.0])
    assert metadata == {"version": "1", "applied": "true"}


def test_a_retry_with_the_key_replays_and_counts_once() -> None:
    svc, session = service()
    push = {"grads": {"w": [1.0, 0.0]}}
    first = run(svc.push(session, body(push), fmt_out="json", key="k"))
    again = run(svc.push(session, body(push), fmt_out="json", key="k"))
    assert again.replayed and bytes(again.body) == bytes(first.body)
    assert session.version == 1 and session.steps_applied == 1
    assert svc.metrics.replays._value.get() == 1  # prometheus_client keeps it there


def test_an_undecodable_push_is_counted_and_changes_nothing() -> None:
    svc, session = service()
    with pytest.raises(ProblemError) as refused:
        run(svc.push(session, body(b"{not json"), fmt_out="json"))
    assert refused.value.slug == "malformed-json"
    assert session.rejected["malformed-json"] == 1 and session.version == 0
    np.testing.assert_array_equal(session.params["w"], [1.0, 1.0])


def test_put_params_configure_and_pull() -> None:
    svc, session = service()
    weights = run(svc.put_params(session, orjson.dumps({"params": {"w": [3.0, 4.0]}}), "json"))
    assert weights.version == 0 and weights.params[0]["name"] == "w"
    info = run(svc.configure(session, orjson.dumps({"optimizer": {"lr": 0.25}})))
    assert info["optimizer"]["lr"] == 0.25
    pulled = run(svc.pull(session, ["w"], "json"))
    assert orjson.loads(bytes(pulled.body)) == {"version": 0, "params": {"w": [3.0, 4.0]}}


# --- every JSON answer against its documented model ------------------------------------------


def documented(app: Any, method: str, path: str, status: int) -> type[BaseModel]:
    """The model the OpenAPI schema announces for this answer."""
    answer = app.openapi()["paths"][path][method.lower()]["responses"][str(status)]
    ref = answer["content"]["application/json"]["schema"]["$ref"]
    model = getattr(schemas, ref.rsplit("/", 1)[1])
    assert isinstance(model, type) and issubclass(model, BaseModel)
    return model


def test_every_json_answer_matches_its_documented_model() -> None:
    app = create_app(Settings())

    async def main() -> list[tuple[str, str, httpx.Response]]:
        transport = httpx.ASGITransport(app=app)
        calls: list[tuple[str, str, httpx.Response]] = []
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            r = await c.post(
                "/v1/sessions",
                json={"optimizer": "adam", "params": {"w": [1.0, 2.0]}},
            )
            calls.append(("POST", "/v1/sessions", r))
            s = r.json()
            auth = {"Authorization": f"Bearer {s['token']}"}
            one = "/v1/sessions/{session_id}"
            url = f"/v1/sessions/{s['id']}"
            step = {"grads": {"w": [1.0, 1.0]}, "worker": "a", "base_version": 0}
            calls.append(
                ("POST", one + "/step", await c.post(url + "/step", json=step, headers=auth))
            )
            none = await c.post(url + "/step?return=none", json=step, headers=auth)
            calls.append(("POST", one + "/step", none))
            calls.append(("GET", one, await c.get(url, headers=auth)))
            patch = await c.patch(url, json={"optimizer": {"lr": 0.01}}, headers=auth)
            calls.append(("PATCH", one, patch))
            put = await c.put(url + "/params", json={"params": {"w": [0.0, 0.0]}}, headers=auth)
            calls.append(("PUT", one + "/params", put))
            calls.append(("GET", one + "/params", await c.get(url + "/params", headers=auth)))
            calls.append(("GET", "/v1/sessions", await c.get("/v1/sessions")))
            state = await c.get(
                url + "/state", headers={**auth, "Accept": "application/octet-stream"}
            )
            imported = await c.post(
                "/v1/sessions/import",
                content=state.content,
                headers={"Content-Type": "application/octet-stream"},
            )
            calls.append(("POST", "/v1/sessions/import", imported))
        return calls

    for method, path, response in run(main()):
        assert response.status_code in (200, 201), (method, path, response.text)
        model = documented(app, method, path, response.status_code)
        model.model_validate_json(response.content, strict=True)  # extra keys fail, too
