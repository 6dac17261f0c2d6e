"""The server's use cases, end to end, without HTTP: what each route asks for.

A push goes: decode the body (:mod:`optserver.codec`) -> admit and apply it in the session's
turn (:class:`~optserver.coordinator.Coordinator`, which calls :meth:`Session.step` or a sync
round's :meth:`Session.apply_round` in a worker thread) -> wait until its journal record is
durable (:meth:`Service.durable`, outside the session's turn: the next push is applied
meanwhile, group commit) -> encode the answer from the frozen outcome, outside the session's
lock (:func:`optserver.replies.encode_outcome`). A push refused before it reaches the session
(an undecodable body) is counted here; every later refusal is counted by the session.

No FastAPI here: routes read the request, call one method, and write the response. Blocking
work (parsing, copying, journaling) runs in worker threads, off the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np

from optserver.codec import decode_params, decode_push, decode_tensors_json, limits
from optserver.config import Settings
from optserver.coordinator import Coordinator
from optserver.errors import ProblemError
from optserver.frozen import Frozen
from optserver.idempotency import fingerprint
from optserver.metrics import Metrics
from optserver.push import Outcome, Push
from optserver.replies import MEDIA, Answer, Format, Reply, Returns, encode_outcome, weights_reply
from optserver.schemas import CreateSessionRequest, PatchSessionRequest, parse_json
from optserver.session import KEEP, Session
from optserver.snapshot import export_session, import_session
from optserver.store import SessionStore
from optserver.wire import Buffer, decode_safetensors

__all__ = ["INLINE_DECODE_BYTES", "INLINE_ENCODE_BYTES", "Created", "Service", "Weights"]

#: Binary bodies above this are decoded in a worker thread (decoding makes views; the cost is the
#: idempotency fingerprint, one pass at ~50 GB/s: 0.15 ms at this size); JSON ones always are
#: (parsing holds the GIL for the whole document: on the event loop, it would stall every
#: connection).
INLINE_DECODE_BYTES = 8 << 20
#: JSON answers carrying more tensor bytes than this are encoded in a worker thread (a
#: safetensors answer only writes its header: always inline).
INLINE_ENCODE_BYTES = 64 << 10

T = TypeVar("T")


@dataclass(frozen=True)
class Created:
    """A new session's info and its token (shown once)."""

    info: dict[str, Any]
    token: str


@dataclass(frozen=True)
class Weights:
    """A session's version and tensor list after its weights were set."""

    version: int
    params: list[dict[str, Any]]


