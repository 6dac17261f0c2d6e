"""Adam (with AMSGrad) and AdamW (decoupled weight decay): hyperparameters, state, kernel.

References: Kingma & Ba, *Adam: A Method for Stochastic Optimization* (2015); Reddi et al., *On
the Convergence of Adam and Beyond* (2018, AMSGrad); Loshchilov & Hutter, *Decoupled Weight
Decay Regularization* (2019, AdamW).
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
from optserver.optim.kernels import Lerp, Scalar
from optserver.optim.kernels import jit as _jit  # coverage skips "@_jit" bodies
from optserver.optim.state import TensorState

__all__ = ["Adam", "AdamHyperparams", "AdamScalars", "AdamState", "AdamW", "AdamWHyperparams"]


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
    #: m, the first moment.
    exp_avg: np.ndarray
    #: v, the second moment.
    exp_avg_sq: np.ndarray
    #: v_max, only with ``amsgrad``.
    max_exp_avg_sq: np.ndarray | None = None


class AdamScalars(NamedTuple):
    """The scalars of one Adam step at step count ``t``, in the parameter's dtype."""

    #: ``-lr / (1 - beta1**t)``: addcdiv's value (bias correction of m folded in).
    neg_step_size: Scalar
    #: -1 with ``maximize``, else 1.
    sign: Scalar
    #: Added to the gradient as ``weight_decay*p`` (Adam's weight decay).
    weight_decay: Scalar
    #: ``1 - lr*weight_decay`` with decoupled weight decay (AdamW), else 1 (exact).
    decay_factor: Scalar
    #: ``1 - beta1``, the weight of m's lerp.
    m_lerp: Lerp
    beta2: Scalar
    one_minus_beta2: Scalar
    #: ``sqrt(1 - beta2**t)``: the bias correction of v, applied after its root.
    bias_correction2_sqrt: Scalar
    eps: Scalar
    bound: Scalar
    bound_sq: Scalar


@functools.cache
def adam_kernel(*, amsgrad: bool, decay: bool) -> kernels.Kernel[AdamScalars]:
    """The fused step; ``decay``: weight decay added to the gradient (not AdamW's)."""

    @_jit
    def adam(arrays: kernels.Arrays, s: AdamScalars) -> bool:
        p, g, exp_avg, exp_avg_sq, max_exp_avg_sq = arrays
        outside = False
        for i in range(p.shape[0]):
            gi = s.sign * g[i]  # g <- -grad if maximize else grad
            pi = p[i] * s.decay_factor  # AdamW: p <- (1 - lr*weight_decay)*p, torch's p.mul_()
            if decay:
                gi = gi + s.weight_decay * pi  # g <- g + weight_decay*p: g.add(p, alpha=wd)
            # m <- beta1*m + (1-beta1)*g, as torch's exp_avg.lerp_(g, 1-beta1) rounds it.
            m = kernels.lerp(exp_avg[i], gi, s.m_lerp)
            exp_avg[i] = m
            # v <- beta2*v + (1-beta2)*g*g: exp_avg_sq.mul_(beta2).addcmul_(g, g, 1-beta2).
            v = exp_avg_sq[i] * s.beta2 + (s.one_minus_beta2 * gi) * gi
            exp_avg_sq[i] = v
            if amsgrad:
                v = max(max_exp_avg_sq[i], v)  # v_max <- max(v_max, v); the root takes v_max
                max_exp_avg_sq[i] = v
            # p <- p - lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps): torch's
            # addcdiv_(m, denom, value=-step_size), with denom rounded as torch builds it.
            q = pi + (s.neg_step_size * m) / (np.sqrt(v) / s.bias_correction2_sqrt + s.eps)
            p[i] = q
            # A sum of magnitudes: NaN and Inf propagate into it (max() could drop a NaN).
            # exp_avg_sq <= max_exp_avg_sq, so checking v covers both under amsgrad.
            outside = outside | (not (abs(q) + abs(m) <= s.bound)) | (not (v <= s.bound_sq))
        return outside

    return adam


class Adam(Optimizer[AdamHyperparams, AdamState]):
    """torch.optim.Adam (its ``_single_tensor_adam``): step ``t`` of one tensor ::

        g     <- -grad if maximize else grad
        g     <- g + weight_decay*p                       (Adam's weight decay)
        p     <- (1 - lr*weight_decay)*p                  (AdamW's, instead of the above)
        m     <- beta1*m + (1 - beta1)*g                  (exp_avg)
        v     <- beta2*v + (1 - beta2)*g*g                (exp_avg_sq)
        v_max <- max(v_max, v)                            (amsgrad; v_max replaces v below)
        p     <- p - lr/(1 - beta1**t) * m / (sqrt(v)/sqrt(1 - beta2**t) + eps)

    The bias corrections are computed in Python floats, as torch does, and reach the kernel
    cast to the parameter's dtype (:class:`AdamScalars`).
    """

    name = "adam"
    hparams_type = AdamHyperparams
    state_type = AdamState
    kernel_factory = staticmethod(adam_kernel)
    scalars_type = AdamScalars

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
        h, dt, t = self.hparams, p.dtype.type, state.step
        beta1, beta2 = h.betas
        decoupled = h.decoupled_weight_decay
        scalars = AdamScalars(
            neg_step_size=dt(-lr / (1 - beta1**t)),
            sign=dt(-1 if h.maximize else 1),
            weight_decay=dt(h.weight_decay),
            decay_factor=dt(1 - lr * h.weight_decay if decoupled else 1),
            m_lerp=Lerp.of(1 - beta1, p.dtype),
            beta2=dt(beta2),
            one_minus_beta2=dt(1 - beta2),
            bias_correction2_sqrt=dt((1 - beta2**t) ** 0.5),
            eps=dt(h.eps),
            bound=dt(bound),
            bound_sq=dt(bound_sq),
        )
        kernel = adam_kernel(amsgrad=h.amsgrad, decay=h.weight_decay != 0 and not decoupled)
        arrays = (p, g, state.exp_avg, state.exp_avg_sq, state.max_exp_avg_sq)
        return kernels.run(kernel, arrays, scalars)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with ``p <- (1 - lr*weight_decay)*p`` before the step, and no
    decay added to the gradient (``weight_decay`` defaults to 0.01)."""

    name = "adamw"
    hparams_type = AdamWHyperparams
