"""The store: the registry of a server's sessions, its limits, credentials and expiry.

Thread-safe and synchronous; it knows nothing of HTTP. The store's lock protects the registry
(sessions by id, token digests by session, deleted tokens, the counters of deleted sessions)
and the recorder it hands to sessions; each session's own lock protects that session (see
:mod:`optserver.session`). Lock order: the store's first, then sessions' in id order
(:meth:`SessionStore.frozen`). Errors are :mod:`optserver.errors` problems.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from optserver_client.vocabulary import ProblemSlug

from optserver import auth
from optserver.admission import hyper, param_dtype
from optserver.config import NonFinitePolicy, Settings
from optserver.errors import (
    Conflict,
    Forbidden,
    InsufficientStorage,
    LimitExceeded,
    NotFound,
    ProblemError,
    Unauthorized,
)
from optserver.modes import AsyncMode, Mode
from optserver.optim import ParamGroups
from optserver.optim.schedules import create_schedule
from optserver.push import Outcome, Push, Recorder, RoundMember
from optserver.session import KEEP, Session, SessionLimits
from optserver.sharding import Sharding

__all__ = [
    "KEEP",
    "Outcome",
    "Push",
    "Recorder",
    "RoundMember",
    "Session",
    "SessionStore",
    "StoreLimits",
]


@dataclass(frozen=True)
class StoreLimits(SessionLimits):
    """The store's limits; every value comes from :class:`~optserver.config.Settings`."""

    max_sessions: int

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreLimits:
        return cls(
            max_sessions=settings.max_sessions,
            max_tensors_per_session=settings.max_tensors_per_session,
            max_tensor_elements=settings.max_tensor_elements,
            idempotency_keys=settings.idempotency_keys,
            idempotency_bytes=settings.idempotency_bytes,
            max_total_bytes=settings.max_total_bytes,
        )


#: Deleted sessions' token digests kept (their holders get 404, not 401).
_DELETED_KEPT = 10_000


