"""Python client for optserver, the parameter server over plain HTTP.

>>> from optserver_client import Client
>>> with Client("http://127.0.0.1:8000") as client:
...     session = client.create_session({"w": w0}, {"name": "adam", "lr": 1e-3})
...     weights = session.step({"w": grad})  # one optimizer step, the new weights back

Workers that receive a session's id and token use :meth:`Session.attach`. :class:`AsyncClient`
and :class:`AsyncSession` are the same with coroutines. :mod:`optserver_client.compat` offers
the ``Optimizer.update(w, alpha, dw, dr, lambdaa)`` classes of the seed article, computed remotely.
"""

from __future__ import annotations

from optserver_client._async import AsyncClient, AsyncSession, AsyncShardedSession
from optserver_client._client import Client, Session, ShardedSession
from optserver_client.exceptions import (
    APIError,
    AuthenticationError,
    ConflictError,
    LimitExceededError,
    NotFoundError,
    OptserverError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ProtocolError,
    ServerError,
    ShardError,
    StaleGradientError,
    TransportError,
    ValidationError,
)

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AsyncClient",
    "AsyncSession",
    "AsyncShardedSession",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "LimitExceededError",
    "NotFoundError",
    "OptserverError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProtocolError",
    "ServerError",
    "Session",
    "ShardError",
    "ShardedSession",
    "StaleGradientError",
    "TransportError",
    "ValidationError",
    "__version__",
]
