"""Request bodies to tensors and pushes, tensors to response bodies, in either encoding."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import orjson
from optserver_client.vocabulary import (
    BASE_VERSION_KEY,
    GROUPS_KEY,
    LR_KEY,
    PARAMS_PREFIX,
    PARTIAL_KEY,
    WORKER_KEY,
    ProblemSlug,
)

from optserver.config import Settings
from optserver.errors import InvalidTensor, LimitExceeded, UnprocessableContent
from optserver.push import Push
from optserver.replies import Format
from optserver.schemas import ParamsRequest, StepRequest, parse_json
from optserver.session import Session
from optserver.wire import (
    Buffer,
    Limits,
    decode_json_tensor,
    decode_safetensors,
)

__all__ = [
    "decode_params",
    "decode_push",
    "decode_tensors_json",
    "limits",
]


def limits(settings: Settings) -> Limits:
    return Limits(
        max_tensors=settings.max_tensors_per_session,
        max_elements=settings.max_tensor_elements,
        max_depth=settings.max_json_depth,
    )


def decode_tensors_json(
    values: Mapping[str, Any], dtype_of: Callable[[str], np.dtype[Any]], limits: Limits
) -> dict[str, np.ndarray]:
    if len(values) > limits.max_tensors:
        raise LimitExceeded(
            f"{len(values)} tensors in one request; the limit is {limits.max_tensors}",
            slug=ProblemSlug.TOO_MANY_TENSORS,
        )
    return {n: decode_json_tensor(n, v, dtype_of(n), limits) for n, v in values.items()}


def _dtype_of(session: Session, default: str | None) -> Callable[[str], np.dtype[Any]]:
    fallback = np.dtype(default or "float32")

    def dtype(name: str) -> np.dtype[Any]:
        current = session.params.get(name)
        return current.dtype if current is not None else fallback

    return dtype


def decode_params(
    body: Buffer, fmt: Format, session: Session, settings: Settings
) -> dict[str, np.ndarray]:
    """The tensors of a PUT params body."""
    if fmt == "binary":
        tensors, _ = decode_safetensors(body, limits(settings))
        return tensors
    request = parse_json(ParamsRequest, body)
    return decode_tensors_json(request.params, _dtype_of(session, request.dtype), limits(settings))


_INTEGER = re.compile(r"^[0-9]+$")
_NUMBER = re.compile(r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$")


def _metadata_number(metadata: Mapping[str, str], key: str, kind: type) -> Any:
    raw = metadata.get(key)
    if raw is None or raw == "":
        return None
    try:
        if not (_INTEGER if kind is int else _NUMBER).match(raw):
            raise ValueError(raw)  # no "1_0", " 1 " or "nan": plain decimal numbers only
        value = kind(raw)
    except ValueError:
        raise UnprocessableContent(
            f"__metadata__ {key!r} must be {'an integer' if kind is int else 'a number'}, "
            f"got {raw!r}",
            option=key,
        ) from None
    if kind is float and not math.isfinite(value):
        raise UnprocessableContent(f"__metadata__ {key!r} must be finite, got {raw!r}", option=key)
    if kind is int and value < 0:
        raise UnprocessableContent(f"__metadata__ {key!r} must be >= 0, got {raw!r}", option=key)
    return value


def decode_push(body: Buffer, fmt: Format, session: Session, settings: Settings) -> Push:
    """A step body: gradients, optional current weights and the scalar options."""
    lim = limits(settings)
    if fmt == "binary":
        tensors, metadata = decode_safetensors(body, lim)
        grads = {n: t for n, t in tensors.items() if not n.startswith(PARAMS_PREFIX)}
        params = {
            n[len(PARAMS_PREFIX) :]: t for n, t in tensors.items() if n.startswith(PARAMS_PREFIX)
        }
        worker = _worker(metadata.get(WORKER_KEY) or None, f"__metadata__ {WORKER_KEY!r}")
        return Push(
            grads=grads,
            params={k: _as_param(k, v) for k, v in params.items()},
            lr=_metadata_number(metadata, LR_KEY, float),
            base_version=_metadata_number(metadata, BASE_VERSION_KEY, int),
            worker=worker,
            groups=_metadata_groups(metadata.get(GROUPS_KEY)),
            partial=_metadata_flag(metadata, PARTIAL_KEY),
        )
    request = parse_json(StepRequest, body)
    if request.lr is not None and not math.isfinite(request.lr):
        raise UnprocessableContent(f"lr must be finite, got {request.lr!r}", option="lr")
    dtype_of = _dtype_of(session, request.dtype)
    return Push(
        grads=decode_tensors_json(request.grads, dtype_of, lim),
        params=decode_tensors_json(request.params or {}, dtype_of, lim),
        lr=request.lr,
        base_version=request.base_version,
        worker=_worker(request.worker, "worker"),
        groups=_groups(request.groups, "groups"),
        partial=request.partial,
    )


def _metadata_flag(metadata: Mapping[str, str], key: str) -> bool:
    raw = metadata.get(key, "")
    if raw not in ("", "true", "false"):
        raise UnprocessableContent(
            f"__metadata__ {key!r} must be 'true' or 'false', got {raw!r}", option=key
        )
    return raw == "true"


def _metadata_groups(raw: str | None) -> dict[str, dict[str, Any]] | None:
    """The ``groups`` of a safetensors step: JSON text (parsed, never evaluated)."""
    if raw is None or raw == "":
        return None
    where = f"__metadata__ {GROUPS_KEY!r}"
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UnprocessableContent(
            f"{where} must be JSON text of an object, got invalid JSON: {exc}", option=GROUPS_KEY
        ) from None
    return _groups(value, where)


def _groups(value: object, where: str) -> dict[str, dict[str, Any]] | None:
    """Per-group options of a step: an object of objects (their values are checked by the
    optimizer, as any hyperparameter)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise UnprocessableContent(
            f"{where} must be an object of objects by group name, e.g. "
            f'{{"head": {{"lr": 0.01}}}}, got {value!r:.200}',
            option=GROUPS_KEY,
        )
    return value or None


def _worker(worker: str | None, where: str) -> str | None:
    """A worker id: at most 256 printable characters (JSON escapes can spell control
    characters or half a UTF-16 pair, which no encoder writes back: info would fail)."""
    if worker is None:
        return None
    if len(worker) > 256:
        raise UnprocessableContent(f"{where} is longer than 256 characters", option="worker")
    if not worker.isprintable():
        raise UnprocessableContent(
            f"{where} must be printable Unicode text, got {worker[:64]!r}", option="worker"
        )
    return worker


def _as_param(name: str, value: np.ndarray) -> np.ndarray:
    if value.dtype.kind != "f":
        raise InvalidTensor(f"weights {name!r} must be floats, got {value.dtype}", tensor=name)
    return value
