"""Requests and responses of the optserver HTTP API, without any I/O.

Every API operation is built here as a :class:`Call`: method, path, headers, body, how much
retrying it tolerates, and the function that turns the successful :class:`Reply` into the
result. The sync and async clients only send calls (see ``Client._request``), so everything about
the protocol lives once, in this module.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeAlias, TypeVar, cast
from urllib.parse import quote

import httpx
import numpy as np

from optserver_client._codec import (
    Array,
    TensorLike,
    as_array,
    decode_json,
    decode_json_tensor,
    decode_safetensors,
    dtype_of,
    encode_json,
    encode_json_tensor,
)
from optserver_client._retry import Retry
from optserver_client.exceptions import (
    ConflictError,
    ProtocolError,
    ServerError,
    ShardError,
    StaleGradientError,
    TransportError,
    error_from_parts,
)
from optserver_client.safetensors_io import (
    Buffer,
    DocumentSink,
    SafetensorsError,
    allocate,
    encode_parts,
)
from optserver_client.vocabulary import (
    APPLIED_KEY,
    BASE_VERSION_KEY,
    BINARY,
    GROUPS_KEY,
    IDEMPOTENCY_KEY_HEADER,
    JSON,
    LR_KEY,
    PARAMS_PREFIX,
    PARTIAL_KEY,
    RETURN_MODES,
    VERSION_HEADER,
    VERSION_KEY,
    WORKER_KEY,
    ProblemSlug,
    ReturnMode,
    problem_type,
)

__all__ = [
    "UNSET",
    "Call",
    "ClientCore",
    "CreatePlan",
    "Reply",
    "SessionCore",
    "Unset",
]

T = TypeVar("T")

_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")

Tensors: TypeAlias = Mapping[str, TensorLike]
#: Hyperparameters for one step, by parameter group name: ``{"head": {"lr": 0.01}}``.
GroupOptions: TypeAlias = Mapping[str, Mapping[str, Any]]
#: See ``_wire.SinkFactory``: a response's status, media type and size -> a sink or None.
SinkFactory: TypeAlias = Callable[[int, str, int], DocumentSink | None]


class Unset(enum.Enum):
    """Marks an argument that was not given, where None is a meaningful value."""

    UNSET = enum.auto()


UNSET = Unset.UNSET


#: Bodies are sent in slices of this size (see :meth:`Call.request_content`).
SEND_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Reply:
    """A response, fully read: the body is writable so that decoded arrays are writable."""

    status: int
    headers: httpx.Headers
    body: Buffer
    #: The tensors and metadata of a body read into place (see :attr:`Call.into`); ``body`` is
    #: then empty.
    decoded: tuple[dict[str, Array], dict[str, str]] | None = None

    @property
    def media_type(self) -> str:
        content_type: str = self.headers.get("content-type", "")
        return content_type.split(";")[0].strip().lower()

    def json(self) -> Any:
        try:
            return decode_json(self.body)
        except ValueError as exc:
            raise ProtocolError(f"response body is not JSON: {exc}") from None

    def json_object(self) -> dict[str, Any]:
        document = self.json()
        if not isinstance(document, dict):
            raise ProtocolError(f"expected a JSON object, got {type(document).__name__}")
        return document


class BodyReader:
    """Collects a response body into one writable buffer, preallocated from Content-Length
    (numpy memory: no zero-filling, huge pages), so that arrays decoded from it are views; or,
    when ``sink`` offers one, into a :class:`DocumentSink` (each tensor in its place)."""

    def __init__(
        self,
        status: int,
        headers: httpx.Headers,
        allocate: Callable[[int], memoryview] = allocate,
        sink: SinkFactory | None = None,
    ) -> None:
        declared = headers.get("content-length")
        self._size = int(declared) if declared and declared.isdigit() else None
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        self._document = sink(status, media, self._size) if sink and self._size else None
        self._fixed = allocate(self._size) if self._size and not self._document else None
        self._grown = bytearray()
        self._position = 0

    def feed(self, chunk: bytes) -> None:
        if self._document is not None:
            try:
                self._document.feed(chunk)
            except SafetensorsError as exc:
                raise ProtocolError(f"invalid safetensors document: {exc}") from None
            return
        end = self._position + len(chunk)
        if self._fixed is not None and end <= len(self._fixed):
            self._fixed[self._position : end] = chunk
        else:
            if self._fixed is not None:  # longer than declared: fall back to growing
                self._grown += self._fixed[: self._position]
                self._fixed = None
            self._grown += chunk
        self._position = end

    def body(self) -> Buffer:
        if self._fixed is not None:
            return self._fixed[: self._position]
        return self._grown

    def decoded(self) -> tuple[dict[str, Array], dict[str, str]] | None:
        if self._document is None:
            return None
        try:
            return self._document.result()
        except SafetensorsError as exc:
            raise ProtocolError(f"invalid safetensors document: {exc}") from None


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One API request, sent as often as its retry policy allows, and the parser of its result.

    The same object serves every attempt, so headers such as ``Idempotency-Key`` are identical on
    all of them.
    """

    method: str
    path: str
    parse: Callable[[Reply], T]
    retry: Retry = Retry.SAFE
    params: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: One buffer, or pieces sent in order (a safetensors header, then views of the arrays).
    content: Buffer | tuple[Buffer, ...] | None = None
    #: Arrays that a successful safetensors answer's tensors of these names are read into
    #: (same dtype and shape; any other tensor gets a new array): no copy after the read.
    into: Mapping[str, Array] | None = None

    def sink(self, status: int, media_type: str, size: int) -> DocumentSink | None:
        """Where a response body goes: a sink into :attr:`into` for a successful
        safetensors answer, else None (one buffer)."""
        if self.into is None or not 200 <= status < 300 or media_type != BINARY:
            return None
        return DocumentSink(size, self.into)

    def body_parts(self) -> tuple[Buffer, ...]:
        """The body as buffers to send one after the other (none: no body)."""
        content = self.content
        if content is None:
            return ()
        return content if isinstance(content, tuple) else (content,)

    def request_content(self) -> tuple[bytes | Iterator[bytes] | None, dict[str, str]]:
        """The body for httpx, and headers to add.

        A large body goes in slices with an explicit Content-Length: httpx would otherwise
        hand it to h11 whole, which copies it into a new bytes object first.
        """
        if self.content is None:
            return None, {}
        views = [memoryview(part).cast("B") for part in self.body_parts()]
        size = sum(len(view) for view in views)
        if size <= SEND_CHUNK:
            return b"".join(views), {}
        # Slices of memoryviews: h11 and the socket take any bytes-like object.
        slices = (
            view[i : i + SEND_CHUNK] for view in views for i in range(0, len(view), SEND_CHUNK)
        )
        return cast(Iterator[bytes], slices), {"Content-Length": str(size)}

    def finish(self, reply: Reply) -> T:
        """The result of a final reply; the matching :class:`APIError` for an error status."""
        if not 200 <= reply.status < 300:
            raise error_from_parts(reply.status, reply.headers, reply.body)
        return self.parse(reply)


