"""Answers to pushes and pulls, encoded in JSON or safetensors: the edge of the server.

An :class:`Answer` says how a push wants its answer (encoding, and which weights come back). It
is plain data, so the journal can record it with the push and rebuild exactly the same answer
when a retried push arrives after a restart. The session never encodes: it returns an
:class:`~optserver.push.Outcome` (a version and :class:`~optserver.frozen.Frozen` copies taken
under its lock), and :func:`encode_outcome` turns that into bytes after the lock is released.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from optserver_client.vocabulary import APPLIED_KEY, BINARY, JSON, VERSION_KEY, ReturnMode

from optserver.frozen import Frozen
from optserver.wire import Buffer, encode_json, json_tensors

if TYPE_CHECKING:
    from optserver.push import Outcome

__all__ = [
    "MEDIA",
    "Answer",
    "Format",
    "Reply",
    "Returns",
    "answer_metadata",
    "encode_outcome",
    "weights_reply",
]

Format = Literal["json", "binary"]
MEDIA: dict[Format, str] = {"json": JSON, "binary": BINARY}

#: Which weights the answer to a push carries: those pushed, every tensor, or none.
Returns = ReturnMode


@dataclass(frozen=True)
class Reply:
    """An encoded answer. ``ticket``: the journal position that must be durable before it is
    sent (None without a data directory)."""

    body: Buffer
    media_type: str
    version: int
    replayed: bool = False
    ticket: int | None = None


@dataclass(frozen=True)
class Answer:
    """How a push is answered: its encoding, and which weights come back."""

    fmt: Format
    returns: Returns = "stepped"

    def names(self, pushed: Iterable[str], held: Iterable[str]) -> list[str]:
        """The tensors to answer with, given the names pushed and those the session holds."""
        if self.returns == "all":
            return list(held)
        return list(pushed) if self.returns == "stepped" else []

    def __call__(self, version: int, applied: bool, chosen: Mapping[str, np.ndarray]) -> Reply:
        """The answer with a copy of ``chosen`` (for callers outside a session)."""
        return self.encode(version, applied, Frozen(chosen))

    def encode(self, version: int, applied: bool, frozen: Frozen) -> Reply:
        """The answer's body, from tensors frozen under the session's lock."""
        if self.fmt == "binary":
            return Reply(frozen.document(answer_metadata(version, applied)), BINARY, version)
        payload: dict[str, Any] = {"version": version, "applied": applied}
        if self.returns != "none":
            payload["params"] = json_tensors(frozen.tensors)
        return Reply(encode_json(payload), JSON, version)


def answer_metadata(version: int, applied: bool) -> dict[str, str]:
    """``__metadata__`` of a safetensors answer to a push (also how replays are kept)."""
    return {VERSION_KEY: str(version), APPLIED_KEY: "true" if applied else "false"}


def encode_outcome(outcome: Outcome) -> Reply:
    """The reply to a push, encoded outside the session's lock."""
    reply = outcome.answer.encode(outcome.version, outcome.applied, outcome.tensors)
    return replace(reply, replayed=outcome.replayed, ticket=outcome.ticket)


def weights_reply(fmt: Format, version: int, frozen: Frozen) -> Reply:
    """Weights and version (GET params)."""
    if fmt == "binary":
        return Reply(frozen.document({VERSION_KEY: str(version)}), BINARY, version)
    payload = {"version": version, "params": json_tensors(frozen.tensors)}
    return Reply(encode_json(payload), JSON, version)
