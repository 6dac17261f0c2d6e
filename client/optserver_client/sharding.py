"""Where the tensors of a sharded session live: placement and chunking, without any I/O.

A sharded session is one session spread over N servers (its shards), each holding an ordinary
session with the same id and token. The client decides where every tensor goes, from three
inputs that every shard keeps in its description (``sharding``), so that any client attaching
later computes the same answer:

- the shard count N and the chunk threshold C (bytes);
- which tensors were cut into chunks, and into how many (``split``).

A tensor of more than C bytes (and at least two rows) is cut along its first axis into
``K = min(N, rows)`` contiguous chunks whose row counts differ by one at most (the first
``rows % K`` get the extra row), as TensorFlow's ``variable_partitioner`` does; chunk ``k`` is
the tensor ``NAME#k`` on its shard. C-contiguous arrays cut so are contiguous views: nothing is
copied to send them. Every other tensor stays whole.

Chunk ``k`` of tensor ``NAME`` (``k = 0`` for a whole tensor) lives on shard
``(h(NAME) + k) mod N``, where ``h`` is the first 8 bytes of SHA-256 of the UTF-8 name, read as a
big-endian integer: deterministic on every machine and in every language, spreads names
evenly, and puts the chunks of one tensor on consecutive shards, so that a tensor cut into N
chunks uses every shard once. Tensors registered after the session was created (a later PUT,
or a step that carries weights) are placed whole: the cut is decided once, at creation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optserver_client.vocabulary import CHUNK_SEPARATOR

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_SHARDS",
    "Layout",
    "Piece",
    "chunk_name",
    "shard_urls",
]

#: Tensors above this many bytes are cut into chunks (BytePS partitions at 4 MB).
DEFAULT_CHUNK_BYTES = 4 << 20
#: As the server's bound (``optserver.sharding.MAX_SHARDS``).
MAX_SHARDS = 256


@dataclass(frozen=True, slots=True)
class Piece:
    """One stored part of a tensor: rows ``start:stop`` of it (all rows: ``whole``), held by
    shard ``shard`` under the name ``remote``."""

    name: str
    shard: int
    remote: str
    start: int
    stop: int
    whole: bool

    def of(self, array: np.ndarray) -> np.ndarray:
        """This piece of the tensor's ``array``: a view (rows of a C-contiguous array are
        contiguous)."""
        return array if self.whole else array[self.start : self.stop]


@dataclass(frozen=True)
class Layout:
    """The placement of a sharded session's tensors (see the module's docstring)."""

    count: int
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    split: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise ValueError(f"a session has 1 to {MAX_SHARDS} shards, not {self.count}")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, not {self.chunk_bytes}")
        for name, chunks in self.split.items():
            if not 2 <= chunks <= self.count:
                raise ValueError(
                    f"tensor {name!r}: {chunks} chunks, where 2 to {self.count} are possible"
                )

    @classmethod
    def plan(
        cls,
        tensors: Mapping[str, tuple[Sequence[int], int]],
        count: int,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> Layout:
        """The layout of a new session of ``count`` shards for ``tensors`` (name -> shape and
        bytes per element): which ones are cut, and into how many chunks."""
        split: dict[str, int] = {}
        for name, (shape, itemsize) in tensors.items():
            rows = shape[0] if shape else 1
            size = itemsize
            for extent in shape:
                size *= extent
            chunks = min(count, rows)
            if size > chunk_bytes and chunks >= 2:
                split[name] = chunks
        for name, chunks in split.items():
            for k in range(chunks):
                if chunk_name(name, k) in tensors:
                    raise ValueError(
                        f"tensor {chunk_name(name, k)!r} has the name of a chunk of {name!r}: "
                        f"rename one of them (names ending in '{CHUNK_SEPARATOR}<number>' are "
                        "taken by the chunks of large tensors)"
                    )
        return cls(count, chunk_bytes, split)

    # --- the shards' description ---------------------------------------------------------------

    def descriptor(self, index: int) -> dict[str, Any]:
        """What shard ``index`` keeps (the ``sharding`` of its session)."""
        return {
            "count": self.count,
            "index": index,
            "chunk_bytes": self.chunk_bytes,
            "split": dict(self.split),
        }

    @classmethod
    def from_descriptor(cls, descriptor: Mapping[str, Any]) -> Layout:
        try:
            return cls(
                int(descriptor["count"]),
                int(descriptor["chunk_bytes"]),
                {str(k): int(v) for k, v in dict(descriptor.get("split") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a sharding description: {exc}") from None

    # --- placement -----------------------------------------------------------------------------

    def shard_of(self, name: str, chunk: int = 0) -> int:
        """The shard of chunk ``chunk`` of tensor ``name`` (0 for a whole tensor)."""
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
        return (int.from_bytes(digest[:8], "big") + chunk) % self.count

    def pieces(self, name: str, rows: int) -> list[Piece]:
        """Where tensor ``name`` of ``rows`` rows lives, in row order."""
        chunks = self.split.get(name)
        if chunks is None:
            return [Piece(name, self.shard_of(name), name, 0, rows, True)]
        if rows < chunks:
            raise ValueError(
                f"tensor {name!r} is stored in {chunks} chunks of rows; {rows} rows cannot fill "
                "them (its first dimension is fixed in a sharded session)"
            )
        out, start = [], 0
        base, extra = divmod(rows, chunks)
        for k in range(chunks):
            stop = start + base + (1 if k < extra else 0)
            remote = chunk_name(name, k)
            out.append(Piece(name, self.shard_of(name, k), remote, start, stop, False))
            start = stop
        return out

    def stored(self, name: str) -> list[tuple[int, str]]:
        """Where tensor ``name`` is stored: (shard, shard-side name) of each of its parts, in
        row order (no rows needed: a cut tensor's chunk count is in :attr:`split`)."""
        chunks = self.split.get(name)
        if chunks is None:
            return [(self.shard_of(name), name)]
        return [(self.shard_of(name, k), chunk_name(name, k)) for k in range(chunks)]

    def owner(self, remote: str) -> tuple[str, int] | None:
        """The tensor and chunk index that a shard's tensor ``remote`` is a chunk of, if any."""
        name, separator, index = remote.rpartition(CHUNK_SEPARATOR)
        if not separator or not index.isdigit() or name not in self.split:
            return None
        k = int(index)
        return (name, k) if k < self.split[name] and str(k) == index else None

    def shards(self) -> Iterator[int]:
        return iter(range(self.count))


def chunk_name(name: str, chunk: int) -> str:
    """The name under which chunk ``chunk`` of tensor ``name`` is stored on its shard."""
    return f"{name}{CHUNK_SEPARATOR}{chunk}"


def shard_urls(url: str | Sequence[str]) -> list[str]:
    """The shard URLs of a client: a list as given, or one string (commas separate several,
    as in ``OPTSERVER_URLS``)."""
    urls = [u.strip() for u in url.split(",")] if isinstance(url, str) else [*url]
    urls = [u for u in urls if u]
    if not urls:
        raise ValueError("no server URL given")
    if len(set(urls)) != len(urls):
        raise ValueError(f"a shard URL is listed twice: {urls}")
    return urls