@dataclass(frozen=True, slots=True)
class CreatePlan:
    """Creating a session: the POST, then (binary mode) a PUT of the initial weights."""

    create: Call[SessionCore]
    upload: dict[str, Array] | None


class ClientCore:
    """The client-level calls: create, list and import sessions, health."""

    def __init__(self, *, binary: bool, admin_key: str | None) -> None:
        self.binary = binary
        self.admin_key = admin_key

    def auth(self, token: str | None = None) -> dict[str, str]:
        secret = token if token is not None else self.admin_key
        return {"Authorization": f"Bearer {secret}"} if secret is not None else {}

    def create_session(
        self,
        params: Tensors | None,
        optimizer: str | Mapping[str, Any],
        *,
        mode: str | Mapping[str, Any] | None,
        schedule: Mapping[str, Any] | None,
        name: str | None,
        nonfinite: str | None,
        dtype: str | np.dtype[Any] | None,
        id: str | None = None,
        token: str | None = None,
        sharding: Mapping[str, Any] | None = None,
    ) -> CreatePlan:
        """``id`` and ``token`` choose the session's (the shards of a sharded session share
        them); ``sharding`` is the shard's description (see :mod:`optserver_client.sharding`)."""
        wire_dtype = None if dtype is None else dtype_of(dtype).newbyteorder("<")
        arrays = None if params is None else weight_arrays(params, dtype)
        body: dict[str, Any] = {"optimizer": _options(optimizer)}
        for key, value in (
            ("name", name),
            ("mode", None if mode is None else _options(mode)),
            ("schedule", None if schedule is None else dict(schedule)),
            ("nonfinite", nonfinite),
            ("id", id),
            ("token", token),
            ("sharding", None if sharding is None else dict(sharding)),
        ):
            if value is not None:
                body[key] = value
        if wire_dtype is not None:
            body["dtype"] = wire_dtype.name
        upload = None
        if arrays:
            if self.binary:  # large weights travel as safetensors, in a PUT after the POST
                upload = arrays
            else:
                body["params"] = {n: encode_json_tensor(a) for n, a in arrays.items()}
                body.setdefault("dtype", _common_dtype(arrays).name)
        default = wire_dtype if wire_dtype is not None else _F32
        call = Call(
            "POST",
            "/v1/sessions",
            lambda reply: self._new_session(reply, default),
            retry=Retry.CONNECT,
            headers={**self.auth(), "Content-Type": JSON, "Accept": JSON},
            content=encode_json(body),
        )
        return CreatePlan(call, upload)

    def session(self, id: str, token: str | None = None) -> SessionCore:
        return SessionCore(self, id, token)

    def list_sessions(self) -> Call[list[dict[str, Any]]]:
        def parse(reply: Reply) -> list[dict[str, Any]]:
            sessions = reply.json_object().get("sessions")
            if not isinstance(sessions, list):
                raise ProtocolError("the session list lacks its 'sessions' array")
            return sessions

        return Call("GET", "/v1/sessions", parse, headers={**self.auth(), "Accept": JSON})

    def import_state(
        self, data: bytes | bytearray | memoryview | tuple[Buffer, ...], name: str | None
    ) -> Call[SessionCore]:
        """POST an export document (one buffer, or the pieces of :func:`encode_parts`)."""
        return Call(
            "POST",
            "/v1/sessions/import",
            lambda reply: self._new_session(reply, _F32),
            retry=Retry.CONNECT,
            params=None if name is None else {"name": name},
            headers={**self.auth(), "Content-Type": BINARY, "Accept": JSON},
            content=data if isinstance(data, tuple) else bytes(data),
        )

    def health(self) -> Call[dict[str, Any]]:
        return Call("GET", "/healthz", Reply.json_object, headers={"Accept": JSON})

    def _new_session(self, reply: Reply, default_dtype: np.dtype[Any]) -> SessionCore:
        info = reply.json_object()
        try:
            id, token = str(info["id"]), str(info["token"])
        except KeyError as exc:
            raise ProtocolError(f"the new session's description lacks {exc}") from None
        core = SessionCore(self, id, token, default_dtype=default_dtype)
        core.observe_info(info)
        return core


