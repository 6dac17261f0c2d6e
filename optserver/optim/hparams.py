"""Typed, validated hyperparameters.

Each optimizer declares a frozen dataclass of its hyperparameters with torch.optim's names and
defaults. Values arriving from the outside (JSON, a config file) go through
:meth:`Hyperparams.from_mapping`, which rejects unknown names and wrong types before the
optimizer's own range checks run.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from optserver.optim.errors import HyperparameterError

__all__ = ["Hyperparams", "require"]


def require(condition: bool, optimizer: str, option: str, value: object, rule: str) -> None:
    """Raise a :class:`HyperparameterError` naming the option and value unless ``condition``."""
    if not condition:
        raise HyperparameterError(
            f"{optimizer}: {option} must be {rule}, got {value!r}", option=option
        )


def _coerce(optimizer: str, option: str, value: object, kind: object) -> object:
    """Check one value against its declared type; ints are accepted where floats are."""
    if kind is bool:
        if not isinstance(value, bool):
            raise HyperparameterError(
                f"{optimizer}: {option} must be true or false, got {value!r}", option=option
            )
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HyperparameterError(
                f"{optimizer}: {option} must be a number, got {value!r}", option=option
            )
        number = float(value)
        if not math.isfinite(number):
            raise HyperparameterError(
                f"{optimizer}: {option} must be finite, got {value!r}", option=option
            )
        return number
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise HyperparameterError(
                f"{optimizer}: {option} must be a list of {len(items)} numbers, got {value!r}",
                option=option,
            )
        return tuple(
            _coerce(optimizer, f"{option}[{i}]", item, k)
            for i, (item, k) in enumerate(zip(value, items, strict=True))
        )
    raise TypeError(f"unsupported hyperparameter type {kind!r} for {option}")  # pragma: no cover


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hyperparams:
    """Base of every optimizer's hyperparameters. Subclasses add fields and :meth:`validate`."""

    optimizer: ClassVar[str] = "optimizer"
    lr: float = 1e-3

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Range checks; raise :class:`HyperparameterError` naming the bad value."""
        require(self.lr >= 0.0, self.optimizer, "lr", self.lr, ">= 0")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """Build from untrusted input: unknown names and wrong types are errors."""
        known = cls.names()
        for key in values:
            if key not in known:
                raise HyperparameterError(
                    f"{cls.optimizer}: unknown option {key!r}; known options: {', '.join(known)}",
                    option=str(key),
                )
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {
            key: _coerce(cls.optimizer, key, value, hints[key]) for key, value in values.items()
        }
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples become lists), every option included."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, changes: Mapping[str, Any]) -> Self:
        """A validated copy with some options changed (untrusted input, as in from_mapping)."""
        return self.from_mapping({**self.to_dict(), **changes})
