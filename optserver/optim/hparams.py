"""Typed, validated hyperparameters.

Each optimizer declares a frozen dataclass of its hyperparameters with torch.optim's names and
defaults. Values arriving from the outside (JSON, a config file) go through
:meth:`Hyperparams.from_mapping`, which rejects unknown names and wrong types before the
optimizer's own range checks run.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Self, TypeVar

from optserver.optim.errors import HyperparameterError

__all__ = ["MAX_INTEGER", "Hyperparams", "Options", "require", "resolve"]


def require(condition: bool, optimizer: str, option: str, value: object, rule: str) -> None:
    """Raise a :class:`HyperparameterError` naming the option and value unless ``condition``."""
    if not condition:
        raise HyperparameterError(
            f"{optimizer}: {option} must be {rule}, got {value!r}", option=option
        )


#: Integer options are step counts: anything beyond 64 bits is a mistake (and unstorable).
MAX_INTEGER = 2**63 - 1


def _integer(who: str, option: str, value: object) -> int:
    # JSON writers may send 30.0 for 30: integral floats are accepted, bools never are.
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (integral or (isinstance(value, float) and value.is_integer())):
        raise HyperparameterError(
            f"{who}: {option} must be an integer, got {value!r}", option=option
        )
    number: int = int(value)  # type: ignore[call-overload]
    if abs(number) > MAX_INTEGER:
        raise HyperparameterError(
            f"{who}: {option} must be at most {MAX_INTEGER} in magnitude, got {value!r}",
            option=option,
        )
    return number


def _coerce(who: str, option: str, value: object, kind: object) -> object:
    """Check one value against its declared type; ints are accepted where floats are."""
    if kind is bool:
        if not isinstance(value, bool):
            raise HyperparameterError(
                f"{who}: {option} must be true or false, got {value!r}", option=option
            )
        return value
    if kind is int:
        return _integer(who, option, value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HyperparameterError(
                f"{who}: {option} must be a number, got {value!r}", option=option
            )
        number = float(value)
        if not math.isfinite(number):
            raise HyperparameterError(
                f"{who}: {option} must be finite, got {value!r}", option=option
            )
        return number
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if items[-1:] == (Ellipsis,):  # tuple[int, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise HyperparameterError(
                    f"{who}: {option} must be a list, got {value!r}", option=option
                )
            return tuple(
                _coerce(who, f"{option}[{i}]", item, items[0]) for i, item in enumerate(value)
            )
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise HyperparameterError(
                f"{who}: {option} must be a list of {len(items)} numbers, got {value!r}",
                option=option,
            )
        return tuple(
            _coerce(who, f"{option}[{i}]", item, k)
            for i, (item, k) in enumerate(zip(value, items, strict=True))
        )
    raise TypeError(f"unsupported option type {kind!r} for {option}")  # pragma: no cover


T = TypeVar("T")


def resolve(
    kind: str, config: object, registry: Mapping[str, T], *, noun: str = "a name or an object"
) -> tuple[T, dict[str, Any]]:
    """The registry entry named by ``"name"`` or ``{"name": ..., **options}``, and the options.

    ``kind`` is what is being built ("optimizer", "schedule"), for the messages.
    """
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, Mapping):
        raise HyperparameterError(f"{kind} must be {noun}, got {config!r}", option=kind)
    options = dict(config)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise HyperparameterError(
            f"{kind} needs a 'name' (one of {', '.join(registry)}), got {name!r}",
            option="name",
        )
    entry = registry.get(name.lower())
    if entry is None:
        raise HyperparameterError(
            f"unknown {kind} {name!r}; available: {', '.join(registry)}", option="name"
        )
    return entry, options


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Validated options: a frozen dataclass built from untrusted mappings.

    Unknown names, missing required options and wrong types are errors naming the option and
    the value; subclasses add range checks in :meth:`validate`.
    """

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def who(cls) -> str:
        """How messages name the owner of these options."""
        return cls.__name__

    def validate(self) -> None:
        """Range checks; raise :class:`HyperparameterError` naming the bad value."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """Options without a default."""
        return tuple(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """Build from untrusted input."""
        known = cls.names()
        for key in values:
            if key not in known:
                listed = ", ".join(known) if known else "none"
                raise HyperparameterError(
                    f"{cls.who()}: unknown option {key!r}; known options: {listed}",
                    option=str(key),
                )
        for key in cls.required():
            if key not in values:
                raise HyperparameterError(
                    f"{cls.who()}: missing required option {key!r}", option=key
                )
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {
            key: _coerce(cls.who(), key, value, hints[key]) for key, value in values.items()
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hyperparams(Options):
    """Base of every optimizer's hyperparameters. Subclasses add fields and :meth:`validate`."""

    optimizer: ClassVar[str] = "optimizer"
    lr: float = 1e-3

    @classmethod
    def who(cls) -> str:
        return cls.optimizer

    def validate(self) -> None:
        require(self.lr >= 0.0, self.optimizer, "lr", self.lr, ">= 0")
