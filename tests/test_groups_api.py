"""Parameter groups over HTTP, in process: created, shown, stepped with per-group options in
either encoding, patched one group at a time, scheduled per group, journaled and exported.

Expected weights come from the optimizer core run on the same inputs (its parity with
torch.optim, groups included, is tests/test_optim_parity.py's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from optserver.optim import ParamGroups
from tests.test_inprocess_api import (
    ST,
    assert_problem,
    auth,
    create,
    metadata_of,
    pull,
    run,
    step,
    step_st,
)

OPTIMIZER: dict[str, Any] = {
    "name": "sgd",
    "lr": 0.5,
    "momentum": 0.5,
    "weight_decay": 0.25,
    "groups": [
        {"name": "no_decay", "match": "*.bias", "weight_decay": 0.0},
        {"name": "head", "params": ["head.w"], "lr": 0.125},
    ],
}
WEIGHTS = {"body.w": [1.0, 2.0], "body.bias": [0.5], "head.w": [-1.0, 4.0]}
GRADS = {"body.w": [0.5, -1.0], "body.bias": [2.0], "head.w": [1.0, 1.0]}


def arrays(values: dict[str, list[float]]) -> dict[str, np.ndarray]:
    return {n: np.array(v, dtype=np.float32) for n, v in values.items()}


def expected(
    steps: list[dict[str, Any]], config: dict[str, Any] = OPTIMIZER
) -> dict[str, np.ndarray]:
    """The weights after ``steps`` (each ``{"groups": ..., "lr": ...}``), from the core."""
    groups = ParamGroups.create(config)
    weights = arrays(WEIGHTS)
    state = groups.init(weights)
    for options in steps:
        grads = arrays(GRADS)
        groups.update(grads, state, weights, lr=options.get("lr"), overrides=options.get("groups"))
    return weights


def assert_weights(got: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[name], dtype=np.float32), value, name)


def test_info_shows_the_groups_and_each_tensors_group() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(client, optimizer=OPTIMIZER, params=WEIGHTS)
        assert s["optimizer"]["groups"] == [
            {"name": "no_decay", "match": ["*.bias"], "weight_decay": 0.0},
            {"name": "head", "params": ["head.w"], "lr": 0.125},
        ]
        assert {t["name"]: t["group"] for t in s["params"]} == {
            "body.w": "default",
            "body.bias": "no_decay",
            "head.w": "head",
        }
        groups = {g["name"]: g for g in s["groups"]}
        assert [g["name"] for g in s["groups"]] == ["no_decay", "head", "default"]
        assert groups["head"]["params"] == ["head.w"] and groups["head"]["lr"] == 0.125
        assert groups["head"]["optimizer"]["weight_decay"] == 0.25  # the base's
        assert groups["no_decay"]["optimizer"]["weight_decay"] == 0.0
        assert groups["default"]["params"] == ["body.w"] and groups["default"]["lr"] == 0.5

    run(scenario)


def test_a_step_overrides_options_per_group_in_json_and_in_safetensors() -> None:
    overrides = {"head": {"lr": 0.25, "momentum": 0.75}, "default": {"momentum": 0.0}}
    steps: list[dict[str, Any]] = [{}, {"groups": overrides}, {"groups": overrides, "lr": 0.0625}]

    async def scenario(client: httpx.AsyncClient) -> None:
        one = await create(client, optimizer=OPTIMIZER, params=WEIGHTS)
        other = await create(client, optimizer=OPTIMIZER, params=WEIGHTS)
        for options in steps:
            r = await step(client, one, {"grads": GRADS, **options})
            assert r.status_code == 200, r.text
            metadata = {"groups": json.dumps(options["groups"])} if "groups" in options else {}
            if "lr" in options:
                metadata["lr"] = str(options["lr"])
            grads = arrays(GRADS)
            r = await step_st(client, other, grads, metadata)
            assert r.status_code == 200, r.text
            assert metadata_of(r.content)["applied"] == "true"
        want = expected(steps)
        assert_weights((await pull(client, one))[1], want)
        assert_weights((await pull(client, other))[1], want)
        # The overrides were for those steps only.
        r = await client.get(f"/v1/sessions/{one['id']}", headers=auth(one["token"]))
        assert r.json()["optimizer"] == ParamGroups.create(OPTIMIZER).config()

    run(scenario)


@pytest.mark.parametrize(
    ("groups", "slug", "option"),
    [
        ({"nope": {"lr": 0.1}}, "invalid-hyperparameter", "groups"),
        ({"head": {"lr": -1}}, "invalid-hyperparameter", "groups.head.lr"),
        ({"head": {"nesterov": True, "dampening": 0.5}}, "invalid-hyperparameter", None),
        ({"head": {"eps": 0.1}}, "invalid-hyperparameter", "groups.head.eps"),
        ({"head": {"lr": 1e300}}, "invalid-hyperparameter", "groups.head.lr"),
        ({"head": 0.1}, "invalid-request", None),
        (["head"], "invalid-request", None),
    ],
)
def test_bad_group_options_are_problems_that_change_nothing(
    groups: Any, slug: str | None, option: str | None
) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(client, optimizer=OPTIMIZER, params=WEIGHTS)
        r = await step(client, s, {"grads": GRADS, "groups": groups})
        problem = assert_problem(r, 422, slug)
        if option is not None:
            assert problem["option"] == option
        metadata = {"groups": json.dumps(groups)}
        grads = arrays(GRADS)
        r = await step_st(client, s, grads, metadata)
        assert r.status_code == 422
        version, weights = await pull(client, s)
        assert version == 0
        assert_weights(weights, expected([]))

    run(scenario)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"groups": "{'head': {'lr': 0.1}}"}, "must be JSON text"),
        ({"partial": "yes"}, "'true' or 'false'"),
    ],
)
def test_bad_safetensors_metadata_is_a_problem_that_changes_nothing(
    metadata: dict[str, str], message: str
) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(client, optimizer=OPTIMIZER, params=WEIGHTS)
        r = await step_st(client, s, arrays(GRADS), metadata)
        assert message in assert_problem(r, 422, "invalid-request")["detail"]
        assert (await pull(client, s))[0] == 0

    run(scenario)


def test_patch_changes_one_group_and_the_next_steps_use_it() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(client, optimizer=OPTIMIZER, params=WEIGHTS)
        assert (await step(client, s, {"grads": GRADS})).status_code == 200
        r = await client.patch(
            f"/v1/sessions/{s['id']}",
            json={"optimizer": {"groups": {"head": {"lr": 0.0625, "momentum": 0.0}}}},
            headers=auth(s["token"]),
        )
        assert r.status_code == 200, r.text
        info = r.json()
        head = {g["name"]: g for g in info["groups"]}["head"]
        assert head["lr"] == 0.0625 and head["optimizer"]["momentum"] == 0.0
        assert info["optimizer"]["groups"][0]["name"] == "no_decay"  # the others as they were
        assert (await step(client, s, {"grads": GRADS})).status_code == 200
        # As if the head group had those options at the second step (torch's param_groups
        # edited between steps).
        want = expected([{}, {"groups": {"head": {"lr": 0.0625, "momentum": 0.0}}}])
        assert_weights((await pull(client, s))[1], want)
        r = await client.patch(
            f"/v1/sessions/{s['id']}",
            json={"optimizer": {"groups": {"head": {"lr": -2}}}},
            headers=auth(s["token"]),
        )
        assert_problem(r, 422, "invalid-hyperparameter")
        r = await client.get(f"/v1/sessions/{s['id']}", headers=auth(s["token"]))
        assert {g["name"]: g for g in r.json()["groups"]}["head"]["lr"] == 0.0625

    run(scenario)


def test_a_schedule_scales_each_groups_own_rate() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        s = await create(
            client,
            optimizer=OPTIMIZER,
            params=WEIGHTS,
            schedule={"name": "step", "step_size": 1, "gamma": 0.5},
        )
        for _ in range(2):
            assert (await step(client, s, {"grads": GRADS})).status_code == 200
        r = await client.get(f"/v1/sessions/{s['id']}", headers=auth(s["token"]))
        lrs = {g["name"]: g["lr"] for g in r.json()["groups"]}
        assert lrs == {"no_decay": 0.5 * 0.25, "head": 0.125 * 0.25, "default": 0.5 * 0.25}
        # torch's StepLR scales each param group's initial_lr: steps at 1, then 0.5 of it.
        want = expected(
            [
                {},
                {
                    "groups": {
                        "head": {"lr": 0.0625},
                        "no_decay": {"lr": 0.25},
                        "default": {"lr": 0.25},
                    }
                },
            ]
        )
        assert_weights((await pull(client, s))[1], want)

    run(scenario)


def test_groups_and_group_options_survive_the_journal_and_an_export(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    overrides = {"head": {"lr": 0.25}}

    async def before(client: httpx.AsyncClient) -> None:
        s = await create(client, optimizer=OPTIMIZER, params=WEIGHTS)
        assert (await step(client, s, {"grads": GRADS, "groups": overrides})).status_code == 200
        r = await client.patch(
            f"/v1/sessions/{s['id']}",
            json={"optimizer": {"groups": {"no_decay": {"lr": 0.0625}}}},
            headers=auth(s["token"]),
        )
        assert r.status_code == 200
        r = await client.get(f"/v1/sessions/{s['id']}/state", headers=auth(s["token"]))
        seen.update(session=s, state=r.content)

    async def after(client: httpx.AsyncClient) -> None:
        s = seen["session"]
        r = await client.get(f"/v1/sessions/{s['id']}/state", headers=auth(s["token"]))
        assert r.content == seen["state"]
        r = await client.post(
            "/v1/sessions/import", content=seen["state"], headers={"Content-Type": ST}
        )
        assert r.status_code == 201, r.text
        copy = r.json()
        assert copy["optimizer"]["groups"][0]["lr"] == 0.0625
        one = await step(client, s, {"grads": GRADS, "groups": overrides})
        other = await step(client, copy, {"grads": GRADS, "groups": overrides})
        assert one.status_code == 200 and one.content == other.content
        # The second step: the group as patched (as torch's param_groups edited between steps).
        patched = {**overrides, "no_decay": {"lr": 0.0625}}
        want = expected([{"groups": overrides}, {"groups": patched}])
        assert_weights(one.json()["params"], want)

    run(before, data_dir=tmp_path, fsync="never")
    run(after, data_dir=tmp_path, fsync="never")


def test_partial_pushes_advance_the_version_once_and_survive_a_restart(tmp_path: Path) -> None:
    """Parts of one step (buckets pushed during backward): each applied on arrival, the version
    advanced by the completing push alone; journaled as such."""
    seen: dict[str, Any] = {}
    parts = [{"body.w": GRADS["body.w"]}, {"body.bias": GRADS["body.bias"]}]

    async def before(client: httpx.AsyncClient) -> None:
        s = await create(client, optimizer=OPTIMIZER, params=WEIGHTS)
        r = await step(client, s, {"grads": parts[0], "partial": True})
        assert r.status_code == 200 and r.json()["version"] == 0, r.text
        metadata = {"partial": "true"}
        r = await step_st(client, s, {"body.bias": np.array([2.0], np.float32)}, metadata)
        assert metadata_of(r.content)["version"] == "0"
        r = await step(client, s, {"grads": {"head.w": GRADS["head.w"]}})
        assert r.json()["version"] == 1
        info = (await client.get(f"/v1/sessions/{s['id']}", headers=auth(s["token"]))).json()
        assert info["counters"]["steps_applied"] == 1 and info["counters"]["pushes_received"] == 3
        seen.update(session=s, weights=(await pull(client, s))[1])

    async def after(client: httpx.AsyncClient) -> None:
        s = seen["session"]
        version, weights = await pull(client, s)
        assert version == 1
        assert_weights(weights, expected([{}]))  # as one step of all three
        for name, value in seen["weights"].items():
            np.testing.assert_array_equal(weights[name], value)

    run(before, data_dir=tmp_path, fsync="never")
    run(after, data_dir=tmp_path, fsync="never")


def test_a_partial_push_is_refused_in_sync_mode() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        mode = {"name": "sync", "workers": 2, "timeout_s": 5}
        s = await create(client, optimizer=OPTIMIZER, params=WEIGHTS, mode=mode)
        r = await step(client, s, {"grads": GRADS, "partial": True})
        assert "needs async or ssp mode" in assert_problem(r, 422, "invalid-request")["detail"]

    run(scenario)


def test_the_rest_of_a_step_in_parts_is_judged_as_of_its_first_part(tmp_path: Path) -> None:
    """ssp: a worker's step pushed in parts is admitted or refused whole. Once its first part
    is applied, its other parts are judged, and their rate scaled, at the version that part
    was applied at, whatever other workers pushed meanwhile; a restart in between keeps it."""
    seen: dict[str, Any] = {}
    mode = {"name": "ssp", "max_staleness": 0, "staleness_scaling": "inverse"}

    async def before(client: httpx.AsyncClient) -> None:
        s = await create(client, optimizer=OPTIMIZER, params=WEIGHTS, mode=mode)
        part = {"grads": {"body.w": GRADS["body.w"]}, "base_version": 0, "worker": "a"}
        r = await step(client, s, {**part, "partial": True})
        assert r.status_code == 200 and r.json()["version"] == 0, r.text
        r = await step(client, s, {"grads": GRADS, "base_version": 0, "worker": "b"})
        assert r.json()["version"] == 1
        info = (await client.get(f"/v1/sessions/{s['id']}", headers=auth(s["token"]))).json()
        assert info["workers"]["a"]["open_step"] == {"base_version": 0, "version": 0}
        assert info["workers"]["b"]["open_step"] is None
        seen["session"] = s

    async def after(client: httpx.AsyncClient) -> None:
        s = seen["session"]
        rest = {"base_version": 0, "worker": "a"}
        r = await step(
            client, s, {"grads": {"body.bias": GRADS["body.bias"]}, **rest, "partial": True}
        )
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
        r = await step(client, s, {"grads": {"head.w": GRADS["head.w"]}, **rest})
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        info = (await client.get(f"/v1/sessions/{s['id']}", headers=auth(s["token"]))).json()
        assert info["workers"]["a"]["open_step"] is None
        # A new step on version 0 is two steps behind now, from worker a as from any other.
        for worker in ("a", "c"):
            r = await step(client, s, {"grads": GRADS, "base_version": 0, "worker": worker})
            assert_problem(r, 409, "stale-gradient")
        # Every tensor stepped twice at the configured rate: each of a's parts was 0 steps
        # stale when its step began (lr/(1+s) would have halved the last two).
        version, weights = await pull(client, s)
        assert version == 2
        assert_weights(weights, expected([{}, {}]))

    run(before, data_dir=tmp_path, fsync="never")
    run(after, data_dir=tmp_path, fsync="never")
