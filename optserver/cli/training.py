"""The demo's commands: ``demo`` (everything on one machine), and its pieces for several
machines or containers: ``create-session``, ``worker`` and ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from optserver.cli.errors import CLIError
from optserver.cli.options import FrameworkName, LogFormat, ModeName, OptimizerName

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
Framework = Annotated[
    FrameworkName,
    typer.Option(help="numpy: gradients by hand through the client; torch: a torch model and "
                 "training loop with optserver_client.torch.RemoteOptimizer (needs torch)."),
]  # fmt: skip
AdminKey = Annotated[str | None, typer.Option(help="The server's admin key, if it has one.")]
#: A server URL, or a sharded session's shards (comma-separated).
URLS_OPTION = typer.Option(
    "--url", help="Server URL; several, comma-separated: the shards.", envvar="OPTSERVER_URLS"
)


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
        str | None,
        typer.Option(
            help="Use this server instead of starting one (comma-separated: these shards).",
            envvar="OPTSERVER_URLS",
        ),
    ] = None,
    admin_key: AdminKey = None,
    shards: Annotated[
        int, typer.Option(min=1, max=16, help="Servers to start and shard the session over.")
    ] = 1,
    framework: Framework = "numpy",
) -> None:
    """Train a small MLP on scikit-learn's digits with several worker processes, and compare
    with the same training in one process. Exits 1 when the result is far below that."""
    from rich.console import Console

    from optserver.demo.run import DemoConfig, DemoError, print_summary, run_demo, verdict

    config = DemoConfig(
        workers=workers, optimizer=optimizer, mode=mode, epochs=epochs, batch=batch, lr=lr,
        max_staleness=max_staleness, framework=framework,
    )  # fmt: skip
    try:
        summary = run_demo(
            config, live=not json_output, url=url, admin_key=admin_key, shards=shards
        )
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
    url: Annotated[str | None, URLS_OPTION] = None,
    session: Annotated[str | None, typer.Option(help="Session id.")] = None,
    token: Annotated[str | None, typer.Option(help="Session token.")] = None,
    shard: Annotated[
        str, typer.Option(help="Data shard index, or 'auto' (random batches).")
    ] = "auto",
    shards: Annotated[
        int | None, typer.Option(min=1, help="Number of data shards (workers).")
    ] = None,
    epochs: Epochs = 20,
    batch: Batch = 32,
    seed: Annotated[int | None, typer.Option(help="Default: from the shard or hostname.")] = None,
    worker_id: Annotated[
        str | None, typer.Option(help="Default: from the shard or hostname.")
    ] = None,
    log: Annotated[LogFormat, typer.Option(help="Progress lines as text or JSON.")] = "text",
    patience: Annotated[
        float,
        typer.Option(
            min=0, help="Seconds to keep pushing a step while a server is out (restarting)."
        ),
    ] = 120.0,
    framework: Framework = "numpy",
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
        patience=patience,
    )
    if framework == "torch":
        from optserver.demo.torch_demo import run_torch_worker

        run_torch_worker(url, session_id, token, plan, printer(log))
        return
    with Session.attach(url, session_id, token) as remote:
        run_worker(remote, plan, printer(log))


def create_session(
    url: Annotated[str, URLS_OPTION],
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write {url, id, token, workers}.", dir_okay=False),
    ] = None,
    session_id: Annotated[
        str | None, typer.Option(help="The session's id (default: a random one).")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="The session's token, 32+ URL-safe characters (default: a random one).",
            envvar="OPTSERVER_SESSION_TOKEN",
        ),
    ] = None,
    exist_ok: Annotated[
        bool,
        typer.Option(
            help="With --session-id: a session of that id that --token opens is fine (several "
            "workers may each run this command)."
        ),
    ] = False,
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
    """Create the demo's session (initial MLP weights) and write its credentials to a file.
    Several comma-separated URLs: the session is sharded over them."""
    from optserver_client import Client, ConflictError, Session, ShardError

    from optserver.demo import mlp
    from optserver.demo.run import mode_config, optimizer_config

    if out is None and (session_id is None or token is None):
        raise typer.BadParameter("give --out, or choose --session-id and --token")
    if exist_ok and (session_id is None or token is None):
        raise typer.BadParameter("--exist-ok needs --session-id and --token")
    existed = False
    with Client(url, admin_key=admin_key) as client:
        try:
            remote = client.create_session(
                mlp.init_params(seed),
                optimizer_config(optimizer, lr),
                mode=mode_config(mode, workers, max_staleness=max_staleness),
                name="demo",
                id=session_id,
                token=token,
            )
        except (ConflictError, ShardError) as error:
            causes = error.errors.values() if isinstance(error, ShardError) else [error]
            if not exist_ok or not all(isinstance(e, ConflictError) for e in causes):
                raise
            assert session_id is not None and token is not None
            with Session.attach(url, session_id, token) as remote:  # it opens: it is ours
                _wait_for_weights(remote, set(mlp.init_params(seed)))
            existed = True
    credentials = {"url": url, "id": remote.id, "token": remote.token, "workers": workers}
    if out is not None:
        out.write_text(json.dumps(credentials))
    shards = len(client.urls)
    where = f" over {shards} shards" if shards > 1 else ""
    verb = "found existing" if existed else "created"
    target = f" -> {out}" if out is not None else ""
    print(
        f"{verb} session {remote.id} ({optimizer}, {mode} mode, {workers} workers{where}){target}"
    )


#: How long ``create-session --exist-ok`` waits for another creator to finish the session.
CREATION_WAIT_S = 120.0


def _wait_for_weights(session: Any, names: set[str]) -> None:
    """Return once the session holds every tensor in ``names``: a concurrent creator may still
    be uploading the weights (on some shards) when this one finds the session."""
    import time

    deadline = time.monotonic() + CREATION_WAIT_S
    while True:
        held = {entry["name"] for entry in session.info()["params"]}
        if names <= held:
            return
        if time.monotonic() > deadline:
            missing = ", ".join(sorted(names - held))
            raise CLIError(
                f"session {session.id} exists but still lacks {missing} after "
                f"{CREATION_WAIT_S:g} s: its creator failed; delete it and create it again"
            )
        time.sleep(0.5)


def evaluate(
    url: Annotated[str, URLS_OPTION],
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
