"""What the finite-step guard costs: one optimizer step now, next to the same step at a
baseline revision, in one run.

    python benchmarks/finite_guard.py [--baseline HEAD~1] [--size 1e7] [--rounds 5]

The baseline's ``optserver`` package is exported from git into a temporary directory; each
round times, in a fresh subprocess per tree (alternating, so drift hits both), the median of
``--repeat`` float32 steps of each optimizer: the baseline's ``update()``, and this tree's
``update()`` and ``update(finite=True)`` (what the server runs under the ``reject`` policy).
It prints the median over rounds and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from configs import CONFIGS

ROOT = Path(__file__).resolve().parent.parent


# Runs in the subprocess: times each config, prints JSON {label: ms}.
PROBE = r"""
import inspect, json, statistics, sys, time
import numpy as np
from optserver.optim import create
size, repeat, configs = int(float(sys.argv[1])), int(sys.argv[2]), json.loads(sys.argv[3])
rng = np.random.default_rng(0)
p0 = rng.standard_normal(size, dtype=np.float32)
g = {"w": rng.standard_normal(size, dtype=np.float32)}
out = {}
for config in configs:
    opt = create(config)
    has_guard = "finite" in inspect.signature(opt.update).parameters
    for finite in ([False, True] if has_guard else [False]):
        params = {"w": p0.copy()}
        state = opt.init(params)
        kwargs = {"finite": True} if finite else {}
        for _ in range(3):
            opt.update(g, state, params, **kwargs)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            opt.update(g, state, params, **kwargs)
            times.append(time.perf_counter() - start)
        out[config["name"] + (" finite" if finite else "")] = statistics.median(times) * 1e3
print(json.dumps(out))
"""


def export(revision: str, into: Path) -> Path:
    """The ``optserver`` package of ``revision`` (and the client it needs), unpacked."""
    archive = into / "tree.tar"
    subprocess.run(
        ["git", "archive", "--format=tar", "-o", str(archive), revision, "optserver", "client"],
        cwd=ROOT,
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(tree: Path, size: float, repeat: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'client'}"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(size), str(repeat), json.dumps(CONFIGS)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores, from /proc/stat)."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with")
    parser.add_argument("--size", type=float, default=1e7)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        baseline = export(args.baseline, Path(temporary))
        start, busy, ours = time.monotonic(), busy_seconds(), children_seconds()
        runs: dict[str, list[dict[str, float]]] = {"baseline": [], "now": []}
        for _ in range(args.rounds):
            runs["baseline"].append(measure(baseline, args.size, args.repeat))
            runs["now"].append(measure(ROOT, args.size, args.repeat))
        elapsed = time.monotonic() - start
        others = max(0.0, busy_seconds() - busy - (children_seconds() - ours))

    def median(tree: str, label: str) -> float:
        return statistics.median(run[label] for run in runs[tree])

    print(f"float32, {args.size:.0e} parameters; ms per step, median of {args.repeat} steps, "
          f"median over {args.rounds} alternating rounds; baseline {args.baseline}")  # fmt: skip
    header = f"{'optimizer':<9} {'baseline':>9} {'now':>9} {'finite':>9} {'now/base':>9} " \
             f"{'finite/base':>12}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for config in CONFIGS:
        name = str(config["name"])
        base, now, finite = (
            median("baseline", name),
            median("now", name),
            median("now", name + " finite"),
        )
        print(f"{name:<9} {base:9.2f} {now:9.2f} {finite:9.2f} {now / base:8.2f}x "
              f"{finite / base:11.2f}x")  # fmt: skip
    print(f"other processes used {others / elapsed:.2f} cores on average during the run")


if __name__ == "__main__":
    main()
