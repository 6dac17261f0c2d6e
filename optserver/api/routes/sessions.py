"""Sessions: create, list, inspect, reconfigure, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from optserver_client.vocabulary import JSON, VERSION_HEADER

from optserver.api.deps import AcceptsJSON, AdminDep, ServiceDep, SessionDep, SettingsDep
from optserver.api.http import RawResponse, read_body, request_format
from optserver.schemas import (
    ADMIN_SECURITY,
    CreateSessionRequest,
    PatchSessionRequest,
    SessionCreated,
    SessionInfo,
    SessionList,
    request_body,
    responses,
)
from optserver.wire import encode_json

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

#: A create body over the JSON limit: the weights can follow as safetensors.
CREATE_HINT = "create the session without params, then PUT them to its /params as safetensors"


def json_response(
    payload: dict[str, Any], status: int = 200, version: int | None = None
) -> RawResponse:
    """A JSON answer (orjson); ``version`` goes into the version header."""
    headers = {VERSION_HEADER: str(version)} if version is not None else None
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
async def create_session(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    request_format(request, ("json",))
    body = await read_body(request, settings, "json", json_hint=CREATE_HINT)
    created = await service.create(body)
    return json_response({**created.info, "token": created.token}, 201, created.info["version"])


@router.get(
    "",
    operation_id="listSessions",
    dependencies=[AdminDep, AcceptsJSON],
    summary="List sessions",
    openapi_extra=ADMIN_SECURITY,
    responses=responses(SessionList),
)
async def list_sessions(service: ServiceDep) -> Response:
    return json_response({"sessions": service.sessions()})


@router.get(
    "/{session_id}",
    operation_id="getSession",
    dependencies=[AcceptsJSON],
    summary="Session info",
    responses=responses(SessionInfo),
)
async def get_session(session: SessionDep) -> Response:
    info = session.info()
    return json_response(info, version=info["version"])


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
async def patch_session(
    request: Request, session: SessionDep, service: ServiceDep, settings: SettingsDep
) -> Response:
    request_format(request, ("json",))
    body = await read_body(request, settings, "json", json_hint="")  # options only: no tensors
    info = await service.configure(session, body)
    return json_response(info, version=info["version"])


@router.delete(
    "/{session_id}",
    operation_id="deleteSession",
    status_code=204,
    summary="Delete a session",
    responses=responses(None, status=204),
)
async def delete_session(session: SessionDep, service: ServiceDep) -> Response:
    await service.delete(session)
    return Response(status_code=204)
