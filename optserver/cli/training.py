"""The demo's commands: ``demo`` (everything on one machine), and its pieces for several
machines or containers: ``create-session``, ``worker`` and ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from optserver.cli.errors import CLIError
from optserver.cli.options import LogFormat, ModeName, OptimizerName

__all__ = ["create_session", "demo", "evaluate", "worker"]


def _positive(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter("must be a positive number")
    return value


Optimizer = Annotated[OptimizerName, typer.Option(help="The session's optimizer.")]
Mode = Annotated[
    ModeName,
    typer.Option(help="How pushes combine: async (on arrival), sync (rounds), ssp (bounded "
                 "staleness)."),
]  # fmt: skip
LearningRate = Annotated[
    float | None,
    typer.Option(help="Learning rate (default: one per optimizer that suits this model).",
                 callback=_positive),
]  # fmt: skip
Workers = Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")]
Epochs = Annotated[int, typer.Option(min=1, help="Passes over each worker's shard.")]
Batch = Annotated[int, typer.Option(min=1, max=4096, help="Examples per gradient.")]
AdminKey = Annotated[str | None, typer.Option(help="The server's admin key, if it has one.")]


def demo(
    workers: Workers = 4,
    optimizer: Optimizer = "adam",
    mode: Mode = "async",
    epochs: Epochs = 20,
    batch: Batch = 32,
    lr: LearningRate = None,
    max_staleness: Annotated[
        int, typer.Option(min=0, help="ssp mode: how many steps behind a gradient may be.")
    ] = 4,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    url: Annotated[
        str | None, typer.Option(help="Use this server instead of starting one.")
    ] = None,
    admin_key: AdminKey = None,
) -> None:
    """Train a small MLP on scikit-learn's digits with several worker processes, and compare
    with the same training in one process. Exits 1 when the result is far below that."""
    from rich.console import Console

    from optserver.demo.run import DemoConfig, DemoError, print_summary, run_demo, verdict

    config = DemoConfig(
        workers=workers, optimizer=optimizer, mode=mode, epochs=epochs, batch=batch, lr=lr,
        max_staleness=max_staleness,
    )  # fmt: skip
    try:
        summary = run_demo(config, live=not json_output, url=url, admin_key=admin_key)
    except DemoError as error:
        raise CLIError(str(error)) from None
    if json_output:
        print(json.dumps(summary))
    else:
        print_summary(summary, Console())
    warning = verdict(summary)
    if warning is not None:
        Console(stderr=True).print(f"[bold red]WARNING:[/bold red] {warning}", highlight=False)
        raise typer.Exit(1)


def worker(
    session_file: Annotated[
        Path | None,
        typer.Option(
            help="JSON with url, id and token (from create-session).", exists=True, dir_okay=False
        ),
    ] = None,
    url: Annotated[str | None, typer.Option(help="Server URL.")] = None,
    session: Annotated[str | None, typer.Option(help="Session id.")] = None,
    token: Annotated[str | None, typer.Option(help="Session token.")] = None,
    shard: Annotated[str, typer.Option(help="Shard index, or 'auto' (random batches).")] = "auto",
    shards: Annotated[int | None, typer.Option(min=1, help="Number of shards (workers).")] = None,
    epochs: Epochs = 20,
    batch: Batch = 32,
    seed: Annotated[int | None, typer.Option(help="Default: from the shard or hostname.")] = None,
    worker_id: Annotated[
        str | None, typer.Option(help="Default: from the shard or hostname.")
    ] = None,
    log: Annotated[LogFormat, typer.Option(help="Progress lines as text or JSON.")] = "text",
) -> None:
    """Train on one shard of the demo data, pushing gradients to a session."""
    import socket

    from optserver_client import Session

    from optserver.demo.worker import WorkerPlan, auto_seed, printer, run_worker

    spec: dict[str, Any] = {}
    if session_file is not None:
        try:
            spec = json.loads(session_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CLIError(f"--session-file {session_file} is not JSON: {error}") from None
        if not isinstance(spec, dict):
            raise CLIError(f"--session-file {session_file} holds no JSON object")
    url = url or spec.get("url")
    session_id = session or spec.get("id")
    token = token or spec.get("token")
    if not (url and session_id and token):
        raise typer.BadParameter("give --session-file, or --url, --session and --token")
    count = shards or int(spec.get("workers", 1))
    if shard == "auto":
        index = None
    elif shard.isdigit() and int(shard) < count:
        index = int(shard)
    else:
        raise typer.BadParameter(
            f"{shard!r} is not 'auto' or a shard index below {count}", param_hint="'--shard'"
        )
    plan = WorkerPlan(
        worker=worker_id or (f"w{index + 1}" if index is not None else socket.gethostname()),
        shard=index,
        shards=count,
        epochs=epochs,
        batch=batch,
        seed=seed if seed is not None else (index + 1 if index is not None else auto_seed()),
    )
    with Session.attach(url, session_id, token) as remote:
        run_worker(remote, plan, printer(log))


def create_session(
    url: Annotated[str, typer.Option(help="Server URL.")],
    out: Annotated[
        Path, typer.Option(help="Where to write {url, id, token, workers}.", dir_okay=False)
    ],
    admin_key: AdminKey = None,
    workers: Workers = 3,
    optimizer: Optimizer = "adam",
    mode: Mode = "async",
    lr: LearningRate = None,
    max_staleness: Annotated[
        int, typer.Option(min=0, help="ssp mode: how many steps behind a gradient may be.")
    ] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights.")] = 0,
) -> None:
    """Create the demo's session (initial MLP weights) and write its credentials to a file."""
    from optserver_client import Client

    from optserver.demo import mlp
    from optserver.demo.run import mode_config, optimizer_config

    with Client(url, admin_key=admin_key) as client:
        remote = client.create_session(
            mlp.init_params(seed),
            optimizer_config(optimizer, lr),
            mode=mode_config(mode, workers, max_staleness=max_staleness),
            name="demo",
        )
    credentials = {"url": url, "id": remote.id, "token": remote.token, "workers": workers}
    out.write_text(json.dumps(credentials))
    print(f"created session {remote.id} ({optimizer}, {mode} mode, {workers} workers) -> {out}")


def evaluate(
    url: Annotated[str, typer.Option(help="Server URL.")],
    session: Annotated[str, typer.Option(help="Session id.")],
    token: Annotated[str, typer.Option(help="Session token (or the admin key).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Pull a demo session's weights and report their accuracy on the digits test split."""
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
