"""Sharded sessions on real servers: the same as one server, bit for bit; resharding; a shard
lost mid-step and the step completed exactly once; NaN routed so that the shards agree."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy as stn
from optserver_client import (
    AsyncClient,
    AsyncShardedSession,
    Client,
    Session,
    ShardedSession,
    ShardError,
    TransportError,
    ValidationError,
)
from optserver_client._codec import decode_safetensors
from optserver_client.sharding import Layout
from optserver_client.vocabulary import STATE_RECORD_KEY

from tests.live import LiveServer, live_server

CHUNK = 1 << 12  # small, so that small test tensors are cut


def initial(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "big": rng.standard_normal((203, 17)).astype(np.float32),  # 13.8 kB: cut
        "bias": rng.standard_normal(9).astype(np.float32),
        "scale": np.float32(0.5),
        "emb": rng.standard_normal((50, 64)).astype(np.float32),  # 12.8 kB: cut
    }


def gradients(rng: np.random.Generator, like: dict[str, Any]) -> dict[str, np.ndarray]:
    return {n: rng.standard_normal(np.shape(a)).astype(np.float32) for n, a in like.items()}


@pytest.fixture(scope="module")
def servers() -> Iterator[list[LiveServer]]:
    with live_server() as a, live_server() as b, live_server() as c, live_server() as d:
        yield [a, b, c, d]


def assert_same(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].shape == np.shape(theirs[name]), name
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def assert_same_exports(ours: bytes, theirs: bytes) -> None:
    """Weights and optimizer state equal tensor for tensor, and the same version and steps."""
    a, b = stn.load(ours), stn.load(theirs)
    assert_same(a, b)
    ja = json.loads(decode_safetensors(ours)[1][STATE_RECORD_KEY])
    jb = json.loads(decode_safetensors(theirs)[1][STATE_RECORD_KEY])
    assert ja["version"] == jb["version"] and ja["steps"] == jb["steps"]
    assert ja["optimizer"] == jb["optimizer"] and ja.get("sharding") is None


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "adam", "lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"name": "rmsprop", "lr": 1e-2, "centered": True},
    ],
)
def test_a_sharded_session_equals_one_server_bit_for_bit(
    servers: list[LiveServer], optimizer: dict[str, Any]
) -> None:
    rng = np.random.default_rng(1)
    params = initial(rng)
    schedule = {"name": "step", "step_size": 3, "gamma": 0.5}
    with (
        Client([s.url for s in servers[:3]], chunk_bytes=CHUNK) as sharded,
        Client(servers[3].url) as single,
    ):
        ours = sharded.create_session(params, optimizer, schedule=schedule)
        theirs = single.create_session(params, optimizer, schedule=schedule)
        assert isinstance(ours, ShardedSession)
        info = ours.info()
        assert info["sharding"] == {"count": 3, "chunk_bytes": CHUNK, "split": {"big": 3, "emb": 3}}
        assert [p["name"] for p in info["params"]] == sorted(params)
        assert {p["name"]: p["shape"] for p in info["params"]} == {
            n: list(np.shape(a)) for n, a in params.items()
        }
        for step in range(7):
            grads = gradients(rng, params)
            if step == 4:  # a subset of the tensors, and an lr for this step only
                grads = {"big": grads["big"], "bias": grads["bias"]}
                assert_same(ours.step(grads, lr=0.05), theirs.step(grads, lr=0.05))
                continue
            assert_same(ours.step(grads), theirs.step(grads))
        assert_same(ours.pull(), theirs.pull())
        assert_same(ours.pull(["emb", "scale"]), theirs.pull(["emb", "scale"]))
        assert ours.versions == (7, 7, 7) and ours.version == theirs.version == 7
        assert_same_exports(ours.export_state(), theirs.export_state())
        # PATCH reaches every shard.
        ours.update(optimizer={"lr": 0.001})
        theirs.update(optimizer={"lr": 0.001})
        grads = gradients(rng, params)
        assert_same(ours.step(grads, return_="all"), theirs.step(grads, return_="all"))
        assert all(s["optimizer"]["lr"] == 0.001 for s in ours.info()["shards"])
        ours.delete()
        theirs.delete()


def test_sync_rounds_on_every_shard_equal_one_server(servers: list[LiveServer]) -> None:
    rng = np.random.default_rng(2)
    params = initial(rng)
    mode = {"name": "sync", "workers": 2, "timeout_s": 30}
    pushes = [[gradients(rng, params) for _ in range(4)] for _ in range(2)]

    def train(urls: list[str], session_id: str, token: str) -> list[dict[str, np.ndarray]]:
        results: list[dict[str, np.ndarray]] = [{}, {}]

        def worker(w: int) -> None:
            with Session.attach(urls, session_id, token) as session:
                for grads in pushes[w]:
                    results[w] = session.step(grads, worker=f"w{w}", return_="all")

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results

    urls = [s.url for s in servers[:2]]
    with Client(urls, chunk_bytes=CHUNK) as sharded, Client(servers[2].url) as single:
        ours = sharded.create_session(params, "adam", mode=mode)
        theirs = single.create_session(params, "adam", mode=mode)
        a = train(urls, ours.id, str(ours.token))
        b = train([servers[2].url], theirs.id, str(theirs.token))
        for w in range(2):
            assert_same(a[w], b[w])
        assert_same(a[0], a[1])  # both workers got the round's weights
        assert ours.info()["versions"] == [4, 4]
        assert_same_exports(ours.export_state(), theirs.export_state())


def test_resharding_two_to_three_to_one_continues_bit_for_bit(servers: list[LiveServer]) -> None:
    rng = np.random.default_rng(3)
    params = initial(rng)
    opt = {"name": "adamw", "lr": 1e-2}
    with Client(servers[3].url) as single:
        reference = single.create_session(params, opt)
        with Client([s.url for s in servers[:2]], chunk_bytes=CHUNK) as two:
            session = two.create_session(params, opt)
            for _ in range(3):
                g = gradients(rng, params)
                assert_same(session.step(g), reference.step(g))
            document = session.export_state()
        with Client([s.url for s in servers[:3]], chunk_bytes=CHUNK // 2) as three:
            moved = three.import_state(document)
            assert moved.info()["sharding"]["count"] == 3 and moved.versions == (3, 3, 3)
            for _ in range(3):
                g = gradients(rng, params)
                assert_same(moved.step(g), reference.step(g))
            document = moved.export_state()
        back = single.import_state(document)  # onto one server: an ordinary session
        assert not isinstance(back, ShardedSession) and back.info()["sharding"] is None
        g = gradients(rng, params)
        assert_same(back.step(g), reference.step(g))
        assert_same_exports(back.export_state(), reference.export_state())


def test_attach_takes_the_shards_in_any_order_and_refuses_a_wrong_list(
    servers: list[LiveServer],
) -> None:
    rng = np.random.default_rng(4)
    params = initial(rng)
    urls = [s.url for s in servers[:3]]
    with Client(urls, chunk_bytes=CHUNK) as client:
        session = client.create_session(params, "sgd")
        token = str(session.token)
        with Session.attach(urls[::-1], session.id, token) as again:
            assert isinstance(again, ShardedSession) and again.urls == tuple(urls)
            assert_same(again.pull(), session.pull())
        with pytest.raises(ValueError, match="3 shards; 2 URLs"):
            Session.attach(urls[:2], session.id, token)
        with pytest.raises(ValueError, match="not the session's 3 shards"):
            Session.attach([urls[0], urls[0] + "/", urls[1]], session.id, token)


def test_listing_over_shards_shows_each_sharded_session_once_and_whole(
    servers: list[LiveServer],
) -> None:
    rng = np.random.default_rng(12)
    params = initial(rng)
    two = [s.url for s in servers[:2]]
    with (
        Client(two, chunk_bytes=CHUNK) as client,
        Client([*two, servers[2].url], chunk_bytes=CHUNK) as wider,
        Client(two[0]) as first,
    ):
        sharded = client.create_session(params, "sgd", name="listed")
        sharded.step(gradients(rng, params))
        elsewhere = wider.create_session(params, "sgd")  # also on a server not in the list
        alone = first.create_session(params, "sgd")  # server 0's own
        try:
            listed = client.list_sessions()
            ids = [s["id"] for s in listed]
            assert ids.count(sharded.id) == 1
            assert elsewhere.id not in ids and alone.id not in ids
            assert all(s["sharding"]["count"] == 2 and len(s["shards"]) == 2 for s in listed)
            entry = next(s for s in listed if s["id"] == sharded.id)
            described = sharded.info()
            for key in ("name", "version", "versions", "params", "groups", "sharding"):
                assert entry[key] == described[key], key
            shapes = {p["name"]: tuple(p["shape"]) for p in entry["params"]}
            assert shapes == {n: np.shape(a) for n, a in params.items()}  # cut tensors whole
            assert entry["versions"] == [1, 1]
            with Client(two[::-1], chunk_bytes=CHUNK) as reversed_:
                assert [s["id"] for s in reversed_.list_sessions()] == ids

            async def listed_async() -> list[str]:
                async with AsyncClient(two, chunk_bytes=CHUNK) as aclient:
                    return [s["id"] for s in await aclient.list_sessions()]

            assert asyncio.run(listed_async()) == ids
        finally:
            for session in (sharded, elsewhere, alone):
                session.delete()


def test_a_problem_with_a_chunk_names_the_callers_tensor_and_its_rows(
    servers: list[LiveServer],
) -> None:
    rng = np.random.default_rng(13)
    params = initial(rng)
    urls = [s.url for s in servers[:2]]

    async def refused_async(session_id: str, token: str, grads: dict[str, Any]) -> Exception:
        async with AsyncShardedSession.attach(urls, session_id, token, chunk_bytes=CHUNK) as s:
            with pytest.raises(ValidationError) as caught:
                await s.step(grads)
            return caught.value

    with Client(urls, chunk_bytes=CHUNK) as client:
        session = client.create_session(params, "sgd")
        layout = Layout.plan({n: (np.shape(a), 4) for n, a in params.items()}, 2, CHUNK)
        narrow = {"big": np.zeros((203, 16), np.float32)}  # a column short: every chunk wrong
        nan = {"big": np.zeros((203, 17), np.float32)}
        nan["big"][150, 3] = np.nan  # in the second chunk only
        for grads, slug in ((narrow, "shape-mismatch"), (nan, "nonfinite")):
            with pytest.raises(ValidationError) as caught:
                session.step(grads)
            error = caught.value
            chunk = error.problem["chunk"]
            name, index = layout.owner(chunk) or ("", -1)
            piece = layout.pieces("big", 203)[index]
            assert name == "big" and error.problem["tensor"] == "big", error.problem
            assert error.problem["shard"] == piece.shard and error.type.endswith(slug)
            assert f"({chunk} is rows {piece.start}:{piece.stop} of 'big', on shard " in str(error)
            assert isinstance(error.__cause__, ValidationError)  # the shard's own words
            assert error.__cause__.problem["tensor"] == chunk
            if slug == "nonfinite":
                assert piece.start <= 150 < piece.stop
            told = asyncio.run(refused_async(session.id, str(session.token), grads))
            assert isinstance(told, ValidationError) and told.problem == error.problem
        assert session.versions == (0, 0)  # refused: nothing changed on either shard
        session.delete()


def kill(server: LiveServer) -> None:
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(10)


def test_a_step_that_one_shard_missed_completes_exactly_once(tmp_path: Path) -> None:
    """Shard 1 dies before a step: shard 0 applies it, the worker gets a ShardError naming
    shard 1; shard 1 comes back from its data directory, the same push with the error's key
    is applied there and replayed by shard 0: every shard has applied it once."""
    rng = np.random.default_rng(5)
    params = initial(rng)
    steps = [gradients(rng, params) for _ in range(3)]
    with live_server() as reference_server, Client(reference_server.url) as single:
        reference = single.create_session(params, "adam")
        expected = [reference.step(g) for g in steps]
    with live_server(data_dir=tmp_path / "a") as a:
        with live_server(data_dir=tmp_path / "b") as b:
            client = Client([a.url, b.url], chunk_bytes=CHUNK, retries=0)
            session = client.create_session(params, "adam")
            assert_same(session.step(steps[0]), expected[0])
            kill(b)
            with pytest.raises(ShardError) as caught:
                session.step(steps[1])
            error = caught.value
            assert error.shard == 1 and set(error.errors) == {1} and error.urls[1] == b.url
            assert isinstance(error.error, TransportError) and error.key is not None
            assert session.versions == (2, 1)
            client.close()
        # The same shard, back from its data directory at a new address.
        with (
            live_server(data_dir=tmp_path / "b") as b2,
            Session.attach([a.url, b2.url], session.id, str(session.token)) as resumed,
        ):
            assert_same(resumed.step(steps[1], key=error.key), expected[1])
            assert resumed.versions == (2, 2)
            assert_same(resumed.step(steps[2]), expected[2])
            info = resumed.info()
            assert info["versions"] == [3, 3]
            assert [s["counters"]["steps_applied"] for s in info["shards"]] == [3, 3]


def test_nan_goes_only_to_its_shard_so_that_the_shards_agree(servers: list[LiveServer]) -> None:
    rng = np.random.default_rng(6)
    params = initial(rng)
    urls = [s.url for s in servers[:3]]
    with Client(urls, chunk_bytes=CHUNK) as client:
        strict = client.create_session(params, "adam", nonfinite="reject")
        before = strict.pull()
        grads = gradients(rng, params)
        grads["big"][150, 3] = np.nan  # in one chunk of "big": one shard
        with pytest.raises(ValidationError) as caught:  # the shard's own 422, not a ShardError
            strict.step(grads)
        assert caught.value.problem["tensor"] == "big"  # the caller's tensor,
        assert caught.value.problem["chunk"] == "big#2"  # and the piece the shard refused
        assert strict.info()["versions"] == [0, 0, 0]
        assert_same(strict.pull(), before)

        lenient = client.create_session(params, "adam", nonfinite="skip")
        answer = lenient.step(grads)
        assert lenient.last_applied is False
        assert_same(answer, before)  # every stepped tensor, as it was
        assert lenient.info()["versions"] == [0, 0, 0]
        grads["big"][150, 3] = 1.0
        lenient.step(grads)
        assert lenient.last_applied is True and lenient.versions == (1, 1, 1)


def test_the_async_client_shards_alike(servers: list[LiveServer]) -> None:
    rng = np.random.default_rng(7)
    params = initial(rng)
    steps = [gradients(rng, params) for _ in range(3)]
    urls = [s.url for s in servers[:2]]
    with Client(servers[2].url) as single:
        reference = single.create_session(params, "adam")
        expected = [reference.step(g) for g in steps]
        expected_state = reference.export_state()

    async def main() -> None:
        async with AsyncClient(urls, chunk_bytes=CHUNK) as client:
            session = await client.create_session(params, "adam")
            assert isinstance(session, AsyncShardedSession)
            assert_same(await session.step(steps[0]), expected[0])
            attached = AsyncShardedSession.attach(urls[::-1], session.id, str(session.token))
            assert not attached.versions  # opened on its first call
            assert_same(await attached.step(steps[1]), expected[1])
            assert attached.versions == (2, 2)
            assert_same(await session.step(steps[2]), expected[2])
            assert_same_exports(await attached.export_state(), expected_state)
            await attached.aclose()
            await session.delete()

    asyncio.run(main())


def test_one_shard_through_the_sharded_path_equals_the_plain_one(servers: list[LiveServer]) -> None:
    rng = np.random.default_rng(8)
    params = initial(rng)
    with Client(servers[0].url, sharded=True) as one, Client(servers[1].url) as plain:
        ours, theirs = one.create_session(params, "adam"), plain.create_session(params, "adam")
        assert isinstance(ours, ShardedSession) and not isinstance(theirs, ShardedSession)
        assert ours.info()["sharding"] == {"count": 1, "chunk_bytes": 4 << 20, "split": {}}
        for _ in range(3):
            g = gradients(rng, params)
            assert_same(ours.step(g), theirs.step(g))
    with pytest.raises(ValueError, match="sharded=False"):
        Client([servers[0].url, servers[1].url], sharded=False)


def test_train_step_waits_out_a_shard_restart_and_applies_the_step_once(tmp_path: Path) -> None:
    """A worker's train_step with patience keeps pushing the same gradients (same key) while a
    shard is down; once the shard is back on its address, every shard has applied it once."""
    rng = np.random.default_rng(9)
    params = initial(rng)
    steps = [gradients(rng, params) for _ in range(2)]
    with live_server() as reference_server, Client(reference_server.url) as single:
        reference = single.create_session(params, "sgd")
        expected = [reference.step(g) for g in steps]
    with live_server(data_dir=tmp_path / "a") as a:
        with live_server(data_dir=tmp_path / "b") as b:
            port = int(b.url.rsplit(":", 1)[1])
            client = Client([a.url, b.url], chunk_bytes=CHUNK, retries=1, backoff=0.05)
            session = client.create_session(params, "sgd")
            weights = session.train_step(lambda w: steps[0])
            assert_same(weights, expected[0])
            kill(b)
            outcome: list[Any] = []
            worker = threading.Thread(
                target=lambda: outcome.append(
                    session.train_step(lambda w: steps[1], weights, patience=60)
                )
            )
            worker.start()
            worker.join(2)
            assert worker.is_alive() and session.versions == (2, 1)  # waiting for shard 1
        with live_server(data_dir=tmp_path / "b", port=port):
            worker.join(60)
            assert not worker.is_alive() and len(outcome) == 1
            assert_same(outcome[0], expected[1])
            assert session.versions == (2, 2)
            info = session.info()
            assert [s["counters"]["steps_applied"] for s in info["shards"]] == [2, 2]
            client.close()


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "httpx"])
def test_answers_are_read_straight_into_one_array_per_tensor(
    servers: list[LiveServer], monkeypatch: pytest.MonkeyPatch, fast_path: bool
) -> None:
    import optserver_client._protocol as protocol
    from optserver_client.safetensors_io import DocumentSink

    sinks: list[DocumentSink] = []

    class Recording(DocumentSink):
        def __init__(self, size: int, into: Any) -> None:
            super().__init__(size, into)
            sinks.append(self)

    monkeypatch.setattr(protocol, "DocumentSink", Recording)
    rng = np.random.default_rng(10)
    params = initial(rng)
    with Client([s.url for s in servers[:3]], chunk_bytes=CHUNK, fast_path=fast_path) as client:
        session = client.create_session(params, "adam")
        grads = gradients(rng, params)
        answer = session.step(grads)
        stepped = list(sinks)
        sinks.clear()
        pulled = session.pull()
        with Client(servers[3].url) as single:
            reference = single.create_session(params, "adam")
            assert_same(answer, reference.step(grads))
            assert_same(pulled, reference.pull())
    # One sink per shard, each placing the chunks of "big" and "emb" it holds in place; the
    # same for the pull.
    chunks = sorted([f"big#{k}" for k in range(3)] + [f"emb#{k}" for k in range(3)])
    for reads in (stepped, sinks):
        assert len(reads) == 3
        assert sorted(name for sink in reads for name in sink.landed) == chunks
    for name in ("big", "emb"):
        assert answer[name].flags.owndata and answer[name].flags.c_contiguous


def test_creators_racing_for_one_id_each_upload_the_shards_they_won(
    servers: list[LiveServer],
) -> None:
    """Two processes create the session "race" at once and each wins one shard: each must
    upload the weights of the shard it won (the other's 409 is no reason not to), so that the
    session is whole once both are done."""
    from optserver_client._sharded import split_tensors
    from optserver_client.sharding import Layout

    rng = np.random.default_rng(11)
    params = initial(rng)
    urls = [s.url for s in servers[:2]]
    token = "race-" + "r" * 40
    layout = Layout.plan({n: (np.shape(a), 4) for n, a in params.items()}, 2, CHUNK)
    # The other creator won shard 1 (its POST arrived first) and has not uploaded yet.
    other = httpx.post(
        urls[1] + "/v1/sessions",
        json={"optimizer": "adam", "id": "race", "token": token, "sharding": layout.descriptor(1)},
    )
    assert other.status_code == 201, other.text
    with Client(urls, chunk_bytes=CHUNK) as client:
        with pytest.raises(ShardError) as caught:
            client.create_session(params, "adam", id="race", token=token)
        assert set(caught.value.errors) == {1} and set(caught.value.results) == {0}
        shard0 = httpx.get(
            urls[0] + "/v1/sessions/race", headers={"Authorization": f"Bearer {token}"}
        )
        parts = split_tensors(layout, {n: np.asarray(a, np.float32) for n, a in params.items()})
        assert sorted(p["name"] for p in shard0.json()["params"]) == sorted(parts[0])
        # The other creator uploads its shard: the session is whole.
        with Client(urls[1]) as second:
            second.session("race", token).set_params(parts[1])
        with Session.attach(urls, "race", token) as session:
            assert_same(session.pull(), {n: np.asarray(a, np.float32) for n, a in params.items()})
            session.delete()


def test_more_shards_than_tensors_and_tensors_registered_by_steps(
    servers: list[LiveServer],
) -> None:
    """Four shards, two small tensors: the shards that hold none never step, and ``version``
    follows those that do (ssp's base_version works). A session made without weights gets its
    tensors from the steps that carry them (optimizer-as-a-service), each on its shard."""
    rng = np.random.default_rng(12)
    params: dict[str, Any] = {"a": rng.standard_normal(5).astype(np.float32), "b": np.float32(2)}
    urls = [s.url for s in servers]
    with Client(urls) as client, Client(urls[0]) as single:
        mode = {"name": "ssp", "max_staleness": 0}
        ours, theirs = (c.create_session(params, "sgd", mode=mode) for c in (client, single))
        holders = {Layout(4).shard_of(n) for n in params}
        for _ in range(3):
            g = gradients(rng, params)
            assert_same(
                ours.step(g, base_version=ours.version),
                theirs.step(g, base_version=theirs.version),
            )
        assert ours.version == 3
        assert [v for i, v in enumerate(ours.versions) if i in holders] == [3] * len(holders)
        info = ours.info()
        assert info["version"] == 3 and {p["name"] for p in info["params"]} == set(params)
        # Optimizer-as-a-service: no weights at creation, they come with the steps.
        service = client.create_session(None, {"name": "adam", "lr": 0.1})
        reference = single.create_session(None, {"name": "adam", "lr": 0.1})
        for _ in range(2):
            g = gradients(rng, params)
            assert_same(service.step(g, params=params), reference.step(g, params=params))
        assert service.version == 2


def test_a_json_client_shards_alike(servers: list[LiveServer]) -> None:
    rng = np.random.default_rng(13)
    params = initial(rng)
    with (
        Client([s.url for s in servers[:2]], chunk_bytes=CHUNK, binary=False) as client,
        Client(servers[2].url) as single,
    ):
        ours, theirs = client.create_session(params, "adam"), single.create_session(params, "adam")
        for _ in range(2):
            g = gradients(rng, params)
            assert_same(ours.step(g), theirs.step(g))
        assert_same(ours.pull(), theirs.pull())


def test_a_sync_round_that_fails_on_one_shard_is_completed_once(
    servers: list[LiveServer],
) -> None:
    """Sync rounds of 2 workers on 2 shards. Worker B's first push reaches shard 0 only, so
    shard 0's round closes and shard 1's fails at its deadline: worker A's train_step gets
    round-failed from shard 1 after shard 0 applied its part, and pushes the same gradients
    again with the same key; shard 0 answers from memory, shard 1 applies them in a new round
    with B's. Each shard applies each round exactly once."""
    a, b = servers[0].url, servers[1].url
    layout = Layout(2)
    names: dict[int, str] = {}
    for i in range(200):  # one small tensor on each shard
        names.setdefault(layout.shard_of(f"t{i}"), f"t{i}")
    params = {names[0]: np.zeros(4, np.float32), names[1]: np.zeros(4, np.float32)}
    mode = {"name": "sync", "workers": 2, "timeout_s": 1.5}
    with Client([a, b]) as client:
        session = client.create_session(params, "sgd", mode=mode)
        token = str(session.token)
        grads_a = {n: np.full(4, 1.0, np.float32) for n in params}
        grads_b = {n: np.full(4, 3.0, np.float32) for n in params}
        done: list[Any] = []

        def train_a() -> None:
            with Session.attach([a, b], session.id, token) as worker:
                try:
                    done.append(worker.train_step(lambda w: grads_a, {}, worker="A"))
                except Exception as error:  # shown by the assertion below
                    done.append(error)

        worker_a = threading.Thread(target=train_a)
        worker_a.start()
        with Session.attach([a, b], session.id, token) as worker_b:
            worker_b.step({names[0]: grads_b[names[0]]}, worker="B")  # shard 0's round closes
            time.sleep(2.5)  # shard 1's round fails meanwhile; A pushes again
            worker_b.step({names[1]: grads_b[names[1]]}, worker="B")  # shard 1's new round
        worker_a.join(30)
        assert not worker_a.is_alive() and len(done) == 1
        assert isinstance(done[0], dict), done[0]
        weights = session.pull()
        mean = -(1.0 + 3.0) / 2 * 0.001  # sgd's default lr: one step of the mean gradient
        for name in params:
            np.testing.assert_allclose(weights[name], np.full(4, mean, np.float32), rtol=1e-6)
        assert session.info()["versions"] == [1, 1]
