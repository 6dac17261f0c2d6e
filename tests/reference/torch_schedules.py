"""Reference learning rates from torch.optim.lr_scheduler for the schedule parity tests.

Run ``python tests/reference/torch_schedules.py`` (with torch==2.13.0 installed) to regenerate
``tests/data/torch_schedules_reference.json``. The same module drives the live comparison in
``tests/test_schedules.py`` when torch is importable, so the data and the live run can never
drift apart.

Each case runs torch's scheduler on SGD over one dummy parameter with ``lr=BASE_LR`` in the
usual loop (``optimizer.step()`` then ``scheduler.step()``) and records the learning rate after
0, 1, ..., STEPS scheduler steps.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STEPS = 300
BASE_LR = 0.1
DATA = Path(__file__).resolve().parents[1] / "data" / "torch_schedules_reference.json"


def cases() -> list[dict[str, Any]]:
    """Schedule configs (as :func:`optserver.optim.create_schedule` takes them) to compare."""
    return [
        {"name": "constant"},
        {"name": "step", "step_size": 30},
        {"name": "step", "step_size": 7, "gamma": 0.5},
        {"name": "step", "step_size": 1, "gamma": 0.97},
        {"name": "multistep", "milestones": [30, 80]},
        {"name": "multistep", "milestones": [0, 5, 6, 150, 299, 300], "gamma": 0.5},
        {"name": "multistep", "milestones": [], "gamma": 0.5},
        {"name": "exponential", "gamma": 0.99},
        {"name": "exponential", "gamma": 0.95},
        {"name": "exponential", "gamma": 1.01},
        {"name": "cosine", "T_max": 300},
        {"name": "cosine", "T_max": 100},
        {"name": "cosine", "T_max": 50, "eta_min": 0.001},
        {"name": "cosine", "T_max": 1},
        {"name": "cosine", "T_max": 7, "eta_min": 0.01},
        {"name": "linear"},
        {"name": "linear", "start_factor": 0.01, "total_iters": 100},
        {"name": "linear", "start_factor": 1.0, "end_factor": 0.0, "total_iters": 300},
        {"name": "linear", "start_factor": 0.25, "end_factor": 0.5, "total_iters": 40},
        {"name": "linear", "start_factor": 1.0 / 3, "end_factor": 0.0, "total_iters": 50},
        {"name": "constant_factor"},
        {"name": "constant_factor", "factor": 0.1, "total_iters": 100},
        {"name": "constant_factor", "factor": 1.0, "total_iters": 1},
        {"name": "warmup_cosine", "T_max": 200},
        {"name": "warmup_cosine", "T_max": 250, "warmup_iters": 50, "start_factor": 0.01},
        {"name": "warmup_cosine", "T_max": 60, "warmup_iters": 10, "eta_min": 0.002},
    ]


def case_id(case: Mapping[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(case.items()) if k != "name")
    return f"{case['name']}[{opts}]"


def _torch_scheduler(optimizer: Any, case: Mapping[str, Any]) -> Any:
    """torch's scheduler for the case, with torch's defaults wherever the case has none."""
    from torch.optim import lr_scheduler as sched

    o = {k: v for k, v in case.items() if k != "name"}
    name = case["name"]
    if name == "constant":
        return sched.LambdaLR(optimizer, lambda _: 1.0)
    if name == "step":
        return sched.StepLR(optimizer, **o)
    if name == "multistep":
        return sched.MultiStepLR(optimizer, **o)
    if name == "exponential":
        return sched.ExponentialLR(optimizer, **o)
    if name == "cosine":
        return sched.CosineAnnealingLR(optimizer, **o)
    if name == "linear":
        return sched.LinearLR(optimizer, **o)
    if name == "constant_factor":
        return sched.ConstantLR(optimizer, **o)
    if name == "warmup_cosine":
        warmup = o.get("warmup_iters", 5)
        linear = sched.LinearLR(
            optimizer, start_factor=o.get("start_factor", 1.0 / 3), total_iters=warmup
        )
        cosine = sched.CosineAnnealingLR(optimizer, T_max=o["T_max"], eta_min=o.get("eta_min", 0))
        return sched.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
    raise ValueError(f"no torch scheduler for {name!r}")


def run_torch(case: Mapping[str, Any], steps: int = STEPS, base_lr: float = BASE_LR) -> list[float]:
    """torch's learning rate after 0, 1, ..., ``steps`` scheduler steps."""
    import torch

    param = torch.zeros((), requires_grad=True)  # never gets a gradient: SGD skips it
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = _torch_scheduler(optimizer, case)
    lrs = [float(optimizer.param_groups[0]["lr"])]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(float(optimizer.param_groups[0]["lr"]))
    return lrs


def generate(path: Path = DATA) -> None:
    import torch

    all_cases = cases()
    # One case per line: small diffs when cases change.
    rows = [json.dumps({"case": case, "lrs": run_torch(case)}) for case in all_cases]
    head = json.dumps({"torch": torch.__version__, "steps": STEPS, "base_lr": BASE_LR})
    text = head[:-1] + ', "cases": [\n' + ",\n".join(rows) + "\n]}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {len(all_cases)} cases to {path} (torch {torch.__version__})")


if __name__ == "__main__":
    generate()
