"""Chosen session ids and tokens, and a shard's ``sharding`` description, through the HTTP API.

A sharded session is one id and one token on several servers, each holding an ordinary
session that also keeps its ``sharding`` (count, index, chunk size, split tensors) and shows it
unchanged. These tests hold the API to that: chosen ids and tokens are taken exactly, refused
when they clash (409) or are malformed (422) with nothing created; ``sharding`` is shown,
exported (never with the token) and imported; an import may choose its id and token through
``__metadata__["optserver.identity"]``; and a restarted server with a data directory brings it
all back. Most run in process (``httpx.ASGITransport``); the restart runs a real server.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import safetensors.numpy as stn
from optserver_client.vocabulary import (
    STATE_FORMAT,
    STATE_FORMAT_KEY,
    STATE_IDENTITY_KEY,
    STATE_RECORD_KEY,
)

from tests.live import LiveServer, live_server
from tests.test_inprocess_api import auth, create, run

ST = "application/octet-stream"
JSON = "application/json"
PROBLEM = "application/problem+json"

#: Chosen tokens: URL-safe, at least 32 characters, distinct.
TOKEN_A = "shard-token-A_" + "0123456789abcdefghijklmnopqrstuv"
TOKEN_B = "shard-token-B_" + "vutsrqponmlkjihgfedcba9876543210"
TOKEN_C = "C" * 32  # exactly the shortest allowed
#: Valid in form, opening nothing.
STRANGER = "nobody-holds-this-token-0123456789"
SHARDING: dict[str, Any] = {
    "count": 4,
    "index": 2,
    "chunk_bytes": 4096,
    "split": {"embedding.weight": 4, "head.weight": 2},
}
SERVER_ID = re.compile(r"^[0-9a-f]{32}$")


async def info(client: httpx.AsyncClient, session_id: str, token: str) -> dict[str, Any]:
    r = await client.get(f"/v1/sessions/{session_id}", headers=auth(token))
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def listed(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """Every session the server holds, by id (no admin key is configured)."""
    r = await client.get("/v1/sessions")
    assert r.status_code == 200, r.text
    return {s["id"]: s for s in r.json()["sessions"]}


async def weights(client: httpx.AsyncClient, session_id: str, token: str) -> dict[str, Any]:
    r = await client.get(f"/v1/sessions/{session_id}/params", headers=auth(token))
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def export(client: httpx.AsyncClient, session_id: str, token: str) -> bytes:
    r = await client.get(f"/v1/sessions/{session_id}/state", headers=auth(token))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == ST
    return r.content


async def import_(client: httpx.AsyncClient, document: bytes) -> httpx.Response:
    return await client.post("/v1/sessions/import", content=document, headers={"Content-Type": ST})


def metadata_of(document: bytes) -> dict[str, str]:
    length = int.from_bytes(document[:8], "little")
    header: dict[str, Any] = orjson.loads(document[8 : 8 + length])
    return dict(header.get("__metadata__", {}))


def with_identity(document: bytes, identity: str) -> bytes:
    """The export re-encoded with ``__metadata__["optserver.identity"] = identity``."""
    return stn.save(stn.load(document), {**metadata_of(document), STATE_IDENTITY_KEY: identity})


def assert_problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """An RFC 9457 problem of type ``urn:optserver:problem:<slug>``."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = r.json()
    assert problem["status"] == status
    assert problem["type"] == f"urn:optserver:problem:{slug}"
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    return problem


# --- creating with a chosen id and token --------------------------------------------------------


