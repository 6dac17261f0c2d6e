"""AdaGrad: per-element rates from the running sum of squared gradients."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from optserver.optim import kernels
from optserver.optim.base import Optimizer, TensorState
from optserver.optim.hparams import Hyperparams, require

__all__ = ["Adagrad", "AdagradHyperparams", "AdagradState"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdagradHyperparams(Hyperparams):
    optimizer = "adagrad"
    lr: float = 1e-2
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    maximize: bool = False

    def validate(self) -> None:
        super().validate()
        require(self.lr_decay >= 0.0, "adagrad", "lr_decay", self.lr_decay, ">= 0")
        require(self.weight_decay >= 0.0, "adagrad", "weight_decay", self.weight_decay, ">= 0")
        require(
            self.initial_accumulator_value >= 0.0,
            "adagrad",
            "initial_accumulator_value",
            self.initial_accumulator_value,
            ">= 0",
        )
        require(self.eps >= 0.0, "adagrad", "eps", self.eps, ">= 0")


@dataclasses.dataclass(eq=False, kw_only=True)
class AdagradState(TensorState):
    sum: np.ndarray


class Adagrad(Optimizer[AdagradHyperparams, AdagradState]):
    """torch.optim.Adagrad: ``clr = lr/(1+(t-1)*lr_decay)``, ``sum += g*g``,
    ``p -= clr*g/(sqrt(sum)+eps)``."""

    name = "adagrad"
    hparams_type = AdagradHyperparams
    state_type = AdagradState

    def init_tensor(self, param: np.ndarray) -> AdagradState:
        return AdagradState(sum=np.full_like(param, self.hparams.initial_accumulator_value))

    def output_bound(self, lr: float, bound: float) -> float:
        h = self.hparams
        if not h.eps > 0:
            return math.inf  # sum may be 0: 0/0
        g = bound * (1 + h.weight_decay)
        clr = abs(lr)  # lr_decay >= 0 and t >= 1: clr <= lr
        total = bound * bound + g * g
        return max(total, clr * g, bound + clr * g / h.eps)

    def _step(
        self, p: np.ndarray, g: np.ndarray, state: AdagradState, lr: float, bound: float,
        bound_sq: float,
    ) -> bool:  # fmt: skip
        h, dt = self.hparams, p.dtype.type
        clr = lr / (1 + (state.step - 1) * h.lr_decay)
        return kernels.run(
            kernels.adagrad(decay=h.weight_decay != 0),
            (p, g, state.sum),
            dt(-clr),
            dt(-1 if h.maximize else 1),
            dt(h.weight_decay),
            dt(h.eps),
            dt(bound),
            dt(bound_sq),
        )
