"""Checks of the tensors an update is given, and the checked update (:class:`Plan`) they make.

An update is checked once, by :meth:`Optimizer.prepare <optserver.optim.base.Optimizer.prepare>`,
which reads no tensor's values: every gradient names a parameter and fits its shape and dtype,
and the learning rate is valid. :meth:`Optimizer.apply <optserver.optim.base.Optimizer.apply>`
steps a :class:`Plan`; it only confirms, per tensor and without reading data, that the arrays
it writes are those the plan was checked against (the kernels index raw memory, so this is
never skipped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from optserver.optim.errors import TensorError

__all__ = [
    "FLOAT_DTYPES",
    "Plan",
    "TensorSpec",
    "check_fits",
    "check_grad",
    "check_param",
]

#: Parameter dtypes the optimizers compute in; state arrays take the parameter's dtype.
FLOAT_DTYPES: tuple[np.dtype[Any], ...] = (np.dtype(np.float32), np.dtype(np.float64))


class TensorSpec(NamedTuple):
    """The shape and dtype of a parameter: what a gradient is checked against. A caller that
    will set new weights before the step describes the parameter they will make."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @classmethod
    def of(cls, param: np.ndarray | TensorSpec) -> TensorSpec:
        if isinstance(param, TensorSpec):
            return param
        return cls(tuple(param.shape), np.dtype(param.dtype))


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """An update checked by ``Optimizer.prepare``, which ``Optimizer.apply`` steps.

    Build it with ``prepare`` only: :attr:`grads` fit :attr:`specs` and :attr:`lr` is valid
    because ``prepare`` checked them.
    """

    #: The gradient of each tensor to step, by name.
    grads: Mapping[str, np.ndarray]
    #: The learning rate of this step, or None for the optimizer's own.
    lr: float | None
    #: The parameter each gradient was checked against.
    specs: Mapping[str, TensorSpec]


def check_param(name: str, param: np.ndarray) -> None:
    """A parameter must be a writable, C-contiguous float32 or float64 array."""
    if not isinstance(param, np.ndarray):
        raise TensorError(f"parameter {name!r} is not a numpy array", tensor=name)
    check_param_dtype(name, param.dtype)
    if not param.flags.c_contiguous or not param.flags.writeable:
        raise TensorError(f"parameter {name!r} must be a writable C-contiguous array", tensor=name)


def check_param_dtype(name: str, dtype: np.dtype[Any]) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TensorError(
            f"parameter {name!r} has dtype {dtype}; expected float32 or float64", tensor=name
        )


def check_grad(name: str, grad: np.ndarray, param: np.ndarray | TensorSpec) -> None:
    """A gradient must have the parameter's shape and a float dtype no wider than its dtype."""
    check_fits(name, "gradient", grad, tuple(param.shape), np.dtype(param.dtype))


def check_fits(
    name: str, what: str, value: np.ndarray, shape: tuple[int, ...], dtype: np.dtype[Any]
) -> None:
    """``value`` (a gradient, or weights) has ``shape`` and a float dtype that casts safely
    to ``dtype``; a :class:`TensorError` saying which of them does not match otherwise."""
    if not isinstance(value, np.ndarray):
        raise TensorError(f"{what} {name!r} is not a numpy array", tensor=name)
    if value.shape != shape:
        raise TensorError(
            f"{what} {name!r} has shape {list(value.shape)}; expected {list(shape)}",
            tensor=name,
            mismatch="shape",
            expected=list(shape),
            received=list(value.shape),
        )
    if value.dtype.kind != "f" or not np.can_cast(value.dtype, dtype, "safe"):
        raise TensorError(
            f"{what} {name!r} has dtype {value.dtype}; expected {dtype} or a narrower float dtype",
            tensor=name,
            mismatch="dtype",
            expected=str(dtype),
            received=str(value.dtype),
        )
