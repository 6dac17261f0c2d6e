"""``optserver shards``: several servers on one machine, for a sharded session without
containers (the demo, benchmarks, a workstation). Clusters use an engine instead: Compose,
Docker Swarm or Kubernetes (see ``deploy/``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from optserver.cli.errors import CLIError
from optserver.cli.options import setting_option
from optserver.config import Settings
from optserver.embedded import shared_threads

__all__ = ["shards"]

#: How long the servers get to stop after SIGTERM, before SIGKILL.
STOP_GRACE_S = 15.0


def shards(
    count: Annotated[int, typer.Option(min=1, max=64, help="How many servers.")] = 2,
    host: Annotated[str, setting_option("host")] = Settings.model_fields["host"].default,
    port: Annotated[
        int, setting_option("port", help="The first server's port; the others follow it.")
    ] = Settings.model_fields["port"].default,
    data_dir: Annotated[
        Path | None,
        setting_option(
            "data_dir", help="Each server keeps its sessions in DIR/shard-<i> (default: memory)."
        ),
    ] = None,
) -> None:
    """Run COUNT servers on consecutive ports, print their URLs as OPTSERVER_URLS, and stop
    them all on Ctrl-C (or when one of them exits). Every other setting is read from the
    OPTSERVER_* environment variables by each server, as for ``serve``; OPTSERVER_COMPUTE_THREADS
    defaults to each server's share of the CPUs."""
    if port + count - 1 > 65535:
        raise CLIError(f"ports {port}-{port + count - 1} do not exist; choose a lower --port")
    processes: list[subprocess.Popen[bytes]] = []
    urls = []
    for i in range(count):
        env = {**os.environ, "OPTSERVER_HOST": host, "OPTSERVER_PORT": str(port + i)}
        # The servers share this machine's cores: each steps with its share of them.
        env.setdefault("OPTSERVER_COMPUTE_THREADS", str(shared_threads(count)))
        if data_dir is not None:
            env["OPTSERVER_DATA_DIR"] = str(data_dir / f"shard-{i}")
        processes.append(subprocess.Popen([sys.executable, "-m", "optserver", "serve"], env=env))
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        urls.append(f"http://{shown}:{port + i}")
    print(f"OPTSERVER_URLS={','.join(urls)}", flush=True)

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping and all(p.poll() is None for p in processes):
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        status = _stop(processes)
    if not stopping:  # a server exited by itself
        raise CLIError(f"a server exited (status {status}); the others were stopped")


def _stop(processes: list[subprocess.Popen[bytes]]) -> int:
    """Stop every server (SIGTERM, then SIGKILL after the grace); the first nonzero status."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return next((p.returncode for p in processes if p.returncode not in (0, -15)), 0)
