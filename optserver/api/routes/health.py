"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from optserver_client.vocabulary import JSON, RETRY_AFTER_HEADER
from prometheus_client import CONTENT_TYPE_LATEST

from optserver.api.deps import MetricsAuth, MetricsDep, StoreDep
from optserver.durability import DataDir
from optserver.schemas import ADMIN_SECURITY, problem_responses

router = APIRouter(tags=["operations"])


SERVER_ERROR: dict[int | str, dict[str, Any]] = {"5XX": problem_responses()}


@router.get("/healthz", operation_id="health", summary="Liveness", responses=SERVER_ERROR)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "Not ready: the data directory's journal cannot record changes now "
        "(`reason` says why, and whether it recovers by itself or needs a restart).",
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "string", "enum": ["unavailable"]},
                        "reason": {"type": "string"},
                        "sessions": {"type": "integer"},
                    },
                    "required": ["status", "reason", "sessions"],
                }
            }
        },
    }
}


@router.get(
    "/readyz",
    operation_id="ready",
    summary="Readiness",
    responses={**NOT_READY, **SERVER_ERROR},
)
async def readyz(request: Request, response: Response, store: StoreDep) -> dict[str, object]:
    data_dir: DataDir | None = getattr(request.app.state, "data_dir", None)
    if data_dir is None:
        return {"status": "ok", "sessions": len(store), "journal": "none"}
    ok, reason = data_dir.health()  # lock-free: never waits for a slow disk
    if not ok:
        response.status_code = 503
        response.headers[RETRY_AFTER_HEADER] = "1"
        return {"status": "unavailable", "reason": reason, "sessions": len(store)}
    return {"status": "ok", "sessions": len(store), "journal": "ok"}


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    description="Needs the metrics token or the admin key as a bearer token when either is "
    "set (unless `metrics_public`). Per-session and per-worker series are bounded: sessions "
    "and workers beyond the configured limits are folded into `_other`.",
    response_class=Response,
    dependencies=[MetricsAuth],
    openapi_extra=ADMIN_SECURITY,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
        401: problem_responses(),
        **SERVER_ERROR,
    },
)
async def metrics(metrics: MetricsDep) -> Response:
    # Generated in a worker thread: a large scrape must not hold up the event loop.
    return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)
