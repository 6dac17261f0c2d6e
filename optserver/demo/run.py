"""``optserver demo``: a server, N worker processes, a live view, and a single-process baseline."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from optserver_client import Client, Session
from rich.console import Console
from rich.live import Live
from rich.table import Table

from optserver.demo import mlp
from optserver.demo.data import Digits, load_digits
from optserver.demo.worker import steps_per_epoch
from optserver.embedded import embedded_shards
from optserver.optim import create as create_optimizer

__all__ = [
    "FRAMEWORKS",
    "DemoConfig",
    "DemoError",
    "baseline",
    "mode_config",
    "optimizer_config",
    "run_demo",
    "verdict",
]

#: Learning rates that suit this small model, by optimizer (overridable with --lr), in every
#: mode with up to 8 workers. SGD's is small because of its momentum (0.9): asynchronous
#: updates add momentum of their own (Mitliagkas et al., 2016, "Asynchrony begets momentum"),
#: and at 0.03 async SGD with 8 workers, or at 0.1 with 4, diverges to chance.
DEFAULT_LR = {"sgd": 0.01, "adagrad": 0.05, "rmsprop": 0.003, "adam": 0.01, "adamw": 0.01}
#: How the workers compute gradients: by hand in numpy, or with torch and RemoteOptimizer.
FRAMEWORKS = ("numpy", "torch")
#: The demo warns (and exits 1) when the test accuracy is further than this below the
#: single-process baseline's.
WARN_BELOW_BASELINE = 0.1
#: ... and when it is below this whatever the baseline (ten classes: chance is 0.1).
LEARNED = 0.5


class DemoError(RuntimeError):
    """The demo could not run to the end (a worker failed); the message says which and why."""


@dataclass(frozen=True)
class DemoConfig:
    workers: int = 4
    optimizer: str = "adam"
    mode: str = "async"
    epochs: int = 20
    batch: int = 32
    lr: float | None = None
    seed: int = 0
    max_staleness: int = 4
    round_timeout: float = 30.0
    #: "numpy": the workers compute gradients by hand and call the client; "torch": a torch
    #: model, and a plain torch loop with RemoteOptimizer (optserver.demo.torch_demo).
    framework: str = "numpy"


def optimizer_config(name: str, lr: float | None) -> dict[str, Any]:
    if name not in DEFAULT_LR:
        raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(DEFAULT_LR)}")
    config: dict[str, Any] = {"name": name, "lr": lr if lr is not None else DEFAULT_LR[name]}
    if name == "sgd":
        config["momentum"] = 0.9
    return config


def mode_config(
    mode: str, workers: int, *, max_staleness: int = 4, timeout: float = 30.0
) -> dict[str, Any]:
    if mode == "async":
        return {"name": "async"}
    if mode == "ssp":
        return {"name": "ssp", "max_staleness": max_staleness}
    if mode == "sync":
        return {"name": "sync", "workers": workers, "timeout_s": timeout}
    raise ValueError(f"unknown mode {mode!r}; use async, sync or ssp")


def baseline(config: DemoConfig, data: Digits) -> dict[str, Any]:
    """The same model, optimizer and data in one process, no server: the reference."""
    start = time.perf_counter()
    params = mlp.init_params(config.seed)
    optimizer = create_optimizer(optimizer_config(config.optimizer, config.lr))
    state = optimizer.init(params)
    rng = np.random.default_rng(config.seed)
    n = len(data.y_train)
    steps = 0
    for _ in range(config.epochs):
        order = rng.permutation(n)
        for begin in range(0, n, config.batch):
            chosen = order[begin : begin + config.batch]
            _, grads = mlp.gradients(params, data.x_train[chosen], data.y_train[chosen])
            optimizer.update(grads, state, params)
            steps += 1
    return {
        "test_accuracy": mlp.accuracy(params, data.x_test, data.y_test),
        "steps": steps,
        "seconds": time.perf_counter() - start,
    }


def _bar(fraction: float, width: int = 20) -> str:
    filled = round(width * min(max(fraction, 0.0), 1.0))
    return "[green]" + "█" * filled + "[/green]" + "·" * (width - filled)


@dataclass
class _Progress:
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    def table(self, title: str) -> Table:
        table = Table(title=title)
        for column in ("worker", "epoch", "steps", "loss", "train acc", "staleness", "status"):
            table.add_column(column, justify="right")
        table.add_column("progress", justify="left")
        for worker, row in sorted(self.rows.items()):
            table.add_row(
                worker,
                f"{row.get('epoch', 0)}/{row.get('epochs', '?')}",
                str(row.get("steps", 0)),
                f"{row['loss']:.4f}" if "loss" in row else "-",
                f"{row['accuracy']:.3f}" if "accuracy" in row else "-",
                f"{row['staleness']:.2f}" if "staleness" in row else "-",
                row.get("status", "training"),
                _bar(row.get("epoch", 0) / max(1, row.get("epochs", 1))),
            )
        return table


def _spawn_workers(url: str, session: Session, config: DemoConfig) -> list[subprocess.Popen[str]]:
    processes = []
    for k in range(config.workers):
        command = [
            sys.executable, "-m", "optserver", "worker", "--url", url, "--session", session.id,
            "--token", str(session.token), "--shard", str(k), "--shards", str(config.workers),
            "--epochs", str(config.epochs), "--batch", str(config.batch),
            "--seed", str(config.seed + k + 1), "--worker-id", f"w{k + 1}", "--log", "json",
            "--framework", config.framework,
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
            )
        )
    return processes


def _read_events(processes: list[subprocess.Popen[str]]) -> Iterator[dict[str, Any]]:
    """Events from every worker's stdout, as they come, until all have exited."""
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def pump(process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                events.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        events.put(None)

    for process in processes:
        threading.Thread(target=pump, args=(process,), daemon=True).start()
    running = len(processes)
    while running:
        event = events.get()
        if event is None:
            running -= 1
        else:
            yield event


@contextmanager
def _server(url: str | None, shards: int) -> Iterator[str]:
    """The servers' URLs, comma-separated: ``url``, or ``shards`` servers started here."""
    if url is not None:
        yield url
        return
    with embedded_shards(shards) as servers:
        yield ",".join(server.url for server in servers)


def run_demo(
    config: DemoConfig,
    *,
    live: bool = True,
    url: str | None = None,
    admin_key: str | None = None,
    shards: int = 1,
) -> dict[str, Any]:
    """Train with ``config.workers`` processes through a server (``url``, comma-separated
    shards, or ``shards`` servers started here); return the summary."""
    if config.framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {config.framework!r}; use {' or '.join(FRAMEWORKS)}")
    data = load_digits()
    console = Console(stderr=True)
    optimizer = optimizer_config(config.optimizer, config.lr)
    mode = mode_config(
        config.mode, config.workers, max_staleness=config.max_staleness,
        timeout=config.round_timeout,
    )  # fmt: skip
    with _server(url, shards) as server_url, Client(server_url, admin_key=admin_key) as client:
        if config.framework == "torch":
            from optserver.demo import torch_demo

            per_epoch = steps_per_epoch(len(data.y_train), config.workers, config.batch)
            rounds = config.epochs * per_epoch  # every worker's steps, as the workers take them
            steps = rounds if config.mode == "sync" else rounds * config.workers
            creator = torch_demo.create(client, optimizer, mode, config.seed, steps)
            session = creator.session
        else:
            session = client.create_session(
                mlp.init_params(config.seed), optimizer, mode=mode, name=f"demo-{config.mode}"
            )
        start = time.perf_counter()
        processes = _spawn_workers(server_url, session, config)
        progress = _Progress(
            {f"w{k + 1}": {"epochs": config.epochs} for k in range(config.workers)}
        )
        over = f", {len(client.urls)} shards" if len(client.urls) > 1 else ""
        framework = ", torch" if config.framework == "torch" else ""
        title = (
            f"{config.workers} workers{over}{framework}, {config.optimizer}, {config.mode} "
            f"mode, {config.epochs} epochs"
        )
        # A live table on a terminal; plain lines, one an epoch, for logs and CI.
        view = (
            Live(progress.table(title), console=console, refresh_per_second=8)
            if live and console.is_terminal
            else nullcontext()
        )
        if live and not console.is_terminal:
            console.print(f"optserver demo: {title}", highlight=False)
        results: dict[str, dict[str, Any]] = {}
        with view as display:
            for event in _read_events(processes):
                row = progress.rows.setdefault(event["worker"], {})
                row.update(event)
                if event["event"] == "done":
                    row["status"] = f"test {event['test_accuracy']:.3f}"
                    results[event["worker"]] = event
                if display is not None:
                    display.update(progress.table(title))
                elif live and event["event"] != "step":
                    console.print(_line(event), highlight=False)
        failed = [p for p in processes if p.wait() != 0]
        seconds = time.perf_counter() - start
        if failed:
            raise DemoError(_failures(processes, failed))
        weights = session.pull()
        info = session.info()
        session.delete()
        shard_count = len(client.urls)
    if config.framework == "torch":
        accuracy = torch_demo.evaluate_weights(weights, data)
        reference = torch_demo.torch_baseline(
            optimizer, epochs=config.epochs, batch=config.batch, seed=config.seed, data=data
        )
    else:
        accuracy = mlp.accuracy(weights, data.x_test, data.y_test)
        reference = baseline(config, data)
    staleness = info["counters"]["staleness"]
    return {
        "workers": config.workers,
        "shards": shard_count,
        "framework": config.framework,
        "mode": config.mode,
        "optimizer": optimizer,
        "epochs": config.epochs,
        "steps": info["version"],
        "test_accuracy": accuracy,
        "baseline_accuracy": reference["test_accuracy"],
        "baseline_steps": reference["steps"],
        "baseline_seconds": reference["seconds"],
        "seconds": seconds,
        "pushes": info["counters"]["pushes_received"],
        "pushes_rejected": info["counters"]["pushes_rejected"],
        "rejected_by_reason": info["counters"]["rejected_by_reason"],
        "staleness_mean": staleness["mean"],
        "staleness_buckets": staleness["buckets"],
        "per_worker": {
            worker: {
                "pushes": stats["pushes"],
                "applied": stats["applied"],
                "rejected": stats["rejected"],
                "staleness_mean": stats["staleness"]["mean"],
                "test_accuracy": results.get(worker, {}).get("test_accuracy"),
            }
            for worker, stats in info["workers"].items()
        },
    }


def _failures(processes: list[subprocess.Popen[str]], failed: list[subprocess.Popen[str]]) -> str:
    """Which workers failed, each with the last line it wrote to stderr (its error)."""
    reasons = []
    for process in failed:
        lines = (process.stderr.read() if process.stderr else "").strip().splitlines()
        reasons.append(f"w{processes.index(process) + 1}: {lines[-1] if lines else 'no output'}")
    return f"{len(failed)} of {len(processes)} workers failed: " + "; ".join(reasons)


def verdict(summary: dict[str, Any]) -> str | None:
    """A warning when the model did not learn, or is far worse than the same training in one
    process (what asynchrony costs should be small)."""
    accuracy, reference = summary["test_accuracy"], summary["baseline_accuracy"]
    setup = (
        f"{json.dumps(summary['optimizer'])} in {summary['mode']} mode with "
        f"{summary['workers']} workers"
    )
    if accuracy < LEARNED:
        return (
            f"test accuracy {accuracy:.3f} is near chance (0.1; the single-process baseline "
            f"reached {reference:.3f}): training diverged or stalled with {setup}; try a "
            "smaller --lr"
        )
    if accuracy < reference - WARN_BELOW_BASELINE:
        return (
            f"test accuracy {accuracy:.3f} is far below the single-process baseline's "
            f"{reference:.3f} with {setup}: stale gradients hurt at this --lr; try a smaller one"
        )
    return None


def _line(event: dict[str, Any]) -> str:
    """One worker event as a plain log line."""
    if event["event"] == "epoch":
        return (
            f"{event['worker']}: epoch {event['epoch']}/{event['epochs']}  steps {event['steps']}"
            f"  loss {event['loss']:.4f}  train acc {event['accuracy']:.3f}"
            f"  staleness {event['staleness']:.2f}"
        )
    return (
        f"{event['worker']}: done after {event['steps']} steps in {event['seconds']:.1f} s, "
        f"test acc {event['test_accuracy']:.3f}"
    )


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The summary: a table on a terminal, ``key: value`` lines elsewhere (logs, CI)."""
    rows = [
        ("workers / mode", f"{summary['workers']} / {summary['mode']}"),
        ("framework", summary.get("framework", "numpy")),
        ("optimizer", json.dumps(summary["optimizer"])),
        ("test accuracy", f"{summary['test_accuracy']:.4f}"),
        (
            "baseline (1 process)",
            f"{summary['baseline_accuracy']:.4f} ({summary['baseline_steps']} steps, "
            f"{summary['baseline_seconds']:.1f} s)",
        ),
        ("steps applied", str(summary["steps"])),
        ("pushes (rejected)", f"{summary['pushes']} ({summary['pushes_rejected']})"),
        (
            "staleness (mean)",
            "-" if summary["staleness_mean"] is None else f"{summary['staleness_mean']:.2f}",
        ),
        ("wall time", f"{summary['seconds']:.1f} s"),
    ]
    if not console.is_terminal:
        width = max(len(key) for key, _ in rows)
        lines = [f"{key + ':':<{width + 1}} {value}" for key, value in rows]
        console.print("optserver demo: summary", *lines, sep="\n", highlight=False, soft_wrap=True)
        return
    table = Table(title="optserver demo: summary", show_header=False)
    table.add_column(justify="right", style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
