"""Learning-rate schedules, exact to torch.optim.lr_scheduler, as closed forms.

A schedule is a frozen dataclass of its options (torch's names and defaults) with one method,
``lr(base_lr, step)``: the learning rate of the optimizer step that follows ``step`` applied
steps. That is the ``param_groups[0]["lr"]`` torch shows after ``step`` calls of
``scheduler.step()`` in the usual loop (``optimizer.step()`` then ``scheduler.step()``)::

    schedule = create_schedule({"name": "step", "step_size": 30, "gamma": 0.1})
    lr = schedule.lr(0.1, step)     # 0.1 for steps 0..29, 0.01 for 30..59, ...

torch updates its rates recursively (each from the previous one); here every rate is computed
from ``base_lr`` and ``step`` alone, so that the base rate can change at run time and a run can
resume from a saved step count. Changing ``base_lr`` rescales the whole schedule, past and
future, as if torch had been started with that rate. Absolute options (``eta_min``) stay put.

"No schedule" is ``None`` (what :func:`create_schedule` returns for ``None``); the ``constant``
schedule is the same thing written out.
"""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_right
from collections.abc import Mapping
from typing import Any, ClassVar

from optserver.optim.errors import OptimError
from optserver.optim.hparams import Options, require, resolve

__all__ = [
    "SCHEDULES",
    "ConstantFactorSchedule",
    "ConstantSchedule",
    "CosineSchedule",
    "ExponentialSchedule",
    "LinearSchedule",
    "MultiStepSchedule",
    "Schedule",
    "StepSchedule",
    "WarmupCosineSchedule",
    "create_schedule",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule(Options):
    """Base of every schedule. Subclasses add options, :meth:`validate` and :meth:`lr`."""

    name: ClassVar[str] = "schedule"

    @classmethod
    def who(cls) -> str:
        """How messages name this schedule."""
        return f"{cls.name} schedule"

    def lr(self, base_lr: float, step: int) -> float:
        """The learning rate after ``step`` scheduler steps, for a base rate of ``base_lr``."""
        if step < 0:
            raise OptimError(f"{self.who()}: step must be >= 0, got {step!r}")
        return self._lr(float(base_lr), step)

    def _lr(self, base_lr: float, step: int) -> float:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **every option}``: enough for :func:`create_schedule` to rebuild it."""
        return {"name": self.name, **self.to_dict()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConstantSchedule(Schedule):
    """The base rate at every step (the same as no schedule)."""

    name = "constant"

    def _lr(self, base_lr: float, step: int) -> float:
        return base_lr


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepSchedule(Schedule):
    """torch's StepLR: ``base_lr * gamma ** (step // step_size)``."""

    name = "step"
    step_size: int
    gamma: float = 0.1

    def validate(self) -> None:
        require(self.step_size >= 1, self.who(), "step_size", self.step_size, ">= 1")
        require(self.gamma > 0.0, self.who(), "gamma", self.gamma, "> 0")

    def _lr(self, base_lr: float, step: int) -> float:
        return base_lr * self.gamma ** (step // self.step_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiStepSchedule(Schedule):
    """torch's MultiStepLR: ``base_lr * gamma ** (number of milestones <= step)``."""

    name = "multistep"
    milestones: tuple[int, ...]
    gamma: float = 0.1

    def validate(self) -> None:
        for i, milestone in enumerate(self.milestones):
            require(milestone >= 0, self.who(), f"milestones[{i}]", milestone, ">= 0")
        # torch counts a repeated milestone twice; strictly increasing keeps gamma in one place.
        require(
            all(a < b for a, b in zip(self.milestones, self.milestones[1:], strict=False)),
            self.who(),
            "milestones",
            list(self.milestones),
            "strictly increasing",
        )
        require(self.gamma > 0.0, self.who(), "gamma", self.gamma, "> 0")

    def _lr(self, base_lr: float, step: int) -> float:
        return base_lr * self.gamma ** bisect_right(self.milestones, step)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExponentialSchedule(Schedule):
    """torch's ExponentialLR: ``base_lr * gamma ** step``."""

    name = "exponential"
    gamma: float

    def validate(self) -> None:
        require(self.gamma > 0.0, self.who(), "gamma", self.gamma, "> 0")

    def _lr(self, base_lr: float, step: int) -> float:
        return base_lr * self.gamma**step


def _cosine(base_lr: float, eta_min: float, step: int, t_max: int) -> float:
    # torch's closed form, operation for operation. Past T_max it climbs back up (period
    # 2 * T_max), as torch's recursive updates do.
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * step / t_max)) / 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class CosineSchedule(Schedule):
    """torch's CosineAnnealingLR:
    ``eta_min + (base_lr - eta_min) * (1 + cos(pi * step / T_max)) / 2``.

    ``eta_min`` is an absolute rate: it does not scale with ``base_lr``."""

    name = "cosine"
    T_max: int
    eta_min: float = 0.0

    def validate(self) -> None:
        require(self.T_max >= 1, self.who(), "T_max", self.T_max, ">= 1")
        require(self.eta_min >= 0.0, self.who(), "eta_min", self.eta_min, ">= 0")

    def _lr(self, base_lr: float, step: int) -> float:
        return _cosine(base_lr, self.eta_min, step, self.T_max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearSchedule(Schedule):
    """torch's LinearLR: the factor goes linearly from ``start_factor`` to ``end_factor``
    over ``total_iters`` steps and stays there: the usual warm-up, or a linear decay."""

    name = "linear"
    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    total_iters: int = 5

    def validate(self) -> None:
        who = self.who()
        require(0.0 < self.start_factor <= 1.0, who, "start_factor", self.start_factor, "in (0, 1]")
        require(0.0 <= self.end_factor <= 1.0, who, "end_factor", self.end_factor, "in [0, 1]")
        # torch accepts 0 but then never leaves start_factor (and its closed form divides by 0).
        require(self.total_iters >= 1, who, "total_iters", self.total_iters, ">= 1")

    def _lr(self, base_lr: float, step: int) -> float:
        if step >= self.total_iters:
            # Exactly end_factor: torch's recursive updates reach it up to rounding.
            return base_lr * self.end_factor
        span = self.end_factor - self.start_factor
        return base_lr * (self.start_factor + span * step / self.total_iters)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConstantFactorSchedule(Schedule):
    """torch's ConstantLR: ``base_lr * factor`` for the first ``total_iters`` steps, then
    ``base_lr``."""

    name = "constant_factor"
    factor: float = 1.0 / 3
    total_iters: int = 5

    def validate(self) -> None:
        # torch allows 0, then fails dividing by it when the factor is undone at total_iters.
        require(0.0 < self.factor <= 1.0, self.who(), "factor", self.factor, "in (0, 1]")
        # torch accepts 0 but then keeps the factor for ever, against its own closed form.
        require(self.total_iters >= 1, self.who(), "total_iters", self.total_iters, ">= 1")

    def _lr(self, base_lr: float, step: int) -> float:
        return base_lr * self.factor if step < self.total_iters else base_lr


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmupCosineSchedule(Schedule):
    """Linear warm-up, then cosine decay: torch's
    ``SequentialLR([LinearLR(start_factor, total_iters=warmup_iters),
    CosineAnnealingLR(T_max, eta_min)], milestones=[warmup_iters])``.

    The cosine part starts at ``base_lr`` at step ``warmup_iters`` and reaches ``eta_min``
    (absolute, like ``cosine``'s) ``T_max`` steps later."""

    name = "warmup_cosine"
    T_max: int
    warmup_iters: int = 5
    start_factor: float = 1.0 / 3
    eta_min: float = 0.0

    def validate(self) -> None:
        who = self.who()
        require(self.T_max >= 1, who, "T_max", self.T_max, ">= 1")
        # No warm-up is the plain cosine schedule; torch's LinearLR misbehaves at 0 anyway.
        require(self.warmup_iters >= 1, who, "warmup_iters", self.warmup_iters, ">= 1")
        require(0.0 < self.start_factor <= 1.0, who, "start_factor", self.start_factor, "in (0, 1]")
        require(self.eta_min >= 0.0, who, "eta_min", self.eta_min, ">= 0")

    def _lr(self, base_lr: float, step: int) -> float:
        if step < self.warmup_iters:
            span = 1.0 - self.start_factor
            return base_lr * (self.start_factor + span * step / self.warmup_iters)
        return _cosine(base_lr, self.eta_min, step - self.warmup_iters, self.T_max)


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls
    for cls in (
        ConstantSchedule,
        StepSchedule,
        MultiStepSchedule,
        ExponentialSchedule,
        CosineSchedule,
        LinearSchedule,
        ConstantFactorSchedule,
        WarmupCosineSchedule,
    )
}


def create_schedule(config: str | Mapping[str, Any] | None) -> Schedule | None:
    """Build a schedule from ``"cosine"``-style names (only for schedules without required
    options), ``{"name": "step", "step_size": 30, "gamma": 0.1}``, or ``None`` (no schedule:
    returns ``None``)."""
    if config is None:
        return None
    cls, options = resolve("schedule", config, SCHEDULES, noun="a name, an object or null")
    return cls.from_mapping(options)
