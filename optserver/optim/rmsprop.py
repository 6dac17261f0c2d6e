"""RMSProp, optionally centered and with momentum, plus the seed's eps-inside-the-root form."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from optserver.optim import kernels
from optserver.optim.base import Optimizer, TensorState
from optserver.optim.hparams import Hyperparams, require

__all__ = ["RMSprop", "RMSpropHyperparams", "RMSpropState"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMSpropHyperparams(Hyperparams):
    optimizer = "rmsprop"
    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False
    #: Not in torch: ``avg = sqrt(square_avg + eps)`` instead of ``sqrt(square_avg) + eps``,
    #: the form of the seed article and of Goodfellow et al. (Algorithm 8.5).
    eps_inside_sqrt: bool = False

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.alpha <= 1.0, "rmsprop", "alpha", self.alpha, "in [0, 1]")
        require(self.eps >= 0.0, "rmsprop", "eps", self.eps, ">= 0")
        require(self.momentum >= 0.0, "rmsprop", "momentum", self.momentum, ">= 0")
        require(self.weight_decay >= 0.0, "rmsprop", "weight_decay", self.weight_decay, ">= 0")


@dataclasses.dataclass(eq=False, kw_only=True)
class RMSpropState(TensorState):
    square_avg: np.ndarray
    #: Only with ``centered``.
    grad_avg: np.ndarray | None = None
    #: Only with ``momentum > 0``.
    momentum_buffer: np.ndarray | None = None


class RMSprop(Optimizer[RMSpropHyperparams, RMSpropState]):
    """torch.optim.RMSprop: ``sq = alpha*sq + (1-alpha)*g*g``; centered subtracts the square
    of ``ga = alpha*ga + (1-alpha)*g``; ``avg = sqrt(.) + eps``; with momentum
    ``buf = momentum*buf + g/avg, p -= lr*buf``, else ``p -= lr*g/avg``."""

    name = "rmsprop"
    hparams_type = RMSpropHyperparams
    state_type = RMSpropState

    def init_tensor(self, param: np.ndarray) -> RMSpropState:
        state = RMSpropState(square_avg=np.zeros_like(param))
        self._complete(state, param)
        return state

    def _complete(self, state: RMSpropState, param: np.ndarray) -> None:
        if self.hparams.centered and state.grad_avg is None:
            state.grad_avg = np.zeros_like(param)
        if self.hparams.momentum > 0 and state.momentum_buffer is None:
            state.momentum_buffer = np.zeros_like(param)

    def output_bound(self, lr: float, bound: float) -> float:
        h = self.hparams
        # centered: square_avg - grad_avg**2 can round below 0, and its root is NaN.
        floor = math.sqrt(h.eps) if h.eps_inside_sqrt else h.eps  # avg >= floor
        if h.centered or not floor > 0:
            return math.inf
        g = bound * (1 + h.weight_decay)
        square = h.alpha * bound * bound + (1 - h.alpha) * g * g
        ratio = g / floor  # g / avg
        direction = h.momentum * bound + ratio if h.momentum > 0 else ratio
        return max(square, abs(lr) * g, direction, bound + abs(lr) * direction)

    def _step(
        self, p: np.ndarray, g: np.ndarray, state: RMSpropState, lr: float, bound: float,
        bound_sq: float,
    ) -> bool:  # fmt: skip
        h, dt = self.hparams, p.dtype.type
        return kernels.run(
            kernels.rmsprop(
                centered=h.centered, momentum=h.momentum > 0, decay=h.weight_decay != 0
            ),
            (p, g, state.square_avg, state.grad_avg, state.momentum_buffer),
            dt(-lr),
            dt(-1 if h.maximize else 1),
            dt(h.weight_decay),
            dt(h.alpha),
            dt(1 - h.alpha),
            *kernels.lerp_coefficients(1 - h.alpha, p.dtype),
            dt(h.eps if h.eps_inside_sqrt else 0),
            dt(0 if h.eps_inside_sqrt else h.eps),
            dt(h.momentum),
            dt(bound),
            dt(bound_sq),
        )