class SessionCore:
    """The calls of one session, and what the client knows of it.

    ``version`` is the last version any response showed. ``dtypes`` remembers each tensor's dtype
    (from session descriptions and the weights sent), to cast gradients and to decode JSON.
    """

    def __init__(
        self,
        client: ClientCore,
        id: str,
        token: str | None,
        *,
        default_dtype: np.dtype[Any] = _F32,
    ) -> None:
        self.client = client
        self.id = id
        self.token = token
        self.version = 0
        self.last_applied: bool | None = None
        self.default_dtype = default_dtype
        self.dtypes: dict[str, np.dtype[Any]] = {}
        self._path = f"/v1/sessions/{quote(id, safe='')}"

    # -- calls --------------------------------------------------------------------------------

    def step(
        self,
        grads: Tensors,
        *,
        lr: float | None,
        groups: GroupOptions | None,
        params: Tensors | None,
        base_version: int | None,
        worker: str | None,
        return_: ReturnMode,
        key: str | None = None,
        into: Mapping[str, Array] | None = None,
        partial: bool = False,
    ) -> Call[dict[str, Array]]:
        """POST .../step; the result is the returned weights (empty for return="none").
        ``key``: its Idempotency-Key (default: a new one); ``into``: see :attr:`Call.into`;
        ``partial``: a part of a step that a later push completes (the version stays)."""
        if return_ not in RETURN_MODES:
            modes = ", ".join(repr(mode) for mode in RETURN_MODES)
            raise ValueError(f"return_ must be one of {modes}, not {return_!r}")
        grad_arrays = {n: self._tensor(n, g, keep_f16=True) for n, g in grads.items()}
        if not grad_arrays:
            raise ValueError("a step needs at least one gradient")
        param_arrays = {n: self._tensor(n, p) for n, p in (params or {}).items()}
        for name, array in param_arrays.items():
            self.dtypes.setdefault(name, array.dtype)  # registered on first sight
        scalars: dict[str, Any] = {}
        if lr is not None:
            scalars[LR_KEY] = float(lr)
        if base_version is not None:
            scalars[BASE_VERSION_KEY] = int(base_version)
        if worker is not None:
            scalars[WORKER_KEY] = str(worker)
        # A gradient named "params/..." would read as weights in safetensors: send JSON instead.
        binary = self.client.binary and not any(n.startswith(PARAMS_PREFIX) for n in grad_arrays)
        if binary:
            tensors = dict(grad_arrays)
            tensors.update({PARAMS_PREFIX + n: a for n, a in param_arrays.items()})
            metadata = {k: repr(v) if isinstance(v, float) else str(v) for k, v in scalars.items()}
            if groups:
                metadata[GROUPS_KEY] = encode_json(_group_options(groups)).decode()
            if partial:
                metadata[PARTIAL_KEY] = "true"
            # Pieces, not one joined document: the arrays' own bytes are sent (scatter-gather).
            content: Buffer | tuple[Buffer, ...] = encode_parts(tensors, metadata)
            content_type = BINARY
        else:
            body: dict[str, Any] = {"grads": _json_tensors(grad_arrays)}
            if param_arrays:
                body["params"] = _json_tensors(param_arrays)
            body.update(scalars)
            if groups:
                body[GROUPS_KEY] = _group_options(groups)
            if partial:
                body[PARTIAL_KEY] = True
            content, content_type = encode_json(body), JSON
        # A push without weights to return is acknowledged in JSON whatever the mode: it is tiny.
        accept = BINARY if self.client.binary and return_ != "none" else JSON
        headers = {
            **self.client.auth(self.token),
            "Content-Type": content_type,
            "Accept": accept,
            # One key per logical push, reused by every retry: the server applies it only once.
            IDEMPOTENCY_KEY_HEADER: key if key is not None else new_key(),
        }
        return Call(
            "POST",
            f"{self._path}/step",
            self._parse_step,
            params={"return": return_},
            headers=headers,
            content=content,
            into=into,
        )

    def pull(
        self, names: str | Iterable[str] | None, into: Mapping[str, Array] | None = None
    ) -> Call[dict[str, Array]]:
        """GET .../params (``into``: see :attr:`Call.into`)."""
        query = None
        if names is not None:
            joined = names if isinstance(names, str) else ",".join(names)
            query = {"names": joined}
        return Call(
            "GET",
            f"{self._path}/params",
            self._parse_weights,
            params=query,
            headers={**self.client.auth(self.token), "Accept": self._accept()},
            into=into,
        )

    def set_params(self, params: Tensors) -> Call[dict[str, Any]]:
        arrays = _param_arrays(params, None)
        if not arrays:
            raise ValueError("set_params needs at least one tensor")
        content: Buffer | tuple[Buffer, ...]
        if self.client.binary:
            content, content_type = encode_parts(arrays, None), BINARY
        else:
            body = {"params": _json_tensors(arrays), "dtype": _common_dtype(arrays).name}
            content, content_type = encode_json(body), JSON
        headers = {**self.client.auth(self.token), "Content-Type": content_type, "Accept": JSON}
        return Call(
            "PUT",
            f"{self._path}/params",
            self._parse_info,
            retry=Retry.CONNECT,
            headers=headers,
            content=content,
        )

    def info(self) -> Call[dict[str, Any]]:
        headers = {**self.client.auth(self.token), "Accept": JSON}
        return Call("GET", self._path, self._parse_info, headers=headers)

    def update(
        self,
        *,
        optimizer: Mapping[str, Any] | None,
        schedule: Mapping[str, Any] | Unset | None,
        mode: str | Mapping[str, Any] | None,
        nonfinite: str | None,
    ) -> Call[dict[str, Any]]:
        body: dict[str, Any] = {}
        if optimizer is not None:
            body["optimizer"] = dict(optimizer)
        if schedule is not UNSET:
            body["schedule"] = None if schedule is None else dict(schedule)  # null: no schedule
        if mode is not None:
            body["mode"] = _options(mode)
        if nonfinite is not None:
            body["nonfinite"] = nonfinite
        if not body:
            raise ValueError("update needs at least one of optimizer, schedule, mode, nonfinite")
        headers = {**self.client.auth(self.token), "Content-Type": JSON, "Accept": JSON}
        return Call(
            "PATCH",
            self._path,
            self._parse_info,
            retry=Retry.CONNECT,
            headers=headers,
            content=encode_json(body),
        )

    def export_state(self) -> Call[bytes]:
        headers = {**self.client.auth(self.token), "Accept": BINARY}
        return Call("GET", f"{self._path}/state", self._parse_state, headers=headers)

    def delete(self) -> Call[None]:
        return Call(
            "DELETE",
            self._path,
            lambda reply: None,
            retry=Retry.CONNECT,
            headers=self.client.auth(self.token),
        )

    # -- responses ----------------------------------------------------------------------------

    def observe_info(self, info: Mapping[str, Any]) -> None:
        """Learn the version and the tensors' dtypes from a session description."""
        if isinstance(info.get("version"), int):
            self.version = info["version"]
        for entry in info.get("params") or ():
            try:
                self.dtypes[str(entry["name"])] = np.dtype(entry["dtype"]).newbyteorder("<")
            except (KeyError, TypeError):
                continue

    def _parse_info(self, reply: Reply) -> dict[str, Any]:
        info = reply.json_object()
        self.observe_info(info)
        self._observe_version(reply, None)
        return info

    def _parse_step(self, reply: Reply) -> dict[str, Array]:
        tensors, scalars = self._decode(reply)
        applied = scalars.get(APPLIED_KEY)
        self.last_applied = applied in (True, "true") if applied is not None else None
        return tensors

    def _parse_weights(self, reply: Reply) -> dict[str, Array]:
        return self._decode(reply)[0]

    def _parse_state(self, reply: Reply) -> bytes:
        self._observe_version(reply, None)
        return bytes(reply.body)

    def _decode(self, reply: Reply) -> tuple[dict[str, Array], Mapping[str, Any]]:
        """Tensors and scalars of a response that carries weights, in either encoding."""
        if reply.decoded is not None:
            tensors, scalars = reply.decoded
            for name, array in tensors.items():
                self.dtypes.setdefault(name, array.dtype)
        elif reply.media_type == BINARY:
            tensors, scalars = decode_safetensors(reply.body)
            for name, array in tensors.items():
                self.dtypes.setdefault(name, array.dtype)
        else:
            document = reply.json_object()
            raw = document.get("params") or {}
            if not isinstance(raw, dict):
                raise ProtocolError("the response's 'params' is not an object")
            tensors = {
                name: decode_json_tensor(value, self.dtypes.get(name, self.default_dtype))
                for name, value in raw.items()
            }
            scalars = document
        self._observe_version(reply, scalars.get(VERSION_KEY))
        return tensors, scalars

    def _observe_version(self, reply: Reply, fallback: Any) -> None:
        for value in (reply.headers.get(VERSION_HEADER), fallback):
            try:
                self.version = int(value)
            except (TypeError, ValueError):
                continue
            return

    # -- helpers ------------------------------------------------------------------------------

    def _accept(self) -> str:
        return BINARY if self.client.binary else JSON

    def _tensor(self, name: str, value: TensorLike, *, keep_f16: bool = False) -> Array:
        """A gradient or weight for tensor ``name``, in that tensor's dtype when it is known.

        float16 gradients stay float16 (compressed transport; the server upcasts them).
        """
        known = self.dtypes.get(name)
        array = as_array(value, default=known if known is not None else self.default_dtype)
        if known is not None and array.dtype != known and not (keep_f16 and array.dtype == _F16):
            array = array.astype(known)
        return array


