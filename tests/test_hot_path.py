"""The lean handler of the hot routes answers exactly as the FastAPI routes do.

The same requests go to two apps, one with ``hot_path`` (steps and pulls answered in front of
FastAPI) and one without (everything through the routes); each answer must match: status,
media type, the headers that mean something, and the body (problems with the session's id and
token written as placeholders, since the two apps create different ones). The metrics they
record must match too.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy as stn
from prometheus_client.parser import text_string_to_metric_families

from optserver.api.app import create_app
from optserver.config import Settings

ST = "application/octet-stream"
JSON = "application/json"
HEADERS = ("content-type", "optserver-version", "idempotent-replayed", "www-authenticate")


@dataclass
class Ids:
    id: str
    token: str
    other_token: str


Request = Callable[[httpx.AsyncClient, Ids], Awaitable[httpx.Response]]


def step(
    body: bytes | None = None,
    *,
    tensors: dict[str, np.ndarray] | None = None,
    metadata: dict[str, str] | None = None,
    query: str = "",
    session: str | None = None,
    token: str | None = "own",
    headers: dict[str, str] | None = None,
) -> Request:
    async def send(client: httpx.AsyncClient, ids: Ids) -> httpx.Response:
        content = body if tensors is None else stn.save(tensors, metadata)
        sent = {"Content-Type": ST if tensors is not None else JSON, "Accept": ST}
        if token is not None:
            sent["Authorization"] = "Bearer " + {"own": ids.token, "other": ids.other_token}.get(
                token, token
            )
        sent.update(headers or {})
        path = f"/v1/sessions/{session if session is not None else ids.id}/step{query}"
        return await client.post(path, content=content, headers=sent)

    return send


def pull(
    query: str = "", *, token: str | None = "own", headers: dict[str, str] | None = None
) -> Request:
    async def send(client: httpx.AsyncClient, ids: Ids) -> httpx.Response:
        sent = {"Accept": ST}
        if token is not None:
            sent["Authorization"] = f"Bearer {ids.token if token == 'own' else token}"
        sent.update(headers or {})
        return await client.get(f"/v1/sessions/{ids.id}/params{query}", headers=sent)

    return send


GRADS = {"w": np.array([0.5, -1.0, 2.0], np.float32)}
JSON_STEP = json.dumps({"grads": {"w": [0.25, 0.5, 1.0]}}).encode()

#: Every case runs against both apps, in this order, on one session each (state carries over:
#: the versions and weights in the answers must agree all along).
CASES: list[tuple[str, Request]] = [
    ("binary step", step(tensors=GRADS)),
    ("json step", step(JSON_STEP, headers={"Accept": JSON})),
    ("return all", step(tensors=GRADS, query="?return=all")),
    ("return none", step(tensors=GRADS, query="?return=none", headers={"Accept": JSON})),
    ("repeated return: the last wins", step(tensors=GRADS, query="?return=bad&return=all")),
    ("keyed", step(tensors=GRADS, headers={"Idempotency-Key": "k1"})),
    ("keyed replay", step(tensors=GRADS, headers={"Idempotency-Key": "k1"})),
    ("replay in JSON", step(tensors=GRADS, headers={"Idempotency-Key": "k1", "Accept": JSON})),
    ("key reused", step(tensors={"w": np.ones(3, np.float32)}, headers={"Idempotency-Key": "k1"})),
    ("lr and worker", step(tensors=GRADS, metadata={"lr": "0.5", "worker": "w7"})),
    ("no token", step(tensors=GRADS, token=None)),
    ("basic auth", step(tensors=GRADS, token=None, headers={"Authorization": "Basic eDp5"})),
    ("bearer without token", step(tensors=GRADS, token=None, headers={"Authorization": "Bearer"})),
    ("wrong token", step(tensors=GRADS, token="nope")),
    ("another's token", step(tensors=GRADS, token="other")),
    ("unknown session", step(tensors=GRADS, session="f" * 32)),
    ("session id too long", step(tensors=GRADS, session="f" * 65)),
    ("bad return", step(tensors=GRADS, query="?return=everything")),
    ("empty return", step(tensors=GRADS, query="?return=")),
    ("key too long", step(tensors=GRADS, headers={"Idempotency-Key": "k" * 257})),
    ("text body", step(b"w=1", headers={"Content-Type": "text/plain"})),
    ("xml accepted", step(tensors=GRADS, headers={"Accept": "text/xml"})),
    ("q-values", step(tensors=GRADS, headers={"Accept": f"{JSON};q=0.5, {ST};q=0.9"})),
    ("malformed json", step(b'{"grads": {"w": [1, 2')),
    ("malformed safetensors", step(b"\x10\x00", headers={"Content-Type": ST})),
    ("shape mismatch", step(tensors={"w": np.ones(4, np.float32)})),
    ("unknown tensor", step(tensors={"v": np.ones(3, np.float32)})),
    ("nan", step(tensors={"w": np.array([np.nan, 0, 0], np.float32)})),
    ("too large", step(tensors={"w": np.ones(4096, np.float32)})),
    ("bad content-length", step(b"{}", headers={"Content-Length": "x"})),
    ("pull", pull()),
    ("pull by name", pull("?names=w")),
    ("pull unknown name", pull("?names=w,nope")),
    ("pull json", pull(headers={"Accept": JSON})),
    ("pull xml", pull(headers={"Accept": "text/xml"})),
    ("pull without token", pull(token=None)),
    ("pull wrong token", pull(token="nope")),
]


def normalized(response: httpx.Response, ids: Ids) -> dict[str, Any]:
    """What must agree between the apps: status, meaningful headers, the body."""
    body: Any = response.content
    media = response.headers.get("content-type", "")
    if media.startswith(("application/json", "application/problem+json")):
        text = response.text
        for value, placeholder in (
            (ids.token, "<token>"), (ids.other_token, "<other>"), (ids.id, "<id>"),
        ):  # fmt: skip
            text = text.replace(value, placeholder)
        body = json.loads(text)
    elif media == ST:
        body = {n: a.tolist() for n, a in stn.load(body).items()}
    headers = {h: response.headers.get(h) for h in HEADERS}
    return {"status": response.status_code, "headers": headers, "body": body}


async def _answers(hot: bool) -> tuple[list[dict[str, Any]], Counter[tuple[str, ...]], float]:
    app = create_app(Settings(hot_path=hot, max_body_bytes=8192, warm_up=False))
    out = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            made = []
            for _ in range(2):
                r = await client.post(
                    "/v1/sessions",
                    json={"optimizer": {"name": "adam", "lr": 0.01}, "params": {"w": [1, 2, 3]}},
                )
                assert r.status_code == 201, r.text
                made.append(r.json())
            ids = Ids(made[0]["id"], made[0]["token"], made[1]["token"])
            for _, request in CASES:
                out.append(normalized(await request(client, ids), ids))
            metrics = (await client.get("/metrics")).text
    return out, *_hot_route_metrics(metrics)


def _hot_route_metrics(text: str) -> tuple[Counter[tuple[str, ...]], float]:
    """Request counts and latency counts of the hot routes, and the bytes received."""
    counts: Counter[tuple[str, ...]] = Counter()
    received = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            route = sample.labels.get("route", "")
            if sample.name == "optserver_http_requests_total" and "{session_id}" in route:
                labels = sample.labels
                counts["requests", labels["method"], route, labels["status"]] += int(sample.value)
            elif sample.name == "optserver_http_request_seconds_count" and "{session_id}" in route:
                counts["latency", route] += int(sample.value)
            elif sample.name == "optserver_http_bytes_total" and sample.labels["direction"] == "in":
                received = sample.value
    return counts, received


@pytest.fixture(scope="module")
def both() -> dict[bool, tuple[list[dict[str, Any]], Counter[tuple[str, ...]], float]]:
    return {hot: asyncio.run(_answers(hot)) for hot in (True, False)}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[name for name, _ in CASES])
def test_the_hot_path_answers_as_the_route_does(
    both: dict[bool, tuple[list[dict[str, Any]], Counter[tuple[str, ...]], float]], index: int
) -> None:
    hot, route = both[True][0][index], both[False][0][index]
    assert hot == route


def test_the_cases_cover_success_and_refusal(
    both: dict[bool, tuple[list[dict[str, Any]], Counter[tuple[str, ...]], float]],
) -> None:
    statuses = {answer["status"] for answer in both[True][0]}
    assert {200, 400, 401, 403, 404, 406, 413, 415, 422} <= statuses
    replayed = [a["headers"]["idempotent-replayed"] for a in both[True][0]]
    assert replayed.count("true") == 2


def test_the_hot_path_records_the_same_metrics(
    both: dict[bool, tuple[list[dict[str, Any]], Counter[tuple[str, ...]], float]],
) -> None:
    hot_counts, hot_bytes = both[True][1], both[True][2]
    route_counts, route_bytes = both[False][1], both[False][2]
    assert hot_counts == route_counts
    assert hot_counts["requests", "POST", "/v1/sessions/{session_id}/step", "200"] >= 6
    assert hot_bytes == route_bytes > 0
