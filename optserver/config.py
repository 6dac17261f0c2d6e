"""Typed configuration, read from ``OPTSERVER_*`` environment variables (and CLI flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# The journal implements the policies, so it defines them; it imports only the standard library.
from optserver.journal import FsyncPolicy

__all__ = ["FsyncPolicy", "LogLevel", "NonFinitePolicy", "Settings"]

#: What a step does with a gradient that holds NaN or Inf: refuse it (422), acknowledge it
#: without applying anything, or apply it anyway.
NonFinitePolicy = Literal["reject", "skip", "allow"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Every knob of the server. Each field is also the environment variable
    ``OPTSERVER_<FIELD>`` (case-insensitive), e.g. ``OPTSERVER_ADMIN_KEY``."""

    model_config = SettingsConfigDict(env_prefix="OPTSERVER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    admin_key: SecretStr | None = Field(
        None,
        description="When set, creating, listing and importing sessions need it as a bearer "
        "token, and it opens every session.",
    )
    max_body_bytes: int = Field(
        1 << 30, ge=1024, description="Largest request body, enforced while reading (413)."
    )
    max_sessions: int = Field(1000, ge=1, description="Most sessions held at once (429).")
    max_tensors_per_session: int = Field(10_000, ge=1, description="Most tensors in a session.")
    max_tensor_elements: int = Field(
        1 << 28, ge=1, description="Most elements in one tensor (2**28: 1 GiB of float32)."
    )
    max_json_depth: int = Field(32, ge=1, description="Deepest nesting of a JSON tensor.")
    max_json_body_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="Largest JSON request body (413; the smaller of this and max_body_bytes). "
        "Parsing JSON holds the interpreter in stretches that grow with the body, stalling "
        "every other request: at 4 MiB they stay under ~0.1 s. Larger tensors travel as "
        "safetensors (application/octet-stream).",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time a client has to send a request's headers, counted from the "
        "connection's start (on a kept-alive connection, from the end of the previous "
        "response); past it, 408 and the connection is closed, however steadily bytes trickle.",
    )
    body_idle_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest wait for the next part of a request body (408, connection "
        "closed); also the base of the whole body's deadline (body_min_bytes_per_s).",
    )
    body_min_bytes_per_s: int = Field(
        256 << 10,
        ge=1,
        description="Slowest average rate a body may arrive at: N bytes must be in within "
        "body_idle_timeout_s + N / body_min_bytes_per_s seconds (408, connection closed).",
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="Most open connections; beyond it a new one is answered 503 (Retry-After) "
        "and closed at once. Default: the open-file limit (raised to its hard limit at start) "
        "less an eighth kept for files and refusals, at most 8192.",
    )
    max_header_bytes: int = Field(
        1 << 20,
        ge=64 << 10,
        description="Most bytes of a request line and headers (431, connection closed): the "
        "header deadline bounds their time, this their memory.",
    )
    idempotency_keys: int = Field(
        256, ge=0, description="Idempotency keys remembered per session (0 disables replay)."
    )
    idempotency_bytes: int = Field(
        64 << 20,
        ge=0,
        description="Bytes of replayable responses kept per session; larger answers are "
        "remembered by version only.",
    )
    nonfinite: NonFinitePolicy = Field(
        "reject", description="Default NaN/Inf policy of new sessions."
    )
    compute_threads: int | None = Field(
        None, ge=1, description="Threads one large optimizer step may use (default: CPUs, <= 8)."
    )
    max_total_bytes: int | None = Field(
        None, ge=0, description="Quota of weights and optimizer state over all sessions (507)."
    )
    session_ttl_s: float | None = Field(
        None, gt=0, description="Delete sessions unused for this many seconds (none: never)."
    )
    data_dir: Path | None = Field(
        None, description="Keep sessions here: a journal of every change plus snapshots."
    )
    fsync: FsyncPolicy = Field(
        "always",
        description="always: a step is on disk before it is acknowledged (group commit); "
        "interval: fsync every fsync_interval_s (a power loss may lose that much); never: leave "
        "it to the kernel. A killed server loses nothing under any policy.",
    )
    fsync_interval_s: float = Field(1.0, gt=0, description="Period of the interval policy.")
    snapshot_bytes: int = Field(
        256 << 20, ge=1, description="Snapshot once the journal has grown by this much."
    )
    snapshot_interval_s: float = Field(
        300.0, gt=0, description="Snapshot at least this often while sessions change."
    )
    log_level: LogLevel = Field("info", description="How much the server logs.")
    warm_up: bool = Field(
        True,
        description="At start, compile (or load from numba's disk cache) every optimizer "
        "kernel in a background thread, so that a session's first step does not wait some "
        "0.3 s per kernel for numba; startup and requests are not held up meanwhile.",
    )
    buffer_pool_bytes: int = Field(
        256 << 20,
        ge=0,
        description="Large buffers (answers' copies of the weights, request bodies over 1 MiB) "
        "are kept for reuse up to this many bytes in all: fresh memory costs a page fault per "
        "page. 0 turns reuse off.",
    )
    hot_path: bool = Field(
        True,
        description="Answer steps and pulls through a lean handler in front of FastAPI (the "
        "same checks, errors and metrics, without per-request dependency resolution); false "
        "serves them through the FastAPI routes, the same answers but slower.",
    )
    # /metrics: bounded whatever clients do (a scrape at these defaults stays well under 1 MB).
    metrics_sessions: int = Field(
        16,
        ge=0,
        description="Sessions with per-session and per-worker series in /metrics (the newest "
        'ones); the others are folded into session="_other".',
    )
    metrics_workers: int = Field(
        8,
        ge=0,
        description="Workers of such a session with series of their own (the first ones the "
        "metrics see, for as long as the session remembers them); the others are folded into "
        'worker="_other".',
    )
    metrics_label_bytes: int = Field(
        64,
        ge=16,
        le=1024,
        description="Longest session or worker label value in /metrics, in UTF-8 bytes; a "
        "longer one is cut and ends with '~' and a digest of the whole.",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="A bearer token that opens /metrics (as does the admin key); when set, "
        "/metrics needs one of them.",
    )
    metrics_public: bool = Field(
        False,
        description="Serve /metrics without credentials even with an admin key or a metrics "
        "token set (by default they guard it: it lists every session id and worker name).",
    )
