"""The store as a registry: limits, credentials, deletion, expiry, totals, frozen views."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from optserver.config import Settings
from optserver.errors import Forbidden, LimitExceeded, NotFound, Unauthorized
from optserver.push import Push
from optserver.replies import Answer
from optserver.store import SessionStore, StoreLimits

ADMIN = "the-admin-key"


def store(**settings: object) -> SessionStore:
    limits = StoreLimits.from_settings(Settings(**settings))  # type: ignore[arg-type]
    return SessionStore(limits, admin_key=ADMIN)


def test_limits_come_from_the_settings() -> None:
    settings = Settings(max_sessions=3, idempotency_keys=7, max_total_bytes=99)
    limits = StoreLimits.from_settings(settings)
    assert (limits.max_sessions, limits.idempotency_keys, limits.max_total_bytes) == (3, 7, 99)
    with pytest.raises(TypeError):
        StoreLimits()  # type: ignore[call-arg]  # no defaults of its own


def test_the_session_limit() -> None:
    s = store(max_sessions=2)
    for _ in range(2):
        s.create(optimizer="sgd")
    with pytest.raises(LimitExceeded):
        s.create(optimizer="sgd")
    assert len(s) == 2


def test_tokens_open_their_own_session_only() -> None:
    s = store()
    a, token_a = s.create(optimizer="sgd")
    b, token_b = s.create(optimizer="sgd")
    assert s.open(a.id, token_a) is a and s.open(a.id, ADMIN) is a
    with pytest.raises(Forbidden):
        s.open(a.id, token_b)
    for bad in (None, "not-a-token"):
        with pytest.raises(Unauthorized):
            s.open(a.id, bad)
        with pytest.raises(Unauthorized):
            s.open("0" * 32, bad)  # the same answer whether or not the session exists
    with pytest.raises(NotFound):
        s.open("0" * 32, token_b)
    s.check_admin(ADMIN)
    with pytest.raises(Unauthorized):
        s.check_admin(token_a)
    assert a.token_digest != b.token_digest and token_a not in repr(vars(a))


def test_deleted_sessions_keep_their_counts_and_answer_404() -> None:
    s = store()
    a, token = s.create(optimizer={"name": "sgd", "lr": 1.0}, params={"w": np.zeros(2)})
    a.step(Push(grads={"w": np.ones(2)}), key=None, answer=Answer("json"))
    a.reject("malformed-body")
    s.delete(a.id)
    with pytest.raises(NotFound):
        s.open(a.id, token)
    with pytest.raises(NotFound):
        s.delete(a.id)
    totals = s.totals()
    assert totals["steps_applied"] == 1 and totals["pushes_received"] == 2
    assert totals["rejected"] == {"malformed-body": 1}


def test_expiry_deletes_idle_sessions() -> None:
    s = store()
    idle, _ = s.create(optimizer="sgd")
    busy, _ = s.create(optimizer="sgd")
    idle.last_used = idle.updated_at = time.time() - 100
    assert s.expire(50) == [idle.id]
    assert [x.id for x in s.sessions()] == [busy.id]


def test_frozen_holds_every_session_still() -> None:
    s = store()
    a, _ = s.create(optimizer={"name": "sgd", "lr": 1.0}, params={"w": np.zeros(2)})
    stepped = threading.Event()

    def push() -> None:
        a.step(Push(grads={"w": np.ones(2)}), key=None, answer=Answer("json"))
        stepped.set()

    with s.frozen() as sessions:
        assert sessions == [a]
        worker = threading.Thread(target=push)
        worker.start()
        assert not stepped.wait(0.2)  # the push waits for the session's lock
        assert a.version == 0
    worker.join(5)
    assert stepped.is_set() and a.version == 1
