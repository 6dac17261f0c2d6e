"""A real server in a child process on a free loopback port: for the demo, benchmarks, tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["EmbeddedServer", "embedded_server", "embedded_shards", "free_port", "shared_threads"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedServer:
    url: str
    process: subprocess.Popen[bytes]
    admin_key: str | None = None

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}


@contextmanager
def embedded_server(
    *,
    startup_timeout: float = 30.0,
    quiet: bool = True,
    log_file: Path | None = None,
    port: int | None = None,
    **settings: object,
) -> Iterator[EmbeddedServer]:
    """Run ``python -m optserver serve`` with ``OPTSERVER_*`` settings until the block ends.

    ``log_file``: where the server's output goes (default: this process's); ``port``: its
    port (default: a free one; a server restarted on its port keeps its address).
    """
    port = free_port() if port is None else port
    env = {**os.environ, "OPTSERVER_HOST": "127.0.0.1", "OPTSERVER_PORT": str(port)}
    if quiet:
        env["OPTSERVER_LOG_LEVEL"] = "warning"
    env.update({f"OPTSERVER_{k.upper()}": str(v) for k, v in settings.items()})
    output = open(log_file, "ab") if log_file is not None else None  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "optserver", "serve"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /healthz within {startup_timeout} s")
            time.sleep(0.05)
        admin = settings.get("admin_key")
        yield EmbeddedServer(url, process, None if admin is None else str(admin))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if output is not None:
            output.close()


@contextmanager
def embedded_shards(count: int, **settings: object) -> Iterator[list[EmbeddedServer]]:
    """``count`` servers (:func:`embedded_server`, the same settings; a ``data_dir`` holds one
    folder ``shard-<i>`` per server), for a sharded session: ``Client([s.url for s in ...])``.
    They share this machine's cores: each steps with its share of them (``compute_threads``,
    unless given)."""
    data_dir = settings.pop("data_dir", None)
    settings.setdefault("compute_threads", shared_threads(count))
    with ExitStack() as stack:
        servers = []
        for i in range(count):
            own: dict[str, Any] = dict(settings)
            if data_dir is not None:
                own["data_dir"] = Path(str(data_dir)) / f"shard-{i}"
            servers.append(stack.enter_context(embedded_server(**own)))
        yield servers


def shared_threads(servers: int) -> int:
    """The compute threads of each of ``servers`` servers on this machine: its CPUs shared out
    (threads beyond the cores only take turns, and cost a wake-up each)."""
    return max(1, (os.cpu_count() or 1) // servers)