class SessionStore:
    """All sessions of a server, with their credentials."""

    def __init__(self, limits: StoreLimits, admin_key: str | None = None) -> None:
        self.limits = limits
        self.admin_key = admin_key
        self.recorder: Recorder | None = None
        #: Counters of deleted sessions, so that the server's totals never go down.
        self._retired: Counter[str] = Counter()
        self._sessions: dict[str, Session] = {}
        self._owners: dict[bytes, str] = {}  # token digest -> session id, to answer 403
        #: Digests of deleted sessions' tokens (bounded): their holders get 404, not 401.
        self._deleted: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    @contextmanager
    def frozen(self) -> Iterator[list[Session]]:
        """Every session, sorted by id, with nothing changing until the block ends: the
        store's lock and every session's lock are held (for a consistent snapshot)."""
        with self._lock, ExitStack() as held:
            sessions = sorted(self._sessions.values(), key=lambda s: s.id)
            for session in sessions:
                held.enter_context(session.locked())
            yield sessions

    def totals(self) -> dict[str, Any]:
        """Steps applied, pushes received and rejections by reason, over every session this
        server has held (since it started)."""
        counts = Counter(self._retired)
        for session in self.sessions():
            with session.locked():
                counts.update(session.counters())
        rejected = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("rejected:")}
        return {
            "steps_applied": counts["steps_applied"],
            "pushes_received": counts["pushes_received"],
            "rejected": rejected,
        }

    def total_bytes(self) -> int:
        # Without the store's lock: callers hold a session's lock (lock order: store first).
        return sum(s.memory_bytes for s in list(self._sessions.values()))

    def set_recorder(self, recorder: Recorder | None) -> None:
        """Record every change from now on (None: stop, e.g. while replaying the journal)."""
        with self._lock:
            self.recorder = recorder
            for session in self._sessions.values():
                session.recorder = recorder

    def sync(self) -> None:
        """Wait until every change recorded so far is durable."""
        if self.recorder is not None:
            self.recorder.sync()

    def wait(self, ticket: int | None) -> None:
        """Wait until the change with ``ticket`` is durable (at once without a recorder)."""
        if ticket is not None and self.recorder is not None:
            self.recorder.wait(ticket)

    @staticmethod
    def new_token(chosen: str | None = None) -> tuple[str, bytes]:
        """A session token (``chosen``, or a fresh one) and the digest that is all the server
        keeps of it."""
        return auth.new_token(chosen)

    def create(
        self,
        *,
        optimizer: str | Mapping[str, Any],
        name: str | None = None,
        mode: Mode | None = None,
        schedule: Mapping[str, Any] | str | None = None,
        nonfinite: NonFinitePolicy = "reject",
        params: Mapping[str, np.ndarray] | None = None,
        id: str | None = None,
        token: str | None = None,
        sharding: Sharding | None = None,
        dtype: np.dtype[Any] | None = None,
    ) -> tuple[Session, str]:
        """A new session and its token (the only time the token is seen in clear; ``token``
        chooses it, as ``id`` the id). ``dtype``: the weights' dtype the session is declared
        for (its hyperparameters must be finite in it). ``sharding``: its part of a sharded
        session."""
        token, digest = self.new_token(token)
        built = hyper(partial(ParamGroups.create, optimizer))
        if dtype is not None:
            hyper(partial(built.check_dtype, param_dtype(dtype)))
        session = Session(
            name=name or "",
            optimizer=built,
            schedule=hyper(partial(create_schedule, schedule)),
            mode=mode or AsyncMode(),
            nonfinite=nonfinite,
            limits=self.limits,
            token_digest=digest,
            id=id,
            sharding=sharding,
        )
        session.total_bytes = self.total_bytes
        if params:
            session.put_params(params)
        self.add(session)
        return session, token

    def add(self, session: Session) -> None:
        """Hold ``session`` (new, imported or recovered) and record it."""
        session.total_bytes = self.total_bytes
        quota = self.limits.max_total_bytes
        if quota is not None and self.total_bytes() + session.memory_bytes > quota:
            raise InsufficientStorage(
                f"the server holds {self.total_bytes()} bytes; this session would add "
                f"{session.memory_bytes}, over the quota of {quota}",
                quota=quota,
            )
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise LimitExceeded(
                    f"the server holds {len(self._sessions)} sessions, its limit; delete one first",
                    slug=ProblemSlug.TOO_MANY_SESSIONS,
                )
            if session.id in self._sessions:
                raise Conflict(f"session {session.id} exists already")
            if session.token_digest in self._owners:  # a chosen token: one session per token
                raise Conflict("the token opens another session here already; choose another")
            if self.recorder is not None:
                with session.locked():
                    self.recorder.created(session)
            self._sessions[session.id] = session
            self._owners[session.token_digest] = session.id
            session.recorder = self.recorder

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}", slug=ProblemSlug.UNKNOWN_SESSION)
        return session

    def open(self, session_id: str, token: str | None) -> Session:
        """The session, if ``token`` opens it (401 wrong or missing, 403 another's token).

        Credentials are checked before existence: without a valid token (this or another
        session's, or the admin key) the answer is 401 whether or not the session exists, so
        ids cannot be probed."""
        if token is None:
            raise Unauthorized("this route needs 'Authorization: Bearer <session token>'")
        session = self._sessions.get(session_id)
        admin = auth.is_admin(token, self.admin_key)
        if session is None:
            digest = auth.digest(token)
            if not admin and digest not in self._owners and digest not in self._deleted:
                raise Unauthorized(f"the token does not open session {session_id}")
            raise NotFound(f"no session {session_id!r}", slug=ProblemSlug.UNKNOWN_SESSION)
        if not admin and not auth.opens(token, session.token_digest):
            if self._owners.get(auth.digest(token)) is not None:
                raise Forbidden(f"this token belongs to another session, not to {session_id}")
            raise Unauthorized(f"the token does not open session {session_id}")
        session.last_used = time.time()
        return session

    def check_admin(self, token: str | None) -> None:
        """Raise unless the admin key is configured-off or presented."""
        auth.check_admin(token, self.admin_key)

    def delete(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise NotFound(f"no session {session_id!r}", slug=ProblemSlug.UNKNOWN_SESSION)
            if self.recorder is not None:
                self.recorder.deleted(session_id)
            del self._sessions[session_id]
            self._owners.pop(session.token_digest, None)
            self._deleted[session.token_digest] = None
            if len(self._deleted) > _DELETED_KEPT:
                self._deleted.popitem(last=False)
            session.recorder = None
            with session.locked():
                self._retired.update(session.counters())

    def expire(self, idle_s: float) -> list[str]:
        """Delete the sessions nobody has used for ``idle_s`` seconds; their ids."""
        cutoff = time.time() - idle_s
        gone = []
        for session in self.sessions():
            if max(session.last_used, session.updated_at) < cutoff:
                try:
                    self.delete(session.id)
                except NotFound:
                    continue
                except ProblemError:  # the journal cannot record it now: the next round retries
                    continue
                gone.append(session.id)
        return gone
