"""Stochastic gradient descent with momentum, dampening, Nesterov momentum and weight decay:
hyperparameters, state, kernel.

Nesterov momentum as in Sutskever et al., *On the importance of initialization and momentum in
deep learning* (2013), in torch.optim's formulation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

from optserver.optim import kernels
from optserver.optim.base import Optimizer
from optserver.optim.hparams import Hyperparams, require
from optserver.optim.kernels import Scalar
from optserver.optim.kernels import jit as _jit  # coverage skips "@_jit" bodies
from optserver.optim.state import TensorState

__all__ = ["SGD", "SGDHyperparams", "SGDScalars", "SGDState"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SGDHyperparams(Hyperparams):
    optimizer = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def validate(self) -> None:
        super().validate()
        require(self.momentum >= 0.0, "sgd", "momentum", self.momentum, ">= 0")
        require(self.weight_decay >= 0.0, "sgd", "weight_decay", self.weight_decay, ">= 0")
        if self.nesterov:
            require(self.momentum > 0.0, "sgd", "momentum", self.momentum, "> 0 with nesterov")
            require(self.dampening == 0.0, "sgd", "dampening", self.dampening, "0 with nesterov")


@dataclasses.dataclass(eq=False, kw_only=True)
class SGDState(TensorState):
    #: None until the first step with momentum, which starts it at that step's gradient.
    momentum_buffer: np.ndarray | None = None


class SGDScalars(NamedTuple):
    """The scalars of one SGD step, in the parameter's dtype."""

    neg_lr: Scalar
    #: -1 with ``maximize``, else 1.
    sign: Scalar
    weight_decay: Scalar
    momentum: Scalar
    one_minus_dampening: Scalar
    bound: Scalar
    bound_sq: Scalar


@functools.cache
def sgd_kernel(
    *, momentum: bool, nesterov: bool, first: bool, decay: bool
) -> kernels.Kernel[SGDScalars]:
    """The fused step; ``first``: the momentum buffer starts at this step."""

    @_jit
    def sgd(arrays: kernels.Arrays, s: SGDScalars) -> bool:
        p, g, buf = arrays
        outside = False
        for i in range(p.shape[0]):
            gi = s.sign * g[i]  # g <- -grad if maximize else grad
            if decay:
                gi = gi + s.weight_decay * p[i]  # g <- g + weight_decay*p: g.add(p, alpha=wd)
            if momentum:
                # b <- g at the first step, else momentum*b + (1 - dampening)*g, rounded as
                # torch's buf.mul_(momentum).add_(g, alpha=1 - dampening).
                b = gi if first else buf[i] * s.momentum + s.one_minus_dampening * gi
                buf[i] = b
                gi = gi + s.momentum * b if nesterov else b  # g.add(b, alpha=momentum)
                q = p[i] + s.neg_lr * gi  # p <- p - lr*g: p.add_(g, alpha=-lr)
                p[i] = q
                outside = outside | (not (abs(q) + abs(b) <= s.bound))
            else:
                q = p[i] + s.neg_lr * gi
                p[i] = q
                outside = outside | (not (abs(q) <= s.bound))
        return outside

    return sgd


class SGD(Optimizer[SGDHyperparams, SGDState]):
    """torch.optim.SGD (its ``_single_tensor_sgd``), one step of one tensor ::

        g <- -grad if maximize else grad
        g <- g + weight_decay*p
        b <- g                                      (momentum > 0, first step)
        b <- momentum*b + (1 - dampening)*g         (momentum > 0, later steps)
        g <- g + momentum*b if nesterov else b      (momentum > 0)
        p <- p - lr*g

    ``b`` is ``momentum_buffer``; it does not exist until the first step with momentum.
    """

    name = "sgd"
    hparams_type = SGDHyperparams
    state_type = SGDState
    kernel_factory = staticmethod(sgd_kernel)
    scalars_type = SGDScalars

    def init_tensor(self, param: np.ndarray) -> SGDState:
        return SGDState()

    def state_arrays(self) -> int:
        return 1 if self.hparams.momentum != 0 else 0  # the buffer starts at the first step

    def output_bound(self, lr: float, bound: float) -> float:
        h = self.hparams
        g = bound * (1 + h.weight_decay)  # sign*g + weight_decay*p
        if h.momentum == 0:
            buf = 0.0
            direction = g
        else:
            buf = max(g, h.momentum * bound + abs(1 - h.dampening) * g)
            direction = g + h.momentum * buf if h.nesterov else buf
        return max(g, buf, direction, abs(lr) * direction, bound + abs(lr) * direction)

    def _step(
        self, p: np.ndarray, g: np.ndarray, state: SGDState, lr: float, bound: float,
        bound_sq: float,
    ) -> bool:  # fmt: skip
        h, dt = self.hparams, p.dtype.type
        first = state.momentum_buffer is None
        if h.momentum != 0 and first:
            state.momentum_buffer = np.empty_like(p)
        scalars = SGDScalars(
            neg_lr=dt(-lr),
            sign=dt(-1 if h.maximize else 1),
            weight_decay=dt(h.weight_decay),
            momentum=dt(h.momentum),
            one_minus_dampening=dt(1 - h.dampening),
            bound=dt(bound),
            bound_sq=dt(bound_sq),
        )
        kernel = sgd_kernel(
            momentum=h.momentum != 0, nesterov=h.nesterov, first=first, decay=h.weight_decay != 0
        )
        return kernels.run(kernel, (p, g, state.momentum_buffer), scalars)
