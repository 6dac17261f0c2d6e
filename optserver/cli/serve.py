"""``optserver serve``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import pydantic
import typer

from optserver.cli.errors import CLIError, setting_errors
from optserver.cli.options import setting_option
from optserver.config import FsyncPolicy, LogLevel, Settings

__all__ = ["serve"]

_PEM = {"exists": True, "dir_okay": False, "readable": True}


def serve(
    host: Annotated[str, setting_option("host")] = Settings.model_fields["host"].default,
    port: Annotated[int, setting_option("port")] = Settings.model_fields["port"].default,
    admin_key: Annotated[str | None, setting_option("admin_key")] = None,
    max_body_bytes: Annotated[int, setting_option("max_body_bytes")] = Settings.model_fields[
        "max_body_bytes"
    ].default,
    log_level: Annotated[
        LogLevel, setting_option("log_level", case_sensitive=False)
    ] = Settings.model_fields["log_level"].default,
    data_dir: Annotated[
        Path | None,
        setting_option(
            "data_dir",
            help="Keep sessions here across restarts (journal and "
            "snapshots). Default: in memory only.",
        ),
    ] = None,
    fsync: Annotated[FsyncPolicy, setting_option("fsync")] = Settings.model_fields["fsync"].default,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="TLS certificate (PEM); serve HTTPS.", **_PEM)
    ] = None,
    ssl_keyfile: Annotated[
        Path | None, typer.Option(help="TLS private key (PEM) of --ssl-certfile.", **_PEM)
    ] = None,
) -> None:
    """Run the server. Every setting is also an OPTSERVER_* environment variable (see the
    README's Configuration table); a flag wins over its variable."""
    from optserver.api.app import create_app
    from optserver.api.server import run
    from optserver.durability import DataDirError

    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise CLIError("give both --ssl-certfile and --ssl-keyfile, or neither")
    flags: dict[str, Any] = {
        "host": host, "port": port, "admin_key": admin_key, "max_body_bytes": max_body_bytes,
        "log_level": log_level, "data_dir": data_dir, "fsync": fsync,
    }  # fmt: skip
    overrides = {k: v for k, v in flags.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except pydantic.ValidationError as error:
        raise CLIError(setting_errors(error, set(overrides))) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s: %(message)s")
    try:
        application = create_app(settings)
    except DataDirError as error:  # unreadable, damaged or in use by another server
        raise CLIError(f"cannot start: {error}") from None
    # Deadlines for slow clients and a cap on connections, which plain uvicorn.run lacks.
    run(
        application,
        settings,
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
    )
