"""Sessions: create, list, inspect, reconfigure, delete."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from optserver.api.codec import decode_tensors_json, limits
from optserver.api.deps import (
    AcceptsJSON,
    AdminDep,
    CoordinatorDep,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from optserver.api.http import RawResponse, read_body, request_format
from optserver.api.schemas import (
    ADMIN_SECURITY,
    JSON,
    CreateSessionRequest,
    PatchSessionRequest,
    SessionCreated,
    SessionInfo,
    SessionList,
    parse_json,
    request_body,
    responses,
)
from optserver.store import KEEP, Session
from optserver.wire import encode_json

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

#: A create body over the JSON limit: the weights can follow as safetensors.
CREATE_HINT = "create the session without params, then PUT them to its /params as safetensors"


def _json(payload: object, status: int = 200, version: int | None = None) -> RawResponse:
    headers = {"Optserver-Version": str(version)} if version is not None else None
    return RawResponse(encode_json(payload), media_type=JSON, status_code=status, headers=headers)


@router.post(
    "",
    operation_id="createSession",
    status_code=201,
    dependencies=[AdminDep, AcceptsJSON],
    summary="Create a session",
    description="Creates a session with an optimizer, optionally a mode, a schedule and initial "
    "weights. The answer carries the session's token, shown this once. Sessions may also start "
    "empty: tensors then register on the first step that carries their weights.",
    openapi_extra={**request_body(CreateSessionRequest), **ADMIN_SECURITY},
    responses=responses(SessionCreated, status=201),
)
async def create_session(request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    request_format(request, ("json",))
    body = await read_body(request, settings, "json", json_hint=CREATE_HINT)

    def parse() -> tuple[CreateSessionRequest, np.dtype[Any], dict[str, np.ndarray]]:
        spec = parse_json(CreateSessionRequest, body)
        dtype = np.dtype(spec.dtype)
        params = decode_tensors_json(spec.params or {}, lambda _: dtype, limits(settings))
        return spec, dtype, params

    spec, dtype, params = await run_in_threadpool(parse)  # parsing holds the GIL: off the loop

    def create() -> tuple[Session, str]:  # copies the weights and journals them: off the loop
        created = store.create(
            optimizer=spec.optimizer,
            name=spec.name,
            mode=spec.mode,
            schedule=spec.schedule,
            nonfinite=spec.nonfinite or settings.nonfinite,
            params=params,
            dtype=dtype,
        )
        store.sync()
        return created

    session, token = await run_in_threadpool(create)
    return _json({**session.info(), "token": token}, 201, session.version)


@router.get(
    "",
    operation_id="listSessions",
    dependencies=[AdminDep, AcceptsJSON],
    summary="List sessions",
    openapi_extra=ADMIN_SECURITY,
    responses=responses(SessionList),
)
async def list_sessions(store: StoreDep) -> Response:
    return _json({"sessions": [s.info() for s in store.sessions()]})


@router.get(
    "/{session_id}",
    operation_id="getSession",
    dependencies=[AcceptsJSON],
    summary="Session info",
    responses=responses(SessionInfo),
)
async def get_session(session: SessionDep) -> Response:
    info = session.info()
    return _json(info, version=info["version"])


@router.patch(
    "/{session_id}",
    operation_id="updateSession",
    dependencies=[AcceptsJSON],
    summary="Change hyperparameters, schedule, mode or NaN policy",
    description="Only the fields present change; `schedule: null` removes the schedule. The "
    "optimizer's name cannot change (its state would not carry over).",
    openapi_extra=request_body(PatchSessionRequest),
    responses=responses(SessionInfo),
)
async def patch_session(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    request_format(request, ("json",))
    body = await read_body(request, settings, "json", json_hint="")  # options only: no tensors
    spec = await run_in_threadpool(parse_json, PatchSessionRequest, body)
    fields = spec.model_fields_set
    ticket = session.configure(
        optimizer=spec.optimizer,
        schedule=spec.schedule if "schedule" in fields else KEEP,
        mode=spec.mode,
        nonfinite=spec.nonfinite,
    )
    if ticket is not None and session.recorder is not None:
        await run_in_threadpool(session.recorder.wait, ticket)
    info = session.info()
    return _json(info, version=info["version"])


@router.delete(
    "/{session_id}",
    operation_id="deleteSession",
    status_code=204,
    summary="Delete a session",
    responses=responses(None, status=204),
)
async def delete_session(
    session: SessionDep, store: StoreDep, coordinator: CoordinatorDep
) -> Response:
    store.delete(session.id)
    coordinator.forget(session.id)
    await run_in_threadpool(store.sync)
    return Response(status_code=204)
