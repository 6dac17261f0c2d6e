"""``optserver_client.torch.RemoteOptimizer`` against a real server, judged by torch.optim.

The reference is the same training loop in process with the torch.optim optimizer of the same
name, parameter groups, gradient clipping and scheduler: parameters and optimizer state must
agree within 1e-6 relative (float64) after every run.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from optserver_client import Client, ValidationError
from optserver_client.torch import RemoteOptimizer

from tests.live import LiveServer

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-6
STEPS = 200

#: torch.optim class, the session's optimizer name, and the options of each case.
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "sgd-momentum": ("SGD", "sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "sgd-nesterov": (
        "SGD",
        "sgd",
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    ),
    "adam": ("Adam", "adam", {"lr": 1e-2, "weight_decay": 1e-3}),
    "adamw": ("AdamW", "adamw", {"lr": 1e-2, "weight_decay": 0.1}),
    "rmsprop": ("RMSprop", "rmsprop", {"lr": 1e-3, "momentum": 0.5, "weight_decay": 1e-3}),
}


def make_model(seed: int = 7, dtype: Any = None) -> Any:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8), torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    )  # fmt: skip
    return model.to(dtype or torch.float64)


def batches(count: int, seed: int = 11) -> Iterator[tuple[Any, Any]]:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x = torch.randn(16, 6, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=generator)
        yield x, y


def groups_of(model: Any, named: bool, lr: float) -> list[dict[str, Any]]:
    """No weight decay on biases; the last layer at three times the rate."""
    items = list(model.named_parameters())
    pick: Callable[[list[tuple[str, Any]]], list[Any]] = (
        (lambda ps: ps) if named else (lambda ps: [p for _, p in ps])
    )
    return [
        {"params": pick([(n, p) for n, p in items if n.endswith("weight") and n != "4.weight"])},
        {"params": pick([(n, p) for n, p in items if n.endswith("bias")]), "weight_decay": 0.0},
        {"params": pick([(n, p) for n, p in items if n == "4.weight"]), "lr": 3 * lr},
    ]


def scheduler_for(optimizer: Any) -> Any:
    # OneCycleLR changes every group's lr and cycles momentum (betas[0] for Adam).
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=STEPS + 5
    )


def train(model: Any, optimizer: Any, scheduler: Any, steps: range) -> None:
    loss_fn = torch.nn.CrossEntropyLoss()
    data = list(batches(STEPS))
    for i in steps:
        x, y = data[i]
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        scheduler.step()


def assert_close(ours: Any, theirs: Any, what: str) -> None:
    ours, theirs = ours.detach(), theirs.detach()
    scale = float(theirs.abs().max()) or 1.0
    np.testing.assert_allclose(
        ours.numpy(), theirs.numpy(), rtol=RTOL, atol=RTOL * scale, err_msg=what
    )


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_loop_matches_torch_optim(server: LiveServer, case: str) -> None:
    """200 float64 steps with three parameter groups, clip_grad_norm_ and OneCycleLR (which
    also cycles momentum): weights and optimizer state as torch.optim's."""
    torch_class, name, options = CASES[case]
    reference_model = make_model()
    model = copy.deepcopy(reference_model)
    reference = getattr(torch.optim, torch_class)(
        groups_of(reference_model, False, options["lr"]), foreach=False, **options
    )
    remote = RemoteOptimizer(
        groups_of(model, True, options["lr"]), url=server.url, optimizer=name, **options
    )
    try:
        assert isinstance(remote, torch.optim.Optimizer)
        train(reference_model, reference, scheduler_for(reference), range(STEPS))
        train(model, remote, scheduler_for(remote), range(STEPS))
        for (n, ours), theirs in zip(
            model.named_parameters(), reference_model.parameters(), strict=True
        ):
            assert_close(ours, theirs, n)
        assert remote.version == STEPS
        our_state = remote.state_dict()["state"]
        their_state = reference.state_dict()["state"]
        assert set(our_state) == set(their_state)
        for index, entry in their_state.items():
            for key, value in entry.items():
                if key == "step":
                    assert int(our_state[index]["step"]) == int(value)
                else:
                    assert_close(our_state[index][key], value, f"state[{index}].{key}")
    finally:
        remote.close(delete=True)


