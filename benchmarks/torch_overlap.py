"""Backward + step of a 10-layer, 10M-parameter MLP: optserver's RemoteOptimizer with and without
``overlap=True``, next to a torch RPC parameter server and a local ``torch.optim`` step.

    .venv/bin/python benchmarks/torch_overlap.py                  # loopback, 3 rounds
    sudo .venv/bin/python benchmarks/torch_overlap.py --rate 10gbit  # server on its own "host"

The model: 10 ``Linear(1000, 1000)`` layers with ReLU (10,010,000 float32 parameters), a batch
of 64, MSE loss, Adam (lr 1e-4). Each system trains it for ``--steps`` steps after a warm-up;
what is timed is ``loss.backward()`` plus the optimizer step (the forward pass is not), and
the table shows each system's median. The systems take turns, ``--rounds`` times:

``torch.optim``
    ``torch.optim.Adam`` (foreach) in the training process: no server, the floor.
``torch rpc``
    The parameter server one writes with ``torch.distributed.rpc`` (TensorPipe over TCP, its
    "basic" channel, as in ``benchmarks/ps_compare.py``): after backward, one ``rpc_sync``
    sends every gradient to a server process, which applies ``torch.optim.Adam`` (foreach)
    to its copy of the parameters and returns them; the trainer copies them into the model.
``optserver``
    ``RemoteOptimizer`` (one push with every gradient after backward, the new weights
    written into the parameters).
``optserver overlap``
    ``RemoteOptimizer(overlap=True)``: gradients pushed in buckets while backward runs.

``benchmark CPU`` is the cores the benchmark's processes used (trainer and servers), ``other
CPU`` what every other process on the machine used meanwhile (``ps_compare.py``'s
accounting): a row with a large ``other CPU`` was disturbed.

``--rate`` (root: network namespaces, ``tests/netns.py``) puts both servers on a host of their
own, the trainer on another, each with a link of that rate each way: the time on the wire is
then the network's, as between machines, instead of the loopback's memory copies, which on a
machine of few cores compete with backward for the same CPUs. ``--threads`` sets torch's
intra-op threads in the trainer (default 1: the servers get the machine's other core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from ps_compare import (
    CpuSample,
    cores_used,
    machine_busy_ticks,
    rpc_backend_options,
    rpc_environment,
    tree_ticks,
)

SYSTEMS = ("torch.optim", "torch rpc", "optserver", "optserver overlap")
LAYERS, WIDTH, BATCH, LR = 10, 1000, 64, 1e-4
RPC_PORT, SERVER_PORT = 29517, 8000
_state: dict[str, Any] = {}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


# --- the torch rpc parameter server ------------------------------------------------------------


def rpc_options(address: str) -> Any:
    # TCP, as between machines (and as optserver's pushes go): on one machine TensorPipe would
    # otherwise move tensors by shared memory.
    return rpc_backend_options(RPC_PORT, ["basic"], threads=8, timeout=300, address=address)


def rpc_apply(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The server's step: Adam on its parameters, copies of the new ones back."""
    with _state["lock"]:
        for param, grad in zip(_state["params"], grads, strict=True):
            param.grad = grad
        _state["opt"].step()
        return [p.detach().clone() for p in _state["params"]]


def rpc_server(address: str, device: str) -> None:
    import torch.distributed.rpc as rpc

    rpc_environment(RPC_PORT, address, device)
    params = list(make_model().parameters())
    _state.update(
        params=params, opt=torch.optim.Adam(params, lr=LR, foreach=True), lock=threading.Lock()
    )
    rpc.init_rpc(  # type: ignore[no-untyped-call]
        "ps", rank=0, world_size=2, rpc_backend_options=rpc_options(address)
    )
    rpc.shutdown()


# --- the trainer -------------------------------------------------------------------------------


def timed(model: torch.nn.Module, step: Any, zero: Any, steps: int) -> list[float]:
    """Seconds of backward + step, each of ``steps`` steps after a warm-up of 5."""
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1))
    y = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(2))
    times = []
    for i in range(5 + steps):
        zero()
        loss = torch.nn.functional.mse_loss(model(x), y)
        start = time.perf_counter()
        loss.backward()  # type: ignore[no-untyped-call]
        step()
        if i >= 5:
            times.append(time.perf_counter() - start)
    return times


def measure(system: str, url: str, steps: int) -> list[float]:
    from optserver_client.torch import RemoteOptimizer

    model = make_model()
    if system == "torch.optim":
        local = torch.optim.Adam(model.parameters(), lr=LR, foreach=True)
        return timed(model, local.step, local.zero_grad, steps)
    if system == "torch rpc":
        import torch.distributed.rpc as rpc

        params = list(model.parameters())

        def rpc_step() -> None:
            new = rpc.rpc_sync("ps", rpc_apply, args=([p.grad for p in params],))
            with torch.no_grad():
                for param, value in zip(params, new, strict=True):
                    param.copy_(value)

        return timed(model, rpc_step, lambda: model.zero_grad(), steps)
    opt = RemoteOptimizer(
        model.named_parameters(), url=url, optimizer="adam", lr=LR,
        overlap=system == "optserver overlap",
    )  # fmt: skip
    try:
        return timed(model, opt.step, opt.zero_grad, steps)
    finally:
        opt.close(delete=True)


