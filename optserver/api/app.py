"""The FastAPI application."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from optserver import __version__, buffers, idempotency
from optserver.api.hot import Handlers, HotPath, hot_routes
from optserver.api.middleware import MetricsMiddleware
from optserver.api.problems import install_problem_handlers
from optserver.api.routes import health, sessions, state, tensors
from optserver.config import Settings
from optserver.coordinator import Coordinator
from optserver.durability import DataDir
from optserver.metrics import Metrics
from optserver.optim import configure_threads, warm_up_in_background
from optserver.schemas import REQUEST_MODELS
from optserver.service import Service
from optserver.store import SessionStore, StoreLimits

__all__ = ["create_app"]

log = logging.getLogger("optserver")

#: The API's title, which generators turn into a package name: not the SDK's ``optserver_client``.
TITLE = "optserver API"

DESCRIPTION = """
A parameter server over plain HTTP. Each session holds named tensors and the optimizer state
that goes with them; workers push gradients and get the new weights back. Tensors travel as
JSON nested lists or as safetensors documents (`application/octet-stream`); answers follow
`Accept`. Errors are RFC 9457 `application/problem+json`.
"""


def create_app(settings: Settings | None = None, store: SessionStore | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.compute_threads is not None:
        configure_threads(settings.compute_threads)
    buffers.configure(settings.buffer_pool_bytes)
    store = store or SessionStore(
        StoreLimits.from_settings(settings),
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
    )
    data_dir = None
    if settings.data_dir is not None:
        data_dir = DataDir(
            settings.data_dir,
            fsync=settings.fsync,
            fsync_interval_s=settings.fsync_interval_s,
            snapshot_bytes=settings.snapshot_bytes,
            snapshot_interval_s=settings.snapshot_interval_s,
        )
        data_dir.open(store)  # recovery happens before anything is served
    coordinator = Coordinator()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Off the event loop: a first step should not wait for numba, nor startup for this.
        extra = {"idempotency": idempotency.warm_up}  # every keyed push's loop
        warming = warm_up_in_background(extra=extra) if settings.warm_up else None
        task = asyncio.create_task(_maintenance(settings, store, coordinator, data_dir))
        # What start-up made lives as long as the server: out of the collector's sight, a full
        # collection (every few thousand requests) no longer walks it all.
        gc.freeze()
        try:
            yield
        finally:
            task.cancel()
            if warming is not None:
                await anyio.to_thread.run_sync(warming.stop, 10.0)
            if data_dir is not None:
                await anyio.to_thread.run_sync(data_dir.close)

    # The docs pages' assets come from the package, not a CDN: /docs works offline.
    app = FastAPIOffline(
        title=TITLE, version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.settings = settings
    app.state.store = store
    app.state.metrics = metrics = Metrics(
        store,
        sessions=settings.metrics_sessions,
        workers=settings.metrics_workers,
        label_bytes=settings.metrics_label_bytes,
    )
    app.state.coordinator = coordinator
    app.state.service = Service(store, coordinator, settings, metrics)
    app.state.data_dir = data_dir  # None without a data directory; /readyz asks its health
    install_problem_handlers(app)
    for module in (sessions, state, tensors, health):
        app.include_router(module.router)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.hot_path:  # outermost of ours: the hot routes skip the metrics middleware too
        routes = hot_routes(tensors.router.routes, Handlers(app.state.service))
        app.add_middleware(HotPath, routes=routes, metrics=metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _maintenance(
    settings: Settings, store: SessionStore, coordinator: Coordinator, data_dir: DataDir | None
) -> None:
    """Expire idle sessions, take periodic snapshots and, while the journal cannot write,
    probe whether it can again (so the server recovers without a client's push), in the
    background."""
    period = 1.0 if settings.session_ttl_s is None else min(1.0, settings.session_ttl_s / 4)
    while True:
        await asyncio.sleep(period)
        if data_dir is not None and not data_dir.health()[0]:
            try:  # first and on its own: an expiry refused by the journal must not skip it
                await anyio.to_thread.run_sync(data_dir.probe)
            except Exception:
                log.exception("probing the data directory failed")
        try:
            if settings.session_ttl_s is not None:
                for session_id in await anyio.to_thread.run_sync(
                    store.expire, settings.session_ttl_s
                ):
                    coordinator.forget(session_id)
                    log.info(
                        "session %s expired after %s s idle", session_id, settings.session_ttl_s
                    )
            if data_dir is not None and data_dir.due():
                await anyio.to_thread.run_sync(data_dir.snapshot)
        except Exception:  # keep maintaining; the next period tries again
            log.exception("maintenance failed")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request models that routes validate themselves."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(definition.pop("$defs", {}))
            components[model.__name__] = definition
        app.openapi_schema = schema
    return app.openapi_schema
