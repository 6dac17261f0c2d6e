"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from optserver.api.http import response_format
from optserver.config import Settings
from optserver.coordinator import Coordinator
from optserver.errors import Unauthorized
from optserver.metrics import Metrics
from optserver.service import Service
from optserver.session import Session
from optserver.store import SessionStore

__all__ = [
    "AcceptsJSON",
    "AdminDep",
    "CoordinatorDep",
    "MetricsAuth",
    "MetricsDep",
    "ServiceDep",
    "SessionDep",
    "SettingsDep",
    "StoreDep",
]

_bearer = HTTPBearer(
    auto_error=False,
    description="The session's token, or the admin key when the server has one.",
)


async def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def _store(request: Request) -> SessionStore:
    return request.app.state.store  # type: ignore[no-any-return]


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


async def _coordinator(request: Request) -> Coordinator:
    return request.app.state.coordinator  # type: ignore[no-any-return]


async def _service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[SessionStore, Depends(_store)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
CoordinatorDep = Annotated[Coordinator, Depends(_coordinator)]
ServiceDep = Annotated[Service, Depends(_service)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return None if credentials is None else credentials.credentials


async def _admin(store: StoreDep, credentials: Credentials) -> None:
    store.check_admin(_token(credentials))


def _metrics_keys(settings: Settings) -> list[str]:
    """The bearer tokens that open /metrics; none: it is open (``metrics_public``, or neither
    an admin key nor a metrics token set)."""
    if settings.metrics_public:
        return []
    return [k.get_secret_value() for k in (settings.admin_key, settings.metrics_token) if k]


async def _metrics_auth(settings: SettingsDep, credentials: Credentials) -> None:
    keys = _metrics_keys(settings)
    if not keys:
        return
    token = _token(credentials)
    if token is None:
        raise Unauthorized("/metrics needs 'Authorization: Bearer <metrics token or admin key>'")
    # Every key is compared, each in constant time: no early exit tells which one was close.
    matches = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]
    if not any(matches):
        raise Unauthorized("the token does not open /metrics")


async def _session(
    session_id: Annotated[str, Path(max_length=64, description="Session id.")],
    store: StoreDep,
    credentials: Credentials,
) -> Session:
    return store.open(session_id, _token(credentials))


async def _answers_json(request: Request) -> None:
    response_format(request, ("json",))  # 406 unless the client accepts JSON


AdminDep = Depends(_admin)
#: For /metrics: the metrics token or the admin key, when either is set (401 otherwise).
MetricsAuth = Depends(_metrics_auth)
#: For routes that answer in JSON only: an Accept header that excludes JSON gets 406.
AcceptsJSON = Depends(_answers_json)
SessionDep = Annotated[Session, Depends(_session)]
