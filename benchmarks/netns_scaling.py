"""How a sharded session scales with its shards when the network is the limit (root only).

    sudo .venv/bin/python benchmarks/netns_scaling.py                  # 1, 2 and 4 shards
    sudo .venv/bin/python benchmarks/netns_scaling.py --rate 100mbit --size 1e5 --workers 4

Every shard and every worker is a "host" of its own: a network namespace with its own address
and a link shaped to ``--rate`` each way (a token bucket on both ends of its veth pair, as
``tests/netns.py`` sets up), so each host has a NIC of that speed, as machines on a switch do.
Each worker is a process that steps one float32 tensor of ``--size`` elements (Adam) in a loop
for ``--seconds``; the tensor is cut into as many chunks as there are shards. The table shows
the aggregate steps/s and what the scaling model of docs/scaling.md predicts from the link rate
alone (``predicted``): a step moves 4P bytes up and 4P bytes down over its worker's link, and
over the shards' links 4P/N bytes each way per shard, so W workers and N shards allow at most
``min(W * rate / 8P, N * rate / 4P)`` steps/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.netns import netns_unavailable, network

PORT = 8000
TOKEN = "scaling-" + "t" * 35

WORKER = """
import json, sys, time
import numpy as np
from optserver_client import Session
urls, size, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
session = Session.attach(urls, "scaling", sys.argv[4], timeout=60)
grads = {"w": np.full(size, 1e-3, np.float32)}
for _ in range(5):
    session.step(grads)
steps, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    session.step(grads)
    steps += 1
print(json.dumps({"steps": steps, "seconds": time.perf_counter() - start}))
"""

CREATE = """
import sys
import numpy as np
from optserver_client import Client
urls, size, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with Client(urls, chunk_bytes=max(1, size * 4 // len(urls.split(",")) - 1), timeout=60) as c:
    s = c.create_session({"w": np.zeros(size, np.float32)}, {"name": "adam", "lr": 1e-3},
                         id="scaling", token=token)
    print(s.info()["sharding"])
"""


def rate_bytes(rate: str) -> float:
    """A ``tc`` rate (``100mbit``, ``1gbit``) in bytes per second."""
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
    for unit, factor in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * factor
    raise ValueError(f"unknown rate {rate!r}: use kbit, mbit or gbit")


def predicted(shards: int, workers: int, size: int, link: float) -> float:
    """Aggregate steps/s that the links allow. A step sends 4P bytes and receives 4P, one after
    the other, over its worker's link: a worker's steps take 8P / link seconds each, at the
    least. Cut in N equal chunks, they cross every shard's link (full duplex) as 4P/N bytes each
    way: all shards together carry N * link / 4P steps per second, at the most."""
    worker_bound = workers * link / (8 * size)
    shard_bound = shards * link / (4 * size)
    return min(worker_bound, shard_bound)


def run(shards: int, workers: int, size: int, seconds: float, rate: str) -> dict[str, float]:
    hosts = {f"shard{i}": 1 + i for i in range(shards)}
    hosts.update({f"worker{i}": 101 + i for i in range(workers)})
    python = sys.executable
    with network(hosts, prefix=f"osscale{os.getpid()}", link_rate=rate) as net:
        urls = ",".join(net.url(f"shard{i}", PORT) for i in range(shards))
        env = {"OPTSERVER_LOG_LEVEL": "warning"}
        for i in range(shards):
            address = net.hosts[f"shard{i}"].address
            net.popen(f"shard{i}", [python, "-m", "optserver", "serve", "--host", address,
                                    "--port", str(PORT)], env=env)  # fmt: skip
        probe = net.inside("worker0")
        for i in range(shards):
            for _ in range(600):
                try:
                    if probe.get(net.url(f"shard{i}", PORT) + "/healthz").status_code == 200:
                        break
                except Exception:
                    pass
                time.sleep(0.1)
        created = net.run("worker0", [python, "-c", CREATE, urls, str(size), TOKEN])
        if created.returncode != 0:
            raise RuntimeError(created.stderr)
        processes = [
            net.popen(
                f"worker{i}",
                [python, "-c", WORKER, urls, str(size), str(seconds), TOKEN],
                stdout=-1,
            )
            for i in range(workers)
        ]
        results = []
        for process in processes:
            out, _ = process.communicate(timeout=seconds + 300)
            if process.returncode != 0:
                raise RuntimeError(f"a worker failed ({process.returncode})")
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
    rate_total = sum(r["steps"] / r["seconds"] for r in results)
    return {"steps_per_s": rate_total}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--size", type=float, default=1e5, help="float32 elements per step")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", default="50mbit", help="each host's link, each way (tc)")
    args = parser.parse_args()
    reason = netns_unavailable()
    if reason is not None:
        raise SystemExit(f"cannot run: {reason}")
    size = int(args.size)
    link = rate_bytes(args.rate)
    print(
        f"{args.workers} workers, one float32 tensor of {size} elements (Adam), every host's "
        f"link {args.rate} each way, {args.seconds:g} s per row, {os.cpu_count()} CPUs"
    )
    print()
    print("| shards | steps/s | predicted by the links | measured / predicted | / 1 shard |")
    print("|---|---|---|---|---|")
    first = None
    for shards in args.shards:
        measured = run(shards, args.workers, size, args.seconds, args.rate)["steps_per_s"]
        bound = predicted(shards, args.workers, size, link)
        first = first or measured
        print(f"| {shards} | {measured:,.1f} | {bound:,.1f} | {measured / bound:.2f} | "
              f"{measured / first:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
