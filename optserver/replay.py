"""The idempotency memory of a session: answers to pushes, by ``Idempotency-Key``.

Stripe's semantics: a key is bound to the request that first carried it, by a fingerprint (a
digest of the body and of what else changes the request's meaning). The same key with the same
request gets the first answer again and applies nothing; the same key with a different request
is an error (:class:`~optserver.errors.IdempotencyKeyReused`), never a replay of the wrong
answer.

An answer is kept as the :class:`~optserver.frozen.Frozen` copies it was encoded from (exact
dtypes and shapes), so that a replay can follow the retry's ``Accept``: a safetensors replay is
the same document, byte for byte, a JSON one is encoded from the same tensors. An answer larger
than a quarter of the byte budget is remembered by version only, and its replay is encoded from
the current weights of the tensors it named.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from optserver.errors import IdempotencyKeyReused
from optserver.frozen import Frozen
from optserver.replies import Answer, Reply, Returns, answer_metadata

__all__ = ["Remembered", "ReplayCache"]


@dataclass(frozen=True)
class Remembered:
    """What is kept of one answered push."""

    #: The answer's tensors, or None when they were too large to keep.
    tensors: Frozen | None
    returns: Returns
    names: tuple[str, ...]
    applied: bool
    version: int
    #: The request's fingerprint (None: recorded before fingerprints existed; not checked).
    fingerprint: str | None = None
    #: The journal position the answer waits for (a replay must not overtake durability).
    ticket: int | None = None

    @property
    def size(self) -> int:
        return 0 if self.tensors is None else self.tensors.nbytes

    @property
    def body(self) -> memoryview | None:
        """The kept answer as a safetensors document (what snapshots store), or None."""
        if self.tensors is None:
            return None
        return memoryview(self.tensors.document(answer_metadata(self.version, self.applied)))


class ReplayCache:
    """A bounded LRU map of idempotency keys to :class:`Remembered` answers (not thread-safe:
    the session's lock guards it)."""

    def __init__(self, max_keys: int, max_bytes: int) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Remembered] = OrderedDict()
        self._bytes = 0

    def entries(self) -> Iterator[tuple[str, Remembered]]:
        """Every entry, oldest first (for snapshots)."""
        return iter(list(self._entries.items()))

    def restore(self, entries: Mapping[str, Remembered]) -> None:
        """Replace the contents (recovery), keeping the bounds."""
        self._entries.clear()
        self._bytes = 0
        for key, memo in entries.items():
            self._insert(key, memo)

    def keep(
        self,
        key: str,
        answer: Answer,
        tensors: Frozen,
        *,
        applied: bool,
        version: int,
        fingerprint: str | None,
        ticket: int | None,
    ) -> None:
        """Remember the answer to the push that carried ``key`` (its tensors are immutable:
        no copy is made)."""
        if self.max_keys <= 0:
            return
        kept = tensors if tensors.nbytes <= self.max_bytes // 4 else None
        memo = Remembered(
            kept, answer.returns, tuple(tensors.tensors), applied, version, fingerprint, ticket
        )
        self._insert(key, memo)

    def lookup(self, key: str | None, fingerprint: str | None) -> Remembered | None:
        """The earlier answer to ``key`` (None if the key is new); 422 if the key came with a
        different ``fingerprint``."""
        if key is None:
            return None
        memo = self._entries.get(key)
        if memo is None:
            return None
        if fingerprint is not None and memo.fingerprint not in (None, fingerprint):
            raise IdempotencyKeyReused(
                f"Idempotency-Key {key!r} was first used with a different request (another "
                "body, content type or return option); nothing was applied: use a new key for "
                "a new push",
                key=key,
            )
        self._entries.move_to_end(key)
        return memo

    def _insert(self, key: str, memo: Remembered) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._entries[key] = memo
        self._bytes += memo.size
        while len(self._entries) > self.max_keys or self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.size

    # --- encoded answers (outside any session) ---------------------------------------------

    def remember(
        self,
        key: str,
        reply: Reply,
        answer: Answer,
        chosen: Mapping[str, np.ndarray],
        applied: bool,
        fingerprint: str | None,
    ) -> None:
        """Keep the answer ``reply`` (made by ``answer`` from the tensors ``chosen``)."""
        self.keep(
            key, answer, Frozen(chosen), applied=applied, version=reply.version,
            fingerprint=fingerprint, ticket=reply.ticket,
        )  # fmt: skip

    def replay(
        self,
        key: str | None,
        answer: Answer,
        fingerprint: str | None,
        current: Mapping[str, np.ndarray],
    ) -> Reply | None:
        """The earlier answer to ``key`` encoded as ``answer`` asks (None if the key is new);
        ``current``: the weights, for answers kept by version only."""
        memo = self.lookup(key, fingerprint)
        if memo is None:
            return None
        tensors = memo.tensors
        if tensors is None:
            tensors = Frozen({n: current[n] for n in memo.names if n in current})
        reply = Answer(answer.fmt, memo.returns).encode(memo.version, memo.applied, tensors)
        return Reply(reply.body, reply.media_type, reply.version, replayed=True, ticket=memo.ticket)
