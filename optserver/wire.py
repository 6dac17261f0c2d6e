"""Tensor encodings on the wire: safetensors documents and JSON nested lists.

Safetensors is decoded here rather than by the ``safetensors`` package because the server must
check a hostile header completely (length, JSON, dtypes, shapes, offsets inside the body, no
gaps or overlaps, element limits) before it allocates anything sized by the client, and because
the tensors can then be numpy views of the request body: no copy. Encoding writes one buffer
with one copy of each tensor. The tests check both directions against the ``safetensors``
package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from optserver.errors import BadRequest, InvalidTensor, LimitExceeded

__all__ = [
    "DTYPES",
    "Limits",
    "decode_json_tensor",
    "decode_safetensors",
    "encode_json",
    "encode_safetensors",
    "json_tensors",
    "safetensors_size",
]

#: safetensors dtype names accepted on the wire, and the numpy dtypes they become.
DTYPES: dict[str, np.dtype[Any]] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
#: The safetensors format caps its header at 100 MB; we allow far less.
MAX_HEADER_BYTES = 16 << 20
MAX_NAME_LENGTH = 512


@dataclass(frozen=True)
class Limits:
    max_tensors: int = 10_000
    max_elements: int = 1 << 28
    max_depth: int = 32


def _shape_elements(shape: list[Any], name: str, limits: Limits) -> int:
    if not isinstance(shape, list) or len(shape) > limits.max_depth:
        raise BadRequest(f"safetensors header: tensor {name!r} has an invalid shape {shape!r}")
    count = 1
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise BadRequest(f"safetensors header: tensor {name!r} has an invalid shape {shape!r}")
        count *= dim
    if count > limits.max_elements:
        raise InvalidTensor(
            f"tensor {name!r} has {count} elements; the limit is {limits.max_elements}",
            slug="tensor-too-large",
            tensor=name,
        )
    return count


def decode_safetensors(
    body: bytes | bytearray | memoryview, limits: Limits
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (views of ``body`` where aligned) and the ``__metadata__`` map of a document."""
    view = memoryview(body).cast("B")
    size = len(view)
    if size < 8:
        raise BadRequest(f"safetensors document of {size} bytes: shorter than its 8-byte header")
    header_len = int.from_bytes(view[:8], "little")
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise BadRequest(
            f"safetensors header length {header_len} does not fit a document of {size} bytes"
        )
    try:
        header = orjson.loads(view[8 : 8 + header_len])
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest("safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BadRequest("safetensors __metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise LimitExceeded(
            f"document holds {len(header)} tensors; the limit is {limits.max_tensors}",
            slug="too-many-tensors",
        )
    data_start = 8 + header_len
    data_len = size - data_start
    spans: list[tuple[int, int, str, np.dtype[Any], list[int]]] = []
    for name, entry in header.items():
        if not name or len(name) > MAX_NAME_LENGTH:
            raise BadRequest(f"safetensors header: invalid tensor name {name[:64]!r}")
        if not isinstance(entry, dict):
            raise BadRequest(f"safetensors header: entry of {name!r} must be an object")
        dtype_name, shape, offsets = (
            entry.get("dtype"),
            entry.get("shape"),
            entry.get("data_offsets"),
        )
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise InvalidTensor(
                f"tensor {name!r} has dtype {dtype_name!r}; supported: {', '.join(DTYPES)}",
                tensor=name,
                received=dtype_name,
            )
        count = _shape_elements(shape, name, limits)  # type: ignore[arg-type]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise BadRequest(
                f"safetensors header: data_offsets {offsets!r} of {name!r} are not inside the "
                f"{data_len} data bytes"
            )
        if offsets[1] - offsets[0] != count * dtype.itemsize:
            raise BadRequest(
                f"safetensors header: {name!r} is {dtype_name} {shape} = "
                f"{count * dtype.itemsize} bytes, but its offsets span {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name, dtype, shape))  # type: ignore[arg-type]
    spans.sort()
    position = 0
    for begin, end, name, _, _ in spans:
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise BadRequest(f"safetensors header: tensor {name!r} {problem}")
        position = end
    if position != data_len:
        raise BadRequest(
            f"safetensors document has {data_len - position} bytes after its last tensor"
        )
    tensors: dict[str, np.ndarray] = {}
    for begin, end, name, dtype, shape in spans:
        array = np.frombuffer(view, dtype=dtype, count=(end - begin) // dtype.itemsize,
                              offset=data_start + begin).reshape(shape)  # fmt: skip
        if not array.flags.aligned:
            array = array.copy()  # kernels want aligned data; only odd layouts pay for this
        tensors[name] = array
    return tensors, metadata


def safetensors_size(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> int:
    return len(_header(tensors, metadata)) + sum(a.nbytes for a in tensors.values())


def _header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for name, array in tensors.items():
        dtype_name = _NAMES.get(array.dtype.newbyteorder("<"))
        if dtype_name is None:
            raise TypeError(f"cannot encode dtype {array.dtype} of {name!r}")
        entries[name] = {
            "dtype": dtype_name,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = orjson.dumps(entries)
    padded = len(raw) + (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    return padded.to_bytes(8, "little") + raw + b" " * (padded - len(raw))


def encode_safetensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytearray:
    """One buffer: header, then each tensor's little-endian bytes (one copy each)."""
    header = _header(tensors, metadata or {})
    out = bytearray(len(header) + sum(a.nbytes for a in tensors.values()))
    out[: len(header)] = header
    position = len(header)
    for array in tensors.values():
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        out[position : position + data.nbytes] = data.reshape(-1).view(np.uint8).data
        position += data.nbytes
    return out


def decode_json_tensor(name: str, value: Any, dtype: np.dtype[Any], limits: Limits) -> np.ndarray:
    """A number (rank 0) or rectangular nested lists of numbers, as an array of ``dtype``."""
    depth, probe = 0, value
    while isinstance(probe, list):
        depth += 1
        if depth > limits.max_depth:
            raise InvalidTensor(
                f"tensor {name!r} is nested deeper than {limits.max_depth} levels", tensor=name
            )
        probe = probe[0] if probe else None
    if isinstance(value, bool) or not isinstance(value, (list, int, float)):
        raise InvalidTensor(
            f"tensor {name!r} must be a number or nested lists of numbers, "
            f"got {type(value).__name__}",
            tensor=name,
        )
    try:
        array = np.array(value)
    except (ValueError, OverflowError):
        raise InvalidTensor(
            f"tensor {name!r} is not a rectangular array of numbers", tensor=name
        ) from None
    if array.dtype.kind not in "iuf":
        raise InvalidTensor(
            f"tensor {name!r} must hold only numbers (and be rectangular)", tensor=name
        )
    if array.size > limits.max_elements:
        raise InvalidTensor(
            f"tensor {name!r} has {array.size} elements; the limit is {limits.max_elements}",
            slug="tensor-too-large",
            tensor=name,
        )
    return np.asarray(array, dtype=dtype, order="C")


def json_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Tensors ready for :func:`encode_json`: rank 0 becomes a bare number."""
    return {n: (a.item() if a.ndim == 0 else a) for n, a in tensors.items()}


def encode_json(payload: Any) -> bytes:
    """JSON with numpy arrays as nested lists (NaN and Inf become null)."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):  # non-contiguous or a dtype orjson lacks
        return np.ascontiguousarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")
