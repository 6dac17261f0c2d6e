"""Whole-session state: export everything needed to resume, and import it elsewhere."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from optserver.api.codec import limits
from optserver.api.deps import AcceptsJSON, AdminDep, SessionDep, SettingsDep, StoreDep
from optserver.api.http import RawResponse, read_body, request_format, response_format
from optserver.api.schemas import (
    ADMIN_SECURITY,
    BINARY,
    JSON,
    SessionCreated,
    request_body,
    responses,
)
from optserver.snapshot import export_session, import_session
from optserver.wire import Buffer, decode_safetensors, encode_json, encode_safetensors

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
async def export_state(request: Request, session: SessionDep) -> Response:
    response_format(request, ("binary",))

    def encode() -> tuple[Buffer, int]:
        with session.locked():
            tensors, metadata = export_session(session)
            return encode_safetensors(tensors, metadata), session.version

    body, version = await run_in_threadpool(encode)
    return RawResponse(body, media_type=BINARY, headers={"Optserver-Version": str(version)})


@router.post(
    "/import",
    operation_id="importSession",
    status_code=201,
    dependencies=[AdminDep, AcceptsJSON],
    summary="Create a session from an export",
    description="The new session (new id and token) continues bit for bit where the exported "
    "one stood.",
    openapi_extra={**request_body(None, EXPORT), **ADMIN_SECURITY},
    responses=responses(SessionCreated, status=201),
)
async def import_state(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    name: Annotated[str | None, Query(max_length=256, description="Rename the session.")] = None,
) -> Response:
    request_format(request, ("binary",))
    body = await read_body(request, settings, "binary")

    def load() -> tuple[dict[str, object], str]:
        tensors, metadata = decode_safetensors(body, limits(settings))
        session, token = import_session(store, tensors, metadata, name=name)
        store.sync()
        return session.info(), token

    info, token = await run_in_threadpool(load)
    return RawResponse(
        encode_json({**info, "token": token}), media_type=JSON, status_code=201,
        headers={"Optserver-Version": str(info["version"])},
    )  # fmt: skip
