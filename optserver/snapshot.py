"""A session as one set of named arrays plus a JSON record: the export/import format, and the
unit of the data directory's snapshots and journal.

Layout of the safetensors document (``GET /v1/sessions/{id}/state``):

- ``params/NAME``: the weights;
- ``state/NAME/FIELD``: optimizer state arrays (torch's names: ``exp_avg``, ``sum``, ...);
- ``__metadata__["optserver.session"]``: JSON with the optimizer config, mode, schedule, NaN
  policy, version, per-tensor step counts and counters; ``__metadata__["optserver.format"]``
  is ``"1"``.

Importing validates all of it (names, shapes, dtypes, options) before a session exists, and the
imported session continues bit for bit where the exported one stood. The data directory keeps
more (``private``): the session's id and token digest, its idempotency memory (answers as
``memo/N`` byte tensors) and per-worker bookkeeping, so that a restarted server is the same
server.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Annotated, Any

import numpy as np
import orjson
from optserver_client.vocabulary import (
    BINARY,
    PARAMS_PREFIX,
    STATE_FORMAT,
    STATE_FORMAT_KEY,
    STATE_IDENTITY_KEY,
    STATE_PREFIX,
    STATE_RECORD_KEY,
    ProblemSlug,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optserver.admission import hyper
from optserver.config import NonFinitePolicy
from optserver.errors import BadRequest, InvalidTensor, UnprocessableContent, invalid_fields
from optserver.frozen import Frozen
from optserver.modes import Mode
from optserver.optim import OptimError, ParamGroups
from optserver.optim.schedules import create_schedule
from optserver.replay import Remembered
from optserver.replies import Returns
from optserver.session import Session, SessionLimits
from optserver.sharding import SESSION_ID_PATTERN, TOKEN_PATTERN, Sharding
from optserver.store import SessionStore

__all__ = [
    "FORMAT",
    "IDENTITY_KEY",
    "SessionRecord",
    "export_session",
    "import_session",
    "restore_session",
    "split_tensors",
]

FORMAT = STATE_FORMAT
RECORD_KEY = STATE_RECORD_KEY
FORMAT_KEY = STATE_FORMAT_KEY
#: Of an import document only: the id and token the new session gets (JSON, see Identity).
IDENTITY_KEY = STATE_IDENTITY_KEY


class MemoEntry(BaseModel):
    key: str
    names: list[str]
    applied: bool
    version: int
    #: The kept answer's encoding: safetensors, or None when it was too large to keep (an
    #: older JSON body is not kept across a restart: its replay is re-encoded).
    media_type: str | None = None
    returns: Returns = "stepped"
    fingerprint: str | None = None


class Private(BaseModel):
    """What only the data directory keeps."""

    id: str
    token_digest: str
    memo: list[MemoEntry] = Field(default_factory=list)
    workers: dict[str, Any] = Field(default_factory=dict)
    staleness: dict[str, Any] = Field(default_factory=dict)
    updated_at: float = 0.0


class Identity(BaseModel):
    """The id and token an import may choose, as a creation may (a sharded session's shards
    share both): the import document's ``__metadata__[IDENTITY_KEY]``, never in an export."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, pattern=SESSION_ID_PATTERN)
    token: str | None = Field(None, pattern=TOKEN_PATTERN)


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
    rejected: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    created_at: float = 0.0
    sharding: Sharding | None = None
    private: Private | None = None


