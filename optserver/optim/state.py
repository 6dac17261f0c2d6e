"""Typed optimizer state: per tensor, a step count and named arrays (torch's names).

State is kept per tensor, as in torch.optim: each tensor has its own step count (the ``t`` of
bias correction), so a push that names a subset of the tensors steps only those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from optserver.optim import kernels

__all__ = ["OptState", "TensorState"]


@dataclasses.dataclass(eq=False, kw_only=True)
class TensorState:
    """Optimizer state of one tensor: a step count and named arrays (torch's names).

    Subclasses declare their arrays as fields typed ``np.ndarray`` (always present) or
    ``np.ndarray | None`` (present only when an option needs them).
    """

    step: int = 0
    #: False while every value of the tensor (weights and state) is known to be inside the
    #: magnitude bound; True after a write that was not checked or went outside it.
    unchecked: bool = dataclasses.field(default=True, compare=False)
    #: The weights or the state hold NaN or Inf (only possible with ``finite=False`` steps).
    nonfinite: bool = dataclasses.field(default=False, compare=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """The state arrays that exist, by name (views, not copies)."""
        out: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                out[f.name] = value
        return out

    @classmethod
    def array_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _FLAGS)

    def checkpoint(self) -> dict[str, Any]:
        """Everything :meth:`rollback` needs to undo a step (array fields copied)."""
        saved: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            saved[f.name] = value.copy() if isinstance(value, np.ndarray) else value
        return saved

    def rollback(self, saved: Mapping[str, Any]) -> None:
        """Return to a :meth:`checkpoint`, in place (arrays keep their identity)."""
        for name, value in saved.items():
            current = getattr(self, name)
            if isinstance(value, np.ndarray) and isinstance(current, np.ndarray):
                np.copyto(current, value)
            else:
                setattr(self, name, value)  # step, flags, or an array the step allocated

    def holds_nonfinite(self, param: np.ndarray | None = None) -> bool:
        """Whether NaN or Inf is in the state's arrays, or in ``param`` (its tensor) if given."""
        arrays = [*self.arrays().values(), *([] if param is None else [param])]
        return any(kernels.count_nonfinite(a) for a in arrays)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


_FLAGS = frozenset({"step", "unchecked", "nonfinite"})

#: The state of a whole model: tensor name -> that tensor's state.
OptState = dict[str, TensorState]
