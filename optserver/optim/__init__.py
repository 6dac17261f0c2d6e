"""The optimizer core: torch.optim's algorithms over named numpy arrays, stepped in place.

It knows nothing of HTTP or storage::

    opt = create({"name": "adam", "lr": 1e-3})
    state = opt.init(params)            # {name: AdamState}
    opt.update(grads, state, params)    # params and state change in place

``update`` is ``apply(prepare(grads, params, lr=...), state, params)``: ``prepare`` checks the
update once and returns a :class:`Plan`, for a caller that must refuse a bad update before
doing anything else.
"""

from __future__ import annotations

from optserver.optim.adagrad import Adagrad, AdagradHyperparams, AdagradState
from optserver.optim.adam import Adam, AdamHyperparams, AdamState, AdamW, AdamWHyperparams
from optserver.optim.base import Optimizer
from optserver.optim.checks import FLOAT_DTYPES, Plan, TensorSpec
from optserver.optim.errors import HyperparameterError, OptimError, TensorError
from optserver.optim.groups import DEFAULT_GROUP, GroupPlan, ParamGroup, ParamGroups
from optserver.optim.hparams import Hyperparams
from optserver.optim.kernels import configure_threads
from optserver.optim.registry import OPTIMIZERS, create
from optserver.optim.rmsprop import RMSprop, RMSpropHyperparams, RMSpropState
from optserver.optim.schedules import (
    SCHEDULES,
    ConstantFactorSchedule,
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LinearSchedule,
    MultiStepSchedule,
    Schedule,
    StepSchedule,
    WarmupCosineSchedule,
    create_schedule,
)
from optserver.optim.sgd import SGD, SGDHyperparams, SGDState
from optserver.optim.state import OptState, TensorState
from optserver.optim.warmup import WarmUpThread, warm_up, warm_up_in_background

__all__ = [
    "DEFAULT_GROUP",
    "FLOAT_DTYPES",
    "OPTIMIZERS",
    "SCHEDULES",
    "SGD",
    "Adagrad",
    "AdagradHyperparams",
    "AdagradState",
    "Adam",
    "AdamHyperparams",
    "AdamState",
    "AdamW",
    "AdamWHyperparams",
    "ConstantFactorSchedule",
    "ConstantSchedule",
    "CosineSchedule",
    "ExponentialSchedule",
    "GroupPlan",
    "HyperparameterError",
    "Hyperparams",
    "LinearSchedule",
    "MultiStepSchedule",
    "OptState",
    "OptimError",
    "Optimizer",
    "ParamGroup",
    "ParamGroups",
    "Plan",
    "RMSprop",
    "RMSpropHyperparams",
    "RMSpropState",
    "SGDHyperparams",
    "SGDState",
    "Schedule",
    "StepSchedule",
    "TensorError",
    "TensorSpec",
    "TensorState",
    "WarmUpThread",
    "WarmupCosineSchedule",
    "configure_threads",
    "create",
    "create_schedule",
    "warm_up",
    "warm_up_in_background",
]
