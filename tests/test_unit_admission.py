"""Admission on its own: the rules every mode shares, and each mode's own (optserver.modes)."""

from __future__ import annotations

import numpy as np
import pytest

from optserver.admission import admit, known_names, param_dtype
from optserver.config import Settings
from optserver.errors import ProblemError
from optserver.modes import AsyncMode, Mode, SSPMode, SyncMode
from optserver.push import Push
from optserver.session import Session
from optserver.store import SessionStore, StoreLimits


def session(mode: Mode | None = None, version: int = 5, **settings: object) -> Session:
    store = SessionStore(StoreLimits.from_settings(Settings(**settings)))  # type: ignore[arg-type]
    created, _ = store.create(
        optimizer={"name": "sgd", "lr": 0.5}, mode=mode, params={"w": np.zeros(2, np.float32)}
    )
    created.version = version
    return created


def grads(**extra: object) -> Push:
    return Push(grads={"w": np.ones(2, np.float32)}, **extra)  # type: ignore[arg-type]


def slug(s: Session, push: Push) -> str:
    with pytest.raises(ProblemError) as refused:
        admit(s, push)
    return refused.value.slug


def test_async_admits_any_version_up_to_the_current() -> None:
    s = session(AsyncMode())
    assert admit(s, grads(base_version=0)).apply
    assert slug(s, grads(base_version=6)) == "future-version"


def test_ssp_refuses_a_push_too_stale() -> None:
    s = session(SSPMode(name="ssp", max_staleness=2))
    assert admit(s, grads(base_version=3)).apply
    assert slug(s, grads(base_version=2)) == "stale-gradient"
    assert admit(s, grads()).apply  # without a base_version there is nothing to judge


def test_ssp_inverse_scaling_divides_lr_by_one_plus_staleness() -> None:
    mode = SSPMode(name="ssp", max_staleness=8, staleness_scaling="inverse")
    push = grads(base_version=2)
    assert mode.scales_lr(push) and mode.step_lr(push, 5, 0.8) == pytest.approx(0.2)
    assert not SSPMode(name="ssp", max_staleness=8).scales_lr(push)
    assert AsyncMode().step_lr(push, 5, 0.8) == 0.8


def test_sync_needs_a_worker_gradients_only_and_the_current_round() -> None:
    s = session(SyncMode(name="sync", workers=2, timeout_s=1))
    assert slug(s, grads()) == "worker-required"
    with_params = grads(worker="a", params={"w": np.zeros(2, np.float32)})
    assert slug(s, with_params) == "params-in-sync-round"
    assert slug(s, grads(worker="a", base_version=4)) == "stale-gradient"
    assert admit(s, grads(worker="a", base_version=5)).apply


def test_shared_rules() -> None:
    s = session()
    assert slug(s, Push(grads={})) == "no-gradients"
    assert slug(s, Push(grads={"v": np.ones(2, np.float32)})) == "unknown-tensor"
    assert slug(s, Push(grads={"w": np.ones(3, np.float32)})) == "shape-mismatch"
    assert slug(s, grads(lr=-1.0)) == "invalid-hyperparameter"
    stray = grads(params={"w": np.zeros(2, np.float32), "v": np.zeros(1, np.float32)})
    assert slug(s, stray) == "invalid-tensor"
    nan = Push(grads={"w": np.array([np.nan, 0], np.float32)})
    assert slug(s, nan) == "nonfinite"


def test_nonfinite_policies() -> None:
    nan = Push(grads={"w": np.array([np.nan, 0], np.float32)})
    skip = session(nonfinite="skip")
    skip.nonfinite = "skip"
    assert admit(skip, nan).apply is False
    allow = session()
    allow.nonfinite = "allow"
    assert admit(allow, nan).apply is True


def test_registering_tensors_respects_the_limits() -> None:
    s = session(max_tensors_per_session=1)
    new = Push(grads={"v": np.ones(1, np.float32)}, params={"v": np.ones(1, np.float32)})
    assert slug(s, new) == "too-many-tensors"
    s = session(max_total_bytes=16)  # sgd without momentum: 8 bytes held, no state arrays
    big = Push(grads={"v": np.ones(4, np.float32)}, params={"v": np.ones(4, np.float32)})
    assert slug(s, big) == "insufficient-storage"


def test_helpers() -> None:
    assert param_dtype(np.dtype(np.float16)) == np.float32
    assert param_dtype(np.dtype(">f8")) == np.float64
    assert known_names({}) == "no tensors yet"
    names = {f"t{i}": np.zeros(1) for i in range(12)}
    assert known_names(names).endswith("and 2 more")
