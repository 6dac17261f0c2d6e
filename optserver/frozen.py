"""Tensors copied out of a session at one moment, to be encoded after its lock is released.

A :class:`Frozen` is taken under the session's lock and never written again: it is what a
push's answer, a pull and an idempotency replay are encoded from, outside the lock. The copies
sit back to back in one buffer, laid out as a safetensors data section behind room for the
header, so that encoding them as a document writes only the header in front of them: each
tensor is still copied exactly once on its way out (the copy is the snapshot). Large buffers
come from the server's pool (:mod:`optserver.buffers`): a step's answer reuses the buffer of
an earlier one that nothing holds any more.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
from optserver_client import safetensors_io
from optserver_client.vocabulary import APPLIED_KEY, VERSION_KEY

from optserver import buffers
from optserver.wire import Buffer

__all__ = ["Frozen"]

#: The metadata of the largest header a document of these tensors is written with: a version
#: of up to 20 digits and "applied" (the answer to a push); a pull's header is smaller.
_WIDEST = {VERSION_KEY: "9" * 20, APPLIED_KEY: "false"}


class Frozen:
    """Read-only copies of named tensors (little-endian, C order), in their order."""

    def __init__(
        self, tensors: Mapping[str, np.ndarray], widest: Mapping[str, str] = _WIDEST
    ) -> None:
        """Copy ``tensors``; ``widest``: the largest metadata a document of them will carry
        (the room left for the header)."""
        room = len(safetensors_io.header_bytes(tensors, widest))  # a multiple of 8
        slab = buffers.pool().take(room + sum(a.nbytes for a in tensors.values()))
        position = room
        views: dict[str, np.ndarray] = {}
        for name, array in tensors.items():
            dtype = array.dtype.newbyteorder("<")
            view = slab[position : position + array.nbytes].view(dtype).reshape(array.shape)
            np.copyto(view, array)
            view.flags.writeable = False
            views[name] = view
            position += array.nbytes
        self.tensors: Mapping[str, np.ndarray] = views
        self._slab: np.ndarray | None = slab
        self._room = room
        self._lock = threading.Lock()  # guards the one document written into the slab
        self._document: tuple[bytes, memoryview] | None = None

    @classmethod
    def from_document(cls, body: Buffer) -> Frozen:
        """The tensors of a safetensors document (e.g. read back from a snapshot), kept as
        they are: :meth:`document` with the same header returns ``body`` itself."""
        tensors, metadata = safetensors_io.decode(body)
        for view in tensors.values():
            view.flags.writeable = False
        # The class's own alternate constructor: it sets its own fields, as __init__ does.
        frozen = cls.__new__(cls)
        frozen.tensors = tensors
        frozen._slab, frozen._room = None, 0
        frozen._lock = threading.Lock()
        whole = memoryview(body).cast("B")
        frozen._document = (bytes(safetensors_io.header_bytes(tensors, metadata)), whole)
        return frozen

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())

    def document(self, metadata: Mapping[str, str]) -> Buffer:
        """The tensors as a safetensors document with ``metadata``. The first document is
        written in place (its header in front of the copies); another header copies."""
        header = safetensors_io.header_bytes(self.tensors, metadata)
        with self._lock:
            if self._document is not None:
                if self._document[0] == header:
                    return self._document[1]
            elif self._slab is not None and len(header) <= self._room:
                start = self._room - len(header)
                self._slab[start : self._room] = np.frombuffer(header, dtype=np.uint8)
                self._document = (header, self._slab[start:].data)
                return self._document[1]
        return safetensors_io.encode(self.tensors, metadata)
