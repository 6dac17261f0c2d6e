"""Options shared by several commands, and ``serve``'s options derived from :class:`Settings`.

A server option is the setting of the same name: its help is the setting's description, its
environment variable ``OPTSERVER_<NAME>`` and its bounds those the setting declares, so
``--help`` and the errors for a bad value (given as a flag or in the environment) say the same
as the settings do, and a limit is written down once.
"""

from __future__ import annotations

from typing import Any, Literal

import annotated_types
import typer
from pydantic import SecretStr

from optserver.config import Settings

__all__ = ["FrameworkName", "LogFormat", "ModeName", "OptimizerName", "setting_option"]

#: The demo's optimizers (every one the server has) and the session modes.
OptimizerName = Literal["sgd", "adagrad", "rmsprop", "adam", "adamw"]
ModeName = Literal["async", "sync", "ssp"]
#: How the demo's workers compute gradients (optserver.demo.run.FRAMEWORKS).
FrameworkName = Literal["numpy", "torch"]
LogFormat = Literal["text", "json"]


def _shown(default: Any) -> str | bool:
    """How ``--help`` shows a default: as it is, but sizes in MiB or GiB."""
    if default is None:
        return False
    if isinstance(default, int) and default >= 1 << 20 and default % (1 << 20) == 0:
        return f"{default >> 30} GiB" if default % (1 << 30) == 0 else f"{default >> 20} MiB"
    return True


def setting_option(name: str, help: str | None = None, **extra: Any) -> Any:
    """A ``typer.Option`` for setting ``name``: its help, default, bounds and variable."""
    field = Settings.model_fields[name]
    bounds: dict[str, Any] = {}
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Ge):
            bounds["min"] = rule.ge
        elif isinstance(rule, annotated_types.Le):
            bounds["max"] = rule.le
    secret = field.annotation is not None and SecretStr in getattr(
        field.annotation, "__args__", (field.annotation,)
    )
    return typer.Option(
        help=help or field.description,
        envvar=f"OPTSERVER_{name.upper()}",
        show_envvar=True,
        show_default=False if secret else _shown(field.default),
        **bounds,
        **extra,
    )
