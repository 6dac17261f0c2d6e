"""The buffer pool (optserver_client.buffers) and the server's use of it.

A pooled buffer may be handed out again only when nothing refers to it: these tests hold it
through each kind of reference (the array, a view, a memoryview, a view of a memoryview) and
check it is not reused, then drop them and check it is. Through a real server, answers kept for
idempotent replay and bodies read into reused buffers must stay exactly what they were.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy as stn
from optserver_client.buffers import MIN_POOLED_BYTES, BufferPool

from tests.live import live_server

MB = MIN_POOLED_BYTES


def test_a_free_buffer_is_reused_and_a_new_size_is_not_confused_with_it() -> None:
    pool = BufferPool(16 * MB)
    first = pool.take(2 * MB)
    address = first.ctypes.data
    del first
    again = pool.take(2 * MB)
    assert again.ctypes.data == address
    other = pool.take(3 * MB)
    assert other.nbytes == 3 * MB and other.ctypes.data != address
    assert pool.held_bytes == 5 * MB


@pytest.mark.parametrize(
    "hold",
    [
        lambda b: b,
        lambda b: b[10:20],
        lambda b: b.view(np.float32).reshape(-1, 4),
        lambda b: b.data,
        lambda b: memoryview(b)[5:],
        lambda b: np.frombuffer(b.data, dtype=np.float64),
    ],
    ids=["array", "slice", "view", "memoryview", "memoryview slice", "frombuffer"],
)
def test_a_buffer_anything_refers_to_is_not_handed_out(hold: Callable[[np.ndarray], Any]) -> None:
    pool = BufferPool(16 * MB)
    buffer = pool.take(2 * MB)
    address = buffer.ctypes.data
    held = hold(buffer)
    del buffer
    busy = pool.take(2 * MB)
    assert busy.ctypes.data != address
    del held, busy
    gc.collect()
    assert pool.reuse(2 * MB) is not None


def test_reuse_never_allocates_and_small_buffers_are_not_pooled() -> None:
    pool = BufferPool(16 * MB)
    assert pool.reuse(2 * MB) is None
    assert pool.held_bytes == 0
    small = pool.take(MB - 1)
    assert small.nbytes == MB - 1 and pool.held_bytes == 0


def test_the_bound_holds_and_free_buffers_make_room() -> None:
    pool = BufferPool(5 * MB)
    a, b = pool.take(2 * MB), pool.take(2 * MB)
    c = pool.take(2 * MB)  # no room: allocated, not kept
    assert pool.held_bytes == 4 * MB
    del c
    assert pool.reuse(2 * MB) is None  # the two kept ones are in use
    del a
    d = pool.take(3 * MB)  # room made by dropping the free 2 MB buffer
    assert pool.held_bytes == 5 * MB
    assert pool.take(3 * MB).ctypes.data != d.ctypes.data
    del b, d
    nothing = BufferPool(0)
    assert nothing.take(2 * MB).nbytes == 2 * MB and nothing.held_bytes == 0
    with pytest.raises(ValueError, match="negative"):
        BufferPool(-1)


def test_adopted_buffers_are_kept_once() -> None:
    pool = BufferPool(16 * MB)
    outside = np.empty(2 * MB, np.uint8)
    assert pool.adopt(outside) and pool.adopt(outside)
    assert pool.held_bytes == 2 * MB
    address = outside.ctypes.data
    del outside
    assert pool.take(2 * MB).ctypes.data == address
    assert not pool.adopt(np.empty(32 * MB, np.uint8))  # larger than the whole pool
    pool.clear()
    assert pool.held_bytes == 0


def test_replayed_answers_survive_buffer_reuse_through_a_real_server() -> None:
    """Large steps, each with its key, read into reused bodies and answered from reused
    slabs; a retry of an early key later still gets that step's own weights, and every answer
    is what the update rule gives."""
    n = 3 * MB // 4  # 3 MB tensors: bodies read directly, answers from pooled slabs
    with live_server(max_body_bytes=64 << 20) as server:
        created = httpx.post(
            server.url + "/v1/sessions", json={"optimizer": {"name": "sgd", "lr": 1.0}}
        ).json()
        auth = {"Authorization": f"Bearer {created['token']}"}
        url = f"{server.url}/v1/sessions/{created['id']}"
        st = "application/octet-stream"
        put = httpx.put(
            url + "/params",
            content=stn.save({"w": np.zeros(n, np.float32)}),
            headers={**auth, "Content-Type": st},
            timeout=30,
        )
        assert put.status_code == 200, put.text
        keys = [uuid.uuid4().hex for _ in range(6)]
        answers = []
        with httpx.Client(timeout=30) as client:
            for step, key in enumerate(keys, start=1):
                grads = np.full(n, 1.0, np.float32)
                grads[step] = 100.0 + step  # a mark of its own in every step
                r = client.post(
                    url + "/step",
                    content=stn.save({"w": grads}),
                    headers={**auth, "Content-Type": st, "Accept": st, "Idempotency-Key": key},
                )
                assert r.status_code == 200, r.text
                answers.append(stn.load(r.content)["w"])
            expected = np.zeros(n, np.float32)
            for step, answer in enumerate(answers, start=1):
                expected -= 1.0
                expected[step] -= 99.0 + step
                np.testing.assert_array_equal(answer, expected)
            grads = np.full(n, 1.0, np.float32)
            grads[1] = 101.0
            replay = client.post(  # the first step again: its answer is kept, in its own slab
                url + "/step",
                content=stn.save({"w": grads}),
                headers={**auth, "Content-Type": st, "Accept": st, "Idempotency-Key": keys[0]},
            )
        assert replay.headers["idempotent-replayed"] == "true"
        np.testing.assert_array_equal(stn.load(replay.content)["w"], answers[0])


def test_a_client_reads_large_answers_into_buffers_it_reuses_once_free() -> None:
    """Through both transports: the answer's arrays are views of a pooled buffer, which the
    next answer reuses only after the caller dropped the previous arrays."""
    from optserver_client import Client

    n = 3 * MB // 4
    with live_server(max_body_bytes=64 << 20) as server:
        for fast_path in (True, False):
            with Client(server.url, fast_path=fast_path) as client:
                session = client.create_session(
                    {"w": np.zeros(n, np.float32)}, {"name": "sgd", "lr": 0.5}
                )
                grads = {"w": np.ones(n, np.float32)}
                first = session.step(grads)["w"]
                held = first.ctypes.data
                second = session.step(grads)["w"]
                assert second.ctypes.data != held  # the first answer is still held
                np.testing.assert_array_equal(first, np.full(n, -0.5, np.float32))
                del first
                third = session.step(grads)["w"]
                assert third.ctypes.data == held  # reused: nothing held it any more
                np.testing.assert_array_equal(third, np.full(n, -1.5, np.float32))
                np.testing.assert_array_equal(second, np.full(n, -1.0, np.float32))
