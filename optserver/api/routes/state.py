"""Whole-session state: export everything needed to resume, and import it elsewhere."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from optserver_client.vocabulary import BINARY, VERSION_HEADER

from optserver.api.deps import AcceptsJSON, AdminDep, ServiceDep, SessionDep, SettingsDep
from optserver.api.http import RawResponse, read_body, request_format, response_format
from optserver.api.routes.sessions import json_response
from optserver.schemas import ADMIN_SECURITY, SessionCreated, request_body, responses

router = APIRouter(prefix="/v1/sessions", tags=["state"])

EXPORT = (
    "A safetensors document: 'params/NAME' weights, 'state/NAME/FIELD' optimizer state, and "
    "the session record (optimizer, mode, schedule, version, step counts) in __metadata__."
)


@router.get(
    "/{session_id}/state",
    operation_id="exportState",
    summary="Export the session's complete state",
    response_class=Response,  # safetensors only: no JSON body to announce
    responses=responses(None, EXPORT),
)
async def export_state(request: Request, session: SessionDep, service: ServiceDep) -> Response:
    response_format(request, ("binary",))
    body, version = await service.export(session)
    return RawResponse(body, media_type=BINARY, headers={VERSION_HEADER: str(version)})


@router.post(
    "/import",
    operation_id="importSession",
    status_code=201,
    dependencies=[AdminDep, AcceptsJSON],
    summary="Create a session from an export",
    description="The new session continues bit for bit where the exported one stood. It gets a "
    "new id and token, unless the document's __metadata__ has 'optserver.identity': JSON "
    '{"id": ..., "token": ...} (either optional, as the create request\'s id and token; 409 if '
    "the id exists or the token opens another session): how the shards of a sharded session, "
    "which share one id and token, are imported.",
    openapi_extra={**request_body(None, EXPORT), **ADMIN_SECURITY},
    responses=responses(SessionCreated, status=201),
)
async def import_state(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    name: Annotated[str | None, Query(max_length=256, description="Rename the session.")] = None,
) -> Response:
    request_format(request, ("binary",))
    body = await read_body(request, settings, "binary")
    created = await service.import_(body, name)
    return json_response({**created.info, "token": created.token}, 201, created.info["version"])
