"""The cost of journaling one step's gradients: the record as one joined buffer, as pieces
(what the data directory writes: the header, then views of the arrays), and the floor, a bare
``os.write`` of the same bytes.

    python benchmarks/journal_append.py [--sizes 1e5 1e6 1e7] [--records 20]

Each size P is one float32 gradient of P numbers in a step record (``fsync=never``: the page
cache, as a killed server sees it). Records alternate between the ways, each in a fresh
directory (``--dir``, e.g. a tmpfs, leaves the disk out); the table shows each way's median
milliseconds per record and the pieces' speed-up over the joined buffer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from optserver_client import safetensors_io

from optserver.journal import Journal

#: A record as the journal takes it: one buffer, or its pieces.
Payload = memoryview | tuple[bytes | memoryview, ...]


def _write(path: Path, data: bytes) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        start = time.perf_counter()
        os.write(fd, data)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def _append(directory: Path, payload: Callable[[], Payload]) -> float:
    """Seconds to encode one record and append it (the journal opened and closed untimed)."""
    journal = Journal(directory, 1, "never")
    try:
        start = time.perf_counter()
        journal.append(payload())
        return time.perf_counter() - start
    finally:
        journal.close()


def measure(size: int, records: int, where: str | None) -> dict[str, float]:
    """Median milliseconds per record of each way, for a gradient of ``size`` numbers."""
    grads = {"g/w": np.random.default_rng(0).standard_normal(size).astype(np.float32)}
    metadata = {"event": '{"type":"step","session":"s"}'}
    floor_bytes = bytes(safetensors_io.encode(grads, metadata))
    ways: dict[str, Callable[[Path], float]] = {
        "os.write": lambda d: _write(d / "floor", floor_bytes),
        "joined": lambda d: _append(d, lambda: safetensors_io.encode(grads, metadata)),
        "pieces": lambda d: _append(d, lambda: safetensors_io.encode_parts(grads, metadata)),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(records):
        for name, way in ways.items():
            # A fresh directory per record: the files do not grow into writeback throttling.
            with tempfile.TemporaryDirectory(dir=where) as directory:
                times[name].append(way(Path(directory)))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument(
        "--dir", default=None, help="where the journals go (default: the system's temp dir)"
    )
    args = parser.parse_args()
    print(f"ms per step record (median of {args.records}), float32, fsync=never")
    header = f"{'params':>7} {'os.write':>10} {'joined':>10} {'pieces':>10} {'joined/pieces':>14}"
    print(header)
    print("-" * len(header))
    for size in (int(s) for s in args.sizes):
        ms = measure(size, args.records, args.dir)
        print(
            f"{size:>7.0e} {ms['os.write']:>10.2f} {ms['joined']:>10.2f} {ms['pieces']:>10.2f}"
            f" {ms['joined'] / ms['pieces']:>14.2f}"
        )


if __name__ == "__main__":
    main()
