"""The protocol's names, defined once, for the server and every client.

Media types, header names, the safetensors metadata keys and tensor-name prefixes of a step
body and of a state export,
the ``return`` modes of a step, and the problem types (``urn:optserver:problem:<slug>``) that
errors are answered with. The server depends on this distribution, so both sides read the same
constants: a name changed here changes on both sides, and a client maps a problem by its exact
type, never by a suffix.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, TypeAlias

__all__ = [
    "APPLIED_KEY",
    "BASE_VERSION_KEY",
    "BINARY",
    "CHUNK_SEPARATOR",
    "GROUPS_KEY",
    "IDEMPOTENCY_KEY_HEADER",
    "JSON",
    "LR_KEY",
    "PARAMS_PREFIX",
    "PARTIAL_KEY",
    "PROBLEM",
    "PROBLEM_TYPE_BASE",
    "REPLAYED_HEADER",
    "RETRY_AFTER_HEADER",
    "RETURN_MODES",
    "STATE_FORMAT",
    "STATE_FORMAT_KEY",
    "STATE_IDENTITY_KEY",
    "STATE_PREFIX",
    "STATE_RECORD_KEY",
    "VERSION_HEADER",
    "VERSION_KEY",
    "WORKER_KEY",
    "ProblemSlug",
    "ReturnMode",
    "problem_type",
]

# --- media types ------------------------------------------------------------------------------
JSON = "application/json"
#: Tensors as a safetensors document.
BINARY = "application/octet-stream"
#: RFC 9457 problem details, the body of every error.
PROBLEM = "application/problem+json"

# --- headers ----------------------------------------------------------------------------------
#: The session's version after the request (applied steps so far).
VERSION_HEADER = "Optserver-Version"
#: A push's retry key: a push with a key already applied gets the original answer back.
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
#: ``true`` on an answer replayed for an ``Idempotency-Key`` seen before.
REPLAYED_HEADER = "Idempotent-Replayed"
#: Seconds to wait before trying again, on a 503 or 507.
RETRY_AFTER_HEADER = "Retry-After"

# --- a safetensors step body ------------------------------------------------------------------
#: Current weights sent with a step sit under ``params/NAME``; gradients under ``NAME``.
PARAMS_PREFIX = "params/"
#: ``__metadata__`` keys of a step body (strings, as safetensors metadata is).
LR_KEY = "lr"
BASE_VERSION_KEY = "base_version"
WORKER_KEY = "worker"
#: Hyperparameters for this step only, by parameter group name: JSON text of an object of
#: objects, e.g. ``{"head": {"lr": 0.01}}`` (the JSON body's ``groups`` member).
GROUPS_KEY = "groups"
#: ``"true"``: a part of a step that a later push completes (the version does not advance).
PARTIAL_KEY = "partial"
#: ``__metadata__`` keys of a weights answer (a JSON answer has members of these names).
VERSION_KEY = "version"
#: Of a step's answer: whether the push was applied (``"true"``/``"false"``).
APPLIED_KEY = "applied"

# --- a state export (``GET .../state``, ``POST /v1/sessions/import``) ----------------------------
#: Weights are ``params/NAME`` (:data:`PARAMS_PREFIX`), optimizer state ``state/NAME/FIELD``.
STATE_PREFIX = "state/"
#: ``__metadata__`` keys: the format's version, the session's record (JSON), and, in an import
#: only, the id and token the new session is to have (JSON ``{"id": ..., "token": ...}``).
STATE_FORMAT_KEY = "optserver.format"
STATE_FORMAT = "1"
STATE_RECORD_KEY = "optserver.session"
STATE_IDENTITY_KEY = "optserver.identity"
#: A chunk of a tensor cut over the shards of a sharded session is the tensor ``NAME#k``.
CHUNK_SEPARATOR = "#"

# --- what a step answers with (``?return=``) ----------------------------------------------------
ReturnMode: TypeAlias = Literal["stepped", "all", "none"]
RETURN_MODES: tuple[ReturnMode, ...] = ("stepped", "all", "none")

# --- problems ---------------------------------------------------------------------------------
PROBLEM_TYPE_BASE = "urn:optserver:problem:"


class ProblemSlug(StrEnum):
    """The last part of every problem type the server answers with, and nothing else.

    A member's name is its slug in upper case with ``_`` for ``-``.
    """

    # The default of each of the server's error classes.
    INTERNAL_ERROR = "internal-error"
    MALFORMED_BODY = "malformed-body"
    INVALID_REQUEST = "invalid-request"
    INVALID_TENSOR = "invalid-tensor"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not-found"
    NOT_ACCEPTABLE = "not-acceptable"
    CONFLICT = "conflict"
    STALE_GRADIENT = "stale-gradient"
    PAYLOAD_TOO_LARGE = "payload-too-large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported-media-type"
    LIMIT_EXCEEDED = "limit-exceeded"
    INSUFFICIENT_STORAGE = "insufficient-storage"
    UNAVAILABLE = "unavailable"
    JOURNAL_UNAVAILABLE = "journal-unavailable"
    NONFINITE_RESULT = "nonfinite-result"
    IDEMPOTENCY_KEY_REUSED = "idempotency-key-reused"
    HEADERS_TOO_LARGE = "headers-too-large"
    REQUEST_TIMEOUT = "request-timeout"
    # Finer kinds, raised with one of those classes.
    MALFORMED_JSON = "malformed-json"  # BadRequest
    UNKNOWN_SESSION = "unknown-session"  # NotFound
    FUTURE_VERSION = "future-version"  # Conflict
    DUPLICATE_PUSH = "duplicate-push"
    ROUND_FAILED = "round-failed"
    INVALID_HYPERPARAMETER = "invalid-hyperparameter"  # UnprocessableContent
    WORKER_REQUIRED = "worker-required"
    PARAMS_IN_SYNC_ROUND = "params-in-sync-round"
    SHAPE_MISMATCH = "shape-mismatch"  # InvalidTensor
    DTYPE_MISMATCH = "dtype-mismatch"
    UNSUPPORTED_SHAPE = "unsupported-shape"
    TENSOR_TOO_LARGE = "tensor-too-large"
    UNKNOWN_TENSOR = "unknown-tensor"
    NO_GRADIENTS = "no-gradients"
    NONFINITE = "nonfinite"
    TOO_MANY_TENSORS = "too-many-tensors"  # LimitExceeded
    TOO_MANY_SESSIONS = "too-many-sessions"


def problem_type(slug: str) -> str:
    """The ``type`` URI of a problem: ``urn:optserver:problem:<slug>``."""
    return PROBLEM_TYPE_BASE + slug