def test_groups_and_options_reach_the_session(server: LiveServer) -> None:
    model = make_model()
    opt = RemoteOptimizer(
        groups_of(model, True, 0.1), url=server.url, optimizer="sgd", lr=0.1, momentum=0.9
    )
    try:
        info = opt.session.info()
        by_name = {g["name"]: g for g in info["groups"]}
        assert by_name["1"]["params"] == ["0.bias", "2.bias", "4.bias"]
        assert by_name["1"]["optimizer"]["weight_decay"] == 0.0
        assert by_name["2"]["lr"] == pytest.approx(0.3)
        # Every group holds every hyperparameter, the server's defaults filled in.
        assert opt.param_groups[0]["dampening"] == 0.0 and opt.defaults["nesterov"] is False
    finally:
        opt.close(delete=True)


def test_an_edited_param_group_is_sent_with_the_next_step(server: LiveServer) -> None:
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), url=server.url, optimizer="sgd", lr=0.1)
    try:
        before = [p.detach().clone() for p in model.parameters()]
        opt.param_groups[0]["lr"] = 0.0
        x, y = next(batches(1))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for p, old in zip(model.parameters(), before, strict=True):
            assert torch.equal(p, old)  # lr 0: nothing moved
        assert opt.version == 1
        assert opt.session.info()["groups"][0]["lr"] == 0.1  # for that step only
    finally:
        opt.close(delete=True)


def test_parameters_without_a_gradient_are_not_stepped(server: LiveServer) -> None:
    model = make_model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = RemoteOptimizer(model.named_parameters(), url=server.url, optimizer="adam", lr=0.1)
    try:
        frozen = model[0].weight.detach().clone()
        x, y = next(batches(1))
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert torch.equal(model[0].weight, frozen)
        steps = {t["name"]: t["step"] for t in opt.session.info()["params"]}
        assert steps["0.weight"] == 0 and steps["2.weight"] == 1
        opt.zero_grad(set_to_none=False)
        assert model[2].weight.grad is not None and not model[2].weight.grad.any()
    finally:
        opt.close(delete=True)


def test_step_with_a_closure_returns_its_loss(server: LiveServer) -> None:
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), url=server.url, optimizer="sgd", lr=0.1)
    x, y = next(batches(1))

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    try:
        first = opt.step(closure).item()
        second = opt.step(closure).item()
        assert second < first
    finally:
        opt.close(delete=True)


def test_add_param_group_registers_the_new_tensors(server: LiveServer) -> None:
    model = make_model()
    first = [(f"l0.{n}", p) for n, p in model[0].named_parameters()]
    opt = RemoteOptimizer(first, url=server.url, optimizer="sgd", lr=0.1)
    try:
        opt.add_param_group({"params": [(f"l2.{n}", p) for n, p in model[2].named_parameters()]})
        info = opt.session.info()
        groups = {g["name"]: g for g in info["groups"]}
        assert groups["1"]["params"] == ["l2.weight", "l2.bias"]
        assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[1]["momentum"] == 0.0
        before = model[2].weight.detach().clone()
        x, y = next(batches(1))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert not torch.equal(model[2].weight, before)  # the new group is stepped
        assert {t["name"]: t["step"] for t in opt.session.info()["params"]}["l2.weight"] == 1
    finally:
        opt.close(delete=True)


