"""Parity of the optimizer core with torch.optim: stored reference vectors, and live."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import numpy as np
import pytest

from optserver.optim import OptState, create
from tests.reference import torch_optim as ref

RTOL = {"float64": 1e-6, "float32": 1e-5}


@cache
def reference() -> tuple[dict[str, Any], Any]:
    data = np.load(ref.DATA)
    meta = json.loads(str(data["meta"]))
    return meta, data


@cache
def ref_inputs() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return ref.inputs()


def run_ours(case: dict[str, Any], dtype: str) -> tuple[dict[int, dict[str, np.ndarray]], OptState]:
    params0, grads = ref_inputs()
    params = {n: p.astype(dtype) for n, p in params0.items()}
    opt = create({"name": case["optimizer"], **case["options"]})
    state = opt.init(params)
    checkpoints = {}
    for step in range(1, ref.STEPS + 1):
        batch = {
            n: np.asarray(grads[n][step - 1], dtype=dtype) for n in params if ref.has_grad(n, step)
        }
        opt.update(batch, state, params, lr=ref.learning_rate(case, step))
        if step in ref.CHECKPOINTS:
            checkpoints[step] = {n: p.copy() for n, p in params.items()}
    return checkpoints, state


def assert_matches(
    ours: tuple[dict[int, dict[str, np.ndarray]], OptState],
    theirs: tuple[dict[int, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]],
    dtype: str,
) -> None:
    rtol = RTOL[dtype]
    our_points, our_state = ours
    their_points, their_state = theirs
    assert sorted(our_points) == sorted(their_points)
    for step, params in their_points.items():
        for name, expected in params.items():
            got = our_points[step][name]
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_allclose(got, expected, rtol=rtol, atol=0, err_msg=f"{name}@{step}")
    for name, entry in their_state.items():
        arrays = our_state[name].arrays()
        for key, expected in entry.items():
            if key == "step":
                assert our_state[name].step == int(expected), name
                continue
            # State arrays may pass near zero: tolerance relative to the array's scale.
            scale = float(np.max(np.abs(expected))) or 1.0
            np.testing.assert_allclose(
                arrays[key], expected, rtol=rtol, atol=rtol * scale, err_msg=f"{name}.{key}"
            )
        # torch has no step count for SGD; everything else must agree on which arrays exist.
        assert set(arrays) == set(entry) - {"step"}, name


def stored(index: int, dtype: str) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, Any]]:
    _, data = reference()
    points: dict[int, dict[str, np.ndarray]] = {}
    state: dict[str, dict[str, np.ndarray]] = {}
    prefix = f"{index}/{dtype}/"
    for key in data.files:
        if not key.startswith(prefix):
            continue
        kind, *rest = key[len(prefix) :].split("/")
        if kind == "params":
            points.setdefault(int(rest[0]), {})[rest[1]] = data[key]
        else:
            state.setdefault(rest[0], {})[rest[1]] = data[key]
    return points, state


CASES = ref.cases()
IDS = [ref.case_id(c) for c in CASES]


def test_reference_data_is_current() -> None:
    meta, _ = reference()
    assert meta["steps"] == ref.STEPS
    assert meta["cases"] == CASES, "cases changed: run python tests/reference/torch_optim.py"
    assert meta["torch"].startswith("2.13.0")


def test_every_table_option_is_covered() -> None:
    """Each option of OPTIMIZERS.md's table takes a non-default value in some case."""
    table = {
        "sgd": ["lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize"],
        "adagrad": ["lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"],
        "rmsprop": ["lr", "alpha", "eps", "weight_decay", "momentum", "centered"],
        "adam": ["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"],
        "adamw": ["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"],
    }
    for name, options in table.items():
        # lr: every optimizer has a case that changes it at every step.
        assert any(c["optimizer"] == name and c["vary_lr"] for c in CASES), name
        options.remove("lr")
        defaults = create(name).config()
        for option in options:
            assert any(
                c["optimizer"] == name
                and c["options"].get(option, defaults[option]) != defaults[option]
                for c in CASES
            ), f"{name}.{option} never leaves its default"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_matches_stored_torch_vectors(index: int, dtype: str) -> None:
    assert_matches(run_ours(CASES[index], dtype), stored(index, dtype), dtype)


LIVE = [CASES[i] for i in range(0, len(CASES), 5)] + [c for c in CASES if c["vary_lr"]]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", LIVE, ids=[ref.case_id(c) for c in LIVE])
def test_matches_live_torch(case: dict[str, Any], dtype: str) -> None:
    """Against the installed torch, on a spread of the cases (all of them are in the data)."""
    pytest.importorskip("torch")
    assert_matches(run_ours(case, dtype), ref.run_torch(case, dtype), dtype)
