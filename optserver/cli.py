"""The ``optserver`` command."""

from __future__ import annotations

from typing import Annotated, Any

import typer

app = typer.Typer(help="optserver: a parameter server over plain HTTP.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """optserver: a parameter server over plain HTTP."""


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface [env OPTSERVER_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [env OPTSERVER_PORT].")] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(help="Admin key for create/list/import [env OPTSERVER_ADMIN_KEY]."),
    ] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Largest request body.")] = None,
    log_level: Annotated[
        str | None, typer.Option(help="critical, error, warning, info, debug.")
    ] = None,
    ssl_certfile: Annotated[str | None, typer.Option(help="TLS certificate (PEM).")] = None,
    ssl_keyfile: Annotated[str | None, typer.Option(help="TLS private key (PEM).")] = None,
) -> None:
    """Run the server. Every setting is also an OPTSERVER_* environment variable."""
    import uvicorn

    from optserver.api.app import create_app
    from optserver.config import Settings

    overrides: dict[str, Any] = {
        k: v
        for k, v in {"host": host, "port": port, "admin_key": admin_key,
                     "max_body_bytes": max_body_bytes, "log_level": log_level}.items()
        if v is not None
    }  # fmt: skip
    settings = Settings(**overrides)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )


def main() -> None:
    app()
