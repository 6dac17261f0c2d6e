"""A real optserver in a subprocess (uvicorn on a free loopback port), for integration tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    admin_key: str | None = None

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}


@contextmanager
def live_server(**settings: object) -> Iterator[LiveServer]:
    """Start ``python -m optserver serve`` with ``OPTSERVER_*`` settings; stop it afterwards."""
    port = free_port()
    env = {**os.environ, "OPTSERVER_PORT": str(port), "OPTSERVER_LOG_LEVEL": "warning"}
    env.update({f"OPTSERVER_{k.upper()}": str(v) for k, v in settings.items()})
    process = subprocess.Popen(
        [sys.executable, "-m", "optserver", "serve"], env=env, stdin=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy in 30 s")
            time.sleep(0.05)
        admin = settings.get("admin_key")
        yield LiveServer(url, process, None if admin is None else str(admin))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
