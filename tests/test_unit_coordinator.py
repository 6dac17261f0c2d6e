"""The coordinator on its own (optserver.coordinator): arrival order, sync rounds, deadlines.

Sessions come from a plain ``SessionStore``; sgd with lr 0.5 and values that float32 holds
exactly, so every expected weight is the update rule's result, w - lr * g.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import pytest

from optserver.config import Settings
from optserver.coordinator import INLINE_JOURNALED_ELEMENTS, INLINE_STEP_ELEMENTS, Coordinator
from optserver.durability import DataDir
from optserver.errors import Conflict, IdempotencyKeyReused, ProblemError
from optserver.modes import SyncMode
from optserver.push import Outcome
from optserver.replies import Answer, encode_outcome
from optserver.store import Push, Session, SessionStore, StoreLimits

T = TypeVar("T")
JSON_ANSWER = Answer("json")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def session(mode: SyncMode | None = None, w: tuple[float, ...] = (1.0, 1.0)) -> Session:
    created, _ = SessionStore(StoreLimits.from_settings(Settings())).create(
        optimizer={"name": "sgd", "lr": 0.5},
        mode=mode,
        params={"w": np.array(w, dtype=np.float32)},
    )
    return created


def push(*g: float, worker: str | None = None, base_version: int | None = None) -> Push:
    return Push(
        grads={"w": np.array(g, dtype=np.float32)}, worker=worker, base_version=base_version
    )


def body(outcome: Outcome) -> dict[str, Any]:
    """The JSON answer to a push, as the server encodes the coordinator's outcome."""
    decoded: dict[str, Any] = orjson.loads(bytes(encode_outcome(outcome).body))
    return decoded


async def joined() -> None:
    """Time for a push started in a task to pass its checks (in a worker thread) and join the
    open round; the coordinator shows no sign of it, so this waits generously."""
    await asyncio.sleep(0.25)


def slug(exc: BaseException) -> str:
    assert isinstance(exc, ProblemError)
    return exc.slug


def test_async_pushes_apply_one_at_a_time_in_arrival_order() -> None:
    s = session()
    coordinator = Coordinator()

    async def main() -> Sequence[Outcome]:
        pushes = [push(1.0, 0.0), push(0.0, 1.0), push(1.0, 1.0)]
        return await asyncio.gather(
            *(coordinator.push(s, p, key=None, answer=JSON_ANSWER) for p in pushes)
        )

    replies = run(main())
    assert [r.version for r in replies] == [1, 2, 3]
    assert [body(r)["params"]["w"] for r in replies] == [[0.5, 1.0], [0.5, 0.5], [0.0, 0.0]]
    assert s.version == 3


def test_turn_is_first_in_first_out() -> None:
    coordinator = Coordinator()
    order: list[int] = []

    async def holder(n: int) -> None:
        async with coordinator.turn("s"):
            order.append(n)
            await asyncio.sleep(0)

    async def main() -> None:
        async with coordinator.turn("s"):
            tasks = [asyncio.create_task(holder(n)) for n in range(5)]
            await asyncio.sleep(0.01)
            assert order == []  # all waiting
        await asyncio.gather(*tasks)

    run(main())
    assert order == [0, 1, 2, 3, 4]


def test_a_sync_round_applies_the_mean_once_for_everybody() -> None:
    s = session(SyncMode(name="sync", workers=3, timeout_s=30))
    coordinator = Coordinator()

    async def main() -> Sequence[Outcome]:
        pushes = [
            push(3.0, 0.0, worker="a"),
            push(0.0, 3.0, worker="b"),
            push(0.0, 0.0, worker="c"),
        ]
        return await asyncio.gather(
            *(coordinator.push(s, p, key=None, answer=JSON_ANSWER) for p in pushes)
        )

    replies = run(main())
    mean = np.array([1.0, 1.0])
    expected = {"version": 1, "applied": True, "params": {"w": (1.0 - 0.5 * mean).tolist()}}
    assert [body(r) for r in replies] == [expected] * 3
    assert s.version == 1