def export_session(
    session: Session, *, private: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (the session's own arrays: encode them under ``session.locked()``) and
    metadata of a session."""
    tensors, record = session_tensors(session, private=private)
    return tensors, {FORMAT_KEY: FORMAT, RECORD_KEY: record.model_dump_json()}


def session_tensors(
    session: Session, *, private: bool = False
) -> tuple[dict[str, np.ndarray], SessionRecord]:
    """The arrays and record of a session; call it with the session's lock held. Weights and
    state are the session's own arrays (they change with its next step); ``memo/N`` arrays
    are immutable."""
    tensors: dict[str, np.ndarray] = {}
    for name, param in session.params.items():
        tensors[PARAMS_PREFIX + name] = param
        for field, array in session.state[name].arrays().items():
            tensors[f"{STATE_PREFIX}{name}/{field}"] = array
    extra = None
    if private:
        memo = []
        for index, (key, remembered) in enumerate(session.replays.entries()):
            memo.append(
                MemoEntry(
                    key=key,
                    names=list(remembered.names),
                    applied=remembered.applied,
                    version=remembered.version,
                    media_type=None if remembered.body is None else BINARY,
                    returns=remembered.returns,
                    fingerprint=remembered.fingerprint,
                )
            )
            body = remembered.body
            if body is not None:
                tensors[f"memo/{index}"] = np.frombuffer(body, dtype=np.uint8)
        extra = Private(
            id=session.id,
            token_digest=session.token_digest.hex(),
            memo=memo,
            workers=session.workers.to_dict(),
            staleness={"counts": session.staleness.counts, "total": session.staleness.total},
            updated_at=session.updated_at,
        )
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
        sharding=session.sharding,
        private=extra,
    )
    return tensors, record


def parse_record(raw: str | bytes) -> SessionRecord:
    try:
        return SessionRecord.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise UnprocessableContent(f"{RECORD_KEY!r} in the export is not JSON: {exc}") from None
    except ValidationError as exc:
        raise invalid_fields(exc, RECORD_KEY) from None


def split_tensors(
    tensors: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], dict[int, np.ndarray]]:
    """``params/NAME``, ``state/NAME/FIELD`` and ``memo/N`` tensors, sorted out."""
    params: dict[str, np.ndarray] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    memo: dict[int, np.ndarray] = {}
    for key, array in tensors.items():
        kind, _, rest = key.partition("/")
        if kind + "/" == PARAMS_PREFIX and rest:
            params[rest] = array
        elif kind + "/" == STATE_PREFIX and "/" in rest:
            tensor, _, field = rest.rpartition("/")
            arrays.setdefault(tensor, {})[field] = array
        elif kind == "memo" and rest.isdigit():
            memo[int(rest)] = array
        else:
            raise InvalidTensor(f"unexpected tensor {key!r} in the export", tensor=key)
    return params, arrays, memo


def restore_session(
    record: SessionRecord,
    tensors: dict[str, np.ndarray],
    limits: SessionLimits,
    *,
    token_digest: bytes | None = None,
    name: str | None = None,
    id: str | None = None,
) -> Session:
    """A session rebuilt from a record and its tensors; raises (a problem) if anything is off.

    Without ``token_digest`` the record's private part (id, digest, memory) is used; with it,
    ``id`` (default: a new one).
    """
    params, arrays, memo = split_tensors(tensors)
    if token_digest is None and record.private is None:
        raise BadRequest("the record has no identity to restore")
    private = record.private if token_digest is None else None
    for tensor in list(arrays) + list(record.steps):
        if tensor not in params:
            raise InvalidTensor(
                f"the export has state but no weights for {tensor!r}", tensor=tensor
            )
    session = Session(
        name=name if name is not None else record.name,
        optimizer=hyper(lambda: ParamGroups.create(record.optimizer)),
        schedule=hyper(lambda: create_schedule(record.schedule)),
        mode=record.mode,
        nonfinite=record.nonfinite,
        limits=limits,
        token_digest=token_digest or bytes.fromhex(private.token_digest if private else ""),
        id=id if private is None else private.id,
        sharding=record.sharding,
    )
    with session.locked():
        nonfinite, session.nonfinite = session.nonfinite, "allow"  # restore what was there
        session.put_params(params)
        session.nonfinite = nonfinite
        for tensor in session.params:
            try:
                session.restore_tensor(
                    tensor, step=record.steps.get(tensor, 0), arrays=arrays.get(tensor, {})
                )
            except OptimError as exc:
                raise InvalidTensor(str(exc), tensor=tensor) from None
            if session.state[tensor].nonfinite and private is None and nonfinite != "allow":
                raise InvalidTensor(
                    f"tensor {tensor!r} holds NaN or Inf in its weights or optimizer state, "
                    f"and the session's nonfinite policy is {nonfinite!r}: import it with "
                    "the policy 'allow', or repair the export",
                    slug=ProblemSlug.NONFINITE,
                    tensor=tensor,
                )
        session.version = record.version
        session.steps_applied = record.steps_applied
        session.pushes_received = record.pushes_received
        session.rejected.update(record.rejected)
        session.created_at = record.created_at or session.created_at
        if private is not None:
            _restore_private(session, private, memo)
    return session


def _restore_private(session: Session, private: Any, memo: dict[int, np.ndarray]) -> None:
    remembered: OrderedDict[str, Remembered] = OrderedDict()
    for index, entry in enumerate(private.memo):
        kept = None
        if entry.media_type == BINARY and index in memo:
            kept = Frozen.from_document(memo[index].tobytes())
        remembered[entry.key] = Remembered(
            kept, entry.returns, tuple(entry.names), entry.applied, entry.version,
            entry.fingerprint,
        )  # fmt: skip
    session.replays.restore(remembered)
    session.workers.restore(private.workers)
    counts = private.staleness.get("counts")
    if counts and len(counts) == len(session.staleness.counts):
        session.staleness.counts = [int(c) for c in counts]
        session.staleness.total = int(private.staleness.get("total", 0))
    session.updated_at = private.updated_at or session.updated_at
    session.rejected = Counter(session.rejected)


def import_session(
    store: SessionStore,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str],
    *,
    name: str | None = None,
) -> tuple[Session, str]:
    """A new session from an export (a new id and token, or those of ``IDENTITY_KEY`` in its
    metadata); nothing is created if anything is off."""
    if metadata.get(FORMAT_KEY) != FORMAT or RECORD_KEY not in metadata:
        raise BadRequest(
            f"not an optserver state export: __metadata__ needs {FORMAT_KEY!r} = {FORMAT!r} "
            f"and {RECORD_KEY!r}"
        )
    record = parse_record(metadata[RECORD_KEY])
    record.private = None  # an import is a new session: never another server's identity
    identity = parse_identity(metadata.get(IDENTITY_KEY))
    token, digest = store.new_token(identity.token)
    session = restore_session(
        record, tensors, store.limits, token_digest=digest, name=name, id=identity.id
    )
    store.add(session)
    return session, token


def parse_identity(raw: str | None) -> Identity:
    """The id and token an import asks for (each optional), from ``IDENTITY_KEY``."""
    if raw is None:
        return Identity()
    try:
        return Identity.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise UnprocessableContent(f"{IDENTITY_KEY!r} in the import is not JSON: {exc}") from None
    except ValidationError as exc:
        raise invalid_fields(exc, IDENTITY_KEY) from None
