"""Steps per second with a data directory under each fsync policy, and without one.

    python benchmarks/durability.py [--sizes 1e3 1e6] [--seconds 3] [--workers 1 4]

For each size P (float32, plain SGD, binary pushes with ``return=none``) and each setting
(no data directory; ``--fsync always``, ``interval``, ``never``), a server is started, and
``workers`` threads push for ``--seconds`` (bounded in count as well). With ``always`` every
acknowledged push is on disk; concurrent pushes share fsyncs (group commit), which is why
several workers get more steps per second than one.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from optserver_client import Client, Session

from optserver.embedded import embedded_server

MAX_PUSHES = 100_000


def measure(url: str, session: Session, size: int, workers: int, seconds: float) -> float:
    grads = {"w": np.full(size, 1e-6, np.float32)}
    counts = [0] * workers
    stop = time.monotonic() + seconds

    def push(k: int) -> None:
        with Session.attach(url, session.id, str(session.token)) as s:
            while time.monotonic() < stop and counts[k] < MAX_PUSHES:
                s.push(grads)
                counts[k] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=push, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e6])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    print(f"steps/s, float32 SGD, binary pushes (return=none), {args.seconds:g} s per cell")
    columns = [f"{w} worker{'s' if w > 1 else ''}" for w in args.workers]
    header = f"{'params':>7} {'data dir':<16}" + "".join(f"{c:>12}" for c in columns)
    print(header)
    print("-" * len(header))
    for size in (int(s) for s in args.sizes):
        for label in ("none", "fsync=always", "fsync=interval", "fsync=never"):
            with tempfile.TemporaryDirectory() as directory:
                settings: dict[str, Any] = {}
                if label != "none":
                    settings = {"data_dir": Path(directory), "fsync": label.split("=")[1]}
                with embedded_server(**settings) as server, Client(server.url) as client:
                    session = client.create_session(
                        {"w": np.zeros(size, np.float32)}, {"name": "sgd", "lr": 1e-3}
                    )
                    session.push({"w": np.zeros(size, np.float32)})  # warm up the kernels
                    rates = [
                        measure(server.url, session, size, w, args.seconds) for w in args.workers
                    ]
            print(f"{size:>7.0e} {label:<16}" + "".join(f"{r:>12.1f}" for r in rates))


if __name__ == "__main__":
    main()
