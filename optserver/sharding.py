"""What one server keeps of a sharded session: its place among the session's shards.

A sharded session is one logical session (one id, one token, one optimizer configuration, one
mode) whose tensors live on several servers, each holding an ordinary session under the same
id and token. Which server holds which tensor, and how a large tensor is cut into chunks, is
computed by the client from the tensor's name and size and the shard count
(``optserver_client.sharding``); each shard keeps the inputs of that computation, so that any
client that attaches can read them from any shard's description. A server does nothing else
with them: every shard is an ordinary server, and no server talks to another.
"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

__all__ = ["MAX_SHARDS", "MAX_SPLIT_TENSORS", "SESSION_ID_PATTERN", "TOKEN_PATTERN", "Sharding"]

#: Shards of one session, at most.
MAX_SHARDS = 256
#: Tensors cut into chunks, at most (each is listed in every shard's description).
MAX_SPLIT_TENSORS = 1 << 14
#: A session id a client may choose (the server's own are 32 hex digits).
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: A session token a client may choose: at least 32 URL-safe characters (the server's own are
#: 43, from 32 random bytes).
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{32,256}$"

TensorName = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class Sharding(BaseModel):
    """This server's part of a sharded session.

    ``count`` shards in all, of which this is number ``index``; tensors of more than
    ``chunk_bytes`` bytes were cut along their first axis into chunks, one per shard at most:
    ``split`` names them with their chunk counts (chunk ``k`` of tensor ``T`` is the tensor
    ``T#k`` on whichever shard it was placed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(ge=1, le=MAX_SHARDS, description="How many shards the session has.")
    index: int = Field(ge=0, description="Which of them this server is (from 0).")
    chunk_bytes: int = Field(
        ge=1, le=1 << 40, description="Tensors larger than this were cut into chunks."
    )
    split: dict[TensorName, Annotated[int, Field(ge=2, le=MAX_SHARDS)]] = Field(
        default_factory=dict,
        max_length=MAX_SPLIT_TENSORS,
        description="The tensors cut into chunks, and into how many.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.index >= self.count:
            raise ValueError(f"index {self.index} is not below count {self.count}")
        for name, chunks in self.split.items():
            if chunks > self.count:
                raise ValueError(
                    f"tensor {name!r} is split into {chunks} chunks, more than the "
                    f"{self.count} shards"
                )
        return self
