"""The demo in PyTorch (``optserver demo --framework torch``): the same digits, a torch MLP, and
workers whose training loop is plain torch with :class:`optserver_client.torch.RemoteOptimizer`
as its optimizer, its rate annealed by the session's cosine schedule over every worker's
steps. The baseline is the same loop in one process with ``torch.optim`` and
``CosineAnnealingLR``.

torch is imported by this module only: the numpy demo never needs it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised without torch installed
    raise SystemExit(
        "the torch demo needs PyTorch: pip install torch (make demo-torch installs the CPU build)"
    ) from exc

from optserver_client import Client
from optserver_client.torch import RemoteOptimizer

from optserver.demo.data import Digits, load_digits, shard
from optserver.demo.mlp import HIDDEN
from optserver.demo.worker import PROGRESS_EVERY, RETRIES, Emit, WorkerPlan, steps_per_epoch

__all__ = [
    "TORCH_CLASSES",
    "accuracy",
    "create",
    "evaluate_weights",
    "make_model",
    "param_groups",
    "run_torch_worker",
    "torch_baseline",
]

#: The torch.optim class of each of the session's optimizers.
TORCH_CLASSES = {
    "sgd": "SGD",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
    "adam": "Adam",
    "adamw": "AdamW",
}


def make_model(seed: int = 0) -> torch.nn.Module:
    """64 inputs, a tanh hidden layer, 10 logits (the numpy demo's MLP, in torch)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 10)
    )


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Two groups, as training recipes have them: weights, and biases without weight decay."""
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if not n.endswith("bias")]},
        {"params": [(n, p) for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float(np.mean(predicted == y))


def _options(optimizer: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    options = dict(optimizer)
    return str(options.pop("name")), options


def create(
    client: Client, optimizer: dict[str, Any], mode: dict[str, Any], seed: int, steps: int
) -> RemoteOptimizer:
    """The first optimizer: it creates the session from its model's weights and groups, with
    the rate annealed to zero over the ``steps`` the session will apply (a server-side
    schedule: every worker's steps count)."""
    name, options = _options(optimizer)
    return RemoteOptimizer(
        param_groups(make_model(seed)), client=client, optimizer=name, mode=mode,
        schedule={"name": "cosine", "T_max": max(1, steps)}, name="demo-torch", **options,
    )  # fmt: skip


def evaluate_weights(weights: dict[str, np.ndarray], data: Digits) -> float:
    """The accuracy on the test split of a model with the session's ``weights``."""
    model = make_model()
    model.load_state_dict({n: torch.from_numpy(np.asarray(w)) for n, w in weights.items()})
    return accuracy(model, data.x_test, data.y_test)


def torch_baseline(
    optimizer: dict[str, Any], *, epochs: int, batch: int, seed: int, data: Digits
) -> dict[str, Any]:
    """The same model, groups, optimizer, schedule and data in one process with torch.optim."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    model = make_model(seed)
    name, options = _options(optimizer)
    reference = getattr(torch.optim, TORCH_CLASSES[name])(
        [{**g, "params": [p for _, p in g["params"]]} for g in param_groups(model)], **options
    )
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    rng = np.random.default_rng(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    # The session's schedule: the rate annealed to zero over all the steps.
    total = epochs * steps_per_epoch(len(y), 1, batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=total)
    steps = 0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for begin in range(0, len(y), batch):
            chosen = torch.from_numpy(order[begin : begin + batch])
            reference.zero_grad()
            loss_fn(model(x[chosen]), y[chosen]).backward()
            reference.step()
            schedule.step()
            steps += 1
    return {
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "steps": steps,
        "seconds": time.perf_counter() - start,
    }


def run_torch_worker(
    url: str, session: str, token: str, plan: WorkerPlan, emit: Emit, data: Digits | None = None
) -> dict[str, Any]:
    """A worker: attach to the session (its weights into this model), then a plain torch
    training loop on this worker's shard, ``RemoteOptimizer`` as the optimizer."""
    torch.set_num_threads(1)  # several workers share the machine's cores
    data = data or load_digits()
    if plan.shard is None:
        x_np, y_np = data.x_train, data.y_train
    else:
        x_np, y_np = shard(data.x_train, data.y_train, plan.shard, plan.shards)
    x, y = torch.from_numpy(np.ascontiguousarray(x_np)), torch.from_numpy(y_np.copy())
    per_epoch = steps_per_epoch(len(data.y_train), plan.shards, plan.batch)
    model = make_model(plan.seed)  # any weights: attaching loads the session's
    opt = RemoteOptimizer.attach(
        model.named_parameters(), url=url, session=session, token=token, worker=plan.worker,
        patience=plan.patience, retries=RETRIES,
    )  # fmt: skip
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(plan.seed)
    start = time.perf_counter()
    steps = 0
    try:
        for epoch in range(1, plan.epochs + 1):
            order = rng.permutation(len(y))
            losses: list[float] = []
            staleness: list[int] = []
            for k in range(per_epoch):
                chosen = torch.from_numpy(order[(np.arange(plan.batch) + k * plan.batch) % len(y)])

                def closure(chosen: torch.Tensor = chosen) -> Any:
                    opt.zero_grad()
                    loss = loss_fn(model(x[chosen]), y[chosen])
                    loss.backward()
                    return loss

                base = opt.version
                loss = opt.step(closure)  # a stale refusal (ssp) recomputes with fresh weights
                losses.append(float(loss.item()))
                staleness.append(max(0, opt.version - 1 - base))
                steps += 1
                if steps % PROGRESS_EVERY == 0:
                    emit(
                        {
                            "event": "step", "worker": plan.worker, "steps": steps,
                            "loss": float(np.mean(losses[-PROGRESS_EVERY:])),
                            "staleness": float(np.mean(staleness)), "version": opt.version,
                        }
                    )  # fmt: skip
            emit(
                {
                    "event": "epoch", "worker": plan.worker, "epoch": epoch,
                    "epochs": plan.epochs, "steps": steps,
                    "loss": float(np.mean(losses[-per_epoch:])),
                    "accuracy": accuracy(model, x_np, y_np), "version": opt.version,
                    "staleness": float(np.mean(staleness)),
                    "seconds": time.perf_counter() - start,
                }
            )  # fmt: skip
        result = {
            "event": "done", "worker": plan.worker, "steps": steps,
            "test_accuracy": accuracy(model, data.x_test, data.y_test), "version": opt.version,
            "seconds": time.perf_counter() - start,
        }  # fmt: skip
        emit(result)
        return result
    finally:
        opt.close()
