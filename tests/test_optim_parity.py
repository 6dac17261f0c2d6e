"""Parity of the optimizer core with torch.optim: stored reference vectors, and live."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optserver.optim import (
    OPTIMIZERS,
    SGD,
    HyperparameterError,
    Optimizer,
    OptState,
    ParamGroups,
    create,
)
from optserver.optim.sgd import SGDHyperparams
from tests import test_optim_core as core
from tests.reference import torch_optim as ref

README = Path(__file__).resolve().parents[1] / "README.md"

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
    groups = [{"name": str(i), **g} for i, g in enumerate(case.get("groups", ()))]
    opt = ParamGroups.create({"name": case["optimizer"], **case["options"], "groups": groups})
    state = opt.init(params)
    checkpoints = {}
    for step in range(1, ref.STEPS + 1):
        batch = {
            n: np.asarray(grads[n][step - 1], dtype=dtype) for n in params if ref.has_grad(n, step)
        }
        opt.update(
            batch, state, params, lr=ref.learning_rate(case, step),
            overrides=ref.group_options(case, step),
        )  # fmt: skip
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


# Options no torch parity case can cover, and the test that checks each one instead.
NOT_IN_TORCH: dict[str, dict[str, Callable[[], None]]] = {
    "rmsprop": {"eps_inside_sqrt": core.test_rmsprop_eps_inside_sqrt_follows_the_seed_equation},
}
# Flags an optimizer accepts at their default only (adamw is adam with this one set).
FIXED: dict[str, set[str]] = {"adamw": {"decoupled_weight_decay"}}


def uncovered(
    cases: list[dict[str, Any]], optimizers: Mapping[str, type[Optimizer[Any, Any]]] = OPTIMIZERS
) -> list[str]:
    """``optimizer.option`` for each declared hyperparameter that no case moves off its
    default (``lr``: that no case changes at every step), except those of NOT_IN_TORCH and
    FIXED."""
    missing = []
    for name, cls in optimizers.items():
        ours = [c for c in cases if c["optimizer"] == name]
        if not any(c["vary_lr"] for c in ours):
            missing.append(f"{name}.lr")
        default = cls().config()
        for option in cls.hparams_type.names():
            if option == "lr" or option in {*NOT_IN_TORCH.get(name, ()), *FIXED.get(name, ())}:
                continue
            if not any(c["options"].get(option, default[option]) != default[option] for c in ours):
                missing.append(f"{name}.{option}")
    return missing


def test_every_table_option_is_covered() -> None:
    """Every hyperparameter each optimizer declares leaves its default in some parity case,
    or is covered by the test NOT_IN_TORCH names, or cannot leave it (FIXED)."""
    assert set(ref.TORCH_CLASSES) == set(OPTIMIZERS)
    assert uncovered(CASES) == []
    for name, covered in NOT_IN_TORCH.items():
        assert set(covered) <= set(OPTIMIZERS[name].hparams_type.names()), name
    for name, flags in FIXED.items():
        defaults = create(name).config()
        for flag in flags:
            with pytest.raises(HyperparameterError, match=flag):
                create({"name": name, flag: not defaults[flag]})


def test_coverage_check_catches_a_missing_case() -> None:
    """The check above fails when a case goes missing or an option is added without one."""
    without = [
        c
        for c in CASES
        if not (c["optimizer"] == "adagrad" and c["options"].get("maximize"))
        and not (c["optimizer"] == "adam" and c["options"].get("decoupled_weight_decay"))
        and not (c["optimizer"] == "sgd" and c["vary_lr"])
    ]
    assert uncovered(without) == ["sgd.lr", "adagrad.maximize", "adam.decoupled_weight_decay"]

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class LookaheadHyperparams(SGDHyperparams):
        lookahead: bool = False

    class LookaheadSGD(SGD):
        hparams_type = LookaheadHyperparams

    assert uncovered(CASES, {**OPTIMIZERS, "sgd": LookaheadSGD}) == ["sgd.lookahead"]


def _readme_table() -> dict[str, str]:
    """The README's Optimizers table: name -> its options cell."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Optimizers\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+) \|$", section, flags=re.MULTILINE)
    return dict(rows)


def _options(cell: str) -> dict[str, Any]:
    """``"lr=1e-3, betas=(0.9, 0.999), ..."`` (inside backticks) as values."""
    pairs = re.findall(r"(\w+)=(\([^)]*\)|[^,`]+)", " ".join(re.findall(r"`([^`]*)`", cell)))
    out = {}
    for key, value in pairs:
        parsed = ast.literal_eval(value.strip())
        out[key] = list(parsed) if isinstance(parsed, tuple) else parsed
    return out


def test_readme_table_lists_every_option_with_its_default() -> None:
    table = _readme_table()
    assert set(table) == set(OPTIMIZERS)
    for name, cls in OPTIMIZERS.items():
        cell = table[name]
        defaults = {k: v for k, v in cls().config().items() if k != "name"}
        based = re.match(r"as `(\w+)`", cell)
        if based:  # "as `adam`, with `weight_decay=1e-2` ...": adam's options, those changed
            assert list(defaults) == list(_options(table[based.group(1)])), name
            for key, value in _options(cell).items():
                assert defaults[key] == value, f"{name}.{key}"
        else:
            assert _options(cell) == defaults, name


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_matches_stored_torch_vectors(index: int, dtype: str) -> None:
    assert_matches(run_ours(CASES[index], dtype), stored(index, dtype), dtype)


LIVE = [CASES[i] for i in range(0, len(CASES), 5)] + [
    c for c in CASES if c["vary_lr"] or "groups" in c
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", LIVE, ids=[ref.case_id(c) for c in LIVE])
def test_matches_live_torch(case: dict[str, Any], dtype: str) -> None:
    """Against the installed torch, on a spread of the cases (all of them are in the data)."""
    pytest.importorskip("torch")
    assert_matches(run_ours(case, dtype), ref.run_torch(case, dtype), dtype)
