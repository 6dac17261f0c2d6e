"""Behaviour of the optimizer core beyond parity: validation, state round trips, in-place."""

from __future__ import annotations

import io
import tracemalloc
from typing import Any

import numpy as np
import pytest

from optserver.optim import (
    OPTIMIZERS,
    HyperparameterError,
    OptState,
    TensorError,
    configure_threads,
    create,
)
from optserver.optim.kernels import MIN_PART

# Options that switch on every state array an optimizer can have.
FULL_OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    "adagrad": {"lr": 0.05, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    "rmsprop": {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 1e-3},
    "adam": {"lr": 0.01, "amsgrad": True, "weight_decay": 1e-3},
    "adamw": {"lr": 0.01, "amsgrad": True},
}


def make_params(dtype: str = "float64", seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((6, 7)).astype(dtype),
        "b": rng.standard_normal(7).astype(dtype),
        "s": np.asarray(rng.standard_normal(), dtype=dtype),
    }


def grads_at(step: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return {n: rng.standard_normal(p.shape).astype(p.dtype) for n, p in params.items()}


def serialize(state: OptState) -> bytes:
    """Through bytes, as an export would go: only arrays and integers survive."""
    buffer = io.BytesIO()
    arrays = {f"{n}/{k}": a for n, s in state.items() for k, a in s.arrays().items()}
    arrays.update({f"{n}/step": np.asarray(s.step) for n, s in state.items()})
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def deserialize(blob: bytes) -> dict[str, tuple[int, dict[str, np.ndarray]]]:
    data = np.load(io.BytesIO(blob))
    out: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
    for key in data.files:
        name, field = key.split("/")
        step, arrays = out.get(name, (0, {}))
        if field == "step":
            step = int(data[key])
        else:
            arrays[field] = data[key]
        out[name] = (step, arrays)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_export_import_continue_equals_uninterrupted(name: str, dtype: str) -> None:
    k = 25
    opt = create({"name": name, **FULL_OPTIONS[name]})
    straight = make_params(dtype)
    straight_state = opt.init(straight)
    for step in range(2 * k):
        opt.update(grads_at(step, straight), straight_state, straight)

    first = make_params(dtype)
    first_state = opt.init(first)
    for step in range(k):
        opt.update(grads_at(step, first), first_state, first)
    config, blob = opt.config(), serialize(first_state)
    weights = {n: p.copy() for n, p in first.items()}
    del first, first_state

    resumed_opt = create(config)
    assert resumed_opt.config() == opt.config()
    resumed_state = {
        n: resumed_opt.restore_tensor(weights[n], step=step, arrays=arrays)
        for n, (step, arrays) in deserialize(blob).items()
    }
    for step in range(k, 2 * k):
        resumed_opt.update(grads_at(step, weights), resumed_state, weights)

    for n in straight:
        assert np.array_equal(weights[n], straight[n]), n
        assert resumed_state[n].step == straight_state[n].step == 2 * k
        ours, theirs = resumed_state[n].arrays(), straight_state[n].arrays()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert np.array_equal(ours[key], theirs[key]), f"{n}.{key}"


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"name": "sgd", "lr": -0.1}, ["lr", "-0.1"]),
        ({"name": "sgd", "momentum": -1}, ["momentum", "-1"]),
        ({"name": "sgd", "nesterov": True}, ["momentum", "nesterov"]),
        ({"name": "sgd", "momentum": 0.9, "dampening": 0.1, "nesterov": True}, ["dampening"]),
        ({"name": "sgd", "weight_decay": -1e-4}, ["weight_decay", "-0.0001"]),
        ({"name": "sgd", "lr": "fast"}, ["lr", "'fast'"]),
        ({"name": "sgd", "lr": float("nan")}, ["lr", "nan"]),
        ({"name": "sgd", "nesterov": 1}, ["nesterov", "1"]),
        ({"name": "sgd", "momentun": 0.9}, ["momentun", "momentum"]),
        ({"name": "adam", "betas": [0.9, 1.0]}, ["betas[1]", "1.0", "[0, 1)"]),
        ({"name": "adam", "betas": [-0.1, 0.99]}, ["betas[0]", "-0.1"]),
        ({"name": "adam", "betas": 0.9}, ["betas", "0.9"]),
        ({"name": "adam", "eps": -1e-8}, ["eps", "-1e-08"]),
        ({"name": "adamw", "decoupled_weight_decay": False}, ["decoupled_weight_decay"]),
        ({"name": "adagrad", "lr_decay": -1}, ["lr_decay", "-1"]),
        ({"name": "adagrad", "initial_accumulator_value": -0.5}, ["initial_accumulator_value"]),
        ({"name": "rmsprop", "alpha": 1.5}, ["alpha", "1.5"]),
        ({"name": "rmsprop", "centered": "yes"}, ["centered", "'yes'"]),
        ({"name": "lbfgs"}, ["lbfgs", "sgd", "adam"]),
        ({"lr": 0.1}, ["name"]),
    ],
)
def test_bad_hyperparameters_are_named(config: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(HyperparameterError) as info:
        create(config)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_defaults_are_torchs() -> None:
    assert create("sgd").config() == {
        "name": "sgd", "lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
        "nesterov": False, "maximize": False,
    }  # fmt: skip
    assert create("adagrad").hparams.eps == 1e-10
    assert create("adagrad").hparams.lr == 1e-2
    assert (create("rmsprop").hparams.alpha, create("rmsprop").hparams.eps) == (0.99, 1e-8)
    assert create("adam").hparams.betas == (0.9, 0.999)
    assert create("adam").hparams.weight_decay == 0.0
    assert create("adamw").hparams.weight_decay == 1e-2


def test_with_options_validates_and_keeps_state_usable() -> None:
    params = make_params()
    opt = create({"name": "sgd", "lr": 0.1})
    state = opt.init(params)
    opt.update(grads_at(0, params), state, params)
    with pytest.raises(HyperparameterError, match="lr"):
        opt.with_options({"lr": -1.0})
    # Momentum switched on mid-run: the buffer starts at that step's gradient, as in torch.
    faster = opt.with_options({"momentum": 0.9})
    assert faster.hparams.lr == 0.1
    assert faster.hparams.momentum == 0.9
    before = params["w"].copy()
    g = grads_at(1, params)
    faster.update(g, state, params)
    np.testing.assert_array_equal(state["w"].arrays()["momentum_buffer"], g["w"])
    np.testing.assert_allclose(params["w"], before - 0.1 * g["w"], rtol=1e-15)


def test_lr_override_applies_to_one_step_only() -> None:
    params, twin = make_params(), make_params()
    opt = create({"name": "sgd", "lr": 0.1})
    state, twin_state = opt.init(params), opt.init(twin)
    g = grads_at(0, params)
    opt.update(g, state, params, lr=0.5)
    np.testing.assert_allclose(params["w"], twin["w"] - 0.5 * g["w"], rtol=1e-15)
    opt.update(g, twin_state, twin, lr=0.5)
    opt.update(g, state, params)
    np.testing.assert_allclose(params["w"], twin["w"] - 0.1 * g["w"], rtol=1e-15)
    with pytest.raises(HyperparameterError, match="lr"):
        opt.update(g, state, params, lr=-1)


def test_partial_update_steps_only_named_tensors() -> None:
    params = make_params()
    opt = create("adam")
    state = opt.init(params)
    untouched = params["b"].copy()
    opt.update({"w": grads_at(0, params)["w"]}, state, params)
    assert state["w"].step == 1
    assert state["b"].step == 0
    np.testing.assert_array_equal(params["b"], untouched)


@pytest.mark.parametrize(
    ("grads", "words"),
    [
        ({"w": np.zeros((6, 7)), "b": np.zeros(8)}, ["'b'", "[8]", "[7]"]),
        ({"w": np.zeros((6, 7)), "nope": np.zeros(7)}, ["'nope'"]),
        ({"w": np.zeros((6, 7)), "b": np.zeros(7, dtype=np.int64)}, ["'b'", "int64"]),
        ({"w": np.zeros((6, 7)), "b": [0.0] * 7}, ["'b'", "numpy"]),
    ],
)
def test_bad_gradient_changes_nothing(grads: dict[str, Any], words: list[str]) -> None:
    params = make_params()
    opt = create({"name": "adam", "amsgrad": True})
    state = opt.init(params)
    opt.update(grads_at(0, params), state, params)
    before = {n: p.copy() for n, p in params.items()}
    arrays_before = {n: {k: a.copy() for k, a in s.arrays().items()} for n, s in state.items()}
    with pytest.raises(TensorError) as info:
        opt.update(grads, state, params)
    for word in words:
        assert word in str(info.value)
    for n in params:
        np.testing.assert_array_equal(params[n], before[n])
        assert state[n].step == 1
        for k, a in state[n].arrays().items():
            np.testing.assert_array_equal(a, arrays_before[n][k])


def test_float16_gradient_for_float32_parameter() -> None:
    params = make_params("float32")
    twin = make_params("float32")
    opt = create({"name": "adam", "lr": 0.01})
    state, twin_state = opt.init(params), opt.init(twin)
    g16 = {n: g.astype(np.float16) for n, g in grads_at(0, params).items()}
    opt.update(g16, state, params)
    opt.update({n: g.astype(np.float32) for n, g in g16.items()}, twin_state, twin)
    for n in params:
        assert params[n].dtype == np.float32
        assert state[n].arrays()["exp_avg"].dtype == np.float32
        np.testing.assert_array_equal(params[n], twin[n])
    with pytest.raises(TensorError, match="float64"):
        opt.update({"w": np.zeros((6, 7))}, state, params)  # no silent narrowing


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_state_takes_the_parameter_dtype(dtype: str) -> None:
    params = make_params(dtype)
    for name, options in FULL_OPTIONS.items():
        opt = create({"name": name, **options})
        state = opt.init(params)
        opt.update(grads_at(0, params), state, params)
        for n, s in state.items():
            for key, array in s.arrays().items():
                assert array.dtype == np.dtype(dtype), key
                assert array.shape == params[n].shape, key


def test_parameters_must_be_float_and_writable() -> None:
    opt = create("sgd")
    with pytest.raises(TensorError, match="int32"):
        opt.init({"w": np.zeros(3, dtype=np.int32)})
    frozen = np.zeros(3)
    frozen.flags.writeable = False
    with pytest.raises(TensorError, match="writable"):
        opt.init({"w": frozen})


def test_restore_rejects_mismatched_state() -> None:
    param = np.zeros((2, 3))
    opt = create("adam")
    good = {"exp_avg": np.zeros((2, 3)), "exp_avg_sq": np.zeros((2, 3))}
    assert opt.restore_tensor(param, step=4, arrays=good).step == 4
    with pytest.raises(TensorError, match=r"exp_avg.*\[3, 2\]"):
        opt.restore_tensor(param, step=4, arrays={**good, "exp_avg": np.zeros((3, 2))})
    with pytest.raises(TensorError, match="float32"):
        opt.restore_tensor(
            param, step=4, arrays={**good, "exp_avg": np.zeros((2, 3), dtype=np.float32)}
        )
    with pytest.raises(TensorError, match="'momentum'"):
        opt.restore_tensor(param, step=4, arrays={**good, "momentum": np.zeros((2, 3))})
    with pytest.raises(TensorError, match="exp_avg_sq"):
        opt.restore_tensor(param, step=4, arrays={"exp_avg": np.zeros((2, 3))})
    with pytest.raises(TensorError, match="step"):
        opt.restore_tensor(param, step=-1, arrays=good)


def test_rmsprop_eps_inside_sqrt_follows_the_seed_equation() -> None:
    """The seed's RMSProp (and RMSProp with momentum), written out naively in float64:
    r = rho*r + (1-rho)*g^2;  v = eps_m*v - lr*g/sqrt(delta + r);  w = w + v."""
    rho, delta, lr, mom = 0.9, 1e-5, 0.01, 0.5
    for momentum in (0.0, mom):
        params = make_params()
        opt = create(
            {"name": "rmsprop", "lr": lr, "alpha": rho, "eps": delta, "momentum": momentum,
             "eps_inside_sqrt": True}
        )  # fmt: skip
        state = opt.init(params)
        w = {n: p.copy() for n, p in params.items()}
        r = {n: np.zeros_like(p) for n, p in params.items()}
        v = {n: np.zeros_like(p) for n, p in params.items()}
        for step in range(200):
            g = grads_at(step, params)
            opt.update(g, state, params)
            for n in w:
                r[n] = rho * r[n] + (1 - rho) * g[n] ** 2
                if momentum:
                    v[n] = momentum * v[n] - lr * g[n] / np.sqrt(delta + r[n])
                    w[n] = w[n] + v[n]
                else:
                    w[n] = w[n] - lr * g[n] / np.sqrt(delta + r[n])
        for n in w:
            np.testing.assert_allclose(params[n], w[n], rtol=1e-12)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_allocates_no_full_size_array(name: str) -> None:
    """Fused in-place kernels: a 1M-element float32 step allocates far less than 4 MB."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(1_000_000).astype(np.float32)}
    grads = {"w": rng.standard_normal(1_000_000).astype(np.float32)}
    opt = create({"name": name, **FULL_OPTIONS[name]})
    state = opt.init(params)
    opt.update(grads, state, params)  # compile and allocate lazily created state first
    address = params["w"].__array_interface__["data"][0]
    tracemalloc.start()
    try:
        opt.update(grads, state, params)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000, f"{name} step allocated {peak} bytes"
    assert params["w"].__array_interface__["data"][0] == address


def test_threaded_split_equals_single_thread() -> None:
    """Large arrays are split over threads; the split must not change a single bit."""
    rng = np.random.default_rng(0)
    n = 1_000_003
    results = []
    previous = configure_threads(1)
    try:
        for threads in (1, 3):
            configure_threads(threads)
            params = {"w": np.linspace(-1, 1, n, dtype=np.float32)}
            opt = create({"name": "adam", "amsgrad": True})
            state = opt.init(params)
            for _ in range(3):
                opt.update({"w": rng.standard_normal(n).astype(np.float32)}, state, params)
            results.append(params["w"])
            rng = np.random.default_rng(0)
    finally:
        configure_threads(previous)
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop"])
def test_a_step_split_over_threads_equals_the_step_on_one(name: str) -> None:
    """Past twice MIN_PART elements a step is cut into parts run on several threads; each
    element's result is what one thread computes (the kernels are elementwise)."""
    n = 2 * MIN_PART + 3  # parts that do not divide evenly
    rng = np.random.default_rng(7)
    start, grads = (
        rng.standard_normal(n, dtype=np.float32),
        rng.standard_normal(n, dtype=np.float32),
    )
    results = []
    for threads in (1, 2):
        previous = configure_threads(threads)
        try:
            opt = create({"name": name, "lr": 0.01})
            weights = start.copy()
            state = opt.init({"w": weights})
            for _ in range(2):
                opt.update({"w": grads}, state, {"w": weights})
            results.append(weights)
        finally:
            configure_threads(previous)
    np.testing.assert_array_equal(results[0], results[1])
