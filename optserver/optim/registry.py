"""Optimizers by name, built from untrusted configuration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optserver.optim.adagrad import Adagrad
from optserver.optim.adam import Adam, AdamW
from optserver.optim.base import Optimizer
from optserver.optim.errors import HyperparameterError
from optserver.optim.rmsprop import RMSprop
from optserver.optim.sgd import SGD

__all__ = ["OPTIMIZERS", "create"]

OPTIMIZERS: dict[str, type[Optimizer[Any, Any]]] = {
    cls.name: cls for cls in (SGD, Adagrad, RMSprop, Adam, AdamW)
}


def create(config: str | Mapping[str, Any]) -> Optimizer[Any, Any]:
    """Build an optimizer from ``"adam"`` or ``{"name": "adam", "lr": 0.01, ...}``."""
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, Mapping):
        raise HyperparameterError(f"optimizer must be a name or an object, got {config!r}")
    options = dict(config)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise HyperparameterError(
            f"optimizer needs a 'name' (one of {', '.join(OPTIMIZERS)}), got {name!r}",
            option="name",
        )
    cls = OPTIMIZERS.get(name.lower())
    if cls is None:
        raise HyperparameterError(
            f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}", option="name"
        )
    return cls(**options)
