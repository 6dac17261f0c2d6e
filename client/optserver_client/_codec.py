"""Tensors on the wire: conversion of array-likes, safetensors and JSON encodings.

Arrays sent are C-contiguous, little-endian float16/float32/float64. Safetensors documents are
written and read by :mod:`optserver_client.safetensors_io`: a body is sent as pieces, views of
the caller's arrays (``encode_parts``: no copy to encode), and received tensors are numpy
views of the response body (read into a writable buffer), so the arrays are writable and cost
no copy beyond the read itself.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

try:  # optional accelerator; installed with the server, not required by the client
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised where orjson is absent
    _orjson = None  # type: ignore[assignment]

from optserver_client import safetensors_io
from optserver_client.exceptions import ProtocolError
from optserver_client.safetensors_io import Buffer

__all__ = [
    "FLOAT_DTYPES",
    "Array",
    "TensorLike",
    "as_array",
    "decode_json",
    "decode_json_tensor",
    "decode_safetensors",
    "dtype_of",
    "encode_json",
    "encode_json_tensor",
    "is_wire_float",
]

#: An array-like: numpy array, (nested) list of numbers, number, or torch tensor.
TensorLike: TypeAlias = npt.ArrayLike
Array: TypeAlias = npt.NDArray[Any]

#: The dtypes a tensor may have on the wire (float16 only as a compressed gradient).
FLOAT_DTYPES: frozenset[np.dtype[Any]] = frozenset(
    np.dtype(name) for name in ("float16", "float32", "float64")
)


def dtype_of(name: str | np.dtype[Any] | type[Any]) -> np.dtype[Any]:
    """A wire dtype from a name ("float32") or numpy dtype; ValueError for anything else."""
    dtype = np.dtype(name)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float16, float32 or float64, not {dtype}")
    return dtype


def as_array(value: object, dtype: np.dtype[Any] | None = None, *, default: np.dtype[Any]) -> Array:
    """``value`` as a C-contiguous little-endian float array ready for the wire.

    Arrays, numpy scalars and tensors with a float16/32/64 dtype keep it unless ``dtype`` is
    given; anything else (lists, Python numbers, integer or bfloat16 arrays) becomes ``default``.
    """
    array, typed = _to_numpy(value)
    if dtype is None:
        dtype = array.dtype if typed and is_wire_float(array.dtype) else default
    # One pass at most: cast, byte order and layout together, and no copy when all already hold.
    # (np.asarray, not np.ascontiguousarray, which turns rank 0 into shape (1,).)
    return np.asarray(array, dtype=dtype.newbyteorder("<"), order="C")


def is_wire_float(dtype: np.dtype[Any]) -> bool:
    """float16, float32 or float64, in either byte order."""
    return dtype.newbyteorder("=") in FLOAT_DTYPES


def _to_numpy(value: object) -> tuple[Array, bool]:
    """The value as an array, and whether the value had a dtype of its own."""
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value), True
    if type(value).__module__.startswith("torch"):
        # Duck-typed so that torch is never imported here: it is, if a tensor exists.
        tensor: Any = value
        tensor = tensor.detach()
        if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            tensor = tensor.float()
        return np.asarray(tensor.cpu().resolve_conj().resolve_neg().numpy()), True
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"cannot use a {type(value).__name__} as a tensor")
    return array, False


def decode_safetensors(body: Buffer) -> tuple[dict[str, Array], dict[str, str]]:
    """The tensors of a safetensors document, as views of ``body``, and its ``__metadata__``.

    Views of a writable buffer are writable and keep it alive; views of ``bytes`` are read-only.
    """
    try:
        return safetensors_io.decode(body)
    except safetensors_io.SafetensorsError as exc:
        raise ProtocolError(f"invalid safetensors document: {exc}") from None


def encode_json_tensor(array: Array) -> Any:
    """Nested lists of numbers; a bare number for rank 0. ValueError for NaN or Infinity."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(_NON_FINITE)
    return array.tolist()


def decode_json_tensor(value: Any, dtype: np.dtype[Any] | str = "float32") -> Array:
    """A JSON tensor (number or rectangular nested lists) as an array of ``dtype``.

    ``null`` elements become NaN: JSON has no NaN or Infinity, and the server writes them as null.
    """
    try:
        array = np.array(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"not a tensor of numbers: {exc}") from None
    return array


def encode_json(document: Any) -> bytes:
    """Compact, standard JSON; ValueError for NaN or Infinity, which JSON cannot carry."""
    if _orjson is not None:
        # Ten times faster than json for big tensors; it would write NaN as null, so refuse
        # non-finite numbers first, as json does (tensors: in encode_json_tensor).
        _check_finite(document)
        return _orjson.dumps(document, default=_json_default)
    try:
        return json.dumps(
            document, separators=(",", ":"), allow_nan=False, default=_json_default
        ).encode()
    except ValueError:
        raise ValueError(_NON_FINITE) from None


def decode_json(body: bytes | bytearray | memoryview) -> Any:
    """A JSON document (orjson when installed: it is much faster on big tensors)."""
    if _orjson is not None:
        return _orjson.loads(body)
    return json.loads(bytes(body) if isinstance(body, memoryview) else body)


_NON_FINITE = (
    "a tensor holds NaN or Infinity, which JSON cannot carry; "
    "use the binary encoding (binary=True) to send non-finite values"
)


def _check_finite(value: Any) -> None:
    """Options such as lr (tensors were checked as arrays by encode_json_tensor)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(_NON_FINITE)
    elif isinstance(value, dict):
        for item in value.values():
            if not isinstance(item, list):
                _check_finite(item)


def _json_default(value: object) -> Any:
    # numpy scalars and arrays inside option dicts (betas=np.array([0.9, 0.99]), lr=np.float32).
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
