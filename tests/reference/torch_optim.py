"""Reference vectors from torch.optim for the optimizer parity tests.

Run ``python tests/reference/torch_optim.py`` (with torch==2.13.0 installed) to regenerate
``tests/data/torch_optim_reference.npz``. The same module drives the live comparison in
``tests/test_optim_parity.py`` when torch is importable, so the data and the live run can never
drift apart.

The problem: three tensors (a matrix, a vector, a rank-0 scalar) start away from zero (so that a
relative tolerance means something), take STEPS steps of normal random gradients, and every
seventh step the vector gets no gradient (torch skips it, so its step count falls behind: this
checks the per-tensor step counts of partial pushes). One case per optimizer also changes the
learning rate at every step (the per-step ``lr`` override).

Grouped cases put the tensors in torch parameter groups (``bias`` without weight decay,
``scale`` at three times the rate, ``weight`` in the default group) and, at every step, change
each group's ``lr`` and its ``momentum`` or ``betas[0]`` (what ``OneCycleLR`` does): the
per-group options of a push.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

STEPS = 1000
CHECKPOINTS = (1, 10, 100, 1000)
SHAPES: dict[str, tuple[int, ...]] = {"weight": (4, 5), "bias": (5,), "scale": ()}
SKIP_EVERY = 7  # "bias" gets no gradient at steps divisible by this
DATA = Path(__file__).resolve().parents[1] / "data" / "torch_optim_reference.npz"

TORCH_CLASSES = {
    "sgd": "SGD",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
    "adam": "Adam",
    "adamw": "AdamW",
}


def _grid(base: Mapping[str, Any], **axes: list[Any]) -> Iterator[dict[str, Any]]:
    names = list(axes)
    for values in itertools.product(*(axes[n] for n in names)):
        yield {**base, **dict(zip(names, values, strict=True))}


def _valid_sgd(o: Mapping[str, Any]) -> bool:
    return not o["nesterov"] or (o["momentum"] > 0 and o["dampening"] == 0)


def cases() -> list[dict[str, Any]]:
    """Every combination of the torch options of each optimizer (those of the README's
    Optimizers table; ``test_every_table_option_is_covered`` checks none is missing), plus one
    varying-lr case each."""
    out: list[dict[str, Any]] = []

    def add(optimizer: str, options: dict[str, Any], vary_lr: bool = False) -> None:
        out.append({"optimizer": optimizer, "options": options, "vary_lr": vary_lr})

    for o in _grid(
        {"lr": 1e-3},
        momentum=[0.0, 0.9],
        dampening=[0.0, 0.5],
        nesterov=[False, True],
        weight_decay=[0.0, 0.01],
        maximize=[False, True],
    ):
        if _valid_sgd(o):
            add("sgd", o)
    for o in _grid(
        {"lr": 1e-2},
        lr_decay=[0.0, 0.01],
        weight_decay=[0.0, 0.01],
        initial_accumulator_value=[0.0, 0.1],
        eps=[1e-10, 1e-6],
        maximize=[False, True],
    ):
        add("adagrad", o)
    for o in _grid(
        {"lr": 1e-3},
        alpha=[0.99, 0.9],
        eps=[1e-8, 1e-4],
        weight_decay=[0.0, 0.01],
        momentum=[0.0, 0.9],
        centered=[False, True],
        maximize=[False, True],
    ):
        add("rmsprop", o)
    for name, decays in (("adam", [0.0, 0.01]), ("adamw", [0.01, 0.1])):
        for o in _grid(
            {"lr": 1e-3},
            betas=[(0.9, 0.999), (0.8, 0.99)],
            eps=[1e-8, 1e-6],
            weight_decay=decays,
            amsgrad=[False, True],
            maximize=[False, True],
        ):
            add(name, {**o, "betas": list(o["betas"])})
    add("adam", {"lr": 1e-3, "weight_decay": 0.05, "decoupled_weight_decay": True})
    add("sgd", {"lr": 1e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, True)
    add("adagrad", {"lr": 1e-2, "lr_decay": 0.01, "weight_decay": 0.01}, True)
    add("rmsprop", {"lr": 1e-3, "momentum": 0.9, "centered": True}, True)
    add("adam", {"lr": 1e-3, "amsgrad": True, "weight_decay": 0.01}, True)
    add("adamw", {"lr": 1e-3, "weight_decay": 0.1}, True)
    for optimizer, options in (
        ("sgd", {"lr": 1e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
        ("sgd", {"lr": 1e-3, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
        ("adagrad", {"lr": 1e-2, "lr_decay": 0.01, "weight_decay": 0.01}),
        ("rmsprop", {"lr": 1e-3, "momentum": 0.5, "centered": True, "weight_decay": 0.01}),
        ("adam", {"lr": 1e-3, "weight_decay": 0.01, "amsgrad": True}),
        ("adamw", {"lr": 1e-3, "weight_decay": 0.1}),
    ):
        lr = options["lr"]
        groups = [{"params": ["bias"], "weight_decay": 0.0}, {"params": ["scale"], "lr": 3 * lr}]
        out.append({"optimizer": optimizer, "options": options, "vary_lr": False, "groups": groups})
    return out


#: The group of tensors no group names (torch: the first of ``param_groups``).
DEFAULT_GROUP = "default"


def group_names(case: Mapping[str, Any]) -> list[str]:
    """The groups of a grouped case by name, ``default`` first (torch's order here)."""
    return [DEFAULT_GROUP] + [str(i) for i in range(len(case.get("groups", ())))]


def group_options(case: Mapping[str, Any], step: int) -> dict[str, dict[str, Any]]:
    """What each group of a grouped case changes before 1-based ``step`` (empty otherwise):
    its rate scaled around its own, and ``momentum`` or ``betas[0]`` cycled."""
    if "groups" not in case:
        return {}
    base = case["options"]
    out = {}
    for name, group in zip(group_names(case), [{}, *case["groups"]], strict=True):
        lr = group.get("lr", base["lr"])
        options: dict[str, Any] = {"lr": float(lr * (1.0 + 0.5 * np.sin(step / 50.0)))}
        cycled = float(0.85 + 0.1 * np.cos(step / 30.0))
        if case["optimizer"] in ("sgd", "rmsprop"):
            options["momentum"] = cycled
        elif case["optimizer"] in ("adam", "adamw"):
            options["betas"] = [cycled, base.get("betas", (0.9, 0.999))[1]]
        out[name] = options
    return out


def case_id(case: Mapping[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(case["options"].items()) if k != "lr")
    suffix = "+vary_lr" if case["vary_lr"] else ""
    return f"{case['optimizer']}[{opts}]{suffix}" + ("+groups" if "groups" in case else "")


def inputs(seed: int = 20261121) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Initial parameters (float64) and the gradient of every step (``STEPS`` x shape)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in SHAPES.items():
        magnitude = rng.uniform(2.0, 4.0, size=shape)
        params[name] = np.where(rng.random(size=shape) < 0.5, -magnitude, magnitude)
    grads = {name: rng.standard_normal((STEPS, *shape)) for name, shape in SHAPES.items()}
    return params, grads


def learning_rate(case: Mapping[str, Any], step: int) -> float | None:
    """The lr override of 1-based ``step``, or None to use the configured one."""
    if not case["vary_lr"]:
        return None
    return float(case["options"]["lr"] * (1.0 + 0.5 * np.sin(step / 50.0)))


def has_grad(name: str, step: int) -> bool:
    return not (name == "bias" and step % SKIP_EVERY == 0)


def run_torch(
    case: Mapping[str, Any], dtype: str
) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
    """torch.optim's single-tensor path on the case: parameters at each checkpoint and the
    final optimizer state (arrays by torch's names, plus ``step``)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    params0, grads = inputs()
    tensors = {
        n: torch.tensor(p, dtype=torch_dtype).requires_grad_(True) for n, p in params0.items()
    }
    cls = getattr(torch.optim, TORCH_CLASSES[case["optimizer"]])
    options = dict(case["options"])
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    groups = case.get("groups", [])
    grouped = {n for g in groups for n in g["params"]}
    param_groups = [{"params": [t for n, t in tensors.items() if n not in grouped]}]
    for group in groups:
        extra = {k: v for k, v in group.items() if k != "params"}
        param_groups.append({"params": [tensors[n] for n in group["params"]], **extra})
    optimizer = cls(param_groups, foreach=False, **options)
    checkpoints: dict[int, dict[str, np.ndarray]] = {}
    for step in range(1, STEPS + 1):
        lr = learning_rate(case, step)
        if lr is not None:
            optimizer.param_groups[0]["lr"] = lr
        changes = group_options(case, step)
        for name, torch_group in zip(group_names(case), optimizer.param_groups, strict=False):
            for key, value in changes.get(name, {}).items():
                torch_group[key] = tuple(value) if key == "betas" else value
        for name, tensor in tensors.items():
            g = grads[name][step - 1]
            tensor.grad = torch.tensor(g, dtype=torch_dtype) if has_grad(name, step) else None
        optimizer.step()
        if step in CHECKPOINTS:
            checkpoints[step] = {n: t.detach().numpy().copy() for n, t in tensors.items()}
    state: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in tensors.items():
        entry = optimizer.state[tensor]
        state[name] = {
            k: (v.detach().numpy().copy() if v.ndim or k != "step" else np.array(float(v)))
            for k, v in entry.items()
            if isinstance(v, torch.Tensor)
        }
    return checkpoints, state


def generate(path: Path = DATA) -> None:
    import torch

    all_cases = cases()
    arrays: dict[str, np.ndarray] = {}
    for index, case in enumerate(all_cases):
        for dtype in ("float64", "float32"):
            checkpoints, state = run_torch(case, dtype)
            for step, params in checkpoints.items():
                for name, value in params.items():
                    arrays[f"{index}/{dtype}/params/{step}/{name}"] = value
            for name, entry in state.items():
                for key, value in entry.items():
                    arrays[f"{index}/{dtype}/state/{name}/{key}"] = value
    meta = {"torch": torch.__version__, "steps": STEPS, "cases": all_cases}
    arrays["meta"] = np.array(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    print(f"wrote {len(all_cases)} cases x 2 dtypes to {path} (torch {torch.__version__})")


if __name__ == "__main__":
    generate()
