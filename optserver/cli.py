"""The ``optserver`` command."""

from __future__ import annotations

import logging
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
    data_dir: Annotated[
        str | None, typer.Option(help="Keep sessions across restarts [env OPTSERVER_DATA_DIR].")
    ] = None,
    fsync: Annotated[str | None, typer.Option(help="always, interval or never.")] = None,
) -> None:
    """Run the server. Every setting is also an OPTSERVER_* environment variable."""
    from optserver.api.app import create_app
    from optserver.api.server import run
    from optserver.config import Settings
    from optserver.durability import DataDirError

    overrides: dict[str, Any] = {
        k: v
        for k, v in {"host": host, "port": port, "admin_key": admin_key,
                     "max_body_bytes": max_body_bytes, "log_level": log_level,
                     "data_dir": data_dir, "fsync": fsync}.items()
        if v is not None
    }  # fmt: skip
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s: %(message)s")
    try:
        application = create_app(settings)
    except DataDirError as exc:
        typer.echo(f"optserver: cannot start: {exc}", err=True)
        raise typer.Exit(1) from None
    # Deadlines for slow clients and a cap on connections, which plain uvicorn.run lacks.
    run(application, settings, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)


def main() -> None:
    app()


Mode = Annotated[str, typer.Option(help="async, sync or ssp.")]


@app.command()
def demo(
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 4,
    optimizer: Annotated[str, typer.Option(help="sgd, adagrad, rmsprop, adam, adamw.")] = "adam",
    mode: Mode = "async",
    epochs: Annotated[int, typer.Option(min=1, help="Passes over each worker's shard.")] = 20,
    batch: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate (default: one per optimizer).")
    ] = None,
    max_staleness: Annotated[int, typer.Option(help="ssp mode's bound.")] = 4,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    url: Annotated[
        str | None, typer.Option(help="Use this server instead of starting one.")
    ] = None,
    admin_key: Annotated[str | None, typer.Option(help="Admin key of --url's server.")] = None,
) -> None:
    """Train a small MLP on scikit-learn's digits with several worker processes."""
    import json

    from rich.console import Console

    from optserver.demo.run import DemoConfig, print_summary, run_demo

    config = DemoConfig(
        workers=workers, optimizer=optimizer, mode=mode, epochs=epochs, batch=batch, lr=lr,
        max_staleness=max_staleness,
    )  # fmt: skip
    summary = run_demo(config, live=not json_output, url=url, admin_key=admin_key)
    if json_output:
        print(json.dumps(summary))
    else:
        print_summary(summary, Console())


@app.command()
def worker(
    session_file: Annotated[
        str | None, typer.Option(help="JSON with url, id and token (from create-session).")
    ] = None,
    url: Annotated[str | None, typer.Option()] = None,
    session: Annotated[str | None, typer.Option(help="Session id.")] = None,
    token: Annotated[str | None, typer.Option(help="Session token.")] = None,
    shard: Annotated[str, typer.Option(help="Shard index, or 'auto' (random batches).")] = "auto",
    shards: Annotated[int | None, typer.Option(help="Number of shards (workers).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    batch: Annotated[int, typer.Option(min=1)] = 32,
    seed: Annotated[int | None, typer.Option(help="Default: from the shard or hostname.")] = None,
    worker_id: Annotated[
        str | None, typer.Option(help="Default: from the shard or hostname.")
    ] = None,
    log: Annotated[str, typer.Option(help="text or json.")] = "text",
) -> None:
    """Train on one shard of the demo data, pushing gradients to a session."""
    import json
    import socket

    from optserver_client import Session

    from optserver.demo.worker import WorkerPlan, auto_seed, printer, run_worker

    spec: dict[str, Any] = {}
    if session_file is not None:
        with open(session_file) as f:
            spec = json.load(f)
    url = url or spec.get("url")
    session_id = session or spec.get("id")
    token = token or spec.get("token")
    if not (url and session_id and token):
        raise typer.BadParameter("give --session-file, or --url, --session and --token")
    count = shards or int(spec.get("workers", 1))
    index = None if shard == "auto" else int(shard)
    plan = WorkerPlan(
        worker=worker_id or (f"w{index + 1}" if index is not None else socket.gethostname()),
        shard=index,
        shards=count,
        epochs=epochs,
        batch=batch,
        seed=seed if seed is not None else (index + 1 if index is not None else auto_seed()),
    )
    if log not in ("text", "json"):
        raise typer.BadParameter("--log is text or json")
    with Session.attach(url, session_id, token) as remote:
        run_worker(remote, plan, printer("json" if log == "json" else "text"))


@app.command("create-session")
def create_session(
    url: Annotated[str, typer.Option(help="Server URL.")],
    out: Annotated[str, typer.Option(help="Where to write {url, id, token, workers}.")],
    admin_key: Annotated[str | None, typer.Option(help="The server's admin key.")] = None,
    workers: Annotated[int, typer.Option(min=1)] = 3,
    optimizer: Annotated[str, typer.Option()] = "adam",
    mode: Mode = "async",
    lr: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Create the demo's session (initial MLP weights) and write its credentials to a file."""
    import json

    from optserver_client import Client

    from optserver.demo import mlp
    from optserver.demo.run import mode_config, optimizer_config

    with Client(url, admin_key=admin_key) as client:
        remote = client.create_session(
            mlp.init_params(seed),
            optimizer_config(optimizer, lr),
            mode=mode_config(mode, workers),
            name="demo",
        )
    with open(out, "w") as f:
        json.dump({"url": url, "id": remote.id, "token": remote.token, "workers": workers}, f)
    print(f"created session {remote.id} ({optimizer}, {mode} mode, {workers} workers) -> {out}")


@app.command()
def evaluate(
    url: Annotated[str, typer.Option()],
    session: Annotated[str, typer.Option(help="Session id.")],
    token: Annotated[str, typer.Option(help="Session token (or the admin key).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Pull a demo session's weights and report their accuracy on the digits test split."""
    import json

    from optserver_client import Session

    from optserver.demo import mlp
    from optserver.demo.data import load_digits

    data = load_digits()
    with Session.attach(url, session, token) as remote:
        weights = remote.pull()
        result = {
            "test_accuracy": mlp.accuracy(weights, data.x_test, data.y_test),
            "test_loss": mlp.loss(weights, data.x_test, data.y_test),
            "version": remote.version,
        }
    print(json.dumps(result) if json_output else f"test_accuracy={result['test_accuracy']:.4f} "
          f"loss={result['test_loss']:.4f} version={result['version']}")  # fmt: skip
