"""JSON shapes of requests and responses: validation and the OpenAPI description.

Bodies are read by the routes themselves (to enforce the size limit while streaming and to
accept safetensors on the same route), then validated with these models; tensors inside them
are validated by :mod:`optserver.wire`, not by pydantic, which would be far too slow for
millions of numbers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import orjson
from optserver_client.vocabulary import BINARY, JSON, PROBLEM, ProblemSlug
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from optserver.config import NonFinitePolicy
from optserver.errors import BadRequest, invalid_fields
from optserver.modes import Mode
from optserver.sharding import SESSION_ID_PATTERN, TOKEN_PATTERN, Sharding
from optserver.wire import Buffer

__all__ = [
    "ADMIN_SECURITY",
    "BINARY",
    "JSON",
    "PROBLEM",
    "CreateSessionRequest",
    "ParamsRequest",
    "ParamsResponse",
    "PatchSessionRequest",
    "Problem",
    "SessionCreated",
    "SessionInfo",
    "SessionList",
    "Staleness",
    "StepRequest",
    "StepResponse",
    "TensorInfo",
    "WorkerInfo",
    "parse_json",
    "problem_responses",
    "request_body",
    "responses",
]

Tensor = Annotated[
    Any,
    WithJsonSchema(
        {
            "description": "A number (rank 0) or rectangular nested lists of numbers.",
            "anyOf": [{"type": "number"}, {"type": "array", "items": {}}],
        }
    ),
]
Tensors = dict[str, Tensor]
#: Tensors in JSON answers: NaN and infinities (weights that overflowed) are written as null.
TensorOut = Annotated[
    Any,
    WithJsonSchema(
        {
            "description": "A number (rank 0) or rectangular nested lists of numbers; NaN and "
            "infinite values are null (safetensors answers carry them exactly).",
            "anyOf": [{"type": "number"}, {"type": "null"}, {"type": "array", "items": {}}],
        }
    ),
]
OptimizerConfig = Annotated[
    str | dict[str, Any],
    Field(
        description="An optimizer name ('sgd', 'adagrad', 'rmsprop', 'adam', 'adamw') or "
        "{'name': ..., torch.optim hyperparameters..., 'groups': [...]}; each group names its "
        "tensors ('params': names, 'match': glob patterns) and overrides hyperparameters, as "
        "torch's param_groups.",
        examples=["adam", {"name": "sgd", "lr": 0.1, "momentum": 0.9}],
    ),
]
ScheduleConfig = Annotated[
    dict[str, Any] | None,
    Field(
        description="A learning-rate schedule, e.g. {'name': 'step', 'step_size': 30, "
        "'gamma': 0.1}; null for none.",
    ),
]
DType = Literal["float32", "float64"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSessionRequest(_Body):
    name: str | None = Field(None, max_length=256)
    optimizer: OptimizerConfig
    mode: Mode | None = None
    schedule: ScheduleConfig = None
    params: Tensors | None = Field(None, description="Initial weights by name.")
    dtype: DType = Field("float32", description="dtype of the JSON params.")
    nonfinite: NonFinitePolicy | None = Field(
        None, description="NaN/Inf gradients: reject (422), skip (acknowledge, apply nothing) "
        "or allow. Default: the server's setting."
    )  # fmt: skip
    id: str | None = Field(
        None, pattern=SESSION_ID_PATTERN,
        description="The session's id (default: a new random one); 409 if it exists. A "
        "sharded session has the same id on every shard.",
    )  # fmt: skip
    token: str | None = Field(
        None, pattern=TOKEN_PATTERN,
        description="The session's bearer token (default: a new random one): at least 32 "
        "URL-safe characters; 409 if it opens another session here. A sharded session has "
        "the same token on every shard.",
    )  # fmt: skip
    sharding: Sharding | None = Field(
        None, description="This server's part of a sharded session (kept and shown, not "
        "interpreted: the client places the tensors)."
    )  # fmt: skip


class PatchSessionRequest(_Body):
    optimizer: dict[str, Any] | None = Field(
        None, description="Hyperparameters to change, e.g. {'lr': 0.01}; 'groups' replaces "
        "the parameter groups (a list) or changes some (an object by group name, merged as "
        "RFC 7396: {'groups': {'head': {'lr': 0.01}}}; null removes an override or a group).",
    )  # fmt: skip
    schedule: ScheduleConfig = Field(None, description="A new schedule; null removes it.")
    mode: Mode | None = None
    nonfinite: NonFinitePolicy | None = None


class ParamsRequest(_Body):
    params: Tensors
    dtype: DType | None = Field(
        None, description="dtype of new tensors (default: that of the tensor replaced, or float32)."
    )


class StepRequest(_Body):
    grads: Tensors = Field(description="Gradients by tensor name; a subset is fine.")
    params: Tensors | None = Field(
        None, description="Current weights the step applies to (registers unknown tensors)."
    )
    lr: float | None = Field(None, description="Learning rate for this step only.")
    groups: dict[str, dict[str, Any]] | None = Field(
        None, description="Hyperparameters for this step only, by parameter group name "
        "('default': tensors in no group), e.g. {'head': {'lr': 0.01, 'betas': [0.95, 0.999]}}: "
        "the step runs as if the group were configured with them (a schedule scales such an "
        "'lr' as the configured one); a group's 'lr' here wins over the step's 'lr'.",
    )  # fmt: skip
    base_version: int | None = Field(
        None, ge=0, description="The version the gradient was computed on."
    )
    worker: str | None = Field(None, max_length=256)
    dtype: DType | None = Field(
        None, description="dtype of new tensors registered by params (default float32)."
    )
    partial: bool = Field(
        False, description="A part of the worker's step that a later push completes (buckets "
        "pushed during backward): applied at once, without advancing the version. Async and "
        "ssp modes only.",
    )  # fmt: skip


class _Out(BaseModel):
    """A response body: these models are what the OpenAPI schema announces, and a test holds
    every route's JSON answers to them (no field more, none missing)."""

    model_config = ConfigDict(extra="forbid")


