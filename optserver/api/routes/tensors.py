"""Weights and steps: put and pull parameters, push gradients."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from optserver.api.codec import decode_params, decode_push
from optserver.api.deps import AcceptsJSON, CoordinatorDep, MetricsDep, SessionDep, SettingsDep
from optserver.api.http import RawResponse, read_body, request_format, response_format
from optserver.api.idempotency import fingerprint
from optserver.api.schemas import (
    JSON,
    ParamsRequest,
    ParamsResponse,
    PutParamsResponse,
    StepRequest,
    StepResponse,
    request_body,
    responses,
)
from optserver.errors import ProblemError
from optserver.replies import MEDIA, Answer, Reply, Returns, weights_reply
from optserver.store import Push
from optserver.wire import encode_json

router = APIRouter(prefix="/v1/sessions/{session_id}", tags=["tensors"])

#: Binary bodies above this are decoded in a worker thread; JSON ones always are (parsing holds
#: the GIL for the whole document: on the event loop, it would stall every connection).
INLINE_DECODE_BYTES = 256 << 10

SAFETENSORS_PARAMS = "A safetensors document: tensors under their names."
SAFETENSORS_STEP = (
    "A safetensors document: gradients under the tensor names, current weights (optional) "
    "under 'params/NAME', and 'lr', 'base_version', 'worker' as strings in __metadata__."
)
SAFETENSORS_WEIGHTS = "A safetensors document of the weights; __metadata__ carries 'version'."


def _reply(reply: Reply) -> RawResponse:
    headers = {"Optserver-Version": str(reply.version)}
    if reply.replayed:
        headers["Idempotent-Replayed"] = "true"
    return RawResponse(reply.body, media_type=reply.media_type, headers=headers)


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
    tensors = await run_in_threadpool(decode_params, body, fmt, session, settings)
    ticket = await run_in_threadpool(lambda: session.put_params(tensors, reset_state=reset_state))
    if ticket is not None and session.recorder is not None:
        await run_in_threadpool(session.recorder.wait, ticket)
    with session.locked():
        payload = {"version": session.version, "params": session.tensor_info()}
    return RawResponse(
        encode_json(payload),
        media_type=JSON,
        headers={"Optserver-Version": str(payload["version"])},
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
    names: Annotated[
        str | None, Query(description="Comma-separated tensor names (default: all).")
    ] = None,
) -> Response:
    fmt = response_format(request)
    wanted = [n for n in names.split(",") if n] if names is not None else None

    def encode() -> Reply:
        with session.locked():
            return weights_reply(fmt, session.version, session.select(wanted))

    return _reply(await run_in_threadpool(encode))


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
    metrics: MetricsDep,
    coordinator: CoordinatorDep,
    return_: Annotated[Returns, Query(alias="return", description="What comes back.")] = "stepped",
    idempotency_key: Annotated[
        str | None, Header(max_length=256, description="Makes retries safe.")
    ] = None,
) -> Response:
    fmt_out = response_format(request)
    try:
        fmt_in = request_format(request)
        body = await read_body(request, settings, fmt_in)

        def decode() -> tuple[Push, str | None]:
            push = decode_push(body, fmt_in, session, settings)
            keyed = idempotency_key is not None
            return push, fingerprint(body, MEDIA[fmt_in], return_) if keyed else None

        if fmt_in == "json" or len(body) > INLINE_DECODE_BYTES:
            push, digest = await run_in_threadpool(decode)  # JSON parsing holds the GIL
        else:
            push, digest = decode()
    except ProblemError as exc:
        session.reject(exc.slug)
        raise
    answer = Answer(fmt_out, return_)
    start = time.perf_counter()
    reply = await coordinator.push(
        session, push, key=idempotency_key, answer=answer, fingerprint=digest
    )
    metrics.step_seconds.observe(time.perf_counter() - start)
    if reply.ticket is not None and session.recorder is not None:
        # Outside the session's turn: the next push is applied meanwhile (group commit).
        await run_in_threadpool(session.recorder.wait, reply.ticket)
    if reply.replayed:
        metrics.replays.inc()
    return _reply(reply)
