"""Exceptions of the optimizer core.

Every message names the offending option, tensor or value, so that the service can pass it on
unchanged as the ``detail`` of a problem+json answer.
"""

from __future__ import annotations


class OptimError(ValueError):
    """Base class of everything the optimizer core raises for bad input."""


class HyperparameterError(OptimError):
    """An optimizer name or hyperparameter is unknown, of the wrong type or out of range."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class TensorError(OptimError):
    """A parameter, gradient or state array does not fit (name, shape, dtype, layout).

    ``mismatch`` is ``"shape"`` or ``"dtype"`` when the tensor does not match what it must
    (``expected`` and ``received`` then say how), else None.
    """

    def __init__(
        self,
        message: str,
        *,
        tensor: str | None = None,
        mismatch: str | None = None,
        expected: object = None,
        received: object = None,
    ) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.mismatch = mismatch
        self.expected = expected
        self.received = received


class NonFiniteStep(OptimError):
    """A step would have left NaN or Inf in ``tensor``'s weights or optimizer state; it was
    undone (every tensor of the update is as it was before)."""

    def __init__(self, message: str, *, tensor: str) -> None:
        super().__init__(message)
        self.tensor = tensor