class TensorInfo(_Out):
    name: str
    shape: list[int]
    dtype: str
    step: int = Field(description="Optimizer steps this tensor has taken.")
    group: str = Field(description="The parameter group it is in ('default': none).")


class GroupInfo(_Out):
    name: str = Field(description="The group's name; 'default' holds the tensors in no group.")
    params: list[str] = Field(description="The tensors in the group now.")
    optimizer: dict[str, Any] = Field(
        description="The group's hyperparameters: the base's with the group's overrides."
    )
    lr: float = Field(description="The learning rate the group's next step will use.")


class Staleness(_Out):
    buckets: dict[str, int] = Field(
        description="Accepted gradients by how many steps stale they were (upper bounds, "
        "inclusive; '+Inf' for the rest)."
    )
    count: int
    mean: float | None


class Counters(_Out):
    steps_applied: int
    pushes_received: int
    pushes_rejected: int
    rejected_by_reason: dict[str, int]
    staleness: Staleness


class OpenStepInfo(_Out):
    base_version: int | None
    version: int


class WorkerInfo(_Out):
    pushes: int
    applied: int
    rejected: int
    rejected_by_reason: dict[str, int]
    last_base_version: int | None = Field(
        description="The base_version of the worker's last push: the newest weights it had."
    )
    last_version: int | None = Field(
        description="The session's version right after the worker's last applied push."
    )
    last_seen: float
    staleness: Staleness
    open_step: OpenStepInfo | None = Field(
        None,
        description="The step the worker is pushing in parts (`partial` pushes), until its "
        "completing push: the base_version its parts carry, and the session's version when its "
        "first part was applied, at which its other parts are admitted and their rate set.",
    )