def new_key() -> str:
    """A fresh Idempotency-Key."""
    return uuid.uuid4().hex


def _options(value: str | Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer or mode given by name alone ("adam") or as options with a "name"."""
    return {"name": value} if isinstance(value, str) else dict(value)


def weight_arrays(params: Tensors, dtype: str | np.dtype[Any] | None) -> dict[str, Array]:
    """Initial weights as a session stores them: cast to ``dtype`` (None: each array's own
    float32/float64 dtype), float16 widened to float32."""
    return _param_arrays(params, None if dtype is None else dtype_of(dtype).newbyteorder("<"))


def _param_arrays(params: Tensors, dtype: np.dtype[Any] | None) -> dict[str, Array]:
    arrays = {}
    for name, value in params.items():
        array = as_array(value, dtype, default=_F32)
        arrays[name] = array.astype(_F32) if array.dtype == _F16 else array  # weights: f32/f64
    return arrays


def _common_dtype(arrays: Mapping[str, Array]) -> np.dtype[Any]:
    dtypes = {a.dtype for a in arrays.values()}
    if len(dtypes) > 1:
        raise ValueError(
            "JSON carries one dtype per request; these tensors mix "
            f"{', '.join(sorted(d.name for d in dtypes))} (send them separately, or use binary)"
        )
    return dtypes.pop() if dtypes else _F32


def _json_tensors(arrays: Mapping[str, Array]) -> dict[str, Any]:
    return {name: encode_json_tensor(array) for name, array in arrays.items()}


_ROUND_FAILED = problem_type(ProblemSlug.ROUND_FAILED)


PushAction = Literal["recompute", "repeat", "complete", "outage"]


def retry_push(error: BaseException) -> PushAction | None:
    """What :meth:`Session.train_step` does after ``error``: pull and recompute the gradients
    (they are stale); push the same ones again (a sync round failed, nothing was applied);
    complete the push (some shards of a sharded session applied it, the others' sync round
    failed: the same request again, same key, which the first answer from memory and the others
    apply in a new round); wait out an outage (a server unreachable or failing: the same push
    again, same key, once it answers); or nothing (re-raise). A push that some shards applied
    and others refused as stale cannot be completed (the key binds the request, base version
    included, and those shards would refuse it again): it is raised."""
    if isinstance(error, ShardError):
        actions = {retry_push(e) for e in error.errors.values()}
        if actions == {"outage"}:
            return "outage"
        return "complete" if actions <= {"repeat", "outage"} else None
    if isinstance(error, (TransportError, ServerError)):
        return "outage"
    if isinstance(error, StaleGradientError):
        return "recompute"
    if isinstance(error, ConflictError) and error.type == _ROUND_FAILED:
        return "repeat"
    return None


class PushRetries:
    """The bookkeeping of one :meth:`Session.train_step`: its Idempotency-Key and base version
    as they change with each refusal, the retry budget, and the outage deadline
    (``patience`` seconds after the first outage; 0: an outage is raised at once)."""

    def __init__(self, base_version: int | None, retries: int, patience: float) -> None:
        self.key = new_key()
        self.base_version = base_version
        self.retries = retries
        self.patience = patience
        self._attempts = 0
        self._deadline: float | None = None

    def after(self, error: BaseException, now: float) -> PushAction:
        """What to do next (the caller recomputes, or waits :data:`OUTAGE_PAUSE_S` for an
        outage); re-raises ``error`` when the budget or the patience is spent."""
        action = retry_push(error)
        if action is None:
            raise error
        if action == "outage":
            if self._deadline is None:
                self._deadline = now + self.patience
            if now >= self._deadline:
                raise error
            return action
        self._deadline = None
        self._attempts += 1
        if self._attempts > self.retries:
            raise error
        if action == "recompute":
            self.key = new_key()  # other gradients: another push
        return action

    def recomputed(self, base_version: int) -> None:
        self.base_version = base_version


#: Between two pushes of the same gradients while a server is out.
OUTAGE_PAUSE_S = 0.5


def _group_options(groups: GroupOptions) -> dict[str, dict[str, Any]]:
    """Per-group step options as dicts (encode_json writes tuples as lists and numpy scalars as
    numbers)."""
    return {str(name): dict(options) for name, options in groups.items()}
