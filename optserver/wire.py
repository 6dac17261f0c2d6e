"""Tensor encodings on the wire: safetensors documents and JSON nested lists.

Safetensors goes through :mod:`optserver_client.safetensors_io`, shared with the client
(strict, zero-copy); this module turns its errors into problems and adds JSON tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import orjson
from optserver_client import safetensors_io
from optserver_client.safetensors_io import SafetensorsError
from optserver_client.vocabulary import ProblemSlug

from optserver.errors import BadRequest, InvalidTensor, LimitExceeded

__all__ = [
    "Buffer",
    "Limits",
    "allocate",
    "decode_json_tensor",
    "decode_safetensors",
    "encode_json",
    "encode_safetensors",
    "json_tensors",
]

#: A request or response body.
Buffer = safetensors_io.Buffer


@dataclass(frozen=True)
class Limits:
    """Bounds on decoded tensors. No defaults: the values come from the settings, which alone
    hold them (``optserver.codec.limits``)."""

    max_tensors: int
    max_elements: int
    max_depth: int


def decode_safetensors(
    body: Buffer, limits: Limits
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (views of ``body`` where aligned) and the ``__metadata__`` map of a document,
    with every header field checked before anything is allocated.

    Zero-element tensors whose shape JSON nested lists cannot carry (``[0, 5]``) are refused:
    whatever the server holds must come back with its shape in either encoding."""
    try:
        return safetensors_io.decode(
            body,
            max_tensors=limits.max_tensors,
            max_elements=limits.max_elements,
            max_rank=limits.max_depth,
            json_shapes=True,
        )
    except SafetensorsError as exc:
        detail, tensor = f"safetensors: {exc}", exc.tensor
        if exc.kind == "dtype":
            raise InvalidTensor(detail, tensor=tensor) from None
        if exc.kind == "too-large":
            raise InvalidTensor(detail, slug=ProblemSlug.TENSOR_TOO_LARGE, tensor=tensor) from None
        if exc.kind == "shape":
            raise InvalidTensor(detail, slug=ProblemSlug.UNSUPPORTED_SHAPE, tensor=tensor) from None
        if exc.kind == "too-many":
            raise LimitExceeded(detail, slug=ProblemSlug.TOO_MANY_TENSORS) from None
        if tensor:
            raise BadRequest(detail, tensor=tensor) from None
        raise BadRequest(detail) from None


encode_safetensors = safetensors_io.encode
allocate = safetensors_io.allocate


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
    nulls = None
    if array.dtype == object:
        array, nulls = _with_nulls(name, value)
    if array.dtype.kind not in "iuf" or _holds_booleans(value):
        raise InvalidTensor(
            f"tensor {name!r} must hold only numbers (and be rectangular)", tensor=name
        )
    # As for safetensors, the limit also bounds the non-zero dimensions of an empty tensor.
    extent = math.prod(d for d in array.shape if d)
    if extent > limits.max_elements:
        held = f"{array.size} elements" if array.size else f"0 elements, but spans {extent}"
        raise InvalidTensor(
            f"tensor {name!r} of shape {list(array.shape)} has {held}; the limit is "
            f"{limits.max_elements}",
            slug=ProblemSlug.TENSOR_TOO_LARGE,
            tensor=name,
        )
    with np.errstate(over="ignore"):
        out = np.asarray(array, dtype=dtype, order="C")
    finite = np.isfinite(out) if nulls is None else np.isfinite(out) | nulls
    if not finite.all():  # JSON numbers are finite: these overflowed ``dtype``
        raise InvalidTensor(
            f"tensor {name!r} holds numbers beyond the range of {dtype} (largest magnitude "
            f"{float(np.finfo(dtype).max):.7g}): they would be NaN or Inf as {dtype}",
            tensor=name,
        )
    return out


def _with_nulls(name: str, value: Any) -> tuple[np.ndarray, np.ndarray]:
    """Nested lists with ``null`` where a value is NaN or Inf (as this server writes them):
    the numbers as float64 with NaN for each null, and where the nulls are. The session's
    nonfinite policy then decides, as for any NaN."""
    try:
        leaves = np.array(value, dtype=object)
        flat = leaves.reshape(-1).tolist()
        if not all(x is None or type(x) in (int, float) for x in flat):
            raise ValueError("not numbers")
        nulls = np.array([x is None for x in flat], dtype=bool).reshape(leaves.shape)
        numbers = np.array([np.nan if x is None else x for x in flat], dtype=np.float64)
        return numbers.reshape(leaves.shape), nulls
    except (ValueError, TypeError, OverflowError):
        raise InvalidTensor(
            f"tensor {name!r} must hold only numbers or null (and be rectangular)", tensor=name
        ) from None


def _holds_booleans(value: Any) -> bool:
    """Whether a rectangular nested list holds true or false (numpy would read them as 1, 0)."""
    level = value
    while isinstance(level, list) and level and isinstance(level[0], list):
        level = list(chain.from_iterable(level))
    return isinstance(level, list) and bool in set(map(type, level))


def json_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Tensors ready for :func:`encode_json`: rank 0 becomes a bare number.

    A rank-0 tensor stays a numpy scalar (not a Python float), so that a float32 value is
    written, as arrays are, in the shortest form that reads back as the same float32:
    ``0.49``, not ``0.49000000953674316``."""
    return {n: (a[()] if a.ndim == 0 else a) for n, a in tensors.items()}


def encode_json(payload: Any) -> bytes:
    """JSON with numpy arrays as nested lists (NaN and Inf become null)."""
    try:
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY, default=_json_default)
    except orjson.JSONEncodeError:
        # orjson refuses integers beyond 64 bits (an option such as a schedule's step_size of
        # 1e21 arrives as a float and is kept as an int): write those as floats instead.
        return orjson.dumps(
            _wide_ints_as_floats(payload),
            option=orjson.OPT_SERIALIZE_NUMPY,
            default=_json_default,
        )


def _wide_ints_as_floats(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < 1 << 64 else float(value)
    if isinstance(value, dict):
        return {k: _wide_ints_as_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wide_ints_as_floats(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):  # non-contiguous or a dtype orjson lacks
        return np.ascontiguousarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")
