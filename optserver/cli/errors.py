"""What the command line says about an ordinary mistake: one line naming the bad value.

A user's mistakes (a bad option, a bad setting, a server that is down, an unknown session)
get one or two lines and a non-zero exit, not a traceback; ``--debug`` (or
``OPTSERVER_LOG_LEVEL=debug``) shows the traceback too.
"""

from __future__ import annotations

import pydantic

__all__ = ["CLIError", "explain", "setting_errors"]


class CLIError(Exception):
    """A mistake the command itself found; its message is the whole story."""


def setting_errors(error: pydantic.ValidationError, flags: set[str]) -> str:
    """Each invalid setting, named as the user gave it: ``--port`` or ``OPTSERVER_PORT``."""
    parts = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else "?"
        name = f"--{field.replace('_', '-')}" if field in flags else f"OPTSERVER_{field.upper()}"
        parts.append(f"invalid {name}={problem.get('input')!r}: {problem['msg']}")
    return "; ".join(parts)


def explain(error: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug (show the traceback)."""
    # Imported here, when there is an error: they bring numba and httpx, which --help needs not.
    from optserver_client import APIError, NotFoundError, OptserverError, TransportError

    from optserver.optim.errors import OptimError

    if isinstance(error, CLIError):
        return str(error)
    if isinstance(error, pydantic.ValidationError):
        return setting_errors(error, set())
    if isinstance(error, TransportError):
        return f"cannot reach the server: {error}"
    if isinstance(error, NotFoundError):
        return f"not found: {error.detail or error.title}"
    if isinstance(error, APIError):
        detail = f": {error.detail}" if error.detail else ""
        return f"the server refused: {error.status} {error.title}{detail}"
    if isinstance(error, OptserverError | OptimError):
        return str(error)
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
        return f"{error.strerror}: {error.filename}"
    return None
