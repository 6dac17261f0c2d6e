"""Checking an update once: ``prepare`` checks it and returns a plan, ``apply`` steps the plan."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from optserver.optim import HyperparameterError, TensorError, TensorSpec, checks, create
from tests.test_optim_core import grads_at, make_params


def test_update_checks_each_gradient_and_the_lr_once(monkeypatch: pytest.MonkeyPatch) -> None:
    params = make_params()
    opt = create("adam")
    state = opt.init(params)
    fits: list[str] = []
    rates: list[float] = []
    check_fits, check_lr = checks.check_fits, opt.check_lr

    def counted_fits(name: str, *args: Any) -> None:
        fits.append(name)
        check_fits(name, *args)

    def counted_lr(lr: float, *args: Any) -> float:
        rates.append(lr)
        return check_lr(lr, *args)

    monkeypatch.setattr(checks, "check_fits", counted_fits)
    monkeypatch.setattr(opt, "check_lr", counted_lr)
    opt.update(grads_at(0, params), state, params, lr=0.01, finite=True)
    assert sorted(fits) == sorted(params)
    assert rates == [0.01]


def test_prepare_then_apply_equals_update() -> None:
    params, twin = make_params(), make_params()
    opt = create({"name": "rmsprop", "momentum": 0.9, "centered": True})
    state, twin_state = opt.init(params), opt.init(twin)
    for step in range(3):
        g = grads_at(step, params)
        plan = opt.prepare(g, params, lr=1)
        assert plan.lr == 1.0
        assert isinstance(plan.lr, float)
        opt.apply(plan, state, params, finite=True)
        opt.update(g, twin_state, twin, lr=1.0)
    for n in params:
        np.testing.assert_array_equal(params[n], twin[n])


def test_prepare_against_weights_still_to_be_set() -> None:
    """A gradient checked against the spec of weights the caller sets before applying."""
    opt = create("sgd")
    grads = {"w": np.ones((2, 3), dtype=np.float16)}
    plan = opt.prepare(grads, {"w": TensorSpec((2, 3), np.dtype(np.float32))})
    params = {"w": np.zeros((2, 3), dtype=np.float32)}
    state = opt.init(params)
    opt.apply(plan, state, params)
    np.testing.assert_array_equal(params["w"], np.full((2, 3), -1e-3, dtype=np.float32))
    with pytest.raises(TensorError, match="float32"):
        opt.prepare({"w": np.ones((2, 3))}, {"w": TensorSpec((2, 3), np.dtype(np.float32))})
    with pytest.raises(TensorError, match="int32"):
        opt.prepare(grads, {"w": TensorSpec((2, 3), np.dtype(np.int32))})
    with pytest.raises(HyperparameterError, match="lr"):
        opt.prepare(grads, params, lr=-1)
    with pytest.raises(HyperparameterError, match="float32"):
        opt.prepare(grads, params, lr=1e300)  # finite in the dtypes it steps


def test_apply_refuses_a_parameter_the_plan_was_not_checked_for() -> None:
    params = make_params()
    opt = create("adam")
    state = opt.init(params)
    plan = opt.prepare(grads_at(0, params), params)
    before = {n: p.copy() for n, p in params.items()}
    for other in ({**params, "b": np.zeros(8)}, {**params, "b": params["b"].astype(np.float32)}):
        with pytest.raises(TensorError, match="'b'"):
            opt.apply(plan, state, other)
    with pytest.raises(TensorError, match="no optimizer state"):
        opt.apply(plan, {"w": state["w"]}, params)
    with pytest.raises(TensorError, match="not sgd state"):
        create("sgd").apply(plan, state, params)
    for n in params:
        np.testing.assert_array_equal(params[n], before[n])
        assert state[n].step == 0


def test_apply_without_the_parameter_changes_nothing() -> None:
    params = make_params()
    opt = create("sgd")
    state = opt.init(params)
    plan = opt.prepare(grads_at(0, params), params)
    before = params["w"].copy()
    with pytest.raises(TensorError, match="'b'"):
        opt.apply(plan, state, {"w": params["w"], "s": params["s"]})
    np.testing.assert_array_equal(params["w"], before)


def test_step_tensor_checks_its_lr_as_update_does() -> None:
    params, twin = make_params("float32"), make_params("float32")
    opt = create({"name": "adam", "amsgrad": True})
    state, twin_state = opt.init(params), opt.init(twin)
    g = grads_at(0, params)
    for name in params:
        opt.step_tensor(params[name], g[name], state[name], lr=0.5)
    opt.update(g, twin_state, twin, lr=0.5)
    for name in params:
        np.testing.assert_array_equal(params[name], twin[name])
    with pytest.raises(HyperparameterError, match="lr"):
        opt.step_tensor(params["w"], g["w"], state["w"], lr=-1)
    with pytest.raises(HyperparameterError, match="float32"):
        opt.step_tensor(params["w"], g["w"], state["w"], lr=1e300)
    assert state["w"].step == 1
