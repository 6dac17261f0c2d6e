"""What a fresh buffer costs next to a reused one: the case for optserver_client.buffers.

    python benchmarks/buffer_reuse.py [--sizes 4e6 4e7] [--repeat 20]

For each size, the median time to copy that many bytes into a new ``np.empty`` buffer (first
touch of every page: faults, zeroing, on a VM possibly the host's allocation), into a buffer
taken from a BufferPool (reused once free), and into one preallocated buffer (the floor).
"""

from __future__ import annotations

import argparse

import numpy as np
from optserver_client.buffers import BufferPool
from timing import median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[4e6, 4e7])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(f"{'bytes':>8} {'fresh ms':>9} {'pooled ms':>10} {'reused ms':>10} {'fresh/pooled':>13}")
    for size in (int(s) for s in args.sizes):
        fresh, pooled, reused = measure(size, args.repeat)
        print(f"{size:>8.0e} {fresh:9.2f} {pooled:10.2f} {reused:10.2f} {fresh / pooled:13.2f}")


def measure(size: int, repeat: int) -> tuple[float, float, float]:
    source = np.ones(size, np.uint8)
    pool = BufferPool(4 * size)
    target = np.empty(size, np.uint8)
    return (
        median_ms(lambda: np.copyto(np.empty(size, np.uint8), source), repeat),
        median_ms(lambda: np.copyto(pool.take(size), source), repeat),
        median_ms(lambda: np.copyto(target, source), repeat),
    )


if __name__ == "__main__":
    main()
