"""Typed configuration, read from ``OPTSERVER_*`` environment variables (and CLI flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["FsyncPolicy", "NonFinitePolicy", "Settings"]

#: What a step does with a gradient that holds NaN or Inf: refuse it (422), acknowledge it
#: without applying anything, or apply it anyway.
NonFinitePolicy = Literal["reject", "skip", "allow"]
FsyncPolicy = Literal["always", "interval", "never"]


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
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
