"""The optimizer core's ``finite`` updates against extreme inputs: every result is finite, or
the step is refused with everything bit for bit as it was; an accepted result is the same as an
unguarded step's; and ordinary steps take no rollback copy."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optserver.optim import create
from optserver.optim.base import magnitude_bound
from optserver.optim.errors import NonFiniteStep
from optserver.optim.kernels import scan

CONFIGS: list[dict[str, Any]] = [
    {"name": "sgd", "lr": 0.1},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.5},
    {"name": "adagrad", "lr": 0.1, "weight_decay": 0.1, "lr_decay": 0.01},
    {"name": "adagrad", "lr": 0.1, "eps": 0.0},
    {"name": "rmsprop", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.1},
    {"name": "rmsprop", "lr": 0.01, "centered": True},
    {"name": "rmsprop", "lr": 0.01, "eps": 0.0, "alpha": 1.0},
    {"name": "rmsprop", "lr": 0.01, "eps_inside_sqrt": True},
    {"name": "adam", "lr": 0.01, "amsgrad": True, "weight_decay": 0.1},
    {"name": "adam", "lr": 0.01, "eps": 0.0},
    {"name": "adamw", "lr": 0.01, "weight_decay": 0.5, "betas": [0.0, 0.0]},
]

# Ordinary values, values near the magnitude bound, and values near the dtype's largest.
EDGES = [0.0, 1e-30, -1.0, 0.5, 3.0, 1e8, 2e9, -1e19, 1e30, 3e38, -3.4e38]


def _snapshot(params: dict[str, np.ndarray], state: Any) -> list[bytes]:
    out = [p.tobytes() for p in params.values()]
    for name in params:
        s = state[name]
        out.append(str(s.step).encode())
        out += [a.tobytes() for a in s.arrays().values()]
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(CONFIGS),
    dtype=st.sampled_from([np.float32, np.float64]),
    p0=st.lists(st.sampled_from(EDGES), min_size=3, max_size=3),
    grads=st.lists(st.lists(st.sampled_from(EDGES), min_size=3, max_size=3), max_size=4),
    lr=st.sampled_from([None, 1.0, 1e6, 1e30, 1e300]),
)
def test_finite_updates_are_finite_or_change_nothing(
    config: dict[str, Any], dtype: Any, p0: list[float], grads: list[list[float]], lr: Any
) -> None:
    """Several steps on two tensors; each step is either finite everywhere, or refused with
    weights and state (both tensors) exactly as they were. An accepted step equals the
    unguarded step bit for bit."""
    opt, twin = create(config), create(config)
    with np.errstate(over="ignore"):
        params = {"a": np.array(p0, dtype), "b": np.array([1.0, -2.0, 0.25], dtype)}
    if not all(np.isfinite(p).all() for p in params.values()):
        return  # an input beyond the dtype: not a finite input
    lr = None if lr is not None and lr > float(np.finfo(dtype).max) else lr
    state, mirror = opt.init(params), twin.init({k: v.copy() for k, v in params.items()})
    mirror_params = {k: v.copy() for k, v in params.items()}
    for g in grads:
        with np.errstate(over="ignore"):
            step = {"a": np.array(g, dtype), "b": np.array(g[::-1], dtype)}
        if not all(np.isfinite(x).all() for x in step.values()):
            continue
        bound = magnitude_bound(np.dtype(dtype))
        large = [n for n, x in step.items() if scan(x, bound)[1]]
        before = _snapshot(params, state)
        try:
            opt.update(step, state, params, lr=lr, finite=True, large=large)
        except NonFiniteStep as exc:
            refused = exc.tensor
            assert refused in step
            assert _snapshot(params, state) == before, "a refused step changed something"
            continue
        for name, p in params.items():
            assert np.isfinite(p).all(), name
            for array in state[name].arrays().values():
                assert np.isfinite(array).all(), name
        with np.errstate(all="ignore"):
            twin.update(step, mirror, mirror_params, lr=lr)
        assert _snapshot(params, state) == _snapshot(mirror_params, mirror)


def test_steady_state_steps_copy_nothing() -> None:
    """Ordinary values: after the first step (which has no checked state yet) a finite update
    allocates nothing of the parameter's size, i.e. takes no rollback copy."""
    n = 1 << 20
    opt = create({"name": "adam", "lr": 1e-3})
    params = {"w": np.random.default_rng(0).standard_normal(n).astype(np.float32)}
    state = opt.init(params)
    grad = {"w": np.ones(n, np.float32)}
    opt.update(grad, state, params, finite=True)
    assert not state["w"].unchecked
    tracemalloc.start()
    try:
        opt.update(grad, state, params, finite=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n  # a copy of w alone would be 4n bytes


def test_guarded_and_unguarded_steps_agree_near_the_bound() -> None:
    """Values just above the bound make the next steps guarded (a rollback copy each); their
    results are bit for bit those of unguarded steps."""
    bound = magnitude_bound(np.dtype(np.float32))
    opt = create({"name": "sgd", "lr": 1e-3, "momentum": 0.9})
    params = {"w": np.array([bound * 2, 1.0], np.float32)}
    mirror = {"w": params["w"].copy()}
    state, mirror_state = opt.init(params), opt.init(mirror)
    for g in ([1.0, 1.0], [-3.0, 0.5], [2.0, -1.0]):
        grad = {"w": np.array(g, np.float32)}
        assert opt.guarded(grad, state, params) == ["w"]  # outside the bound: keep guarding
        opt.update(grad, state, params, finite=True)
        opt.update(grad, mirror_state, mirror)
        assert state["w"].unchecked
    assert _snapshot(params, state) == _snapshot(mirror, mirror_state)


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    values=st.lists(
        st.sampled_from([*EDGES, np.nan, np.inf, -np.inf, 6e4, 1e300]), min_size=0, max_size=40
    ),
    readonly=st.booleans(),
)
def test_scan_counts_nonfinite_and_finds_values_outside_the_bound(
    dtype: Any, values: list[float], readonly: bool
) -> None:
    with np.errstate(over="ignore"):
        array = np.array(values, dtype=dtype)
    array.flags.writeable = not readonly
    bound = magnitude_bound(array.dtype)
    wide = array.astype(np.float64)
    expected = (int(np.count_nonzero(~np.isfinite(wide))), bool(not (np.abs(wide) <= bound).all()))
    assert scan(array, bound) == expected
    assert scan(array[::2], bound) == scan(array[::2].copy(), bound)  # strided: same answer
