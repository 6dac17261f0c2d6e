"""The fingerprint that binds an ``Idempotency-Key`` to the request that first carried it.

It covers everything that changes what a push does: the body (gradients, weights, ``lr``,
``groups``, ``base_version``, ``worker``), its media type, and the ``return`` option.
``Accept`` is left out on purpose: a retry may ask for the same answer in another encoding,
and gets it.

The body's digest is SHA-256 over its first 64 KiB (a safetensors header, or all of a small
JSON body), its length, its last few bytes, and a position-weighted sum of all its 64-bit
words modulo 2**64, ``sum(w[i] * (2i + 1))``: the odd weights are invertible, so a change to
any one word always changes the sum, and unrelated bodies collide with odds of 2**-64. The
sum is a vectorized numba loop, written here because the library digests cost a pass that is
several times slower over the large bodies that every push carries (40 MB, here: SHA-256
19 ms, CRC-32 5.3 ms, this sum 0.9 ms). It is no cryptographic hash, and needs none: the key's
owner is the only one who could forge a collision and would gain nothing by it; the
fingerprint guards against a client reusing a key by mistake, not against an adversary.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np

from optserver.wire import Buffer

__all__ = ["fingerprint", "warm_up"]

_HEAD = 64 << 10


@numba.njit(nogil=True, cache=True)
def _weighted_sum(words: np.ndarray) -> np.uint64:  # compiled for the uint64 arrays it is given
    total = np.uint64(0)
    for i in range(words.shape[0]):
        total += words[i] * np.uint64(2 * i + 1)
    return total


def fingerprint(body: Buffer, media_type: str, returns: str) -> str:
    """A short hex digest of a push request (see the module's docstring)."""
    view = memoryview(body).cast("B")
    whole = len(view) // 8 * 8
    words = np.frombuffer(view[:whole], dtype=np.uint64)
    if not words.flags.aligned:  # only an odd layout pays this copy
        words = words.copy()
    digest = hashlib.sha256()
    digest.update(f"{media_type}\n{returns}\n{len(view)}\n{_weighted_sum(words)}\n".encode())
    digest.update(view[whole:])
    digest.update(view[:_HEAD])
    return digest.hexdigest()[:32]


def warm_up() -> None:
    """Compile (or load from the cache) the sum for the bodies a push may have: numba types a
    read-only buffer (``bytes``) apart from a writable one. A server's warm-up calls this, so
    that its first keyed push does not wait for it."""
    for body in (bytes(8), bytearray(8)):
        fingerprint(body, "", "")
