"""Optimizers by name, built from untrusted configuration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optserver.optim.adagrad import Adagrad
from optserver.optim.adam import Adam, AdamW
from optserver.optim.base import Optimizer
from optserver.optim.hparams import resolve
from optserver.optim.rmsprop import RMSprop
from optserver.optim.sgd import SGD

__all__ = ["OPTIMIZERS", "create"]

OPTIMIZERS: dict[str, type[Optimizer[Any, Any]]] = {
    cls.name: cls for cls in (SGD, Adagrad, RMSprop, Adam, AdamW)
}


def create(config: str | Mapping[str, Any]) -> Optimizer[Any, Any]:
    """Build an optimizer from ``"adam"`` or ``{"name": "adam", "lr": 0.01, ...}``."""
    cls, options = resolve("optimizer", config, OPTIMIZERS)
    return cls(**options)
