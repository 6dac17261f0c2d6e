"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from optserver.api.deps import MetricsDep, StoreDep
from optserver.api.schemas import problem_responses

router = APIRouter(tags=["operations"])


SERVER_ERROR: dict[int | str, dict[str, Any]] = {"5XX": problem_responses()}


@router.get("/healthz", summary="Liveness", responses=SERVER_ERROR)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness", responses=SERVER_ERROR)
async def readyz(store: StoreDep) -> dict[str, object]:
    return {"status": "ok", "sessions": len(store)}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
        **SERVER_ERROR,
    },
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
