"""A session as one set of named arrays plus a JSON record: the export/import format.

Layout of the safetensors document (``GET /v1/sessions/{id}/state``):

- ``params/NAME``: the weights;
- ``state/NAME/FIELD``: optimizer state arrays (torch's names: ``exp_avg``, ``sum``, ...);
- ``__metadata__["optserver.session"]``: JSON with the optimizer config, mode, schedule, NaN
  policy, version, per-tensor step counts and counters; ``__metadata__["optserver.format"]``
  is ``"1"``.

Importing validates all of it (names, shapes, dtypes, options) before a session exists, and the
imported session continues bit for bit where the exported one stood.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optserver.config import NonFinitePolicy
from optserver.errors import BadRequest, InvalidTensor, UnprocessableContent
from optserver.modes import Mode
from optserver.optim import OptimError
from optserver.store import Session, SessionStore

__all__ = ["FORMAT", "export_session", "import_session"]

FORMAT = "1"
RECORD_KEY = "optserver.session"
FORMAT_KEY = "optserver.format"


class SessionRecord(BaseModel):
    """The JSON part of an export."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=256)
    optimizer: dict[str, Any]
    mode: Mode
    schedule: dict[str, Any] | None = None
    nonfinite: NonFinitePolicy = "reject"
    version: int = Field(ge=0)
    steps: dict[str, int]
    steps_applied: int = Field(0, ge=0)
    pushes_received: int = Field(0, ge=0)
    rejected: dict[str, int] = Field(default_factory=dict)
    created_at: float = 0.0


def export_session(session: Session) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (views: encode them under ``session.locked()``) and metadata of a session."""
    tensors: dict[str, np.ndarray] = {}
    for name, param in session.params.items():
        tensors[f"params/{name}"] = param
        for field, array in session.state[name].arrays().items():
            tensors[f"state/{name}/{field}"] = array
    record = SessionRecord(
        name=session.name,
        optimizer=session.optimizer.config(),
        mode=session.mode,
        schedule=None if session.schedule is None else session.schedule.config(),
        nonfinite=session.nonfinite,
        version=session.version,
        steps={n: s.step for n, s in session.state.items()},
        steps_applied=session.steps_applied,
        pushes_received=session.pushes_received,
        rejected=dict(session.rejected),
        created_at=session.created_at,
    )
    return tensors, {FORMAT_KEY: FORMAT, RECORD_KEY: record.model_dump_json()}


def import_session(
    store: SessionStore,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str],
    *,
    name: str | None = None,
) -> tuple[Session, str]:
    """A new session (new id and token) from an export; nothing is created if anything is off."""
    if metadata.get(FORMAT_KEY) != FORMAT or RECORD_KEY not in metadata:
        raise BadRequest(
            f"not an optserver state export: __metadata__ needs {FORMAT_KEY!r} = {FORMAT!r} "
            f"and {RECORD_KEY!r}"
        )
    try:
        record = SessionRecord.model_validate(orjson.loads(metadata[RECORD_KEY]))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise UnprocessableContent(f"invalid session record in the export: {exc}") from None
    params: dict[str, np.ndarray] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "params" and rest:
            params[rest] = array
        elif kind == "state" and "/" in rest:
            tensor, _, field = rest.rpartition("/")
            arrays.setdefault(tensor, {})[field] = array
        else:
            raise InvalidTensor(f"unexpected tensor {key!r} in the export", tensor=key)
    for tensor in list(arrays) + list(record.steps):
        if tensor not in params:
            raise InvalidTensor(
                f"the export has state but no weights for {tensor!r}", tensor=tensor
            )
    session, token = store.create(
        optimizer=record.optimizer,
        name=name if name is not None else record.name,
        mode=record.mode,
        schedule=record.schedule,
        nonfinite=record.nonfinite,
        params=None,
    )
    try:
        with session.locked():
            session.put_params(params)
            for tensor, param in session.params.items():
                try:
                    session.state[tensor] = session.optimizer.restore_tensor(
                        param, step=record.steps.get(tensor, 0), arrays=arrays.get(tensor, {})
                    )
                except OptimError as exc:
                    raise InvalidTensor(str(exc), tensor=tensor) from None
            session.version = record.version
            session.steps_applied = record.steps_applied
            session.pushes_received = record.pushes_received
            session.rejected.update(record.rejected)
            session.created_at = record.created_at or session.created_at
    except Exception:
        store.delete(session.id)
        raise
    return session, token