def test_a_second_worker_attaches_and_takes_the_sessions_weights(server: LiveServer) -> None:
    first_model = make_model(seed=1)
    other_model = make_model(seed=2)  # different weights until it attaches
    first = RemoteOptimizer(
        groups_of(first_model, True, 0.01), url=server.url, optimizer="adam", lr=0.01
    )
    try:
        train(first_model, first, scheduler_for(first), range(3))
        other = RemoteOptimizer.attach(
            other_model.named_parameters(), url=server.url, session=first.session_id,
            token=first.token,
        )  # fmt: skip
        try:
            for a, b in zip(first_model.parameters(), other_model.parameters(), strict=True):
                assert torch.equal(a, b)
            assert [len(g["params"]) for g in other.param_groups] == [2, 3, 1]
            assert other.param_groups[2]["lr"] == pytest.approx(0.03)
            x, y = next(batches(1))
            torch.nn.functional.cross_entropy(other_model(x), y).backward()
            other.step()
            assert other.version == 4
        finally:
            other.close()
    finally:
        first.close(delete=True)


def test_attach_refuses_a_parameter_the_session_does_not_hold(server: LiveServer) -> None:
    model = make_model()
    first_layer = [(n, p) for n, p in model.named_parameters() if n.startswith("0.")]
    first = RemoteOptimizer(first_layer, url=server.url, optimizer="sgd")
    try:
        with pytest.raises(ValueError, match=r"'2\.weight' is not in session"):
            RemoteOptimizer.attach(
                model.named_parameters(), url=server.url, session=first.session_id,
                token=first.token,
            )  # fmt: skip
    finally:
        first.close(delete=True)


