"""Adam (with AMSGrad) and AdamW (decoupled weight decay)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from optserver.optim import kernels
from optserver.optim.base import Optimizer, TensorState
from optserver.optim.hparams import Hyperparams, require

__all__ = ["Adam", "AdamHyperparams", "AdamState", "AdamW", "AdamWHyperparams"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamHyperparams(Hyperparams):
    optimizer = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    maximize: bool = False
    #: AdamW's rule: ``p *= 1 - lr*weight_decay`` instead of adding ``weight_decay*p`` to g.
    decoupled_weight_decay: bool = False

    def validate(self) -> None:
        super().validate()
        name = self.optimizer
        require(self.eps >= 0.0, name, "eps", self.eps, ">= 0")
        for i, beta in enumerate(self.betas):
            require(0.0 <= beta < 1.0, name, f"betas[{i}]", beta, "in [0, 1)")
        require(self.weight_decay >= 0.0, name, "weight_decay", self.weight_decay, ">= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamWHyperparams(AdamHyperparams):
    optimizer = "adamw"
    weight_decay: float = 1e-2
    decoupled_weight_decay: bool = True

    def validate(self) -> None:
        super().validate()
        require(
            self.decoupled_weight_decay,
            "adamw",
            "decoupled_weight_decay",
            self.decoupled_weight_decay,
            "true (use adam for weight decay added to the gradient)",
        )


@dataclasses.dataclass(eq=False, kw_only=True)
class AdamState(TensorState):
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    #: Only with ``amsgrad``.
    max_exp_avg_sq: np.ndarray | None = None


class Adam(Optimizer[AdamHyperparams, AdamState]):
    """torch.optim.Adam: ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g*g``
    (AMSGrad: ``v = max(vmax, v)``), ``p -= lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)``."""

    name = "adam"
    hparams_type = AdamHyperparams
    state_type = AdamState

    def init_tensor(self, param: np.ndarray) -> AdamState:
        state = AdamState(exp_avg=np.zeros_like(param), exp_avg_sq=np.zeros_like(param))
        self._complete(state, param)
        return state

    def _complete(self, state: AdamState, param: np.ndarray) -> None:
        if self.hparams.amsgrad and state.max_exp_avg_sq is None:
            state.max_exp_avg_sq = np.zeros_like(param)

    def output_bound(self, lr: float, bound: float) -> float:
        h = self.hparams
        if not h.eps > 0:
            return math.inf  # a zero gradient at step 1: 0/0
        beta1, beta2 = h.betas
        decoupled = h.decoupled_weight_decay
        weights = bound * abs(1 - lr * h.weight_decay) if decoupled else bound
        g = bound if decoupled else bound + h.weight_decay * weights
        m = max(bound, g) + 0.5 * (g + bound)  # lerp with a coefficient of at most 1/2
        v = beta2 * bound * bound + (1 - beta2) * g * g
        step_size = abs(lr) / (1 - beta1)  # 1 - beta1**t is smallest at t = 1
        return max(weights, g, m, v, step_size * m, weights + step_size * m / h.eps)

    def _step(
        self, p: np.ndarray, g: np.ndarray, state: AdamState, lr: float, bound: float,
        bound_sq: float,
    ) -> bool:  # fmt: skip
        h, dt = self.hparams, p.dtype.type
        beta1, beta2 = h.betas
        t = state.step
        decoupled = h.decoupled_weight_decay
        return kernels.run(
            kernels.adam(amsgrad=h.amsgrad, decay=h.weight_decay != 0 and not decoupled),
            (p, g, state.exp_avg, state.exp_avg_sq, state.max_exp_avg_sq),
            dt(-lr / (1 - beta1**t)),
            dt(-1 if h.maximize else 1),
            dt(h.weight_decay),
            dt(1 - lr * h.weight_decay if decoupled else 1),
            *kernels.lerp_coefficients(1 - beta1, p.dtype),
            dt(beta2),
            dt(1 - beta2),
            dt((1 - beta2**t) ** 0.5),
            dt(h.eps),
            dt(bound),
            dt(bound_sq),
        )


class AdamW(Adam):
    """torch.optim.AdamW: Adam with ``p *= 1 - lr*weight_decay`` before the step (default 0.01)."""

    name = "adamw"
    hparams_type = AdamWHyperparams
