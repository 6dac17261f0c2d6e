"""How pushes from several workers are combined: the session's mode, and its admission rules.

Each mode says which pushes it admits (:meth:`admit`, checked with the session's lock held
against its current version) and which learning rate an admitted push is applied with
(:meth:`step_lr`). The rules every mode shares (a push needs gradients, its ``base_version``
cannot be ahead of the session) are in :mod:`optserver.admission`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from optserver_client.vocabulary import ProblemSlug
from pydantic import BaseModel, ConfigDict, Field, model_validator

from optserver.errors import StaleGradient, UnprocessableContent

if TYPE_CHECKING:
    from optserver.push import Push

__all__ = ["AsyncMode", "Mode", "SSPMode", "SyncMode"]


class _Mode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def admit(self, push: Push, version: int) -> None:
        """Raise a problem unless this mode takes ``push`` at session version ``version``."""

    def step_lr(self, push: Push, version: int, lr: float) -> float:
        """The learning rate ``push`` is applied with, given the one it would have."""
        return lr

    def scales_lr(self, push: Push) -> bool:
        """Whether :meth:`step_lr` may change the learning rate of ``push``."""
        return False


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

    def admit(self, push: Push, version: int) -> None:
        if push.base_version is None:
            return
        staleness = version - push.base_version
        if staleness > self.max_staleness:
            raise StaleGradient(
                f"gradient computed on version {push.base_version} is {staleness} steps "
                f"behind version {version}; max_staleness is {self.max_staleness}: pull and "
                "retry",
                current_version=version,
                base_version=push.base_version,
            )

    def scales_lr(self, push: Push) -> bool:
        return push.base_version is not None and self.staleness_scaling == "inverse"

    def step_lr(self, push: Push, version: int, lr: float) -> float:
        """``staleness_scaling: inverse``: lr/(1+s) for a gradient s steps stale."""
        if push.base_version is None or not self.scales_lr(push):
            return lr
        return lr / (1 + version - push.base_version)


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

    def admit(self, push: Push, version: int) -> None:
        if push.partial:
            raise UnprocessableContent(
                "a partial push (one bucket of a step) needs async or ssp mode: a sync round "
                "takes one whole push per worker",
                option="partial",
            )
        if not push.worker:
            raise UnprocessableContent(
                "sync mode needs the pushing worker's id ('worker'): a round takes one "
                "gradient per worker",
                slug=ProblemSlug.WORKER_REQUIRED,
            )
        if push.params:
            raise UnprocessableContent(
                "sync mode takes gradients only: weights cannot be sent with a push",
                slug=ProblemSlug.PARAMS_IN_SYNC_ROUND,
            )
        if push.base_version is not None and push.base_version < version:
            raise StaleGradient(
                f"gradient computed on version {push.base_version} is late: its round "
                f"closed; the session is at version {version}: pull and retry",
                current_version=version,
                base_version=push.base_version,
            )


Mode = Annotated[AsyncMode | SSPMode | SyncMode, Field(discriminator="name")]
