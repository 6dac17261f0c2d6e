"""Weights and steps: put and pull parameters, push gradients."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from optserver.api.deps import AcceptsJSON, ServiceDep, SessionDep, SettingsDep
from optserver.api.http import read_body, reply_response, request_format, response_format
from optserver.api.routes.sessions import json_response
from optserver.replies import Format, Returns
from optserver.schemas import (
    ParamsRequest,
    ParamsResponse,
    PutParamsResponse,
    StepRequest,
    StepResponse,
    request_body,
    responses,
)
from optserver.wire import Buffer

router = APIRouter(prefix="/v1/sessions/{session_id}", tags=["tensors"])

SAFETENSORS_PARAMS = "A safetensors document: tensors under their names."
SAFETENSORS_STEP = (
    "A safetensors document: gradients under the tensor names, current weights (optional) "
    "under 'params/NAME', and 'lr', 'base_version', 'worker' as strings in __metadata__."
)
SAFETENSORS_WEIGHTS = "A safetensors document of the weights; __metadata__ carries 'version'."


@router.put(
    "/params",
    operation_id="putParams",
    dependencies=[AcceptsJSON],
    summary="Set or replace weights",
    description="Tensors with the shape and dtype they had keep their optimizer state (unless "
    "`reset_state=true`); new names, or a new shape or dtype, start with fresh state. The "
    "version does not change.",
    openapi_extra=request_body(ParamsRequest, SAFETENSORS_PARAMS),
    responses=responses(PutParamsResponse),
)
async def put_params(
    request: Request,
    session: SessionDep,
    service: ServiceDep,
    settings: SettingsDep,
    reset_state: Annotated[
        bool,
        Query(
            description="Start the optimizer state of every tensor written afresh (moments, "
            "step counts), e.g. after NaN or Inf reached it under the `allow` policy."
        ),
    ] = False,
) -> Response:
    fmt = request_format(request)
    body = await read_body(request, settings, fmt)
    weights = await service.put_params(session, body, fmt, reset_state=reset_state)
    return json_response(
        {"version": weights.version, "params": weights.params}, version=weights.version
    )


@router.get(
    "/params",
    operation_id="pullParams",
    summary="Pull weights",
    responses=responses(ParamsResponse, SAFETENSORS_WEIGHTS),
)
async def get_params(
    request: Request,
    session: SessionDep,
    service: ServiceDep,
    names: Annotated[
        str | None, Query(description="Comma-separated tensor names (default: all).")
    ] = None,
) -> Response:
    fmt = response_format(request)
    wanted = [n for n in names.split(",") if n] if names is not None else None
    return reply_response(await service.pull(session, wanted, fmt))


@router.post(
    "/step",
    operation_id="step",
    summary="Push gradients; get the new weights",
    description="Applies one optimizer step (in async mode at once, in arrival order). "
    "`return=stepped` (default) answers with the tensors named in the push, `all` with every "
    "tensor, `none` with the version only. A retry that carries the `Idempotency-Key` of an "
    "applied push gets the original answer (header `Idempotent-Replayed: true`), encoded as its "
    "`Accept` asks, and nothing is applied again; the key is bound to the request (body, "
    "`Content-Type`, `return`): the same key with a different request gets 422 "
    "`idempotency-key-reused` and changes nothing. Answers too large for the idempotency memory "
    "are re-encoded from the current weights. Under the `reject` policy a step that would leave "
    "NaN or Inf in the weights or the optimizer state is refused with 422 `nonfinite-result` "
    "and changes nothing.",
    openapi_extra=request_body(StepRequest, SAFETENSORS_STEP),
    responses=responses(StepResponse, SAFETENSORS_WEIGHTS),
)
async def step(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    service: ServiceDep,
    return_: Annotated[Returns, Query(alias="return", description="What comes back.")] = "stepped",
    idempotency_key: Annotated[
        str | None, Header(max_length=256, description="Makes retries safe.")
    ] = None,
) -> Response:
    fmt_out = response_format(request)

    async def read() -> tuple[Format, Buffer]:
        fmt_in = request_format(request)
        return fmt_in, await read_body(request, settings, fmt_in)

    reply = await service.push(session, read, fmt_out=fmt_out, returns=return_, key=idempotency_key)
    return reply_response(reply)
