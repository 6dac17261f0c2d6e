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
from collections.abc import Iterator, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ps_compare
from ps_compare import LR, Bench, Budget, Cell, Target, size_label

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


def table(cells: Sequence[Cell]) -> str:
    columns = ("P", "workers", "system", "steps/s", "p50 ms", "p90 ms", "/ 1 server", "steps",
               "own CPU", "other CPU")  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    base = {(c.size, c.workers): c.rate for c in cells if c.system == "single" and not c.error}
    for c in cells:
        head = [size_label(c.size), str(c.workers), SYSTEMS[c.system]]
        if c.error:
            lines.append("| " + " | ".join([*head, f"failed: {c.error}"] + [""] * 6) + " |")
            continue
        p50, p90 = np.percentile(np.array(c.latencies) * 1e3, [50, 90])
        single = base.get((c.size, c.workers))
        ratio = f"{c.rate / single:.2f}" if single else "-"
        row = [f"{c.rate:,.1f}", f"{p50:.3f}", f"{p90:.3f}", ratio, str(c.steps),
               f"{c.own_cores:.2f}", f"{c.other_cores:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(head + row) + " |")
    return "\n".join(lines)


def spread(rounds: Sequence[Sequence[Cell]]) -> str:
    columns = ("P", "workers", "system", "steps/s median (min-max)", "/ 1 server median (min-max)")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for i, first in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        rates = [c.rate for c in same]
        ratios = []
        for r, c in zip(rounds, same, strict=True):
            single = next(x for x in r if x.system == "single" and x.size == c.size
                          and x.workers == c.workers)  # fmt: skip
            ratios.append(c.rate / single.rate if single.rate else 0.0)
        head = [size_label(first.size), str(first.workers), SYSTEMS[first.system]]
        lines.append("| " + " | ".join([
            *head,
            f"{np.median(rates):,.1f} ({min(rates):,.1f}-{max(rates):,.1f})",
            f"{np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


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
    rounds: list[list[Cell]] = []
    began = time.monotonic()
    try:
        for _ in range(max(1, args.rounds)):
            cells = []
            for size, workers in plan:
                for system in args.systems:
                    cell = bench.measure(system, size, workers)
                    cells.append(cell)
                    status = cell.error or f"{cell.rate:,.1f} steps/s"
                    print(f"{SYSTEMS[system]:>9} P={size_label(size)} x{workers}: {status}",
                          file=sys.stderr, flush=True)  # fmt: skip
            rounds.append(cells)
    finally:
        bench.close()
    print(
        f"Adam lr {LR}, float32, one tensor of P; chunks above {args.chunk_bytes} bytes; "
        f"{os.cpu_count()} CPUs; timed >= {budget.seconds:g} s and >= {budget.min_steps} steps "
        f"per worker per cell; total {time.monotonic() - began:.0f} s"
    )
    print()
    print(table(rounds[-1]))
    if len(rounds) > 1:
        print()
        print(f"Over {len(rounds)} rounds (the table above is the last):")
        print()
        print(spread(rounds))


if __name__ == "__main__":
    main()
