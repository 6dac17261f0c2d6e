"""Stochastic gradient descent with momentum, dampening, Nesterov momentum and weight decay."""

from __future__ import annotations

import dataclasses

import numpy as np

from optserver.optim import kernels
from optserver.optim.base import Optimizer, TensorState
from optserver.optim.hparams import Hyperparams, require

__all__ = ["SGD", "SGDHyperparams", "SGDState"]


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


class SGD(Optimizer[SGDHyperparams, SGDState]):
    """torch.optim.SGD. With momentum: ``buf = momentum*buf + (1-dampening)*g`` (``buf = g``
    at the first step), ``g = g + momentum*buf`` (nesterov) or ``g = buf``; ``p -= lr*g``."""

    name = "sgd"
    hparams_type = SGDHyperparams
    state_type = SGDState

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
        if h.momentum != 0 and state.momentum_buffer is None:
            state.momentum_buffer = np.empty_like(p)
        kernel = kernels.sgd(
            momentum=h.momentum != 0,
            nesterov=h.nesterov,
            first=first,
            decay=h.weight_decay != 0,
        )
        return kernels.run(
            kernel,
            (p, g, state.momentum_buffer),
            dt(-lr),
            dt(-1 if h.maximize else 1),
            dt(h.weight_decay),
            dt(h.momentum),
            dt(1 - h.dampening),
            dt(bound),
            dt(bound_sq),
        )
