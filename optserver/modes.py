"""How pushes from several workers are combined: the session's mode."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["AsyncMode", "Mode", "SSPMode", "SyncMode"]


class _Mode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AsyncMode(_Mode):
    """Every push is applied on arrival, in arrival order (Downpour-style)."""

    name: Literal["async"] = "async"


class SSPMode(_Mode):
    """Bounded staleness: a push whose ``base_version`` is more than ``max_staleness`` steps
    behind is refused with 409 and the current version."""

    name: Literal["ssp"]
    max_staleness: int = Field(ge=0)
    staleness_scaling: Literal["none", "inverse"] = Field(
        "none",
        description="'inverse': an accepted gradient s steps stale is applied with lr/(1+s) "
        "(staleness-aware asynchronous SGD, Zhang et al. 2016).",
    )


class SyncMode(_Mode):
    """A round collects one gradient from each of ``workers`` workers and applies their mean
    as one step; at ``timeout_s`` it proceeds with ``min_workers`` or more, else fails."""

    name: Literal["sync"]
    workers: int = Field(ge=1, le=10_000)
    timeout_s: float = Field(gt=0, le=86_400)
    min_workers: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _min_within_workers(self) -> SyncMode:
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) must not exceed workers ({self.workers})"
            )
        return self


Mode = Annotated[AsyncMode | SSPMode | SyncMode, Field(discriminator="name")]
