"""What a push is, what becomes of it, and where changes go to become durable.

Plain data shared by the session, the coordinator, the journal and the service: nothing here
holds a lock or encodes a reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from optserver.frozen import Frozen
from optserver.replies import Answer

if TYPE_CHECKING:
    from optserver.session import Session

__all__ = ["Outcome", "Push", "Recorder", "RoundMember"]


@dataclass
class Push:
    """One worker's gradient push, decoded."""

    grads: dict[str, np.ndarray]
    #: Current weights sent with the push (optimizer-as-a-service); unknown names register.
    params: dict[str, np.ndarray] = field(default_factory=dict)
    lr: float | None = None
    base_version: int | None = None
    worker: str | None = None
    #: Hyperparameters for this step only, by parameter group name (torch schedulers' edits).
    groups: dict[str, dict[str, Any]] | None = None
    #: A part of the worker's step that a later push of it completes: applied at once, but
    #: the version does not advance (gradients pushed during backward, bucket by bucket).
    partial: bool = False

    @property
    def elements(self) -> int:
        """How many numbers it carries (gradients and weights): what stepping it costs."""
        return sum(a.size for a in self.grads.values()) + sum(a.size for a in self.params.values())


@dataclass
class RoundMember:
    """One push of a sync round, with what its answer should carry."""

    push: Push
    key: str | None
    answer: Answer
    fingerprint: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What became of a push, taken under the session's lock: the version after it, whether
    it was applied, copies of the weights its answer carries, and the journal position that
    must be durable before it is acknowledged. Encoded by :func:`optserver.replies.encode_outcome`
    once the lock is released."""

    version: int
    applied: bool
    tensors: Frozen
    answer: Answer
    ticket: int | None = None
    replayed: bool = False


class Recorder(Protocol):
    """Where changes go to become durable (the data directory's journal). Each method returns
    a ticket: the change is durable once ``wait(ticket)`` returns.

    A change is recorded before it is made (journal before apply): if recording raises (a
    problem: the disk is full or failing), nothing changes. ``rejected`` is bookkeeping and
    never raises. Called with the session's lock held."""

    def created(self, session: Session) -> int: ...
    def params_put(
        self, session: Session, tensors: Mapping[str, np.ndarray], reset_state: bool
    ) -> int: ...
    def stepped(
        self, session: Session, push: Push, key: str | None, answer: Answer,
        fingerprint: str | None,
    ) -> int: ...  # fmt: skip
    def round_applied(self, session: Session, members: list[RoundMember]) -> int: ...
    def configured(self, session: Session) -> int: ...
    def deleted(self, session_id: str) -> int: ...
    def rejected(self, session: Session, reason: str, worker: str | None) -> None: ...
    def wait(self, ticket: int | None) -> None: ...
    def sync(self) -> None: ...
