"""The safetensors format, read and written with numpy alone: zero-copy and strict.

A document is an 8-byte little-endian header length, a JSON header (tensor name ->
``{"dtype", "shape", "data_offsets"}``, plus an optional ``__metadata__`` map of strings), and
the tensors' raw little-endian bytes. The client and the server both use this module: the
server because it must check a hostile header completely before it allocates anything sized by
the client (length, JSON, dtypes, shapes, offsets inside the body, no gaps or overlaps,
element limits); both because decoded tensors can be numpy views of the body (no copy) and
encoding is a single copy into one buffer, several times faster than the ``safetensors``
package for large tensors (or no copy at all: :func:`encode_parts` gives the document as the
header and views of the arrays, for a scatter-gather send). The test suite checks both
directions against that package.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

__all__ = [
    "BYTES",
    "DTYPES",
    "DocumentSink",
    "SafetensorsError",
    "allocate",
    "decode",
    "encode",
    "encode_parts",
    "header_bytes",
    "header_length",
    "json_expressible",
    "parse_header",
]

#: Dtype names of the format and the numpy dtypes they are (floats: what tensors here are).
DTYPES: dict[str, np.dtype[Any]] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
#: Also understood where asked for (decode's ``dtypes``): raw bytes, for internal documents.
BYTES = {"U8": np.dtype("u1")}
_NAMES = {dtype: name for name, dtype in {**DTYPES, **BYTES}.items()}
#: The format caps its header at 100 MB; far less is plenty for any real document.
MAX_HEADER_BYTES = 16 << 20
MAX_NAME_LENGTH = 512
#: numpy's index type (int64) bounds every dimension and, zero dimensions left out, the
#: product of the dimensions times the item size: even an empty array is refused beyond it.
MAX_INDEX = 2**63 - 1

Buffer = bytes | bytearray | memoryview


class SafetensorsError(ValueError):
    """A document that is not valid safetensors, or exceeds a limit.

    ``kind``: ``malformed`` (structure), ``dtype`` (a dtype not supported), ``too-large`` (a
    tensor over ``max_elements``, or dimensions no array index can hold), ``too-many`` (more
    than ``max_tensors`` tensors) or ``shape`` (a zero-element shape that JSON nested lists
    cannot carry, refused only when ``decode`` is asked to: ``json_shapes``).
    """

    def __init__(
        self,
        message: str,
        kind: Literal["malformed", "dtype", "too-large", "too-many", "shape"] = "malformed",
        tensor: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.tensor = tensor


def allocate(size: int) -> memoryview:
    """An uninitialised, writable byte buffer.

    numpy rather than ``bytearray``: no zero-filling pass, and numpy asks the kernel for huge
    pages, which for tens of megabytes saves most of the page-fault time.
    """
    return np.empty(size, dtype=np.uint8).data


def header_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    """The length prefix and JSON header for ``tensors`` laid out in order."""
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, array in tensors.items():
        dtype_name = _NAMES.get(array.dtype.newbyteorder("<"))
        if dtype_name is None:
            raise TypeError(f"cannot encode tensor {name!r} of dtype {array.dtype}")
        entries[name] = {
            "dtype": dtype_name,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    padded = len(raw) + (-len(raw) % 8)  # the data section starts 8-byte aligned, as usual
    return padded.to_bytes(8, "little") + raw + b" " * (padded - len(raw))


def encode_parts(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> tuple[bytes | memoryview, ...]:
    """The document of :func:`encode` as pieces to send in order: the header, then each tensor's
    little-endian bytes. A C-contiguous little-endian array is not copied (its piece is a view of
    it: it must not change until the pieces are sent); any other is copied once."""
    parts: list[bytes | memoryview] = [header_bytes(tensors, metadata)]
    for array in tensors.values():
        data = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
        if data.nbytes:
            parts.append(data.reshape(-1).view(np.uint8).data)
    return tuple(parts)


def encode(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> memoryview:
    """One document in one buffer: each tensor is copied once, nothing else (the bytes are those
    of :func:`encode_parts` joined; this writes them in place, without the pieces' copies)."""
    header = header_bytes(tensors, metadata)
    out = np.empty(len(header) + sum(a.nbytes for a in tensors.values()), dtype=np.uint8)
    out[: len(header)] = np.frombuffer(header, dtype=np.uint8)
    position = len(header)
    for array in tensors.values():
        data = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
        out[position : position + data.nbytes] = data.reshape(-1).view(np.uint8)
        position += data.nbytes
    return out.data


def decode(
    body: Buffer,
    *,
    max_tensors: int | None = None,
    max_elements: int | None = None,
    max_rank: int = 64,
    dtypes: Mapping[str, np.dtype[Any]] = DTYPES,
    json_shapes: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (views of ``body`` where aligned; writable if ``body`` is) and metadata.

    Everything in the header is checked before any array is made. ``max_elements`` bounds
    the element count and also the product of the non-zero dimensions (a ``[0, 2**40]``
    tensor holds nothing, but its dimensions are still absurd). ``json_shapes``: also refuse
    zero-element tensors whose shape JSON nested lists cannot carry (see
    :func:`json_expressible`), so that everything accepted round-trips in both encodings.
    """
    view = memoryview(body).cast("B")
    size = len(view)
    header_len = header_length(view, size)
    data_start = 8 + header_len
    spans, metadata = parse_header(
        view[8:data_start], size - data_start, max_tensors=max_tensors,
        max_elements=max_elements, max_rank=max_rank, dtypes=dtypes, json_shapes=json_shapes,
    )  # fmt: skip
    tensors: dict[str, np.ndarray] = {}
    for begin, end, name, dtype, shape in spans:
        count = (end - begin) // dtype.itemsize
        if count == 0:
            tensors[name] = np.zeros(shape, dtype)
            continue
        array = np.frombuffer(view, dtype=dtype, count=count, offset=data_start + begin)
        array = array.reshape(shape)
        # Unaligned views are legal but slow to compute with; only odd layouts pay this copy.
        tensors[name] = array if array.flags.aligned else array.copy()
    return tensors, metadata


Span = tuple[int, int, str, np.dtype[Any], tuple[int, ...]]


def header_length(prefix: Buffer, size: int) -> int:
    """The header length that a document of ``size`` bytes starts with (its first 8 bytes)."""
    if size < 8:
        raise SafetensorsError(f"a document of {size} bytes is shorter than its 8-byte header")
    header_len = int.from_bytes(memoryview(prefix)[:8], "little")
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise SafetensorsError(
            f"header length {header_len} does not fit a document of {size} bytes"
        )
    return header_len


def parse_header(
    raw: Buffer,
    data_len: int,
    *,
    max_tensors: int | None = None,
    max_elements: int | None = None,
    max_rank: int = 64,
    dtypes: Mapping[str, np.dtype[Any]] = DTYPES,
    json_shapes: bool = False,
) -> tuple[list[Span], dict[str, str]]:
    """The tensors' spans (begin, end, name, dtype, shape: in data order, covering the
    ``data_len`` data bytes without gap or overlap) and the metadata of a JSON header, all
    checked (see :func:`decode`)."""
    try:
        header = json.loads(bytes(raw))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsError(f"the header is not valid JSON: {exc}") from None
    except RecursionError:
        raise SafetensorsError("the header is not valid JSON: nested too deeply") from None
    if not isinstance(header, dict):
        raise SafetensorsError("the header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsError("__metadata__ must map strings to strings")
    if max_tensors is not None and len(header) > max_tensors:
        raise SafetensorsError(
            f"the document holds {len(header)} tensors; the limit is {max_tensors}", "too-many"
        )
    spans = sorted(
        _entry(name, entry, data_len, max_elements, max_rank, dtypes, json_shapes)
        for name, entry in header.items()
    )
    position = 0
    for begin, end, name, _, _ in spans:
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap"
            raise SafetensorsError(f"tensor {name!r} {problem}", tensor=name)
        position = end
    if position != data_len:
        raise SafetensorsError(f"{data_len - position} bytes follow the last tensor")
    return spans, metadata


class DocumentSink:
    """A safetensors document of ``size`` bytes read straight into its tensors' final places as
    it arrives (sans-I/O: the reader asks :meth:`window` where the next bytes go, reads into it
    and reports the count to :meth:`advance`).

    A tensor named in ``into`` whose dtype and shape are those of the given array (writable,
    C-contiguous) is written into that array; any other tensor into a new one. The header is
    checked as :func:`decode` checks it before any tensor byte is placed. :attr:`landed` names
    the tensors written in place."""

    def __init__(self, size: int, into: Mapping[str, np.ndarray]) -> None:
        if size < 8:
            raise SafetensorsError(f"a document of {size} bytes is shorter than its 8-byte header")
        self.size = size
        self.into = into
        self.landed: set[str] = set()
        self._prefix = bytearray(8)
        self._header: bytearray | None = None  # sized once the prefix is in
        self._planned = False  # the header is in and checked: the segments are known
        self._segments: list[memoryview] = []
        self._tensors: dict[str, np.ndarray] = {}
        self._metadata: dict[str, str] = {}
        self._position = 0  # bytes placed so far
        self._segment = 0  # the data segment being filled
        self._filled = 0  # bytes of it filled

    @property
    def done(self) -> bool:
        return self._position == self.size

    def window(self) -> memoryview:
        """Where the next bytes go (empty once the document is complete)."""
        if self._header is None:
            return memoryview(self._prefix)[self._position :]
        if not self._planned:
            return memoryview(self._header)[self._position - 8 :]
        while self._segment < len(self._segments):
            segment = self._segments[self._segment]
            if self._filled < len(segment):
                return segment[self._filled :]
            self._segment, self._filled = self._segment + 1, 0
        return memoryview(b"")

    def advance(self, count: int) -> None:
        """``count`` more bytes were written into the last :meth:`window`."""
        self._position += count
        if self._header is None:
            if self._position == 8:
                self._header = bytearray(header_length(self._prefix, self.size))
                if not self._header:
                    self._plan()
        elif not self._planned:
            if self._position == 8 + len(self._header):
                self._plan()
        else:
            self._filled += count

    def feed(self, data: Buffer) -> None:
        """Bytes that arrived elsewhere (copied into their places)."""
        view = memoryview(data).cast("B")
        while len(view):
            window = self.window()
            if not len(window):
                raise SafetensorsError("more bytes than the document's length")
            count = min(len(window), len(view))
            window[:count] = view[:count]
            self.advance(count)
            view = view[count:]

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        if not self.done:
            raise SafetensorsError(
                f"the document ended after {self._position} of {self.size} bytes"
            )
        return self._tensors, self._metadata

    def _plan(self) -> None:
        assert self._header is not None
        data_len = self.size - 8 - len(self._header)
        spans, self._metadata = parse_header(self._header, data_len)
        self._planned = True
        for begin, end, name, dtype, shape in spans:
            target = self.into.get(name)
            if (
                target is not None
                and target.dtype == dtype
                and target.shape == shape
                and target.flags.c_contiguous
                and target.flags.writeable
            ):
                self.landed.add(name)
            else:
                target = np.empty(shape, dtype)
            self._tensors[name] = target
            if end > begin:
                self._segments.append(target.reshape(-1).view(np.uint8).data)


def _entry(
    name: str,
    entry: Any,
    data_len: int,
    max_elements: int | None,
    max_rank: int,
    dtypes: Mapping[str, np.dtype[Any]],
    json_shapes: bool,
) -> tuple[int, int, str, np.dtype[Any], tuple[int, ...]]:
    if not name or len(name) > MAX_NAME_LENGTH:
        raise SafetensorsError(f"invalid tensor name {name[:64]!r}")
    if not isinstance(entry, dict):
        raise SafetensorsError(f"the entry of {name!r} must be an object", tensor=name)
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    dtype = dtypes.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise SafetensorsError(
            f"tensor {name!r} has dtype {dtype_name!r}; supported: {', '.join(dtypes)}",
            "dtype",
            name,
        )
    if (
        not isinstance(shape, list)
        or len(shape) > max_rank
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise SafetensorsError(f"tensor {name!r} has an invalid shape {shape!r}", tensor=name)
    # numpy sizes an array by its non-zero dimensions even when another one is 0.
    extent = math.prod(d for d in shape if d)
    count = extent if all(shape) else 0
    if max_elements is not None and extent > max_elements:
        if count:
            problem = f"has {count} elements"
        else:
            problem = f"has 0 elements, but its non-zero dimensions span {extent}"
        raise SafetensorsError(
            f"tensor {name!r} of shape {_shape_text(shape)} {problem}; the limit is {max_elements}",
            "too-large",
            name,
        )
    if extent * dtype.itemsize > MAX_INDEX:
        raise SafetensorsError(
            f"tensor {name!r} of shape {_shape_text(shape)} does not fit a 64-bit index: "
            f"its non-zero dimensions times {dtype.itemsize} bytes exceed 2**63 - 1",
            "too-large",
            name,
        )
    if json_shapes and not json_expressible(shape):
        raise SafetensorsError(
            f"tensor {name!r} of shape {_shape_text(shape)} holds no elements in a shape JSON "
            "nested lists cannot carry; a zero-element tensor may have one zero dimension, "
            "the last (e.g. [0] or [3, 0])",
            "shape",
            name,
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise SafetensorsError(
            f"data_offsets {offsets!r} of {name!r} are not inside the {data_len} data bytes",
            tensor=name,
        )
    if offsets[1] - offsets[0] != count * dtype.itemsize:
        raise SafetensorsError(
            f"tensor {name!r} is {dtype_name} {shape} = {count * dtype.itemsize} bytes, but its "
            f"data_offsets span {offsets[1] - offsets[0]}",
            tensor=name,
        )
    return offsets[0], offsets[1], name, dtype, tuple(shape)


def json_expressible(shape: tuple[int, ...] | list[int]) -> bool:
    """Whether nested lists carry ``shape``: any shape with elements, and zero-element shapes
    whose only zero dimension is the last (``[]`` is ``(0,)``, ``[[], []]`` is ``(2, 0)``)."""
    return all(shape) or (shape[-1] == 0 and all(shape[:-1]))


def _shape_text(shape: list[int]) -> str:
    """The shape for a message, shortened: a hostile header's shape may be long."""
    text = str(list(shape))
    return text if len(text) <= 200 else text[:180] + f"... (rank {len(shape)})"