def test_one_push_per_worker_and_round() -> None:
    s = session(SyncMode(name="sync", workers=2, timeout_s=30))
    coordinator = Coordinator()

    async def main() -> tuple[Outcome, Conflict, Outcome, Conflict]:
        first = asyncio.create_task(
            coordinator.push(s, push(2.0, 2.0, worker="a"), key=None, answer=JSON_ANSWER)
        )
        await joined()
        with pytest.raises(Conflict) as duplicate:
            await coordinator.push(s, push(9.0, 9.0, worker="a"), key=None, answer=JSON_ANSWER)
        second = await coordinator.push(s, push(0.0, 0.0, worker="b"), key=None, answer=JSON_ANSWER)
        # The next round has the next number.
        third = asyncio.create_task(
            coordinator.push(s, push(0.0, 0.0, worker="a"), key=None, answer=JSON_ANSWER)
        )
        await joined()
        with pytest.raises(Conflict) as again:
            await coordinator.push(s, push(0.0, 0.0, worker="a"), key=None, answer=JSON_ANSWER)
        coordinator.forget(s.id)
        with pytest.raises(Conflict):
            await third
        return await first, duplicate.value, second, again.value

    first, duplicate, second, again = run(main())
    assert slug(duplicate) == "duplicate-push"
    assert duplicate.extra["round"] == 1 and again.extra["round"] == 2
    assert (
        body(first)
        == body(second)
        == {
            "version": 1,
            "applied": True,
            "params": {"w": [0.5, 0.5]},  # the mean of (2, 2) and (0, 0); the duplicate not in it
        }
    )


def test_a_retry_in_an_open_round_waits_for_the_same_answer() -> None:
    s = session(SyncMode(name="sync", workers=2, timeout_s=30))
    coordinator = Coordinator()

    async def main() -> tuple[Outcome, Outcome, Outcome, ProblemError, Outcome]:
        a = asyncio.create_task(
            coordinator.push(
                s, push(2.0, 0.0, worker="a"), key="k", answer=JSON_ANSWER, fingerprint="f"
            )
        )
        await joined()
        retry = asyncio.create_task(
            coordinator.push(
                s, push(2.0, 0.0, worker="a"), key="k", answer=JSON_ANSWER, fingerprint="f"
            )
        )
        await joined()
        with pytest.raises(IdempotencyKeyReused) as reused:
            await coordinator.push(
                s, push(5.0, 5.0, worker="a"), key="k", answer=JSON_ANSWER, fingerprint="other"
            )
        b = await coordinator.push(s, push(0.0, 2.0, worker="b"), key=None, answer=JSON_ANSWER)
        # After the round, the key replays the remembered answer.
        later = await coordinator.push(
            s, push(2.0, 0.0, worker="a"), key="k", answer=JSON_ANSWER, fingerprint="f"
        )
        return await a, await retry, b, reused.value, later

    a, retry, b, reused, later = run(main())
    assert slug(reused) == "idempotency-key-reused"
    expected = {"version": 1, "applied": True, "params": {"w": [0.5, 0.5]}}
    assert body(a) == body(retry) == body(b) == body(later) == expected
    assert later.replayed and not a.replayed
    assert s.version == 1


def test_the_deadline_closes_a_round_with_enough_workers() -> None:
    s = session(SyncMode(name="sync", workers=3, timeout_s=0.05, min_workers=2))
    coordinator = Coordinator()

    async def main() -> Sequence[Outcome]:
        return await asyncio.gather(
            coordinator.push(s, push(2.0, 0.0, worker="a"), key=None, answer=JSON_ANSWER),
            coordinator.push(s, push(0.0, 2.0, worker="b"), key=None, answer=JSON_ANSWER),
        )

    replies = run(main())
    assert [body(r)["params"]["w"] for r in replies] == [[0.5, 0.5]] * 2
    assert s.version == 1


def test_the_deadline_fails_a_round_short_of_workers() -> None:
    s = session(SyncMode(name="sync", workers=3, timeout_s=0.05))
    coordinator = Coordinator()

    async def main() -> Sequence[BaseException | Outcome]:
        return await asyncio.gather(
            coordinator.push(s, push(2.0, 0.0, worker="a"), key=None, answer=JSON_ANSWER),
            coordinator.push(s, push(0.0, 2.0, worker="b"), key=None, answer=JSON_ANSWER),
            return_exceptions=True,
        )

    results = run(main())
    for result in results:
        assert isinstance(result, Conflict) and slug(result) == "round-failed"
        assert (result.extra["workers"], result.extra["needed"]) == (2, 3)
    assert s.version == 0
    np.testing.assert_array_equal(s.select(None)["w"], [1.0, 1.0])


def test_a_stale_push_is_refused_before_it_joins_a_round() -> None:
    s = session(SyncMode(name="sync", workers=1, timeout_s=30))
    coordinator = Coordinator()

    async def main() -> Conflict:
        await coordinator.push(s, push(1.0, 1.0, worker="a", base_version=0), key=None,
                               answer=JSON_ANSWER)  # fmt: skip
        with pytest.raises(Conflict) as stale:
            await coordinator.push(
                s, push(1.0, 1.0, worker="a", base_version=0), key=None, answer=JSON_ANSWER
            )
        return stale.value

    stale = run(main())
    assert slug(stale) == "stale-gradient" and stale.extra["current_version"] == 1
    assert s.version == 1


