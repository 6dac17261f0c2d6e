"""Encoded answers to pushes and pulls, in JSON or safetensors.

An :class:`Answer` says how a push wants its answer (encoding, with or without weights). It is
plain data, so the journal can record it with the push and rebuild exactly the same answer when
a retried push arrives after a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from optserver.wire import Buffer, encode_json, encode_safetensors, json_tensors

__all__ = ["BINARY", "JSON", "Answer", "Format", "Reply", "Returns", "weights_reply"]

JSON = "application/json"
BINARY = "application/octet-stream"
Format = Literal["json", "binary"]
MEDIA: dict[Format, str] = {"json": JSON, "binary": BINARY}


@dataclass(frozen=True)
class Reply:
    """An encoded answer. ``ticket``: the journal position that must be durable before it is
    sent (None without a data directory)."""

    body: Buffer
    media_type: str
    version: int
    replayed: bool = False
    ticket: int | None = None

    def with_ticket(self, ticket: int | None) -> Reply:
        return replace(self, ticket=ticket)


#: Which weights the answer to a push carries: those pushed, every tensor, or none.
Returns = Literal["stepped", "all", "none"]


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
        if self.fmt == "binary":
            metadata = {"version": str(version), "applied": "true" if applied else "false"}
            return Reply(encode_safetensors(chosen, metadata), BINARY, version)
        payload: dict[str, Any] = {"version": version, "applied": applied}
        if self.returns != "none":
            payload["params"] = json_tensors(chosen)
        return Reply(encode_json(payload), JSON, version)


def weights_reply(fmt: Format, version: int, tensors: Mapping[str, np.ndarray]) -> Reply:
    """Weights and version (GET params)."""
    if fmt == "binary":
        return Reply(encode_safetensors(tensors, {"version": str(version)}), BINARY, version)
    return Reply(encode_json({"version": version, "params": json_tensors(tensors)}), JSON, version)
