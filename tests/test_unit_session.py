"""Session mutations on their own: a refused push changes nothing, weights keep their state
when shape and dtype stay, the quota holds, outcomes are frozen copies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from optserver.config import Settings
from optserver.errors import InsufficientStorage, ProblemError
from optserver.modes import SyncMode
from optserver.push import Push, RoundMember
from optserver.replies import Answer, encode_outcome
from optserver.session import Session
from optserver.store import SessionStore, StoreLimits

JSON = Answer("json")


def store(**settings: object) -> SessionStore:
    return SessionStore(StoreLimits.from_settings(Settings(**settings)))  # type: ignore[arg-type]


def adam(s: SessionStore | None = None) -> Session:
    created, _ = (s if s is not None else store()).create(
        optimizer={"name": "adam", "lr": 0.1}, params={"w": np.array([1.0, 2.0], np.float32)}
    )
    return created


def snapshot(s: Session) -> tuple[object, ...]:
    with s.locked():
        return (
            s.version,
            {n: p.copy() for n, p in s.params.items()},
            {n: {k: v.copy() for k, v in st.arrays().items()} for n, st in s.state.items()},
            {n: st.step for n, st in s.state.items()},
        )


def same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return repr(a) == repr(b)


@pytest.mark.parametrize(
    "push",
    [
        Push(grads={"w": np.ones(3, np.float32)}),
        Push(grads={"w": np.array([np.inf, 0], np.float32)}),
        Push(grads={"w": np.ones(2, np.float32)}, base_version=9),
        Push(grads={"w": np.ones(2, np.float32)}, lr=-1.0),
        Push(grads={"w": np.ones(2, np.float32), "v": np.ones(1, np.float32)}),
    ],
)
def test_a_refused_push_changes_nothing_but_its_counters(push: Push) -> None:
    s = adam()
    s.step(Push(grads={"w": np.ones(2, np.float32)}), key=None, answer=JSON)
    before = snapshot(s)
    with pytest.raises(ProblemError) as refused:
        s.step(push, key="k", answer=JSON)
    assert same(snapshot(s), before)
    assert s.rejected[refused.value.slug] == 1 and s.pushes_received == 2
    assert list(s.replays.entries()) == []  # nothing remembered for a refused push


def test_a_step_returns_a_frozen_copy() -> None:
    s = adam()
    outcome = s.step(Push(grads={"w": np.ones(2, np.float32)}), key=None, answer=JSON)
    first = outcome.tensors.tensors["w"].copy()
    assert not outcome.tensors.tensors["w"].flags.writeable
    s.step(Push(grads={"w": np.ones(2, np.float32)}), key=None, answer=JSON)
    np.testing.assert_array_equal(outcome.tensors.tensors["w"], first)  # untouched by step 2
    assert outcome.version == 1 and s.version == 2


def test_a_replay_returns_the_first_outcome() -> None:
    s = adam()
    push = Push(grads={"w": np.ones(2, np.float32)})
    first = s.step(push, key="k", answer=JSON, fingerprint="f")
    again = s.step(push, key="k", answer=Answer("binary"), fingerprint="f")
    assert again.replayed and again.version == first.version == s.version == 1
    with pytest.raises(ProblemError) as reused:
        s.step(push, key="k", answer=JSON, fingerprint="other")
    assert reused.value.slug == "idempotency-key-reused"
    assert encode_outcome(again).media_type == "application/octet-stream"


def test_put_params_keeps_state_for_the_same_shape_and_dtype() -> None:
    s = adam()
    s.step(Push(grads={"w": np.ones(2, np.float32)}), key=None, answer=JSON)
    state = s.state["w"]
    s.put_params({"w": np.array([5.0, 5.0], np.float32)})
    assert s.state["w"] is state and state.step == 1
    np.testing.assert_array_equal(s.params["w"], [5.0, 5.0])
    s.put_params({"w": np.zeros(3, np.float32)})  # another shape: fresh state
    assert s.state["w"].step == 0 and s.params["w"].shape == (3,)
    s.put_params({"w": np.zeros(3, np.float64)})  # another dtype: fresh state
    assert s.params["w"].dtype == np.float64
    s.step(Push(grads={"w": np.ones(3, np.float64)}), key=None, answer=JSON)
    s.put_params({"w": np.zeros(3, np.float64)}, reset_state=True)
    assert s.state["w"].step == 0
    assert s.version == 2  # weights never change the version


def test_put_params_refuses_nan_weights_unless_allowed() -> None:
    s = adam()
    before = snapshot(s)
    with pytest.raises(ProblemError) as refused:
        s.put_params({"w": np.array([np.nan, 0], np.float32)})
    assert refused.value.slug == "nonfinite" and same(snapshot(s), before)
    s.configure(nonfinite="allow")
    s.put_params({"w": np.array([np.nan, 0], np.float32)})
    assert s.nonfinite_tensors() == ["w"]


def test_the_quota_counts_every_session() -> None:
    shared = store(max_total_bytes=64)
    adam(shared)  # 8 bytes of weights and 16 of adam's moments
    a = adam(shared)
    with pytest.raises(InsufficientStorage):
        a.put_params({"big": np.zeros(8, np.float32)})
    assert "big" not in a.params


def test_configure_changes_options_or_nothing() -> None:
    s = adam()
    s.configure(optimizer={"lr": 0.01}, schedule={"name": "step", "step_size": 2, "gamma": 0.5})
    assert s.base_lr == pytest.approx(0.01) and s.schedule is not None
    with pytest.raises(ProblemError):
        s.configure(optimizer={"name": "sgd"})
    with pytest.raises(ProblemError):
        s.configure(optimizer={"lr": -1.0})
    assert s.optimizer.name == "adam" and s.base_lr == pytest.approx(0.01)
    s.configure(schedule=None)
    assert s.schedule is None


def test_a_round_applies_the_mean_once() -> None:
    created, _ = store().create(
        optimizer={"name": "sgd", "lr": 1.0},
        mode=SyncMode(name="sync", workers=2, timeout_s=1),
        params={"w": np.zeros(2, np.float32)},
    )
    members = [
        RoundMember(Push(grads={"w": np.array([1.0, 0.0], np.float32)}, worker="a"), "ka", JSON),
        RoundMember(Push(grads={"w": np.array([0.0, 1.0], np.float32)}, worker="b"), None, JSON),
    ]
    outcomes = created.apply_round(members)
    assert [o.version for o in outcomes] == [1, 1] and created.steps_applied == 1
    np.testing.assert_array_equal(outcomes[0].tensors.tensors["w"], [-0.5, -0.5])
    assert [k for k, _ in created.replays.entries()] == ["ka"]
    assert created.workers.get("a") is not None and created.pushes_received == 2


def test_a_push_is_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission asks the optimizer to check the update (shapes, dtypes, lr) once; the step
    applies that plan without checking it again."""
    import optserver.admission as admission
    import optserver.optim.base as base
    import optserver.optim.checks as checks

    calls = {"grad": 0, "lr": 0, "fits": 0}
    check_grad, check_lr, check_fits = checks.check_grad, base.Optimizer.check_lr, checks.check_fits

    def counting_fits(*args: object) -> None:
        calls["fits"] += 1
        check_fits(*args)  # type: ignore[arg-type]

    def counting_grad(*args: object) -> None:
        calls["grad"] += 1
        check_grad(*args)  # type: ignore[arg-type]

    def counting_lr(self: base.Optimizer[Any, Any], *args: object, **kw: object) -> float:
        calls["lr"] += 1
        return check_lr(self, *args, **kw)  # type: ignore[arg-type]

    s = adam()
    monkeypatch.setattr(base, "check_grad", counting_grad)
    monkeypatch.setattr(admission, "check_fits", counting_fits)  # admission's own check
    monkeypatch.setattr(base.Optimizer, "check_lr", counting_lr)
    s.step(Push(grads={"w": np.ones(2, np.float32)}, lr=0.01), key=None, answer=JSON)
    assert calls == {"grad": 1, "lr": 1, "fits": 0}
    assert s.version == 1
