"""Learning-rate schedules: parity with torch.optim.lr_scheduler (stored and live), validation,
configs, and run-time base-rate changes."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import pytest

from optserver.optim import (
    SCHEDULES,
    CosineSchedule,
    HyperparameterError,
    OptimError,
    Schedule,
    StepSchedule,
    create_schedule,
)
from tests.reference import torch_schedules as ref

RTOL = 1e-9
# torch's recursive updates leave rounding residue (even slightly negative rates) where the
# schedule is exactly zero; the closed form gives 0 there. Tolerated relative to the base rate.
ATOL = 1e-15

CASES = ref.cases()
IDS = [ref.case_id(c) for c in CASES]


@cache
def reference() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ref.DATA.read_text())
    return data


def build(case: dict[str, Any]) -> Schedule:
    schedule = create_schedule(case)
    assert schedule is not None
    return schedule


def assert_matches(schedule: Schedule, expected: list[float], base_lr: float) -> None:
    assert len(expected) == ref.STEPS + 1
    for step, theirs in enumerate(expected):
        ours = schedule.lr(base_lr, step)
        assert abs(ours - theirs) <= RTOL * abs(theirs) + ATOL * base_lr, (step, ours, theirs)


# --- parity ----------------------------------------------------------------------------------


def test_reference_data_is_current() -> None:
    data = reference()
    assert data["steps"] == ref.STEPS
    assert data["base_lr"] == ref.BASE_LR
    stored = [entry["case"] for entry in data["cases"]]
    assert stored == CASES, "cases changed: run python tests/reference/torch_schedules.py"
    assert data["torch"].startswith("2.13.0")


def test_every_schedule_is_covered() -> None:
    assert {c["name"] for c in CASES} == set(SCHEDULES)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_matches_stored_torch(index: int) -> None:
    entry = reference()["cases"][index]
    assert_matches(build(entry["case"]), entry["lrs"], ref.BASE_LR)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_live_torch(case: dict[str, Any]) -> None:
    pytest.importorskip("torch")
    assert_matches(build(case), ref.run_torch(case), ref.BASE_LR)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_live_torch_at_other_base_rate(case: dict[str, Any]) -> None:
    """torch started with another rate is what the closed form gives for that base rate."""
    pytest.importorskip("torch")
    assert_matches(build(case), ref.run_torch(case, base_lr=0.03), 0.03)


# --- base rate changes -----------------------------------------------------------------------

MULTIPLICATIVE = [c for c in CASES if not c.get("eta_min")]


@pytest.mark.parametrize("case", MULTIPLICATIVE, ids=[ref.case_id(c) for c in MULTIPLICATIVE])
def test_base_rate_scales_multiplicative_schedules(case: dict[str, Any]) -> None:
    schedule = build(case)
    for step in range(ref.STEPS + 1):
        assert schedule.lr(0.2, step) == pytest.approx(2 * schedule.lr(0.1, step), rel=1e-15)


@pytest.mark.parametrize("name", ["cosine", "warmup_cosine"])
def test_eta_min_is_absolute(name: str) -> None:
    """The distance to eta_min scales with base_lr - eta_min; eta_min itself stays put."""
    eta_min, t_max = 0.001, 40
    schedule = build({"name": name, "T_max": t_max, "eta_min": eta_min})
    warmup = schedule.to_dict().get("warmup_iters", 0)
    assert schedule.lr(0.1, warmup + t_max) == eta_min
    assert schedule.lr(0.5, warmup + t_max) == eta_min
    for step in range(warmup, warmup + 3 * t_max):
        low = schedule.lr(0.1, step) - eta_min
        high = schedule.lr(0.2, step) - eta_min
        assert high == pytest.approx(low * (0.2 - eta_min) / (0.1 - eta_min), rel=1e-12, abs=1e-18)


def test_lr_is_a_pure_function_of_base_and_step() -> None:
    schedule = build({"name": "warmup_cosine", "T_max": 100, "warmup_iters": 10})
    forward = [schedule.lr(0.1, k) for k in range(120)]
    assert [schedule.lr(0.1, k) for k in reversed(range(120))] == forward[::-1]


def test_negative_step_is_an_error() -> None:
    with pytest.raises(OptimError, match=r"step must be >= 0, got -1"):
        build({"name": "step", "step_size": 3}).lr(0.1, -1)


# --- configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_config_round_trips(case: dict[str, Any]) -> None:
    schedule = build(case)
    config = schedule.config()
    assert config["name"] == case["name"]
    assert json.loads(json.dumps(config)) == config
    assert create_schedule(config) == schedule
    assert {k: v for k, v in config.items() if k in case} == case


def test_config_shapes_and_defaults() -> None:
    assert build({"name": "constant"}).config() == {"name": "constant"}
    assert build({"name": "step", "step_size": 30}).config() == {
        "name": "step",
        "step_size": 30,
        "gamma": 0.1,
    }
    assert build({"name": "multistep", "milestones": [30, 80]}).config() == {
        "name": "multistep",
        "milestones": [30, 80],
        "gamma": 0.1,
    }
    assert build({"name": "exponential", "gamma": 0.9}).config() == {
        "name": "exponential",
        "gamma": 0.9,
    }
    assert build({"name": "cosine", "T_max": 10}).config() == {
        "name": "cosine",
        "T_max": 10,
        "eta_min": 0.0,
    }
    assert build({"name": "linear"}).config() == {
        "name": "linear",
        "start_factor": 1.0 / 3,
        "end_factor": 1.0,
        "total_iters": 5,
    }
    assert build({"name": "constant_factor"}).config() == {
        "name": "constant_factor",
        "factor": 1.0 / 3,
        "total_iters": 5,
    }
    assert build({"name": "warmup_cosine", "T_max": 10}).config() == {
        "name": "warmup_cosine",
        "T_max": 10,
        "warmup_iters": 5,
        "start_factor": 1.0 / 3,
        "eta_min": 0.0,
    }


def test_none_is_no_schedule() -> None:
    assert create_schedule(None) is None


def test_name_string_and_case() -> None:
    assert create_schedule("linear") == build({"name": "linear"})
    assert create_schedule({"name": "Cosine", "T_max": 3}) == CosineSchedule(T_max=3)


def test_integral_floats_are_integers() -> None:
    schedule = build({"name": "multistep", "milestones": [3.0, 9]})
    assert schedule.config()["milestones"] == [3, 9]
    assert all(type(m) is int for m in schedule.config()["milestones"])
    assert build({"name": "step", "step_size": 30.0}) == StepSchedule(step_size=30)


def test_replace_validates() -> None:
    schedule = build({"name": "step", "step_size": 30})
    assert schedule.replace({"gamma": 0.5}) == StepSchedule(step_size=30, gamma=0.5)
    with pytest.raises(HyperparameterError, match=r"gamma must be > 0, got -0\.5"):
        schedule.replace({"gamma": -0.5})


# --- validation ------------------------------------------------------------------------------

BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"name": "step", "step_size": 0}, "step_size", "0"),
    ({"name": "step", "step_size": -3}, "step_size", "-3"),
    ({"name": "step", "step_size": 2.5}, "step_size", "2.5"),
    ({"name": "step", "step_size": True}, "step_size", "True"),
    ({"name": "step", "step_size": "30"}, "step_size", "'30'"),
    ({"name": "step", "step_size": 3, "gamma": 0}, "gamma", "0"),
    ({"name": "step", "step_size": 3, "gamma": -0.1}, "gamma", "-0.1"),
    ({"name": "step", "step_size": 3, "gamma": "0.1"}, "gamma", "'0.1'"),
    ({"name": "step", "step_size": 3, "gamma": float("nan")}, "gamma", "nan"),
    ({"name": "multistep", "milestones": [30, 10]}, "milestones", "[30, 10]"),
    ({"name": "multistep", "milestones": [5, 5]}, "milestones", "[5, 5]"),
    ({"name": "multistep", "milestones": [-1, 10]}, "milestones[0]", "-1"),
    ({"name": "multistep", "milestones": [1, 2.5]}, "milestones[1]", "2.5"),
    ({"name": "multistep", "milestones": [1, False]}, "milestones[1]", "False"),
    ({"name": "multistep", "milestones": 30}, "milestones", "30"),
    ({"name": "multistep", "milestones": [1], "gamma": 0.0}, "gamma", "0.0"),
    ({"name": "exponential", "gamma": 0.0}, "gamma", "0.0"),
    ({"name": "exponential", "gamma": -1}, "gamma", "-1"),
    ({"name": "cosine", "T_max": 0}, "T_max", "0"),
    ({"name": "cosine", "T_max": 10, "eta_min": -0.1}, "eta_min", "-0.1"),
    ({"name": "linear", "start_factor": 0.0}, "start_factor", "0.0"),
    ({"name": "linear", "start_factor": 1.5}, "start_factor", "1.5"),
    ({"name": "linear", "end_factor": -0.5}, "end_factor", "-0.5"),
    ({"name": "linear", "end_factor": 2.0}, "end_factor", "2.0"),
    ({"name": "linear", "total_iters": 0}, "total_iters", "0"),
    ({"name": "linear", "total_iters": -1}, "total_iters", "-1"),
    ({"name": "constant_factor", "factor": 0.0}, "factor", "0.0"),
    ({"name": "constant_factor", "factor": 1.1}, "factor", "1.1"),
    ({"name": "constant_factor", "total_iters": 0}, "total_iters", "0"),
    ({"name": "warmup_cosine", "T_max": 0}, "T_max", "0"),
    ({"name": "warmup_cosine", "T_max": 9, "warmup_iters": 0}, "warmup_iters", "0"),
    ({"name": "warmup_cosine", "T_max": 9, "start_factor": 0.0}, "start_factor", "0.0"),
    ({"name": "warmup_cosine", "T_max": 9, "eta_min": -1.0}, "eta_min", "-1.0"),
]


@pytest.mark.parametrize(
    ("config", "option", "value"), BAD, ids=[f"{c['name']}-{o}={v}" for c, o, v in BAD]
)
def test_bad_option_names_option_and_value(config: dict[str, Any], option: str, value: str) -> None:
    with pytest.raises(HyperparameterError) as info:
        create_schedule(config)
    message = str(info.value)
    assert option in message
    assert value in message
    assert config["name"] in message
    assert info.value.option == option


def test_unknown_schedule_lists_available() -> None:
    with pytest.raises(HyperparameterError) as info:
        create_schedule({"name": "polynomial"})
    message = str(info.value)
    assert "'polynomial'" in message
    for name in SCHEDULES:
        assert name in message
    assert info.value.option == "name"


def test_unknown_option_lists_known() -> None:
    with pytest.raises(HyperparameterError) as info:
        create_schedule({"name": "step", "step_size": 3, "step": 4})
    message = str(info.value)
    assert "'step'" in message
    assert "step_size, gamma" in message
    assert info.value.option == "step"


def test_constant_has_no_options() -> None:
    with pytest.raises(HyperparameterError, match=r"unknown option 'gamma'; known options: none"):
        create_schedule({"name": "constant", "gamma": 0.5})


@pytest.mark.parametrize(
    ("config", "option"),
    [
        ({"name": "step"}, "step_size"),
        ({"name": "multistep"}, "milestones"),
        ({"name": "exponential"}, "gamma"),
        ({"name": "cosine"}, "T_max"),
        ("warmup_cosine", "T_max"),
    ],
)
def test_missing_required_option(config: Any, option: str) -> None:
    with pytest.raises(HyperparameterError, match=f"missing required option '{option}'") as info:
        create_schedule(config)
    assert info.value.option == option


@pytest.mark.parametrize("config", [42, ["step"], {"step_size": 3}, {"name": 3}])
def test_malformed_config(config: Any) -> None:
    with pytest.raises(HyperparameterError):
        create_schedule(config)