def test_ssp_refusals_pull_and_recompute_or_drop_the_step(server: LiveServer) -> None:
    model_a, model_b = make_model(), make_model()
    a = RemoteOptimizer(
        model_a.named_parameters(), url=server.url, optimizer="sgd", lr=0.1,
        mode={"name": "ssp", "max_staleness": 0},
    )  # fmt: skip
    b = RemoteOptimizer.attach(
        model_b.named_parameters(), url=server.url, session=a.session_id, token=a.token
    )
    x, y = next(batches(1))
    try:
        for model, opt in ((model_a, a), (model_b, b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        a.step()
        b.step()  # stale (its weights are from version 0) and no closure: dropped
        assert b.last_step_applied is False and a.version == 1
        for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
            assert torch.equal(p, q)  # b took the session's weights

        def closure() -> Any:
            b.zero_grad()
            loss = torch.nn.functional.cross_entropy(model_b(x), y)
            loss.backward()
            return loss

        a.zero_grad()
        torch.nn.functional.cross_entropy(model_a(x), y).backward()
        a.step()  # version 2: b's weights are stale again
        b.step(closure)  # refused, pulled, recomputed, applied
        assert b.last_step_applied is True and b.version == 3
    finally:
        b.close()
        a.close(delete=True)


def test_overlap_gives_the_same_steps_and_one_version_per_step(server: LiveServer) -> None:
    _, name, options = CASES["adam"]
    plain_model = make_model()
    model = copy.deepcopy(plain_model)
    plain = RemoteOptimizer(
        plain_model.named_parameters(), url=server.url, optimizer=name, **options
    )
    overlapped = RemoteOptimizer(
        model.named_parameters(), url=server.url, optimizer=name, overlap=True, bucket_bytes=256,
        **options,
    )  # fmt: skip
    try:
        loss_fn = torch.nn.CrossEntropyLoss()
        for x, y in batches(5):
            for m, opt in ((plain_model, plain), (model, overlapped)):
                opt.zero_grad()
                loss_fn(m(x), y).backward()
                opt.step()
        for p, q in zip(plain_model.parameters(), model.parameters(), strict=True):
            assert torch.equal(p, q)
        assert overlapped.version == 5
        counters = overlapped.session.info()["counters"]
        assert counters["steps_applied"] == 5 and counters["pushes_received"] > 5
        # A second backward before step() would push a gradient twice: refused (by the
        # optimizer, or by autograd when a part's new weights arrived before the forward).
        x, y = next(batches(1))
        overlapped.zero_grad()
        loss_fn(model(x), y).backward()
        with pytest.raises(RuntimeError, match=r"accumulated twice|modified by an inplace"):
            loss_fn(model(x), y).backward()
    finally:
        plain.close(delete=True)
        overlapped.close(delete=True)


def test_overlap_needs_an_async_or_ssp_session(server: LiveServer) -> None:
    with Client(server.url) as client:
        before = {s["id"] for s in client.list_sessions()}
        with pytest.raises(ValueError, match="needs an async or ssp session"):
            RemoteOptimizer(
                make_model().parameters(), client=client, overlap=True,
                mode={"name": "sync", "workers": 2, "timeout_s": 5},
            )  # fmt: skip
        assert {s["id"] for s in client.list_sessions()} == before  # the session it made: gone


def test_bad_options_and_dtypes_are_refused_before_training(server: LiveServer) -> None:
    with Client(server.url) as client:
        before = {s["id"] for s in client.list_sessions()}
        with pytest.raises(ValidationError, match="unknown option 'momentum'"):
            RemoteOptimizer(
                make_model().parameters(), client=client, optimizer="adam", momentum=0.9
            )
        with pytest.raises(TypeError, match="float16"):
            RemoteOptimizer(make_model(dtype=torch.float16).parameters(), client=client)
        assert {s["id"] for s in client.list_sessions()} == before  # no session left behind


RESUME = textwrap.dedent(
    """
    import sys, torch
    from optserver_client.torch import RemoteOptimizer
    from tests import test_torch_optimizer as t

    url, path, out = sys.argv[1:4]
    checkpoint = torch.load(path, weights_only=False)
    model = t.make_model()
    model.load_state_dict(checkpoint["model"])
    opt = RemoteOptimizer(t.groups_of(model, True, 1e-2), url=url, optimizer="adamw", lr=1e-2)
    scheduler = t.scheduler_for(opt)  # as in torch: scheduler first, then the states
    opt.load_state_dict(checkpoint["opt"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    t.train(model, opt, scheduler, range(t.STEPS // 2, t.STEPS))
    torch.save({"model": model.state_dict(), "version": opt.version}, out)
    opt.close(delete=True)
    """
)


def test_state_dict_resumes_in_a_new_process_bit_for_bit(
    server: LiveServer, tmp_path: Path
) -> None:
    whole_model = make_model()
    model = copy.deepcopy(whole_model)
    whole = RemoteOptimizer(
        groups_of(whole_model, True, 1e-2), url=server.url, optimizer="adamw", lr=1e-2,
        schedule={"name": "step", "step_size": 50, "gamma": 0.5},
    )  # fmt: skip
    half = RemoteOptimizer(
        groups_of(model, True, 1e-2), url=server.url, optimizer="adamw", lr=1e-2,
        schedule={"name": "step", "step_size": 50, "gamma": 0.5},
    )  # fmt: skip
    try:
        train(whole_model, whole, scheduler_for(whole), range(STEPS))
        scheduler = scheduler_for(half)
        train(model, half, scheduler, range(STEPS // 2))
        path = tmp_path / "checkpoint.pt"
        torch.save(
            {"model": model.state_dict(), "opt": half.state_dict(),
             "scheduler": scheduler.state_dict()},
            path,
        )  # fmt: skip
        out = tmp_path / "resumed.pt"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run(
            [sys.executable, "-c", RESUME, server.url, str(path), str(out)],
            check=True, cwd=ROOT, env=env, timeout=300,
        )  # fmt: skip
        resumed = torch.load(out, weights_only=False)
        assert resumed["version"] == STEPS  # the server-side schedule continued at 100
        for name, value in whole_model.state_dict().items():
            assert torch.equal(resumed["model"][name], value), name
    finally:
        whole.close(delete=True)
        half.close(delete=True)


def test_a_torch_optim_state_dict_loads_into_a_remote_optimizer(server: LiveServer) -> None:
    reference_model = make_model()
    model = copy.deepcopy(reference_model)
    reference = torch.optim.Adam(reference_model.parameters(), lr=1e-2, foreach=False)
    data = list(batches(20))
    loss_fn = torch.nn.CrossEntropyLoss()
    for x, y in data[:10]:
        reference.zero_grad()
        loss_fn(reference_model(x), y).backward()
        reference.step()
    model.load_state_dict(reference_model.state_dict())
    remote = RemoteOptimizer(model.parameters(), url=server.url, optimizer="adam", lr=1e-2)
    try:
        remote.load_state_dict(reference.state_dict())
        for x, y in data[10:]:
            for m, opt in ((reference_model, reference), (model, remote)):
                opt.zero_grad()
                loss_fn(m(x), y).backward()
                opt.step()
        for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
            assert_close(p, q, "weights")
    finally:
        remote.close(delete=True)


def test_the_client_needs_no_torch_until_this_module_is_imported() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        import optserver_client
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        try:
            import optserver_client.torch
        except ImportError as exc:
            print(exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert "optserver_client.torch needs PyTorch" in result.stdout


@pytest.fixture(scope="module")
def shards() -> Iterator[list[str]]:
    from optserver.embedded import embedded_shards

    with embedded_shards(2) as servers:
        yield [s.url for s in servers]


def test_a_sharded_session_steps_as_torch_and_round_trips(shards: list[str]) -> None:
    """Two shards, the first layer's weight cut over both: groups, a scheduler, a second
    worker attaching, and state_dict."""
    _, name, options = CASES["adamw"]
    reference_model = make_model()
    model, resumed_model = copy.deepcopy(reference_model), copy.deepcopy(reference_model)
    reference = torch.optim.AdamW(
        groups_of(reference_model, False, options["lr"]), foreach=False, **options
    )
    with Client(shards, chunk_bytes=256) as client:
        remote = RemoteOptimizer(
            groups_of(model, True, options["lr"]), client=client, optimizer=name, **options
        )
        try:
            assert "0.weight" in remote.session.info()["sharding"]["split"]  # cut in chunks
            train(reference_model, reference, scheduler_for(reference), range(STEPS))
            scheduler = scheduler_for(remote)
            train(model, remote, scheduler, range(STEPS // 2))
            saved, saved_scheduler = remote.state_dict(), copy.deepcopy(scheduler.state_dict())
            resumed_model.load_state_dict(model.state_dict())
            train(model, remote, scheduler, range(STEPS // 2, STEPS))
            for (n, ours), theirs in zip(
                model.named_parameters(), reference_model.parameters(), strict=True
            ):
                assert_close(ours, theirs, n)
            other = RemoteOptimizer.attach(
                make_model(seed=3).named_parameters(), client=client,
                session=remote.session_id, token=remote.token,
            )  # fmt: skip
            assert [len(g["params"]) for g in other.param_groups] == [2, 3, 1]
            other.close()
        finally:
            remote.close(delete=True)
        again = RemoteOptimizer(
            groups_of(resumed_model, True, options["lr"]), client=client, optimizer=name,
            **options,
        )  # fmt: skip
        try:
            scheduler = scheduler_for(again)
            again.load_state_dict(saved)
            scheduler.load_state_dict(saved_scheduler)
            train(resumed_model, again, scheduler, range(STEPS // 2, STEPS))
            for (n, ours), theirs in zip(
                resumed_model.named_parameters(), model.parameters(), strict=True
            ):
                assert torch.equal(ours, theirs), n
        finally:
            again.close(delete=True)


def test_overlap_completes_a_step_whose_parameters_did_not_all_get_a_gradient(
    server: LiveServer,
) -> None:
    """A parameter that requires a gradient but gets none (unused in this forward): the last
    hook never sees the step complete, so step() sends the completing push."""
    model = make_model()
    unused = torch.nn.Linear(3, 3).double()
    params = [
        *model.named_parameters(),
        *(("unused." + n, p) for n, p in unused.named_parameters()),
    ]
    opt = RemoteOptimizer(params, url=server.url, optimizer="sgd", lr=0.1, overlap=True,
                          bucket_bytes=64)  # fmt: skip
    try:
        before = unused.weight.detach().clone()
        for x, y in batches(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert opt.version == 3
        assert torch.equal(unused.weight, before)
        steps = {t["name"]: t["step"] for t in opt.session.info()["params"]}
        assert steps["unused.weight"] == 0 and steps["0.weight"] == 3
        opt.zero_grad()
        opt.step()  # no gradient at all: nothing is sent
        assert opt.version == 3
    finally:
        opt.close(delete=True)


def test_misuse_is_refused_with_a_message_that_says_what_to_do(server: LiveServer) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="bucket_bytes must be >= 1"):
        RemoteOptimizer(model.parameters(), url=server.url, overlap=True, bucket_bytes=0)
    with pytest.raises(TypeError, match="attach takes the model's parameters"):
        RemoteOptimizer.attach([{"params": list(model.parameters())}], url=server.url,
                               session="0" * 32, token="t" * 43)  # fmt: skip
    with pytest.raises(TypeError, match=r"has the session's options; got \['lr'\]"):
        RemoteOptimizer.attach(model.parameters(), url=server.url, session="0" * 32,
                               token="t" * 43, lr=0.1)  # fmt: skip
    embedding = torch.nn.Embedding(10, 4, sparse=True).double()
    opt = RemoteOptimizer(embedding.named_parameters(), url=server.url, optimizer="sgd")
    try:
        embedding(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(TypeError, match="sparse"):
            opt.step()
    finally:
        opt.close(delete=True)


def test_overlap_in_ssp_applies_or_refuses_a_step_whole(server: LiveServer) -> None:
    """A step pushed in parts is judged as of its first part: another worker's step landing
    between a's parts does not make the rest of a's step stale; a step whose first part is
    stale is refused whole, and the model takes the session's weights."""
    model_a, model_b = make_model(), make_model()
    unused = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))  # step() completes
    a = RemoteOptimizer(
        [*model_a.named_parameters(), ("unused", unused)], url=server.url, optimizer="sgd",
        lr=0.1, mode={"name": "ssp", "max_staleness": 0}, overlap=True, bucket_bytes=64,
    )  # fmt: skip
    b = RemoteOptimizer.attach(
        model_b.named_parameters(), url=server.url, session=a.session_id, token=a.token
    )
    assert a.worker is not None and a.worker.startswith("torch-")
    x, y = next(batches(1))

    def workers() -> dict[str, Any]:
        seen: dict[str, Any] = a.session.info()["workers"]
        return seen

    try:
        a.zero_grad()
        torch.nn.functional.cross_entropy(model_a(x), y).backward()  # a's parts go out
        deadline = time.monotonic() + 30
        while workers().get(a.worker, {}).get("open_step") is None:
            assert time.monotonic() < deadline, "a's first part never arrived"
            time.sleep(0.01)
        b.zero_grad()
        torch.nn.functional.cross_entropy(model_b(x), y).backward()
        b.step()  # version 1, between a's parts
        a.step()  # its rest is judged at version 0: applied
        assert a.last_step_applied is True and a.version == 2
        seen = workers()[a.worker]
        assert seen["open_step"] is None and seen["rejected"] == 0, seen

        # c takes version 2's weights, a steps again: c's step, on version 2, is stale whole.
        model_c = make_model(seed=8)
        c = RemoteOptimizer.attach(
            model_c.named_parameters(), url=server.url, session=a.session_id, token=a.token,
            overlap=True, bucket_bytes=64, worker="c",
        )  # fmt: skip
        a.zero_grad()
        torch.nn.functional.cross_entropy(model_a(x), y).backward()
        a.step()
        assert a.version == 3
        before = a.session.pull()  # (not c.session: it would learn of version 3)
        c.zero_grad()
        torch.nn.functional.cross_entropy(model_c(x), y).backward()
        c.step()
        assert c.last_step_applied is False and c.version == 3
        after = c.session.pull()
        for name, value in before.items():
            np.testing.assert_array_equal(after[name], value)  # none of c's parts applied
        for name, p in model_c.named_parameters():
            np.testing.assert_array_equal(p.detach().numpy(), after[name])  # c resynced
        seen = workers()["c"]
        assert seen["applied"] == 0 and seen["rejected"] > 0 and seen["open_step"] is None
        c.close()
    finally:
        b.close()
        a.close(delete=True)