class SessionInfo(_Out):
    id: str
    name: str
    version: int = Field(description="Optimizer steps applied so far.")
    optimizer: dict[str, Any]
    mode: dict[str, Any]
    schedule: dict[str, Any] | None
    lr: float = Field(description="The learning rate the next step will use.")
    nonfinite: NonFinitePolicy
    nonfinite_tensors: list[str] = Field(
        description="Tensors whose weights or optimizer state hold NaN or Inf (only the "
        "`allow` policy puts them there; `PUT params?reset_state=true` clears the state).",
    )
    params: list[TensorInfo]
    groups: list[GroupInfo] = Field(
        description="The parameter groups, in order, then 'default' (see the optimizer's 'groups')."
    )
    counters: Counters
    workers: dict[str, WorkerInfo] = Field(
        description="Per worker id (the most recently seen ones, bounded)."
    )
    memory_bytes: int
    created_at: float
    updated_at: float
    sharding: Sharding | None = Field(
        None, description="This server's part of a sharded session; null for a session of one "
        "server."
    )  # fmt: skip


class SessionCreated(SessionInfo):
    token: str = Field(description="The session's bearer token; shown only once.")


class SessionList(_Out):
    sessions: list[SessionInfo]


class ParamsResponse(_Out):
    version: int
    params: dict[str, TensorOut]


class PutParamsResponse(_Out):
    version: int
    params: list[TensorInfo]


class StepResponse(_Out):
    version: int
    applied: bool = Field(description="False when the push was skipped (nonfinite policy).")
    params: dict[str, TensorOut] | None = Field(
        None, description="New weights (absent with return=none)."
    )


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str


M = TypeVar("M", bound=BaseModel)


def parse_json(model: type[M], body: Buffer) -> M:
    """Parse and validate a JSON body; problems name the field and what was wrong."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"body is not valid JSON: {exc}", slug=ProblemSlug.MALFORMED_JSON
        ) from None
    try:
        return model.model_validate(data, strict=True)  # as documented: no "5" or true for 5
    except ValidationError as exc:
        raise invalid_fields(exc) from None


_BINARY_SCHEMA = {"type": "string", "format": "binary"}

#: ``openapi_extra`` of the admin routes: FastAPI lists the bearer scheme as required; the
#: empty requirement added to that list says the route is open when no admin key is set.
ADMIN_SECURITY: dict[str, Any] = {"security": [{}]}


def request_body(model: type[BaseModel] | None, binary: str | None = None) -> dict[str, Any]:
    """``openapi_extra`` describing a body the route reads itself (JSON and/or safetensors)."""
    content: dict[str, Any] = {}
    if model is not None:
        content[JSON] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    if binary is not None:
        content[BINARY] = {"schema": {**_BINARY_SCHEMA, "description": binary}}
    return {"requestBody": {"required": True, "content": content}}


def responses(
    model: type[BaseModel] | None, binary: str | None = None, status: int = 200
) -> dict[int | str, dict[str, Any]]:
    """``responses`` of a route: the success body (JSON and/or safetensors) and problems."""
    content: dict[str, Any] = {}
    if binary is not None:
        content[BINARY] = {"schema": {**_BINARY_SCHEMA, "description": binary}}
    success: dict[str, Any] = {"description": "Success"}
    if model is not None:
        success["model"] = model
    if content:
        success["content"] = content
    out: dict[int | str, dict[str, Any]] = {status: success}
    out["4XX"] = problem_responses()
    out["5XX"] = problem_responses()
    return out


def problem_responses() -> dict[str, Any]:
    """A ``responses`` entry for problems: ``application/problem+json`` only (no ``model``,
    which would also announce ``application/json``)."""
    return {
        "description": "A problem (RFC 9457)",
        "content": {PROBLEM: {"schema": {"$ref": f"#/components/schemas/{Problem.__name__}"}}},
    }


#: Models referenced only by ``$ref`` (request bodies, problems); the app adds them to the
#: OpenAPI components.
REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    CreateSessionRequest,
    PatchSessionRequest,
    ParamsRequest,
    StepRequest,
    Problem,
)
