"""AdaGrad: per-element rates from the running sum of squared gradients: hyperparameters,
state, kernel.

Reference: Duchi et al., *Adaptive Subgradient Methods for Online Learning and Stochastic
Optimization* (2011).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import numpy as np

from optserver.optim import kernels
from optserver.optim.base import Optimizer
from optserver.optim.hparams import Hyperparams, require
from optserver.optim.kernels import Scalar
from optserver.optim.kernels import jit as _jit  # coverage skips "@_jit" bodies
from optserver.optim.state import TensorState

__all__ = ["Adagrad", "AdagradHyperparams", "AdagradScalars", "AdagradState"]


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
    #: The running sum of squared gradients.
    sum: np.ndarray


class AdagradScalars(NamedTuple):
    """The scalars of one AdaGrad step at step count ``t``, in the parameter's dtype."""

    #: ``-lr / (1 + (t-1)*lr_decay)``: addcdiv's value.
    neg_clr: Scalar
    #: -1 with ``maximize``, else 1.
    sign: Scalar
    weight_decay: Scalar
    eps: Scalar
    bound: Scalar
    bound_sq: Scalar


@functools.cache
def adagrad_kernel(*, decay: bool) -> kernels.Kernel[AdagradScalars]:
    """The fused step."""

    @_jit
    def adagrad(arrays: kernels.Arrays, s: AdagradScalars) -> bool:
        p, g, acc = arrays
        outside = False
        for i in range(p.shape[0]):
            gi = s.sign * g[i]  # g <- -grad if maximize else grad
            if decay:
                gi = gi + s.weight_decay * p[i]  # g <- g + weight_decay*p: g.add(p, alpha=wd)
            total = acc[i] + gi * gi  # sum <- sum + g*g: sum.addcmul_(g, g, value=1)
            acc[i] = total
            # p <- p - clr*g/(sqrt(sum) + eps): p.addcdiv_(g, sum.sqrt().add_(eps), value=-clr)
            q = p[i] + (s.neg_clr * gi) / (np.sqrt(total) + s.eps)
            p[i] = q
            outside = outside | (not (abs(q) <= s.bound)) | (not (total <= s.bound_sq))
        return outside

    return adagrad


class Adagrad(Optimizer[AdagradHyperparams, AdagradState]):
    """torch.optim.Adagrad (its ``_single_tensor_adagrad``): step ``t`` of one tensor ::

        g   <- -grad if maximize else grad
        g   <- g + weight_decay*p
        clr  = lr / (1 + (t - 1)*lr_decay)
        sum <- sum + g*g                            (starts at initial_accumulator_value)
        p   <- p - clr * g / (sqrt(sum) + eps)

    ``clr`` is computed in Python floats, as torch does, and reaches the kernel cast to the
    parameter's dtype (:class:`AdagradScalars`).
    """

    name = "adagrad"
    hparams_type = AdagradHyperparams
    state_type = AdagradState
    kernel_factory = staticmethod(adagrad_kernel)
    scalars_type = AdagradScalars

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
        scalars = AdagradScalars(
            neg_clr=dt(-lr / (1 + (state.step - 1) * h.lr_decay)),
            sign=dt(-1 if h.maximize else 1),
            weight_decay=dt(h.weight_decay),
            eps=dt(h.eps),
            bound=dt(bound),
            bound_sq=dt(bound_sq),
        )
        kernel = adagrad_kernel(decay=h.weight_decay != 0)
        return kernels.run(kernel, (p, g, state.sum), scalars)
