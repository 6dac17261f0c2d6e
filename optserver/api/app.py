"""The FastAPI application."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from optserver import __version__
from optserver.api.problems import install_problem_handlers
from optserver.api.routes import health, sessions, state, tensors
from optserver.api.schemas import REQUEST_MODELS
from optserver.config import Settings
from optserver.coordinator import Coordinator
from optserver.metrics import Metrics, MetricsMiddleware
from optserver.optim import configure_threads
from optserver.store import SessionStore, StoreLimits

__all__ = ["create_app"]

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
    store = store or SessionStore(
        StoreLimits(
            max_sessions=settings.max_sessions,
            max_tensors_per_session=settings.max_tensors_per_session,
            max_tensor_elements=settings.max_tensor_elements,
            idempotency_keys=settings.idempotency_keys,
            idempotency_bytes=settings.idempotency_bytes,
        ),
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
    )
    app = FastAPI(title="optserver", version=__version__, description=DESCRIPTION)
    app.state.settings = settings
    app.state.store = store
    app.state.metrics = metrics = Metrics(store)
    app.state.coordinator = Coordinator()
    install_problem_handlers(app)
    for module in (sessions, state, tensors, health):
        app.include_router(module.router)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


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
