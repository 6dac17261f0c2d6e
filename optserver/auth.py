"""Credentials: session tokens, of which the server keeps only a digest, and the admin key.

Every comparison is constant-time (:func:`hmac.compare_digest`): no early exit tells how close
a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from optserver.errors import Unauthorized

__all__ = ["check_admin", "digest", "is_admin", "new_token", "opens"]


def digest(token: str) -> bytes:
    """What the server keeps of a session token."""
    return hashlib.sha256(token.encode()).digest()


def new_token(chosen: str | None = None) -> tuple[str, bytes]:
    """A session token and its digest: ``chosen`` (the client's, validated by the caller), or
    a fresh one (the token is shown once, at creation)."""
    token = secrets.token_urlsafe(32) if chosen is None else chosen
    return token, digest(token)


def is_admin(token: str, admin_key: str | None) -> bool:
    """Whether ``token`` is the admin key (never, when none is configured)."""
    return admin_key is not None and hmac.compare_digest(token.encode(), admin_key.encode())


def opens(token: str, token_digest: bytes) -> bool:
    """Whether ``token`` is the one whose digest is ``token_digest``."""
    return hmac.compare_digest(digest(token), token_digest)


def check_admin(token: str | None, admin_key: str | None) -> None:
    """Raise unless no admin key is configured or ``token`` is it."""
    if admin_key is None:
        return
    if token is None:
        raise Unauthorized("this route needs 'Authorization: Bearer <admin key>'")
    if not is_admin(token, admin_key):
        raise Unauthorized("the token is not the admin key")
