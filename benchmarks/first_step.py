"""The first Adam step of a freshly started server, with a cold and a warm numba cache, with and
without the kernel warm-up (``OPTSERVER_WARM_UP``).

    python benchmarks/first_step.py [--sizes 1e3 1e6]

For each size P (one float32 tensor) and case, a new ``optserver serve`` process: the time to
its first /healthz, then, through the Python client, the session's creation (weights included)
and its first and second Adam steps. "cold" gives the server an empty ``NUMBA_CACHE_DIR``,
"warm" one that a warm-up filled beforehand. With the warm-up, the steps wait until the server
has logged that its kernels are ready (the "ready" column: seconds after /healthz); without it,
they start at once. A step that finds its kernel neither in memory nor in the cache compiles it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from optserver_client import Client

from optserver.embedded import embedded_server

#: What the server logs when its warm-up has finished.
READY = "kernels ready in"


@dataclass
class Result:
    startup_s: float
    ready_s: float | None
    create_ms: float
    first_ms: float
    second_ms: float


def fill_cache(cache: Path) -> None:
    """Warm-up in a process of its own: it leaves every kernel in ``cache``."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    code = "from optserver.optim import warm_up; warm_up()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def wait_for(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not log {text!r} within {timeout} s")
        time.sleep(0.05)


def measure(size: int, cache: Path, warm_up: bool, log: Path) -> Result:
    previous = os.environ.get("NUMBA_CACHE_DIR")
    os.environ["NUMBA_CACHE_DIR"] = str(cache)  # the server inherits this environment
    try:
        start = time.perf_counter()
        with embedded_server(
            startup_timeout=120, log_file=log, log_level="info", warm_up=str(warm_up).lower()
        ) as server:
            startup = time.perf_counter() - start
            ready = None
            if warm_up:
                wait_for(log, READY, 600)
                ready = time.perf_counter() - start - startup
            w = np.zeros(size, np.float32)
            g = np.full(size, 0.5, np.float32)
            with Client(server.url) as client:
                t0 = time.perf_counter()
                session = client.create_session({"w": w}, {"name": "adam", "lr": 1e-3})
                t1 = time.perf_counter()
                session.step({"w": g})
                t2 = time.perf_counter()
                session.step({"w": g})
                t3 = time.perf_counter()
    finally:
        if previous is None:
            del os.environ["NUMBA_CACHE_DIR"]
        else:
            os.environ["NUMBA_CACHE_DIR"] = previous
    return Result(startup, ready, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e6])
    args = parser.parse_args()
    header = (
        f"{'P':>9} {'cache':>5} {'warm-up':>7} {'healthz s':>9} {'ready s':>7} "
        f"{'create ms':>9} {'first ms':>8} {'second ms':>9}"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm = root / "warm"
        fill_cache(warm)
        for size in map(int, args.sizes):
            for cache_name in ("cold", "warm"):
                for warm_up in (False, True):
                    case = root / f"{size}-{cache_name}-{warm_up}"
                    case.mkdir()
                    cache = case / "cache" if cache_name == "cold" else warm
                    r = measure(size, cache, warm_up, case / "server.log")
                    ready = "-" if r.ready_s is None else f"{r.ready_s:.2f}"
                    print(
                        f"{size:>9.0e} {cache_name:>5} {'on' if warm_up else 'off':>7} "
                        f"{r.startup_s:>9.2f} {ready:>7} {r.create_ms:>9.1f} "
                        f"{r.first_ms:>8.1f} {r.second_ms:>9.1f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
