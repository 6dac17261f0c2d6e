"""Orders pushes and runs synchronous rounds: the asyncio side of applying gradients.

The store applies a push atomically under a session's lock, in a worker thread (a small push,
on the event loop, when the lock is free: see INLINE_STEP_ELEMENTS). This module
decides when: in arrival order, one at a time per session (a FIFO lock per session), and in
sync mode once a round has one gradient from each worker or its deadline has passed.

Sync rounds. The first push opens a round with a deadline ``timeout_s`` later. The round closes
when ``workers`` distinct workers have pushed, and their mean is applied as one step; every
member gets the new weights. At the deadline the round closes with the pushes it has if there
are at least ``min_workers`` (default ``workers``); otherwise every waiting push fails with 409
``round-failed`` and nothing is applied, so a dead worker never hangs the others for longer than
``timeout_s``. A second push from the same worker in an open round gets 409 ``duplicate-push``
(the first stays in); a retry with the same ``Idempotency-Key`` waits for the same answer. A
push whose ``base_version`` is older than the session's version was computed for a round that
has closed: 409 ``stale-gradient`` with ``current_version``, so the worker pulls and recomputes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio.to_thread
from optserver_client.vocabulary import ProblemSlug

from optserver.errors import Conflict, IdempotencyKeyReused, ProblemError
from optserver.modes import SyncMode
from optserver.push import Outcome, Push, RoundMember
from optserver.replies import Answer
from optserver.session import Session

__all__ = ["INLINE_JOURNALED_ELEMENTS", "INLINE_STEP_ELEMENTS", "Coordinator"]

#: A push of at most this many numbers is stepped on the event loop itself when the session's
#: lock is free: at most about a millisecond of math, copying and a journal write, while the hop
#: to a worker thread and back costs ~0.1 ms and, with two cores, the step's kernel threads
#: leave the loop nothing to do meanwhile (measured with benchmarks/ps_compare.py: inline, one
#: worker at P=1e6 goes from 348 to 385 steps/s and four from 349 to 435).
INLINE_STEP_ELEMENTS = 1 << 20
#: The same with a journal: the record is encoded, checksummed and written under the lock too
#: (~1 ms per MB), so only small pushes stay on the loop.
INLINE_JOURNALED_ELEMENTS = 1 << 15


@dataclass
class _Waiting:
    member: RoundMember
    answer: asyncio.Future[Outcome]


@dataclass
class _Round:
    number: int
    waiting: dict[str, _Waiting] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    closed: bool = False


class Coordinator:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._rounds: dict[str, _Round] = {}
        self._round_numbers: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def turn(self, session_id: str) -> AsyncIterator[None]:
        """The session's FIFO lock: asyncio wakes waiters in the order they queued."""
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            yield

    def forget(self, session_id: str) -> None:
        self._locks.pop(session_id, None)
        self._round_numbers.pop(session_id, None)
        pending = self._rounds.pop(session_id, None)
        if pending is not None:
            self._fail(pending, Conflict("the session was deleted", slug=ProblemSlug.ROUND_FAILED))

    async def push(
        self,
        session: Session,
        push: Push,
        *,
        key: str | None,
        answer: Answer,
        fingerprint: str | None = None,
    ) -> Outcome:
        """Apply ``push`` (async and ssp modes) or add it to the session's round (sync), and
        return its outcome (not yet encoded, not yet durable: see :mod:`optserver.service`).
        ``fingerprint`` identifies the request that carries ``key`` (see optserver.replay)."""
        if isinstance(session.mode, SyncMode):
            return await self._join_round(session, session.mode, push, key, answer, fingerprint)
        async with self.turn(session.id):
            inline = INLINE_STEP_ELEMENTS if session.recorder is None else INLINE_JOURNALED_ELEMENTS
            if push.elements <= inline:
                outcome = session.try_step(push, key=key, answer=answer, fingerprint=fingerprint)
                if outcome is not None:
                    return outcome
            return await anyio.to_thread.run_sync(
                lambda: session.step(push, key=key, answer=answer, fingerprint=fingerprint)
            )

    async def _join_round(
        self,
        session: Session,
        mode: SyncMode,
        push: Push,
        key: str | None,
        answer: Answer,
        fingerprint: str | None,
    ) -> Outcome:
        try:
            replayed = session.replay(key, answer, fingerprint)
        except ProblemError as exc:
            session.reject(exc.slug, push.worker)
            raise
        if replayed is not None:
            return replayed
        await anyio.to_thread.run_sync(session.check, push)
        # From here on no await until the push is in the round: what the round holds cannot
        # change between the duplicate check and the insertion.
        current = self._rounds.get(session.id)
        worker = push.worker or ""
        if current is not None and worker in current.waiting:
            earlier = current.waiting[worker]
            if key is not None and earlier.member.key == key:  # a retry of the same push
                if fingerprint is not None and earlier.member.fingerprint not in (
                    None,
                    fingerprint,
                ):
                    session.reject(ProblemSlug.IDEMPOTENCY_KEY_REUSED, worker)
                    raise IdempotencyKeyReused(
                        f"Idempotency-Key {key!r} is in round {current.number} with a "
                        "different request; nothing was changed",
                        key=key,
                    )
                return await asyncio.shield(earlier.answer)
            session.reject(ProblemSlug.DUPLICATE_PUSH, worker)
            raise Conflict(
                f"worker {worker!r} has already pushed in round {current.number}; one gradient "
                "per worker and round (the first one stays in)",
                slug=ProblemSlug.DUPLICATE_PUSH,
                round=current.number,
            )
        if current is None:
            number = self._round_numbers.get(session.id, 0) + 1
            self._round_numbers[session.id] = number
            current = self._rounds[session.id] = _Round(number)
            loop = asyncio.get_running_loop()
            current.timer = loop.call_later(mode.timeout_s, self._deadline, session, mode, current)
        waiting = _Waiting(
            RoundMember(push, key, answer, fingerprint), asyncio.get_running_loop().create_future()
        )
        current.waiting[worker] = waiting
        if len(current.waiting) >= mode.workers:
            self._close(session, current)
        # Shielded: a client that hangs up does not cancel the round for the others.
        return await asyncio.shield(waiting.answer)

    def _deadline(self, session: Session, mode: SyncMode, round_: _Round) -> None:
        if round_.closed:
            return
        needed = mode.min_workers or mode.workers
        if len(round_.waiting) >= needed:
            self._close(session, round_)
            return
        self._detach(session.id, round_)
        for worker in round_.waiting:
            session.reject(ProblemSlug.ROUND_FAILED, worker)
        self._fail(
            round_,
            Conflict(
                f"sync round {round_.number} reached its deadline ({mode.timeout_s} s) with "
                f"{len(round_.waiting)} of the {needed} workers it needs; nothing was applied: "
                "push again",
                slug=ProblemSlug.ROUND_FAILED,
                round=round_.number,
                workers=len(round_.waiting),
                needed=needed,
            ),
        )

    def _detach(self, session_id: str, round_: _Round) -> None:
        round_.closed = True
        if round_.timer is not None:
            round_.timer.cancel()
        if self._rounds.get(session_id) is round_:
            del self._rounds[session_id]

    def _close(self, session: Session, round_: _Round) -> None:
        """Stop taking pushes and apply the round (in a task: the caller may be a timer)."""
        self._detach(session.id, round_)
        task = asyncio.get_running_loop().create_task(self._apply(session, round_))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, session: Session, round_: _Round) -> None:
        waiting = list(round_.waiting.values())
        try:
            async with self.turn(session.id):
                outcomes = await anyio.to_thread.run_sync(
                    session.apply_round, [w.member for w in waiting]
                )
        except ProblemError as exc:
            self._fail(round_, exc)
            return
        except Exception as exc:  # pragma: no cover - surfaced to every waiting push
            self._fail(round_, exc)
            raise
        for w, outcome in zip(waiting, outcomes, strict=True):
            if not w.answer.done():
                w.answer.set_result(outcome)

    @staticmethod
    def _fail(round_: _Round, exc: BaseException) -> None:
        round_.closed = True
        for w in round_.waiting.values():
            if not w.answer.done():
                w.answer.set_exception(exc)
