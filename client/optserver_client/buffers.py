"""Large byte buffers reused once nothing refers to them any more.

Fresh memory is slow: each page of a new multi-megabyte buffer faults on first touch and the
kernel zeroes it, and on a virtual machine whose host backs guest memory lazily the fault may go
to the host too. Copying 40 MB into a fresh ``np.empty`` buffer takes 2-3x as long as into one
already used (``benchmarks/buffer_reuse.py``), and a step moves several such buffers. A
parameter server sees the same sizes step after step, so buffers of a size are worth keeping.

A :class:`BufferPool` hands out numpy ``uint8`` arrays and keeps a reference to each. A buffer
is free again when that reference is the only one left: every numpy view of it and every
memoryview of it (or of a view) holds a reference to the array, so nothing that can still read
or write it is overlooked, and a buffer is never handed out twice while in use. The pool holds
at most ``max_bytes``; beyond that, buffers are allocated as usual and not kept.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

__all__ = ["DEFAULT_POOL_BYTES", "MIN_POOLED_BYTES", "BufferPool"]

#: Smaller buffers come from the allocator's own free lists: nothing to gain.
MIN_POOLED_BYTES = 1 << 20
#: A client's pool for response bodies, unless told otherwise (``buffer_pool_bytes``).
DEFAULT_POOL_BYTES = 256 << 20


def _probe_baseline() -> int:
    """The reference count ``sys.getrefcount`` shows for an array only a list holds (the list's
    reference and the call's own), measured rather than assumed."""
    held = [np.empty(0, np.uint8)]
    return sys.getrefcount(held[0])


_BASELINE = _probe_baseline()


class BufferPool:
    """Buffers of at least :data:`MIN_POOLED_BYTES`, kept for reuse up to ``max_bytes`` in all.

    Thread-safe. :meth:`take` returns a free buffer of exactly the size asked for, or a new one;
    :meth:`reuse` only a free one (for callers that must not commit memory on a client's word
    alone); :meth:`adopt` keeps a buffer allocated elsewhere.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, got {max_bytes}")
        self.max_bytes = max_bytes
        self._buffers: list[np.ndarray] = []
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers kept (in use or free)."""
        return self._held

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` (uninitialised)."""
        found = self.reuse(nbytes)
        if found is not None:
            return found
        buffer = np.empty(nbytes, dtype=np.uint8)
        self.adopt(buffer)
        return buffer

    def allocate(self, nbytes: int) -> memoryview:
        """:meth:`take` as a writable byte memoryview (which refers to the array)."""
        return self.take(nbytes).data

    def reuse(self, nbytes: int) -> np.ndarray | None:
        """A free buffer of ``nbytes``, or None."""
        if nbytes < MIN_POOLED_BYTES:
            return None
        with self._lock:
            buffers = self._buffers
            for index in range(len(buffers)):
                if buffers[index].nbytes == nbytes and sys.getrefcount(buffers[index]) == _BASELINE:
                    return buffers[index]
        return None

    def adopt(self, buffer: np.ndarray) -> bool:
        """Keep ``buffer`` (a uint8 array that owns or wraps its memory) for reuse once it is
        free, if there is room, making room by dropping free buffers of other sizes. Whether
        it was kept."""
        nbytes = buffer.nbytes
        if nbytes < MIN_POOLED_BYTES or nbytes > self.max_bytes:
            return False
        with self._lock:
            if any(b is buffer for b in self._buffers):
                return True
            index = 0
            while self._held + nbytes > self.max_bytes and index < len(self._buffers):
                if sys.getrefcount(self._buffers[index]) == _BASELINE:
                    self._held -= self._buffers.pop(index).nbytes
                else:
                    index += 1
            if self._held + nbytes > self.max_bytes:
                return False
            self._buffers.append(buffer)
            self._held += nbytes
            return True

    def clear(self) -> None:
        """Forget every buffer (those in use stay valid: their users hold them)."""
        with self._lock:
            self._buffers.clear()
            self._held = 0
