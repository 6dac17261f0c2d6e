"""RMSProp, optionally centered and with momentum, plus the seed's eps-inside-the-root form:
hyperparameters, state, kernel.

References: Hinton, *Neural Networks for Machine Learning*, lecture 6e (2012); Graves,
*Generating Sequences With Recurrent Neural Networks* (2013, the centered form); Goodfellow et
al., *Deep Learning* (2016), Algorithm 8.5 (eps inside the root).
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

__all__ = ["RMSprop", "RMSpropHyperparams", "RMSpropScalars", "RMSpropState"]


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


class RMSpropScalars(NamedTuple):
    """The scalars of one RMSProp step, in the parameter's dtype."""

    neg_lr: Scalar
    #: -1 with ``maximize``, else 1.
    sign: Scalar
    weight_decay: Scalar
    alpha: Scalar
    one_minus_alpha: Scalar
    #: ``1 - alpha``, the weight of grad_avg's lerp (centered).
    grad_avg_lerp: Lerp
    eps: Scalar
    momentum: Scalar
    bound: Scalar
    bound_sq: Scalar


@functools.cache
def rmsprop_kernel(
    *, centered: bool, momentum: bool, decay: bool, eps_inside_sqrt: bool
) -> kernels.Kernel[RMSpropScalars]:
    """The fused step."""

    @_jit
    def rmsprop(arrays: kernels.Arrays, s: RMSpropScalars) -> bool:
        p, g, square_avg, grad_avg, buf = arrays
        outside = False
        for i in range(p.shape[0]):
            gi = s.sign * g[i]  # g <- -grad if maximize else grad
            if decay:
                gi = gi + s.weight_decay * p[i]  # g <- g + weight_decay*p: g.add(p, alpha=wd)
            # v <- alpha*v + (1-alpha)*g*g: square_avg.mul_(alpha).addcmul_(g, g, 1-alpha)
            sq = square_avg[i] * s.alpha + (s.one_minus_alpha * gi) * gi
            square_avg[i] = sq
            outside = outside | (not (sq <= s.bound_sq))
            if centered:
                # ga <- alpha*ga + (1-alpha)*g, as torch's grad_avg.lerp_(g, 1-alpha) rounds it.
                ga = kernels.lerp(grad_avg[i], gi, s.grad_avg_lerp)
                grad_avg[i] = ga
                outside = outside | (not (abs(ga) <= s.bound))
                sq = sq + (-ga) * ga  # v - ga*ga: square_avg.addcmul(ga, ga, value=-1)
            # avg = sqrt(v) + eps: square_avg.sqrt().add_(eps); or sqrt(v + eps) (seed's form).
            avg = np.sqrt(sq + s.eps) if eps_inside_sqrt else np.sqrt(sq) + s.eps
            if momentum:
                b = buf[i] * s.momentum + gi / avg  # b <- momentum*b + g/avg: addcdiv_(g, avg)
                buf[i] = b
                q = p[i] + s.neg_lr * b  # p <- p - lr*b: p.add_(b, alpha=-lr)
                outside = outside | (not (abs(q) + abs(b) <= s.bound))
            else:
                q = p[i] + (s.neg_lr * gi) / avg  # p <- p - lr*g/avg: p.addcdiv_(g, avg, -lr)
                outside = outside | (not (abs(q) <= s.bound))
            p[i] = q
        return outside

    return rmsprop


class RMSprop(Optimizer[RMSpropHyperparams, RMSpropState]):
    """torch.optim.RMSprop (its ``_single_tensor_rmsprop``), one step of one tensor ::

        g   <- -grad if maximize else grad
        g   <- g + weight_decay*p
        v   <- alpha*v + (1 - alpha)*g*g                (square_avg)
        ga  <- alpha*ga + (1 - alpha)*g                 (grad_avg, centered only)
        avg  = sqrt(v - ga*ga) + eps                    (centered; else sqrt(v) + eps)
        b   <- momentum*b + g/avg;   p <- p - lr*b      (momentum > 0; b: momentum_buffer)
        p   <- p - lr*g/avg                             (momentum = 0)

    With ``eps_inside_sqrt`` (not in torch), ``avg = sqrt(v + eps)`` (or ``sqrt(v - ga*ga +
    eps)``): Goodfellow et al.'s Algorithm 8.5 and the seed article's form.
    """

    name = "rmsprop"
    hparams_type = RMSpropHyperparams
    state_type = RMSpropState
    kernel_factory = staticmethod(rmsprop_kernel)
    scalars_type = RMSpropScalars

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
        scalars = RMSpropScalars(
            neg_lr=dt(-lr),
            sign=dt(-1 if h.maximize else 1),
            weight_decay=dt(h.weight_decay),
            alpha=dt(h.alpha),
            one_minus_alpha=dt(1 - h.alpha),
            grad_avg_lerp=Lerp.of(1 - h.alpha, p.dtype),
            eps=dt(h.eps),
            momentum=dt(h.momentum),
            bound=dt(bound),
            bound_sq=dt(bound_sq),
        )
        kernel = rmsprop_kernel(
            centered=h.centered,
            momentum=h.momentum > 0,
            decay=h.weight_decay != 0,
            eps_inside_sqrt=h.eps_inside_sqrt,
        )
        arrays = (p, g, state.square_avg, state.grad_avg, state.momentum_buffer)
        return kernels.run(kernel, arrays, scalars)
