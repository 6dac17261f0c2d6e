"""Parameter groups in the optimizer core: membership, configuration, per-update options and
one rollback across groups. (Parity with torch for the same groups: the grouped cases of
tests/test_optim_parity.py.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from optserver.optim import (
    DEFAULT_GROUP,
    Adam,
    HyperparameterError,
    ParamGroups,
    TensorError,
    create,
)
from optserver.optim.errors import NonFiniteStep
from optserver.optim.groups import MAX_GROUPS

CONFIG: dict[str, Any] = {
    "name": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.1,
    "groups": [
        {"name": "no_decay", "match": ["*.bias", "*norm*"], "weight_decay": 0},
        {"name": "head", "params": ["head.weight", "head.bias"], "lr": 1e-2},
    ],
}


def test_a_tensor_takes_its_named_group_then_the_first_matching_pattern_then_default() -> None:
    groups = ParamGroups.create(CONFIG)
    assert groups.group_of("head.bias").name == "head"  # named beats a matching pattern
    assert groups.group_of("body.bias").name == "no_decay"
    assert groups.group_of("layernorm.weight").name == "no_decay"
    assert groups.group_of("body.weight").name == DEFAULT_GROUP
    assert groups.group_of("body.weight").optimizer is groups.base
    tensors = ["body.weight", "body.bias", "head.weight", "head.bias"]
    assert groups.members(tensors) == {
        "no_decay": ["body.bias"],
        "head": ["head.weight", "head.bias"],
        "default": ["body.weight"],
    }
    assert groups.group_of("Body.BIAS").name == DEFAULT_GROUP  # patterns are case sensitive


def test_a_chunk_of_a_cut_tensor_is_in_the_group_of_its_tensor() -> None:
    groups = ParamGroups.create(CONFIG)
    assert groups.group_of("head.weight#3").name == "head"
    assert groups.group_of("body.bias#0").name == "no_decay"
    assert groups.group_of("body.weight#12").name == DEFAULT_GROUP
    assert groups.group_of("head.weight#x").name == DEFAULT_GROUP  # not a chunk name


def test_a_group_overrides_only_what_it_names_and_reads_back_normalized() -> None:
    groups = ParamGroups.create(CONFIG)
    no_decay = groups.group("no_decay")
    assert no_decay is not None
    assert no_decay.optimizer.hparams.weight_decay == 0.0
    assert no_decay.optimizer.hparams.lr == 1e-3  # the base's
    config = groups.config()
    assert config["groups"][0] == {
        "name": "no_decay",
        "match": ["*.bias", "*norm*"],
        "weight_decay": 0.0,  # the integer 0, validated as the float it is
    }
    assert ParamGroups.create(config).config() == config
    assert "groups" not in ParamGroups.create("adam").config()  # records without groups stay


def test_changing_the_base_reaches_the_groups_that_do_not_override_it() -> None:
    groups = ParamGroups.create(CONFIG).with_options({"lr": 5e-4})
    head, no_decay = groups.group("head"), groups.group("no_decay")
    assert head is not None and no_decay is not None
    assert head.optimizer.hparams.lr == 1e-2
    assert no_decay.optimizer.hparams.lr == 5e-4


def test_groups_merge_as_rfc7396_or_are_replaced_by_a_list() -> None:
    groups = ParamGroups.create(CONFIG)
    merged = groups.with_options({"groups": {"head": {"lr": 2e-2, "betas": [0.8, 0.9]}}})
    head = merged.group("head")
    assert head is not None
    assert head.optimizer.hparams.lr == 2e-2 and head.optimizer.hparams.betas == (0.8, 0.9)
    assert head.params == ("head.weight", "head.bias")
    reverted = merged.with_options({"groups": {"head": {"lr": None}}})
    head = reverted.group("head")
    assert head is not None and head.optimizer.hparams.lr == 1e-3 and "lr" not in head.options
    removed = groups.with_options({"groups": {"no_decay": None}})
    assert [g.name for g in removed.groups] == ["head"]
    assert removed.group_of("body.bias").name == DEFAULT_GROUP
    added = groups.with_options({"groups": {"emb": {"params": ["emb"], "lr": 0.1}}})
    assert [g.name for g in added.groups] == ["no_decay", "head", "emb"]
    replaced = groups.with_options({"groups": [{"params": ["w"], "lr": 0.5}]})
    assert [g.name for g in replaced.groups] == ["0"]  # unnamed: its index
    assert groups.config() == ParamGroups.create(CONFIG).config()  # immutable


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ("no_decay", "groups must be a list"),
        ([{"params": ["a"]}, {"params": ["a"]}], "'a' is in the params of groups '0' and '1'"),
        ([{"name": "x"}, {"name": "x"}], "two groups are named 'x'"),
        ([{"name": "default"}], "'default' is the group of tensors in no group"),
        ([{"name": "a b"}], "groups\\[0\\].name must be"),
        ([{"params": "w", "momentum": 0.9}], "group '0': adamw: unknown option 'momentum'"),
        ([{"lr": -1.0}], "group '0': adamw: lr must be >= 0"),
        ([{"params": [""]}], "groups\\[0\\].params\\[0\\] must be a non-empty string"),
        ([{"match": [1]}], "groups\\[0\\].match\\[0\\] must be"),
        ([{"groups": []}], "groups do not nest"),
        ([7], "groups\\[0\\] must be an object"),
        ([{}] * (MAX_GROUPS + 1), f"at most {MAX_GROUPS}"),
    ],
)
def test_bad_groups_are_refused_naming_the_group_and_the_value(groups: Any, message: str) -> None:
    with pytest.raises(HyperparameterError, match=message):
        ParamGroups.create({"name": "adamw", "groups": groups})


def test_the_default_group_cannot_be_patched_as_a_group() -> None:
    groups = ParamGroups.create(CONFIG)
    with pytest.raises(HyperparameterError, match="'default' is the base"):
        groups.with_options({"groups": {"default": {"lr": 1.0}}})
    with pytest.raises(HyperparameterError, match="no group 'nope' to remove"):
        groups.with_options({"groups": {"nope": None}})


def params() -> dict[str, np.ndarray]:
    return {
        "body.weight": np.full((3, 2), 2.0),
        "body.bias": np.full(2, -1.0),
        "head.weight": np.full((2, 2), 0.5),
    }


def test_each_group_steps_with_its_own_options() -> None:
    groups = ParamGroups.create(CONFIG)
    weights = params()
    state = groups.init(weights)
    grads = {n: np.ones_like(p) for n, p in weights.items()}
    groups.update(grads, state, weights)
    for name, expected_lr, expected_decay in (
        ("body.weight", 1e-3, 0.1),
        ("body.bias", 1e-3, 0.0),
        ("head.weight", 1e-2, 0.1),
    ):
        alone = params()[name]
        one = create({"name": "adamw", "lr": expected_lr, "weight_decay": expected_decay})
        one_state = one.init({name: alone})
        one.update({name: np.ones_like(alone)}, one_state, {name: alone})
        np.testing.assert_array_equal(weights[name], alone, err_msg=name)


def test_per_update_overrides_are_for_that_update_and_their_lr_wins_over_the_push_lr() -> None:
    groups = ParamGroups.create(CONFIG)
    plan = groups.prepare(
        {"head.weight": np.ones((2, 2)), "body.weight": np.ones((3, 2))},
        params(),
        lr=0.5,
        overrides={"head": {"lr": 0.25, "betas": [0.5, 0.9]}},
    )
    by_tensor = {name: (o, p) for o, p in plan.parts for name in p.grads}
    head_optimizer, head_plan = by_tensor["head.weight"]
    # As if configured so: the group's own rate (which a schedule would scale).
    assert head_plan.lr is None and head_optimizer.hparams.lr == 0.25
    assert head_optimizer.hparams.betas == (0.5, 0.9)
    default_optimizer, default_plan = by_tensor["body.weight"]
    assert default_plan.lr == 0.5 and default_optimizer is groups.base
    head = groups.group("head")
    assert head is not None and head.optimizer.hparams.betas == (0.9, 0.999)  # unchanged


def test_a_schedule_scales_an_overridden_rate_as_a_configured_one() -> None:
    groups = ParamGroups.create(CONFIG)

    def halve(lr: float | None, configured: float) -> float:
        return configured / 2 if lr is None else lr

    plan = groups.prepare(
        {"head.weight": np.ones((2, 2)), "body.weight": np.ones((3, 2))},
        params(),
        overrides={"head": {"lr": 0.25}},
        rate=halve,
    )
    assert sorted(p.lr for _, p in plan.parts if p.lr is not None) == [5e-4, 0.125]


def test_the_rate_function_sees_each_groups_configured_rate() -> None:
    groups = ParamGroups.create(CONFIG)
    seen: list[tuple[float | None, float]] = []

    def rate(lr: float | None, configured: float) -> float:
        seen.append((lr, configured))
        return configured / 2

    plan = groups.prepare(
        {"head.weight": np.ones((2, 2)), "body.weight": np.ones((3, 2))}, params(), rate=rate
    )
    assert sorted(seen) == [(None, 1e-3), (None, 1e-2)]
    assert sorted(p.lr for _, p in plan.parts if p.lr is not None) == [5e-4, 5e-3]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nope": {"lr": 1.0}}, "no group is named 'nope'"),
        ({"head": {"lr": -1.0}}, "group 'head': adamw: lr must be >= 0"),
        ({"head": {"betas": [2.0, 0.9]}}, "group 'head': adamw: betas\\[0\\] must be in"),
        ({"head": {"momentum": 0.9}}, "unknown option 'momentum'"),
        ({"head": 0.1}, "groups.head must be an object"),
    ],
)
def test_bad_overrides_are_refused_even_for_groups_the_update_does_not_step(
    overrides: Any, message: str
) -> None:
    groups = ParamGroups.create(CONFIG)
    with pytest.raises(HyperparameterError, match=message):
        groups.prepare({"body.weight": np.ones((3, 2))}, params(), overrides=overrides)


def test_an_unknown_gradient_is_refused_before_any_group_is_looked_up() -> None:
    groups = ParamGroups.create(CONFIG)
    with pytest.raises(TensorError, match="'ghost' names no parameter"):
        groups.prepare({"ghost": np.ones(2)}, params())


def test_a_nonfinite_result_in_one_group_undoes_the_whole_update() -> None:
    groups = ParamGroups.create(
        {"name": "sgd", "lr": 0.1, "groups": [{"params": ["b"], "lr": 1e300}]}
    )
    weights = {"a": np.full(3, 1.0), "b": np.full(3, 1e300)}
    state = groups.init(weights)
    before = {n: p.copy() for n, p in weights.items()}
    grads = {"a": np.ones(3), "b": np.full(3, 1e300)}
    plan = groups.prepare(grads, weights)
    with pytest.raises(NonFiniteStep, match="'b'"):
        groups.apply(plan, state, weights, finite=True, large=["b"])
    for name in weights:
        np.testing.assert_array_equal(weights[name], before[name])
        assert state[name].step == 0


def test_state_carries_over_when_a_tensor_changes_group() -> None:
    groups = ParamGroups.create({"name": "adam", "lr": 0.1})
    weights = {"w": np.ones(4)}
    state = groups.init(weights)
    groups.update({"w": np.ones(4)}, state, weights)
    regrouped = groups.with_options({"groups": [{"params": ["w"], "amsgrad": True}]})
    regrouped.update({"w": np.ones(4)}, state, weights)
    assert state["w"].step == 2 and "max_exp_avg_sq" in state["w"].arrays()
    expected = {"w": np.ones(4)}
    reference = Adam(lr=0.1)
    ref_state = reference.init(expected)
    reference.update({"w": np.ones(4)}, ref_state, expected)
    Adam(lr=0.1, amsgrad=True).update({"w": np.ones(4)}, ref_state, expected)
    np.testing.assert_array_equal(weights["w"], expected["w"])


def test_state_arrays_is_the_most_any_group_needs() -> None:
    plain = ParamGroups.create({"name": "sgd", "lr": 0.1})
    assert plain.state_arrays() == 0
    grouped = ParamGroups.create(
        {"name": "sgd", "lr": 0.1, "groups": [{"params": ["w"], "momentum": 0.9}]}
    )
    assert grouped.state_arrays() == 1


def test_each_groups_options_must_fit_the_dtype() -> None:
    groups = ParamGroups.create({"name": "sgd", "groups": [{"name": "big", "lr": 1e300}]})
    groups.check_dtype(np.dtype(np.float64))
    with pytest.raises(HyperparameterError, match=r"group 'big': sgd: lr = 1e\+?300 is beyond"):
        groups.check_dtype(np.dtype(np.float32))