class Service:
    """The use cases of one server: its store, coordinator, settings and metrics."""

    def __init__(
        self, store: SessionStore, coordinator: Coordinator, settings: Settings, metrics: Metrics
    ) -> None:
        self.store = store
        self.coordinator = coordinator
        self.settings = settings
        self.metrics = metrics

    @staticmethod
    async def _thread(call: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(call)

    async def durable(self, ticket: int | None) -> None:
        """Return once the change with ``ticket`` is durable (at once without a journal);
        :class:`~optserver.errors.JournalUnavailable` if it cannot be made so."""
        if ticket is not None and self.store.recorder is not None:
            await self._thread(lambda: self.store.wait(ticket))

    # --- pushes ------------------------------------------------------------------------------

    async def push(
        self,
        session: Session,
        read: Callable[[], Awaitable[tuple[Format, Buffer]]],
        *,
        fmt_out: Format,
        returns: Returns = "stepped",
        key: str | None = None,
    ) -> Reply:
        """One push, from its body (``read`` returns its format and bytes) to its encoded,
        durable answer. A push refused before the session sees it (unreadable, undecodable)
        is counted as rejected here; the session counts every later refusal."""
        try:
            fmt_in, body = await read()

            def decode() -> tuple[Push, str | None]:
                push = decode_push(body, fmt_in, session, self.settings)
                keyed = key is not None
                return push, fingerprint(body, MEDIA[fmt_in], returns) if keyed else None

            if fmt_in == "json" or len(body) > INLINE_DECODE_BYTES:
                push, digest = await self._thread(decode)  # JSON parsing holds the GIL
            else:
                push, digest = decode()
        except ProblemError as exc:
            session.reject(exc.slug)
            raise
        start = time.perf_counter()
        outcome = await self.coordinator.push(
            session, push, key=key, answer=Answer(fmt_out, returns), fingerprint=digest
        )
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        await self.durable(outcome.ticket)
        if outcome.replayed:
            self.metrics.replays.inc()
        return await self.encode(outcome)

    async def encode(self, outcome: Outcome) -> Reply:
        """The answer's bytes (no lock is held: the outcome's tensors are frozen)."""
        if outcome.answer.fmt == "json" and outcome.tensors.nbytes > INLINE_ENCODE_BYTES:
            return await self._thread(lambda: encode_outcome(outcome))
        return encode_outcome(outcome)

    async def pull(self, session: Session, names: list[str] | None, fmt: Format) -> Reply:
        """Weights and version, copied together under the session's lock, encoded after."""

        def encode() -> Reply:
            version, frozen = session.pull(names)
            return weights_reply(fmt, version, frozen)

        return await self._thread(encode)

    # --- weights and options -----------------------------------------------------------------

    async def put_params(
        self, session: Session, body: Buffer, fmt: Format, *, reset_state: bool = False
    ) -> Weights:
        tensors = await self._thread(lambda: decode_params(body, fmt, session, self.settings))
        ticket = await self._thread(lambda: session.put_params(tensors, reset_state=reset_state))
        await self.durable(ticket)
        with session.locked():
            return Weights(session.version, session.tensor_info())

    async def configure(self, session: Session, body: Buffer) -> dict[str, Any]:
        """Change options (PATCH): the session's info once the change is durable."""
        spec = await self._thread(lambda: parse_json(PatchSessionRequest, body))
        ticket = session.configure(
            optimizer=spec.optimizer,
            schedule=spec.schedule if "schedule" in spec.model_fields_set else KEEP,
            mode=spec.mode,
            nonfinite=spec.nonfinite,
        )
        await self.durable(ticket)
        return session.info()

    # --- sessions ----------------------------------------------------------------------------

    async def create(self, body: Buffer) -> Created:
        settings = self.settings

        def parse() -> tuple[CreateSessionRequest, np.dtype[Any], dict[str, np.ndarray]]:
            spec = parse_json(CreateSessionRequest, body)
            dtype = np.dtype(spec.dtype)
            params = decode_tensors_json(spec.params or {}, lambda _: dtype, limits(settings))
            return spec, dtype, params

        spec, dtype, params = await self._thread(parse)  # parsing holds the GIL: off the loop

        def create() -> Created:  # copies the weights and journals them: off the loop
            session, token = self.store.create(
                optimizer=spec.optimizer,
                name=spec.name,
                mode=spec.mode,
                schedule=spec.schedule,
                nonfinite=spec.nonfinite or settings.nonfinite,
                params=params,
                id=spec.id,
                token=spec.token,
                sharding=spec.sharding,
                dtype=dtype,
            )
            self.store.sync()
            return Created(session.info(), token)

        return await self._thread(create)

    async def delete(self, session: Session) -> None:
        self.store.delete(session.id)
        self.coordinator.forget(session.id)
        await self._thread(self.store.sync)

    async def export(self, session: Session) -> tuple[Buffer, int]:
        """The session's state export and its version."""

        def encode() -> tuple[Buffer, int]:
            with session.locked():  # copied together, encoded after
                tensors, metadata = export_session(session)
                frozen, version = Frozen(tensors, widest=metadata), session.version
            return frozen.document(metadata), version

        return await self._thread(encode)

    async def import_(self, body: Buffer, name: str | None) -> Created:
        def load() -> Created:
            tensors, metadata = decode_safetensors(body, limits(self.settings))
            session, token = import_session(self.store, tensors, metadata, name=name)
            self.store.sync()
            return Created(session.info(), token)

        return await self._thread(load)

    def sessions(self) -> list[dict[str, Any]]:
        return [s.info() for s in self.store.sessions()]
