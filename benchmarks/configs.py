"""The optimizer configurations every optimizer benchmark times (one list, so that their tables
line up)."""

from __future__ import annotations

from typing import Any

CONFIGS: list[dict[str, Any]] = [
    {"name": "sgd", "lr": 1e-3, "momentum": 0.9},
    {"name": "adagrad", "lr": 1e-2},
    {"name": "rmsprop", "lr": 1e-3, "momentum": 0.9},
    {"name": "adam", "lr": 1e-3},
    {"name": "adamw", "lr": 1e-3},
]
