"""The idempotency memory of a session: answers to pushes, by ``Idempotency-Key``.

Stripe's semantics: a key is bound to the request that first carried it, by a fingerprint (a
digest of the body and of what else changes the request's meaning). The same key with the same
request gets the first answer again and applies nothing; the same key with a different request
is an error (:class:`~optserver.errors.IdempotencyKeyReused`), never a replay of the wrong
answer.

Answers are kept in one canonical encoding, safetensors (exact dtypes and shapes, and smaller
than JSON), so that a replay can follow the retry's ``Accept``: binary is sent as kept, JSON is
re-encoded from it. An answer larger than a quarter of the byte budget is remembered by version
only, and its replay is encoded from the current weights of the tensors it named.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from optserver_client import safetensors_io

from optserver.errors import IdempotencyKeyReused
from optserver.replies import BINARY, Answer, Reply, Returns
from optserver.wire import Buffer

__all__ = ["Remembered", "ReplayCache"]


@dataclass(frozen=True)
class Remembered:
    """What is kept of one answered push."""

    #: The answer as a safetensors document, or None when it was too large to keep.
    body: Buffer | None
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
        return 0 if self.body is None else len(self.body)


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
        if self.max_keys <= 0:
            return
        binary = reply.media_type == BINARY
        size = len(reply.body) if binary else sum(a.nbytes for a in chosen.values())
        body: Buffer | None = None
        if size <= self.max_bytes // 4:  # a binary answer is kept as it is: no second copy
            body = reply.body if binary else Answer("binary")(reply.version, applied, chosen).body
        memo = Remembered(
            body, answer.returns, tuple(chosen), applied, reply.version, fingerprint, reply.ticket
        )
        self._insert(key, memo)

    def _insert(self, key: str, memo: Remembered) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._entries[key] = memo
        self._bytes += memo.size
        while len(self._entries) > self.max_keys or self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.size

    def replay(
        self,
        key: str | None,
        answer: Answer,
        fingerprint: str | None,
        current: Mapping[str, np.ndarray],
    ) -> Reply | None:
        """The earlier answer to ``key`` encoded as ``answer`` asks (None if the key is new);
        ``current``: the session's weights, for answers kept by version only."""
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
        replay = Answer(answer.fmt, memo.returns)
        if memo.body is None:
            present = {n: current[n] for n in memo.names if n in current}
            reply = replay(memo.version, memo.applied, present)
        elif answer.fmt == "binary":
            reply = Reply(memo.body, BINARY, memo.version)
        else:
            tensors, _ = safetensors_io.decode(memo.body)
            reply = replay(memo.version, memo.applied, tensors)
        return Reply(reply.body, reply.media_type, reply.version, replayed=True, ticket=memo.ticket)