def test_forget_fails_the_open_round() -> None:
    s = session(SyncMode(name="sync", workers=2, timeout_s=30))
    coordinator = Coordinator()

    async def main() -> Conflict:
        waiting = asyncio.create_task(
            coordinator.push(s, push(1.0, 1.0, worker="a"), key=None, answer=JSON_ANSWER)
        )
        await joined()
        coordinator.forget(s.id)
        coordinator.forget(s.id)  # nothing left to forget
        with pytest.raises(Conflict) as failed:
            await waiting
        return failed.value

    failed = run(main())
    assert slug(failed) == "round-failed"
    assert s.version == 0


def _stepping_threads(s: Session) -> list[str]:
    """Record the name of the thread that runs each of the session's steps."""
    threads: list[str] = []
    original = s.step

    def recording(*args: Any, **kwargs: Any) -> Outcome:
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    s.step = recording  # type: ignore[method-assign]
    return threads


def test_a_small_push_is_stepped_on_the_event_loop_a_large_one_in_a_thread() -> None:
    small = session()
    large = session(w=(0.0,) * (INLINE_STEP_ELEMENTS + 1))
    small_threads, large_threads = _stepping_threads(small), _stepping_threads(large)
    coordinator = Coordinator()

    async def main() -> tuple[Outcome, Outcome]:
        grads = np.ones(INLINE_STEP_ELEMENTS + 1, np.float32)
        return (
            await coordinator.push(small, push(1.0, 1.0), key=None, answer=JSON_ANSWER),
            await coordinator.push(large, Push(grads={"w": grads}), key=None, answer=JSON_ANSWER),
        )

    first, second = run(main())
    main_thread = threading.current_thread().name
    assert small_threads == [main_thread]
    assert large_threads and large_threads[0] != main_thread
    assert body(first)["params"]["w"] == [0.5, 0.5]
    assert first.version == second.version == 1


def test_a_small_push_waits_in_a_thread_while_another_thread_holds_the_session() -> None:
    s = session()
    threads = _stepping_threads(s)
    coordinator = Coordinator()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with s.locked():
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)

    async def main() -> tuple[Outcome, int]:
        task = asyncio.create_task(
            coordinator.push(s, push(1.0, 1.0), key=None, answer=JSON_ANSWER)
        )
        ticks = 0
        while not task.done():  # the loop runs on while the push waits for the lock
            await asyncio.sleep(0.005)
            ticks += 1
            if ticks == 10:
                release.set()
        return await task, ticks

    outcome, ticks = run(main())
    holder.join(10)
    assert ticks >= 10
    assert outcome.version == 1
    assert len(threads) == 1 and threads[0] != threading.current_thread().name


def test_with_a_journal_only_small_pushes_are_stepped_on_the_event_loop(tmp_path: Path) -> None:
    """Journaling encodes, checksums and writes the record under the lock: a push larger than
    INLINE_JOURNALED_ELEMENTS goes to a worker thread even though it is inline-sized without
    a journal."""
    store = SessionStore(StoreLimits.from_settings(Settings()))
    data_dir = DataDir(tmp_path, fsync="never")
    data_dir.open(store)
    try:
        n = INLINE_JOURNALED_ELEMENTS + 1
        assert n <= INLINE_STEP_ELEMENTS
        s, _ = store.create(
            optimizer={"name": "sgd", "lr": 0.5}, params={"w": np.zeros(n, np.float32)}
        )
        assert s.recorder is not None
        threads = _stepping_threads(s)
        coordinator = Coordinator()
        grads = {"w": np.ones(n, np.float32)}
        small = {"w": np.ones(2, np.float32)}
        t, _ = store.create(
            optimizer={"name": "sgd", "lr": 0.5}, params={"w": np.zeros(2, np.float32)}
        )
        small_threads = _stepping_threads(t)

        async def main() -> None:
            await coordinator.push(s, Push(grads=grads), key=None, answer=JSON_ANSWER)
            await coordinator.push(t, Push(grads=small), key=None, answer=JSON_ANSWER)

        run(main())
        main_thread = threading.current_thread().name
        assert threads and threads[0] != main_thread
        assert small_threads == [main_thread]
    finally:
        data_dir.close()
