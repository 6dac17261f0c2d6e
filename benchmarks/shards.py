"""Sharded sessions: the same workload through one server, and through two shard processes.

    .venv/bin/python benchmarks/shards.py                # 1 worker x P=1e7, 4 workers x P=1e6
    .venv/bin/python benchmarks/shards.py --rounds 3     # and the ratios' median and range

The worker loop, the processes and the CPU accounting are those of ``ps_compare.py`` (each
worker a spawned process stepping ``Session.step`` in a loop; Adam, lr 1e-3, one float32 tensor
of P elements). Systems, in turn, in each cell:

``1 server``
    an ordinary session on one server (the unsharded path);
``1 shard``
    a sharded session of one shard on one server (``Client(url, sharded=True)``): what the
    sharded client costs by itself;
``2 shards``
    a sharded session over two server processes: the tensor is cut in two chunks
    (``--chunk-bytes``, 1 MiB by default, so that P=1e6 is cut too), and every step goes to
    both shards at once.

``/ 1 server`` is the system's steps/s over the unsharded one's in the same cell.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ps_compare
from ps_compare import LR, Bench, Budget, Ratio, Target, print_tables, run_rounds

SYSTEMS = {"single": "1 server", "one-shard": "1 shard", "two-shards": "2 shards"}
ps_compare.LABELS.update(SYSTEMS)


class ShardBench(Bench):
    def __init__(self, args: argparse.Namespace, budget: Budget) -> None:
        super().__init__(args, budget)
        self.chunk_bytes: int = args.chunk_bytes
        self.servers: dict[int, list[str]] = {}

    def urls(self, count: int) -> list[str]:
        if count not in self.servers:
            from optserver.embedded import embedded_shards

            servers = self.stack.enter_context(embedded_shards(count))
            self.servers[count] = [s.url for s in servers]
        return self.servers[count]

    @contextlib.contextmanager
    def system(self, system: str, size: int, workers: int) -> Iterator[Target]:
        from optserver_client import Client

        urls = self.urls(2 if system == "two-shards" else 1)
        sharded = system != "single"
        weights = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
        with Client(urls, timeout=300, sharded=sharded, chunk_bytes=self.chunk_bytes) as client:
            session = client.create_session({"w": weights}, {"name": "adam", "lr": LR})
            try:
                yield Target(
                    "optserver", size, workers, url=",".join(urls), session_id=session.id,
                    token=session.token or "", sharded=sharded,
                )  # fmt: skip
            finally:
                with contextlib.suppress(Exception):
                    session.delete()


RATIO = Ratio(reference="single", title="/ 1 server", row_over_reference=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["1x1e7", "4x1e6"],
                        help="WORKERSxP cells")  # fmt: skip
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--budget", type=float, default=3.0, help="timed seconds per cell")
    parser.add_argument("--min-steps", type=int, default=15, help="least timed steps per worker")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    args.rpc_channels = ""
    budget = Budget(args.budget, args.min_steps, warmup_steps=5, warmup_seconds=0.5)
    plan = []
    for cell in args.cells:
        workers, _, size = cell.partition("x")
        plan.append((int(float(size)), int(workers)))
    bench = ShardBench(args, budget)
    began = time.monotonic()
    rounds = run_rounds(bench, plan, args.systems, args.rounds)
    print(
        f"Adam lr {LR}, float32, one tensor of P; chunks above {args.chunk_bytes} bytes; "
        f"{os.cpu_count()} CPUs; timed >= {budget.seconds:g} s and >= {budget.min_steps} steps "
        f"per worker per cell; total {time.monotonic() - began:.0f} s"
    )
    print_tables(rounds, RATIO)


if __name__ == "__main__":
    main()