def test_chosen_id_and_token_are_taken_exactly_and_open_only_that_session() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(client, id="job-7.shard_2", token=TOKEN_A, params={"w": [1.0, 2.0]})
        assert s["id"] == "job-7.shard_2" and s["token"] == TOKEN_A
        assert s["version"] == 0 and s["sharding"] is None
        got = await info(client, "job-7.shard_2", TOKEN_A)
        assert got["id"] == "job-7.shard_2" and "token" not in got
        assert [p["name"] for p in got["params"]] == ["w"]

        # A step through the hot path and a pull, under the chosen id and token.
        r = await client.post(
            "/v1/sessions/job-7.shard_2/step", json={"grads": {"w": [1.0, 1.0]}},
            headers=auth(TOKEN_A),
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json() == {"version": 1, "applied": True, "params": {"w": [0.5, 1.5]}}
        assert await weights(client, "job-7.shard_2", TOKEN_A) == {
            "version": 1,
            "params": {"w": [0.5, 1.5]},
        }

        # Other tokens do not open it: none, one that opens nothing, another session's.
        other = await create(client)
        assert SERVER_ID.match(other["id"]) and len(other["token"]) == 43
        assert other["token"] != TOKEN_A
        r = await client.get("/v1/sessions/job-7.shard_2")
        assert_problem(r, 401, "unauthorized")
        r = await client.get("/v1/sessions/job-7.shard_2", headers=auth(STRANGER))
        assert_problem(r, 401, "unauthorized")
        r = await client.get("/v1/sessions/job-7.shard_2", headers=auth(other["token"]))
        assert_problem(r, 403, "forbidden")
        r = await client.get(f"/v1/sessions/{other['id']}", headers=auth(TOKEN_A))
        assert_problem(r, 403, "forbidden")
        r = await client.post(
            "/v1/sessions/job-7.shard_2/step", json={"grads": {"w": [1.0, 1.0]}},
            headers=auth(STRANGER),
        )  # fmt: skip
        assert_problem(r, 401, "unauthorized")
        assert (await info(client, "job-7.shard_2", TOKEN_A))["version"] == 1

        # The longest id (64 characters) and the shortest token (32) are accepted as they are.
        longest = "L" + "x" * 63
        s = await create(client, id=longest, token=TOKEN_C)
        assert s["id"] == longest and s["token"] == TOKEN_C
        assert (await info(client, longest, TOKEN_C))["id"] == longest
        assert set(await listed(client)) == {"job-7.shard_2", other["id"], longest}

    run(scenario)


def test_an_id_that_exists_is_a_conflict_and_changes_nothing() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        await create(client, id="taken", token=TOKEN_A, params={"w": [1.0, 2.0]})
        r = await client.post(
            "/v1/sessions/taken/step", json={"grads": {"w": [1.0, 1.0]}}, headers=auth(TOKEN_A)
        )
        assert r.status_code == 200, r.text
        before = await info(client, "taken", TOKEN_A)

        r = await client.post(
            "/v1/sessions",
            json={"id": "taken", "token": TOKEN_B, "optimizer": {"name": "adam", "lr": 0.1},
                  "params": {"v": [9.0]}, "sharding": SHARDING},
        )  # fmt: skip
        problem = assert_problem(r, 409, "conflict")
        assert "taken" in problem["detail"]

        after = await info(client, "taken", TOKEN_A)
        assert after["version"] == before["version"] == 1
        assert after["optimizer"] == before["optimizer"] and after["optimizer"]["name"] == "sgd"
        assert after["params"] == before["params"] and after["sharding"] is None
        assert await weights(client, "taken", TOKEN_A) == {
            "version": 1,
            "params": {"w": [0.5, 1.5]},
        }
        sessions = await listed(client)
        assert list(sessions) == ["taken"]
        # The refused request's token was not registered: it opens nothing, and is free.
        r = await client.get("/v1/sessions/taken", headers=auth(TOKEN_B))
        assert_problem(r, 401, "unauthorized")
        s = await create(client, id="free", token=TOKEN_B)
        assert s["id"] == "free" and s["token"] == TOKEN_B

    run(scenario)


def test_a_token_that_opens_another_session_is_a_conflict() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        await create(client, id="first", token=TOKEN_A)
        generated = await create(client)

        for token in (TOKEN_A, generated["token"]):
            r = await client.post(
                "/v1/sessions", json={"id": "second", "token": token, "optimizer": "sgd"}
            )
            problem = assert_problem(r, 409, "conflict")
            assert "token" in problem["detail"]
            assert token not in r.text  # the answer does not repeat the secret
        # The same without a chosen id: still refused, nothing created.
        r = await client.post("/v1/sessions", json={"token": TOKEN_A, "optimizer": "sgd"})
        assert_problem(r, 409, "conflict")

        assert set(await listed(client)) == {"first", generated["id"]}
        r = await client.get("/v1/sessions/second", headers=auth(TOKEN_A))
        assert_problem(r, 404, "unknown-session")  # a valid token, but no such session
        assert (await info(client, "first", TOKEN_A))["id"] == "first"

        # A deleted session's token is free again.
        r = await client.delete("/v1/sessions/first", headers=auth(TOKEN_A))
        assert r.status_code == 204, r.text
        s = await create(client, id="second", token=TOKEN_A)
        assert s["id"] == "second" and s["token"] == TOKEN_A
        assert (await info(client, "second", TOKEN_A))["id"] == "second"
        assert set(await listed(client)) == {"second", generated["id"]}

    run(scenario)


INVALID: list[tuple[str, dict[str, Any], list[str | int]]] = [
    ("token of 31 characters", {"token": "t" * 31}, ["token"]),
    ("token with a dot", {"token": "t" * 32 + "."}, ["token"]),
    ("token with a plus", {"token": "t" * 20 + "+" + "t" * 20}, ["token"]),
    ("token with a space", {"token": "t" * 20 + " " + "t" * 20}, ["token"]),
    ("token with a newline", {"token": "t" * 40 + "\n"}, ["token"]),
    ("token of 257 characters", {"token": "t" * 257}, ["token"]),
    ("token not a string", {"token": 12345678901234567890123456789012345}, ["token"]),
    ("id with a slash", {"id": "a/b"}, ["id"]),
    ("id with a space", {"id": "a b"}, ["id"]),
    ("id of 65 characters", {"id": "i" * 65}, ["id"]),
    ("id starting with a dot", {"id": ".hidden"}, ["id"]),
    ("id that is empty", {"id": ""}, ["id"]),
    ("id with a newline", {"id": "abc\n"}, ["id"]),
    ("id not ASCII", {"id": "caf\u00e9"}, ["id"]),
    ("id not a string", {"id": 7}, ["id"]),
    ("index equal to count", {"sharding": {"count": 2, "index": 2, "chunk_bytes": 1}},
     ["sharding"]),
    ("index negative", {"sharding": {"count": 2, "index": -1, "chunk_bytes": 1}},
     ["sharding", "index"]),
    ("count 0", {"sharding": {"count": 0, "index": 0, "chunk_bytes": 1}}, ["sharding", "count"]),
    ("count 257", {"sharding": {"count": 257, "index": 0, "chunk_bytes": 1}},
     ["sharding", "count"]),
    ("count as a string", {"sharding": {"count": "2", "index": 0, "chunk_bytes": 1}},
     ["sharding", "count"]),
    ("chunk_bytes 0", {"sharding": {"count": 2, "index": 0, "chunk_bytes": 0}},
     ["sharding", "chunk_bytes"]),
    ("chunk_bytes missing", {"sharding": {"count": 2, "index": 0}},
     ["sharding", "chunk_bytes"]),
    ("split into 1 chunk",
     {"sharding": {"count": 2, "index": 0, "chunk_bytes": 1, "split": {"w": 1}}},
     ["sharding", "split", "w"]),
    ("split into more chunks than shards",
     {"sharding": {"count": 2, "index": 0, "chunk_bytes": 1, "split": {"w": 3}}},
     ["sharding"]),
    ("split tensor with an empty name",
     {"sharding": {"count": 2, "index": 0, "chunk_bytes": 1, "split": {"": 2}}},
     ["sharding", "split", "", "[key]"]),
    ("unknown field in sharding",
     {"sharding": {"count": 2, "index": 0, "chunk_bytes": 1, "shards": ["a", "b"]}},
     ["sharding", "shards"]),
    ("sharding not an object", {"sharding": [2, 0, 1]}, ["sharding"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "loc"), [(extra, loc) for _, extra, loc in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_id_token_or_sharding_is_refused_and_creates_nothing(
    extra: dict[str, Any], loc: list[str | int]
) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        existing = await create(client, id="existing", token=TOKEN_A)
        body = {"optimizer": "sgd", "params": {"w": [1.0]}, **extra}
        r = await client.post("/v1/sessions", json=body)
        problem = assert_problem(r, 422, "invalid-request")
        where = ".".join(str(p) for p in loc)
        assert problem["detail"].startswith(f"{where}:"), problem["detail"]
        assert problem["errors"][0]["loc"][: len(loc)] == loc, problem["errors"]
        assert list(await listed(client)) == [existing["id"]]
        assert (await info(client, "existing", TOKEN_A))["version"] == 0

    run(scenario)


# --- sharding shown, and kept -------------------------------------------------------------------


def test_sharding_is_shown_unchanged_and_patch_does_not_change_it() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        # A shard holds chunks under their "NAME#k" names, like any tensor.
        s = await create(
            client, id="shard-2", token=TOKEN_A, sharding=SHARDING,
            params={"embedding.weight#2": [1.0, 2.0], "bias": [0.0]},
        )  # fmt: skip
        assert s["sharding"] == SHARDING
        r = await client.post(
            "/v1/sessions/shard-2/step", json={"grads": {"embedding.weight#2": [1.0, 1.0]}},
            headers=auth(TOKEN_A),
        )  # fmt: skip
        assert r.json() == {
            "version": 1,
            "applied": True,
            "params": {"embedding.weight#2": [0.5, 1.5]},
        }
        plain = await create(client)
        assert "sharding" in plain and plain["sharding"] is None
        bare = await create(client, sharding={"count": 1, "index": 0, "chunk_bytes": 1})
        assert bare["sharding"] == {"count": 1, "index": 0, "chunk_bytes": 1, "split": {}}

        got = await info(client, "shard-2", TOKEN_A)
        assert got["sharding"] == SHARDING
        assert list(got["sharding"]["split"]) == list(SHARDING["split"])  # order kept too
        assert (await info(client, plain["id"], plain["token"]))["sharding"] is None
        sessions = await listed(client)
        assert sessions["shard-2"]["sharding"] == SHARDING
        assert sessions[plain["id"]]["sharding"] is None
        assert sessions[bare["id"]]["sharding"] == bare["sharding"]

        r = await client.patch(
            "/v1/sessions/shard-2", json={"optimizer": {"lr": 0.125}}, headers=auth(TOKEN_A)
        )
        assert r.status_code == 200, r.text
        assert r.json()["optimizer"]["lr"] == 0.125 and r.json()["sharding"] == SHARDING
        # sharding is not something PATCH changes: refused, and nothing else changes either.
        r = await client.patch(
            "/v1/sessions/shard-2",
            json={"optimizer": {"lr": 0.5}, "sharding": {**SHARDING, "index": 3}},
            headers=auth(TOKEN_A),
        )
        problem = assert_problem(r, 422, "invalid-request")
        assert problem["detail"].startswith("sharding:")
        got = await info(client, "shard-2", TOKEN_A)
        assert got["sharding"] == SHARDING and got["optimizer"]["lr"] == 0.125
        assert got["version"] == 1
        r = await client.patch(
            f"/v1/sessions/{plain['id']}", json={"optimizer": {"lr": 0.25}},
            headers=auth(plain["token"]),
        )  # fmt: skip
        assert r.status_code == 200 and r.json()["sharding"] is None

    run(scenario)


# --- export and import --------------------------------------------------------------------------


async def sharded_and_stepped(client: httpx.AsyncClient) -> dict[str, Any]:
    """A sharded adam session under a chosen id and token, stepped once."""
    s = await create(
        client, id="src", token=TOKEN_A, sharding=SHARDING,
        optimizer={"name": "adam", "lr": 0.01}, params={"w": [0.5, -1.0, 2.0]},
    )  # fmt: skip
    r = await client.post(
        "/v1/sessions/src/step", json={"grads": {"w": [0.1, 0.2, -0.3]}}, headers=auth(TOKEN_A)
    )
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    return s


def test_export_carries_the_sharding_and_never_the_token() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        await sharded_and_stepped(client)
        document = await export(client, "src", TOKEN_A)
        metadata = metadata_of(document)
        assert metadata[STATE_FORMAT_KEY] == STATE_FORMAT
        assert STATE_IDENTITY_KEY not in metadata
        record = orjson.loads(metadata[STATE_RECORD_KEY])
        assert record["sharding"] == SHARDING
        assert record["version"] == 1 and record["optimizer"]["name"] == "adam"
        assert record.get("private") is None and "token" not in record and "id" not in record
        # Neither the token nor its digest is anywhere in the document.
        assert TOKEN_A.encode() not in document
        digest = hashlib.sha256(TOKEN_A.encode())
        assert digest.hexdigest().encode() not in document and digest.digest() not in document
        tensors = stn.load(document)
        assert set(tensors) == {"params/w", "state/w/exp_avg", "state/w/exp_avg_sq"}
        pulled = await weights(client, "src", TOKEN_A)
        np.testing.assert_array_equal(tensors["params/w"], np.float32(pulled["params"]["w"]))

        # An ordinary session's export says null.
        plain = await create(client)
        plain_record = orjson.loads(
            metadata_of(await export(client, plain["id"], plain["token"]))[STATE_RECORD_KEY]
        )
        assert plain_record["sharding"] is None

    run(scenario)


def test_import_restores_the_sharding_with_a_new_id_and_token_by_default() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        await sharded_and_stepped(client)
        document = await export(client, "src", TOKEN_A)
        r = await import_(client, document)
        assert r.status_code == 201, r.text
        copy = r.json()
        assert SERVER_ID.match(copy["id"]) and copy["id"] != "src"
        assert len(copy["token"]) == 43 and copy["token"] != TOKEN_A
        assert copy["sharding"] == SHARDING and copy["version"] == 1
        got = await info(client, copy["id"], copy["token"])
        assert got["sharding"] == SHARDING and got["version"] == 1
        assert await weights(client, copy["id"], copy["token"]) == await weights(
            client, "src", TOKEN_A
        )
        r = await client.get(f"/v1/sessions/{copy['id']}", headers=auth(TOKEN_A))
        assert_problem(r, 403, "forbidden")  # the original's token does not open the copy
        assert (await info(client, "src", TOKEN_A))["sharding"] == SHARDING
        assert set(await listed(client)) == {"src", copy["id"]}

    run(scenario)


def test_import_takes_the_identity_it_is_given() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        await sharded_and_stepped(client)
        document = await export(client, "src", TOKEN_A)
        moved = with_identity(document, orjson.dumps({"id": "moved", "token": TOKEN_B}).decode())
        r = await import_(client, moved)
        assert r.status_code == 201, r.text
        copy = r.json()
        assert copy["id"] == "moved" and copy["token"] == TOKEN_B
        assert copy["sharding"] == SHARDING and copy["version"] == 1
        got = await info(client, "moved", TOKEN_B)
        assert got["id"] == "moved" and got["sharding"] == SHARDING and got["version"] == 1
        assert await weights(client, "moved", TOKEN_B) == await weights(client, "src", TOKEN_A)
        # The copy continues exactly as the original does.
        push = {"grads": {"w": [-0.5, 0.25, 1.0]}}
        one = await client.post("/v1/sessions/src/step", json=push, headers=auth(TOKEN_A))
        two = await client.post("/v1/sessions/moved/step", json=push, headers=auth(TOKEN_B))
        assert one.status_code == two.status_code == 200
        assert one.content == two.content and one.json()["version"] == 2

        # Only an id: that id, and a new random token.
        r = await import_(client, with_identity(document, '{"id": "only-id"}'))
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "only-id" and len(r.json()["token"]) == 43
        assert r.json()["token"] not in (TOKEN_A, TOKEN_B)
        assert (await info(client, "only-id", r.json()["token"]))["sharding"] == SHARDING

        # A shard moved here: once the original is gone, its own id and token can be taken.
        assert (await client.delete("/v1/sessions/src", headers=auth(TOKEN_A))).status_code == 204
        same = orjson.dumps({"id": "src", "token": TOKEN_A}).decode()
        r = await import_(client, with_identity(document, same))
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "src" and r.json()["token"] == TOKEN_A
        back = await info(client, "src", TOKEN_A)
        assert back["version"] == 1 and back["sharding"] == SHARDING
        assert set(await listed(client)) == {"src", "moved", "only-id"}

    run(scenario)


BAD_IDENTITIES = [
    ("token of 31 characters", orjson.dumps({"id": "new", "token": "t" * 31}).decode()),
    ("token with a bad character", orjson.dumps({"token": "t" * 32 + "!"}).decode()),
    ("id with a slash", orjson.dumps({"id": "a/b", "token": TOKEN_C}).decode()),
    ("id of 65 characters", orjson.dumps({"id": "i" * 65}).decode()),
    ("unknown field", orjson.dumps({"id": "new", "secret": "x"}).decode()),
    ("not JSON", "id=new"),
    ("not an object", '["new"]'),
]


def test_import_with_a_bad_or_clashing_identity_creates_nothing() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        await sharded_and_stepped(client)
        other = await create(client, id="other", token=TOKEN_B)
        document = await export(client, "src", TOKEN_A)

        for what, identity in BAD_IDENTITIES:
            r = await import_(client, with_identity(document, identity))
            problem = assert_problem(r, 422, "invalid-request")
            assert STATE_IDENTITY_KEY in problem["detail"], (what, problem["detail"])
        # A refused token is never repeated in the answer (it is a secret), and the problem
        # lists the fields as a creation's does.
        secret = "secret-but-too-short!"
        r = await import_(client, with_identity(document, orjson.dumps({"token": secret}).decode()))
        problem = assert_problem(r, 422, "invalid-request")
        assert secret not in r.text and problem["errors"][0]["loc"] == ["token"]
        # An id that exists, and a token that opens another session: 409.
        for clash in (
            {"id": "other", "token": TOKEN_C},
            {"id": "other"},
            {"id": "new", "token": TOKEN_B},
            {"token": TOKEN_A},
        ):
            r = await import_(client, with_identity(document, orjson.dumps(clash).decode()))
            assert_problem(r, 409, "conflict")

        assert set(await listed(client)) == {"src", "other"}
        r = await client.get("/v1/sessions/new", headers=auth(TOKEN_A))
        assert_problem(r, 404, "unknown-session")
        r = await client.get("/v1/sessions/src", headers=auth(TOKEN_C))
        assert_problem(r, 401, "unauthorized")  # no refused import registered TOKEN_C
        assert (await info(client, "other", TOKEN_B))["version"] == other["version"] == 0
        src = await info(client, "src", TOKEN_A)
        assert src["version"] == 1 and src["sharding"] == SHARDING

    run(scenario)


def test_import_refuses_a_record_with_invalid_sharding() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        await sharded_and_stepped(client)
        document = await export(client, "src", TOKEN_A)
        metadata = metadata_of(document)
        record = orjson.loads(metadata[STATE_RECORD_KEY])
        record["sharding"] = {**SHARDING, "index": SHARDING["count"]}
        bad = stn.save(
            stn.load(document), {**metadata, STATE_RECORD_KEY: orjson.dumps(record).decode()}
        )
        r = await import_(client, bad)
        problem = assert_problem(r, 422, "invalid-request")
        assert "sharding" in problem["detail"]
        assert list(await listed(client)) == ["src"]

    run(scenario)


# --- OpenAPI ------------------------------------------------------------------------------------


def test_openapi_describes_id_token_and_sharding() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.get("/openapi.json")
        assert r.status_code == 200
        schemas = r.json()["components"]["schemas"]
        create_props = schemas["CreateSessionRequest"]["properties"]

        def branches(prop: dict[str, Any]) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = prop.get("anyOf", [prop])
            return found

        def string_pattern(prop: dict[str, Any]) -> str:
            (string,) = [b for b in branches(prop) if b.get("type") == "string"]
            pattern: str = string["pattern"]
            return pattern

        id_pattern = re.compile(string_pattern(create_props["id"]))
        assert id_pattern.fullmatch("job-7.shard_2") and id_pattern.fullmatch("a" * 64)
        assert not id_pattern.search("a/b") and not id_pattern.search("a" * 65)
        token_pattern = re.compile(string_pattern(create_props["token"]))
        assert token_pattern.fullmatch(TOKEN_A) and token_pattern.fullmatch(TOKEN_C)
        assert not token_pattern.search("t" * 31) and not token_pattern.search("t" * 32 + ".")
        for name in ("id", "token", "sharding"):
            assert create_props[name].get("description"), name
        assert {"id", "token", "sharding"}.isdisjoint(
            schemas["CreateSessionRequest"].get("required", [])
        )

        sharding_ref = {"$ref": "#/components/schemas/Sharding"}
        assert sharding_ref in branches(create_props["sharding"])
        assert sharding_ref in branches(schemas["SessionInfo"]["properties"]["sharding"])
        sharding = schemas["Sharding"]
        assert sharding["additionalProperties"] is False
        assert set(sharding["properties"]) == {"count", "index", "chunk_bytes", "split"}
        assert set(sharding["required"]) == {"count", "index", "chunk_bytes"}
        count = sharding["properties"]["count"]
        assert (count["type"], count["minimum"], count["maximum"]) == ("integer", 1, 256)
        assert sharding["properties"]["index"]["minimum"] == 0
        chunks = sharding["properties"]["split"]["additionalProperties"]
        assert (chunks["minimum"], chunks["maximum"]) == (2, 256)
        # The create answer carries it too (SessionCreated extends SessionInfo).
        created = schemas["SessionCreated"]["properties"]
        assert sharding_ref in branches(created["sharding"]) and "token" in created

    run(scenario)


# --- a real server with a data directory --------------------------------------------------------


def kill(server: LiveServer) -> None:
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()


def check_revived(server: LiveServer, expected: dict[str, Any], w: list[float]) -> None:
    base = f"{server.url}/v1/sessions/shard-1"
    with httpx.Client(timeout=30) as http:
        r = http.get(base, headers=auth(TOKEN_A))
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["id"] == "shard-1" and got["version"] == 1
        assert got["sharding"] == SHARDING
        assert got["params"] == expected["params"] and got["optimizer"] == expected["optimizer"]
        r = http.get(base + "/params", headers=auth(TOKEN_A))
        assert r.json() == {"version": 1, "params": {"w": w}}
        r = http.get(base, headers=auth(STRANGER))
        assert r.status_code == 401
        # The chosen id and token are still taken.
        for clash in ({"id": "shard-1"}, {"token": TOKEN_A}):
            r = http.post(f"{server.url}/v1/sessions", json={"optimizer": "sgd", **clash})
            assert r.status_code == 409, r.text
        sessions = http.get(f"{server.url}/v1/sessions").json()["sessions"]
        assert [s["id"] for s in sessions] == ["shard-1"]


def test_chosen_identity_and_sharding_survive_kill_9_and_a_clean_restart(tmp_path: Path) -> None:
    with live_server(data_dir=tmp_path) as server, httpx.Client(timeout=30) as http:
        r = http.post(
            f"{server.url}/v1/sessions",
            json={"id": "shard-1", "token": TOKEN_A, "sharding": SHARDING,
                  "optimizer": {"name": "sgd", "lr": 0.5}, "params": {"w": [1.0, 2.0]}},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        r = http.post(
            f"{server.url}/v1/sessions/shard-1/step",
            json={"grads": {"w": [1.0, -1.0]}},
            headers=auth(TOKEN_A),
        )
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
        expected = http.get(f"{server.url}/v1/sessions/shard-1", headers=auth(TOKEN_A)).json()
        assert expected["sharding"] == SHARDING
        kill(server)
    # From the journal, after kill -9; the clean stop that ends this block writes a snapshot.
    with live_server(data_dir=tmp_path) as server:
        check_revived(server, expected, [0.5, 2.5])
    assert list(tmp_path.glob("snapshot-*.safetensors"))
    # From that snapshot.
    with live_server(data_dir=tmp_path) as server:
        check_revived(server, expected, [0.5, 2.5])