def trainer(url: str, rpc_address: str, device: str, steps: int, rounds: int) -> None:
    """Every system, ``rounds`` times in turn; the samples as JSON on stdout."""
    import torch.distributed.rpc as rpc

    rpc_environment(RPC_PORT, rpc_address, device)
    rpc.init_rpc(  # type: ignore[no-untyped-call]
        "trainer", rank=1, world_size=2, rpc_backend_options=rpc_options(rpc_address)
    )
    samples: dict[str, list[list[float]]] = {s: [] for s in SYSTEMS}
    cpu: dict[str, list[tuple[float, float]]] = {s: [] for s in SYSTEMS}

    def sample() -> CpuSample:
        # The benchmark's tree: the process that started this one, its servers, this one.
        return CpuSample(time.monotonic(), machine_busy_ticks(), tree_ticks(os.getppid()))

    try:
        for _ in range(rounds):
            for system in SYSTEMS:
                before = sample()
                samples[system].append(measure(system, url, steps))
                cpu[system].append(cores_used(before, sample()))
                ms = statistics.median(samples[system][-1]) * 1e3
                print(f"{system:>18}: {ms:.1f} ms", file=sys.stderr, flush=True)
    finally:
        rpc.shutdown()
    print(json.dumps({"times": samples, "cpu": cpu}))


# --- the table ---------------------------------------------------------------------------------


def report(measured: dict[str, Any], title: str) -> None:
    """The table: per system the median and p90 of backward+step, the ratio to optserver
    without overlap, and the cores the benchmark's processes (trainer and servers) and every
    other process used while it ran (the mean over rounds)."""
    samples: dict[str, list[list[float]]] = measured["times"]
    cpu: dict[str, list[list[float]]] = measured["cpu"]
    medians = {
        s: statistics.median([t for r in rounds for t in r]) for s, rounds in samples.items()
    }
    plain = medians["optserver"]
    print(title)
    print()
    print("| system | backward+step p50 ms | p90 ms | optserver (no overlap) / row "
          "| benchmark CPU | other CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for system, rounds in samples.items():
        flat = sorted(t for r in rounds for t in r)
        p90 = flat[int(0.9 * (len(flat) - 1))]
        own = statistics.mean(c[0] for c in cpu[system])
        other = statistics.mean(c[1] for c in cpu[system])
        print(f"| {system} | {medians[system] * 1e3:.1f} | {p90 * 1e3:.1f} | "
              f"{plain / medians[system]:.2f} | {own:.2f} | {other:.2f} |")  # fmt: skip
    per_round = [
        statistics.median(p) / statistics.median(o)
        for p, o in zip(samples["optserver"], samples["optserver overlap"], strict=True)
    ]
    versus_rpc = [
        statistics.median(r) / statistics.median(o)
        for r, o in zip(samples["torch rpc"], samples["optserver overlap"], strict=True)
    ]
    print()
    for label, ratios in (
        ("overlap speed-up (no overlap / overlap)", per_round),
        ("optserver overlap vs torch rpc (rpc / overlap)", versus_rpc),
    ):
        shown = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"{label}, per round: {shown}; median {statistics.median(ratios):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per system per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the trainer")
    parser.add_argument("--rate", default=None, help="each host's link (tc units; root)")
    parser.add_argument("--role", choices=["main", "rpc-server", "trainer"], default="main")
    parser.add_argument("--url", default="")
    parser.add_argument("--rpc-address", default="127.0.0.1")
    parser.add_argument("--device", default="lo")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.role == "rpc-server":
        rpc_server(args.rpc_address, args.device)
        return
    if args.role == "trainer":
        trainer(args.url, args.rpc_address, args.device, args.steps, args.rounds)
        return
    here = os.path.abspath(__file__)
    common = ["--steps", str(args.steps), "--rounds", str(args.rounds),
              "--threads", str(args.threads)]  # fmt: skip
    title = (
        f"{LAYERS} x Linear({WIDTH}, {WIDTH}) (10.0M float32 parameters), batch {BATCH}, Adam; "
        f"trainer torch threads {args.threads}, {os.cpu_count()} CPUs, {args.steps} steps x "
        f"{args.rounds} rounds per system; "
        + (f"servers on another host, links {args.rate} each way" if args.rate else "loopback")
    )
    if args.rate is None:
        from optserver.embedded import embedded_server

        with embedded_server() as server:
            rpc_server_process = subprocess.Popen(
                [sys.executable, here, "--role", "rpc-server", *common]
            )
            try:
                out = subprocess.run(
                    [sys.executable, here, "--role", "trainer", "--url", server.url, *common],
                    stdout=subprocess.PIPE, check=True, text=True,
                ).stdout  # fmt: skip
            finally:
                rpc_server_process.wait(timeout=120)
        report(json.loads(out.strip().splitlines()[-1]), title)
        return
    from tests.netns import netns_unavailable, network

    reason = netns_unavailable()
    if reason is not None:
        raise SystemExit(f"cannot run with --rate: {reason}")
    with network(
        {"server": 1, "trainer": 2}, prefix=f"osov{os.getpid()}", link_rate=args.rate
    ) as net:
        address = net.hosts["server"].address
        env = {"OPTSERVER_LOG_LEVEL": "warning"}
        net.popen("server", [sys.executable, "-m", "optserver", "serve", "--host", address,
                             "--port", str(SERVER_PORT)], env=env)  # fmt: skip
        url = net.url("server", SERVER_PORT)
        probe = net.inside("trainer")
        for _ in range(600):
            try:
                if probe.get(url + "/healthz").status_code == 200:
                    break
            except Exception:
                pass
            time.sleep(0.1)
        rpc = ["--rpc-address", address, "--device", "eth0"]
        net.popen("server", [sys.executable, here, "--role", "rpc-server", *common, *rpc])
        done = net.run("trainer", [sys.executable, here, "--role", "trainer", "--url", url,
                                   *common, *rpc])  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        sys.stderr.write(done.stderr)
    report(json.loads(done.stdout.strip().splitlines()[-1]), title)


if __name__ == "__main__":
    main()
