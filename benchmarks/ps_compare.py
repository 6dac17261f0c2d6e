"""Parameter servers side by side: push P float32 gradients, apply Adam (lr 1e-3), get P weights.

    .venv/bin/python benchmarks/ps_compare.py              # full run (a few minutes)
    .venv/bin/python benchmarks/ps_compare.py --quick      # smoke check: P=1e3, 1e6, one worker
    .venv/bin/python benchmarks/ps_compare.py --sizes 1e6 --workers 4 --multi-size 1e6
    .venv/bin/python benchmarks/ps_compare.py --rounds 3   # and the ratios' median and range

Every system is measured in the same run by the same worker loop (one process per worker,
started with multiprocessing's "spawn"; a step is one blocking round trip), on loopback:

``tcp echo``
    The transport floor, no math: a thread-per-connection TCP server reads a length-prefixed
    message of P float32 (``recv_into`` a preallocated buffer) and sends it back (``sendall``);
    the worker sends header and gradients (``sendmsg``) and reads the answer with ``recv_into``.
``tcp+kernel``
    The same server, but it applies Adam in place to one shared parameter with optserver's
    fused optimizer core (``optserver.optim.create``, under a lock) and sends back the new
    weights: the physical floor of a parameter server written in Python on this machine.
``torch rpc``
    A ``torch.distributed.rpc`` parameter server (TensorPipe over its "uv" transport on the
    loopback interface; tensors on the "basic" channel by default, so they travel over the
    same TCP connection, see ``--rpc-channels``): a world of one server process and N worker
    processes; each step is an ``rpc_sync`` of a function that applies ``torch.optim.Adam``
    (``fused=True``; ``foreach=True`` where fused is unavailable) to the parameter under a
    lock and returns a copy of the new weights.
``optserver``
    optserver itself: a real server (``optserver.embedded.embedded_server``), one session,
    one client per worker (``Session.attach``), ``Session.step`` over the binary
    (safetensors) encoding.

Cells: P = 1e3, 1e6, 1e7 with one worker, and 4 workers at P = 1e6 sharing one parameter (one
session for optserver); the multi-worker steps/s is the aggregate over all workers, p50 and p90
are per worker-step. Each cell warms up (compilation, connections) before timing for a wall
budget and a least number of steps per worker, whichever is longer. ``optserver / row`` is
optserver's steps/s over the row's in the same cell (below 1: optserver is slower). ``own
CPU`` is the CPU, in cores, that this benchmark's process tree used during the timed window;
``other CPU`` is what every other process on the machine used then (from ``/proc/stat`` and
``/proc/<pid>/stat``): a cell with a large ``other CPU`` was disturbed.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext, SpawnProcess
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event

    from optserver.embedded import EmbeddedServer

SYSTEMS = ("echo", "kernel", "rpc", "optserver")
LABELS = {"echo": "tcp echo", "kernel": "tcp+kernel", "rpc": "torch rpc", "optserver": "optserver"}
LR = 1e-3
HEADER_BYTES = 8
STARTUP_TIMEOUT = 300.0  # imports and compilation, on a busy 2-core machine
EXIT_TIMEOUT = 60.0

Step = Callable[[], object]


@dataclass(frozen=True)
class Budget:
    seconds: float  # timed wall time per cell
    min_steps: int  # and at least this many steps per worker
    warmup_steps: int  # before timing, at least this many steps per worker
    warmup_seconds: float  # and at least this long


@dataclass(frozen=True)
class Target:
    """Where a worker sends its steps (picklable: it crosses into spawned processes)."""

    system: str
    size: int
    world: int = 1  # workers
    port: int = 0  # raw TCP server, or the torch rpc rendezvous
    url: str = ""  # optserver
    session_id: str = ""
    token: str = ""
    rpc_channels: tuple[str, ...] = ()
    sharded: bool = False  # optserver: a sharded session (``url`` lists its shards)


@dataclass
class Cell:
    system: str
    size: int
    workers: int
    steps: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    own_cores: float = 0.0
    other_cores: float = 0.0
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


# --- CPU accounting -------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    wall: float
    busy: int  # clock ticks of the whole machine, not idle nor waiting for I/O
    own: int  # clock ticks of this process's tree (reaped children included)


def machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return user + nice + system + irq + softirq + steal


def tree_ticks(root: int) -> int:
    """utime + stime + cutime + cstime over ``root`` and its descendants.

    Counting the children's times of each member keeps the sum when a member exits and its
    parent reaps it.
    """
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:  # gone meanwhile
            continue
        rest = text[text.rindex(")") + 2 :].split()  # the fields after the command's name
        pid = int(entry)
        parents[pid] = int(rest[1])
        ticks[pid] = sum(int(v) for v in rest[11:15])
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total


def cpu_sample() -> CpuSample:
    return CpuSample(time.monotonic(), machine_busy_ticks(), tree_ticks(os.getpid()))


def cores_used(before: CpuSample, after: CpuSample) -> tuple[float, float]:
    """(own tree, every other process), in cores, between two samples."""
    wall = max(after.wall - before.wall, 1e-9)
    own = (after.own - before.own) / CLOCK_TICKS / wall
    busy = (after.busy - before.busy) / CLOCK_TICKS / wall
    return own, max(busy - own, 0.0)


# --- raw TCP: the echo and the kernel servers -----------------------------------------------


def recv_exact(conn: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``conn``; False if the peer closed first."""
    got, size = 0, len(view)
    while got < size:
        n = conn.recv_into(view[got:], size - got)
        if n == 0:
            return False
        got += n
    return True


def tcp_server_main(kernel: bool, size: int, replies: Queue[Any]) -> None:
    """A thread-per-connection server of one parameter (a spawned process; runs until killed)."""
    try:
        listener = socket.create_server(("127.0.0.1", 0))
        update: Callable[[np.ndarray], None] | None = None
        if kernel:
            from optserver.optim import create

            weights = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
            opt = create({"name": "adam", "lr": LR})
            state = opt.init({"w": weights})
            lock = threading.Lock()

            def apply(buffer: np.ndarray) -> None:
                with lock:
                    opt.update({"w": buffer}, state, {"w": weights})
                    buffer[:] = weights  # the reply: a copy of the new weights

            update = apply
        replies.put(("ready", listener.getsockname()[1]))
    except BaseException:
        replies.put(("error", traceback.format_exc()))
        raise

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = np.empty(size, np.float32)
            view = buffer.data.cast("B")
            head = memoryview(bytearray(HEADER_BYTES))
            while recv_exact(conn, head):
                if int.from_bytes(head, "little") != len(view):
                    return
                if not recv_exact(conn, view):
                    return
                if update is not None:
                    update(buffer)
                conn.sendall(view)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def tcp_step(target: Target, rank: int) -> tuple[Step, Callable[[], None]]:
    conn = socket.create_connection(("127.0.0.1", target.port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    grads = gradients(target.size, rank)
    out = np.empty(target.size, np.float32).data.cast("B")
    payload = grads.data.cast("B")
    header = len(payload).to_bytes(HEADER_BYTES, "little")
    total = HEADER_BYTES + len(payload)

    def step() -> memoryview:
        sent = conn.sendmsg([header, payload])
        if sent < total:  # a partial send: the rest
            if sent < HEADER_BYTES:
                conn.sendall(header[sent:])
            conn.sendall(payload[max(sent - HEADER_BYTES, 0) :])
        if not recv_exact(conn, out):
            raise ConnectionError("the server closed the connection")
        return out

    return step, conn.close


# --- torch.distributed.rpc ------------------------------------------------------------------

RPC_SERVER = "ps"
_rpc_state: dict[str, Any] = {}


def rpc_environment(port: int, address: str = "127.0.0.1", device: str = "lo") -> None:
    """torch rpc's rendezvous at ``address:port``, its sockets on network ``device``."""
    # torch's rpc start-up warns that it uses a Gloo backend as a process group: noise here.
    warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)
    os.environ.update(
        MASTER_ADDR=address,
        MASTER_PORT=str(port),
        TP_SOCKET_IFNAME=device,
        GLOO_SOCKET_IFNAME=device,
    )


def rpc_backend_options(
    port: int, channels: Sequence[str], *, threads: int, timeout: float, address: str = "127.0.0.1"
) -> Any:
    """TensorPipe over TCP (``uv``) with ``channels`` (none given: TensorPipe's choice)."""
    import torch.distributed.rpc as rpc

    return rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://{address}:{port}",
        num_worker_threads=threads,
        rpc_timeout=timeout,
        _transports=["uv"],
        _channels=list(channels) or None,
    )


def rpc_options(target: Target) -> Any:
    return rpc_backend_options(
        target.port, target.rpc_channels, threads=max(16, 2 * target.world),
        timeout=STARTUP_TIMEOUT,
    )  # fmt: skip


def torch_adam(param: Any) -> tuple[Any, str]:
    """``torch.optim.Adam`` over ``param``: fused if this torch has it on CPU, else foreach."""
    import torch

    probe = torch.zeros(4, requires_grad=True)
    probe.grad = torch.ones(4)
    try:
        torch.optim.Adam([probe], lr=LR, fused=True).step()
    except (RuntimeError, ValueError):
        return torch.optim.Adam([param], lr=LR, foreach=True), "foreach"
    return torch.optim.Adam([param], lr=LR, fused=True), "fused"


def rpc_apply(grad: Any) -> Any:
    """The remote step: Adam on the server's parameter, a copy of the new weights back."""
    with _rpc_state["lock"]:
        param = _rpc_state["param"]
        param.grad = grad
        _rpc_state["opt"].step()
        return param.detach().clone()


def rpc_server_main(target: Target, replies: Queue[Any]) -> None:
    """Rank 0 of the rpc world (a spawned process); returns once every worker has shut down."""
    try:
        rpc_environment(target.port)
        import torch
        import torch.distributed.rpc as rpc

        weights = np.random.default_rng(0).standard_normal(target.size, dtype=np.float32)
        param = torch.nn.Parameter(torch.from_numpy(weights))
        opt, kind = torch_adam(param)
        _rpc_state.update(param=param, opt=opt, lock=threading.Lock())
        replies.put(("ready", f"torch {torch.__version__}, Adam {kind}"))
        rpc.init_rpc(  # type: ignore[no-untyped-call]
            RPC_SERVER, rank=0, world_size=target.world + 1, rpc_backend_options=rpc_options(target)
        )
    except BaseException:
        replies.put(("error", traceback.format_exc()))
        raise
    rpc.shutdown()  # graceful: waits for the workers


def rpc_step(target: Target, rank: int) -> tuple[Step, Callable[[], None]]:
    rpc_environment(target.port)
    import torch
    import torch.distributed.rpc as rpc

    rpc.init_rpc(  # type: ignore[no-untyped-call]
        f"worker{rank}",
        rank=rank + 1,
        world_size=target.world + 1,
        rpc_backend_options=rpc_options(target),
    )
    grads = torch.from_numpy(gradients(target.size, rank))

    def step() -> Any:
        return rpc.rpc_sync(RPC_SERVER, rpc_apply, args=(grads,))

    return step, rpc.shutdown


# --- optserver --------------------------------------------------------------------------------


def optserver_step(target: Target, rank: int) -> tuple[Step, Callable[[], None]]:
    from optserver_client import Session

    session = Session.attach(
        target.url, target.session_id, target.token, timeout=300, sharded=target.sharded or None
    )
    grads = {"w": gradients(target.size, rank)}

    def step() -> dict[str, np.ndarray]:
        return session.step(grads)

    return step, session.close


# --- the worker loop, the same for every system ---------------------------------------------


def gradients(size: int, rank: int) -> np.ndarray:
    rng = np.random.default_rng(1 + rank)
    return rng.standard_normal(size, dtype=np.float32) * np.float32(1e-3)


def connect(target: Target, rank: int) -> tuple[Step, Callable[[], None]]:
    if target.system in ("echo", "kernel"):
        return tcp_step(target, rank)
    if target.system == "rpc":
        return rpc_step(target, rank)
    return optserver_step(target, rank)


def worker_main(
    target: Target,
    rank: int,
    budget: Budget,
    messages: Queue[Any],
    start: Event,
    finish: Event,
) -> None:
    """One worker (a spawned process): warm up, wait for the start, time steps, report."""
    try:
        step, close = connect(target, rank)
        try:
            began = time.perf_counter()
            done = 0
            while done < budget.warmup_steps or time.perf_counter() - began < budget.warmup_seconds:
                step()
                done += 1
            messages.put(("ready", rank, None))
            if not start.wait(STARTUP_TIMEOUT):
                raise TimeoutError("no start signal")
            latencies: list[float] = []
            first = time.perf_counter()
            deadline = first + budget.seconds
            while True:
                t0 = time.perf_counter()
                step()
                t1 = time.perf_counter()
                latencies.append(t1 - t0)
                if t1 >= deadline and len(latencies) >= budget.min_steps:
                    break
            messages.put(("result", rank, (first, t1, latencies)))
            finish.wait(STARTUP_TIMEOUT)
        finally:
            close()
    except BaseException:
        messages.put(("error", rank, traceback.format_exc()))


# --- the driver -----------------------------------------------------------------------------


def wait_for(
    messages: Queue[Any], kind: str, count: int, processes: Sequence[SpawnProcess], timeout: float
) -> list[Any]:
    """``count`` messages of ``kind`` (their payloads); raise on an error or a dead process."""
    deadline = time.monotonic() + timeout
    out: list[Any] = []
    while len(out) < count:
        try:
            message = messages.get(timeout=0.5)
        except queue.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a process died with status {dead[0].exitcode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(out)} of {count} {kind!r} messages") from None
            continue
        if message[0] == "error":
            raise RuntimeError(message[-1])
        if message[0] == kind:
            out.append(message[-1])
    return out


def stop(process: SpawnProcess, grace: float) -> None:
    process.join(grace)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


class Bench:
    def __init__(self, args: argparse.Namespace, budget: Budget) -> None:
        self.ctx: SpawnContext = multiprocessing.get_context("spawn")
        self.budget = budget
        self.rpc_channels = tuple(c for c in args.rpc_channels.split(",") if c)
        self.stack = contextlib.ExitStack()
        self.server: EmbeddedServer | None = None
        self.notes: dict[str, str] = {}

    def optserver_url(self) -> str:
        if self.server is None:
            from optserver.embedded import embedded_server

            self.server = self.stack.enter_context(embedded_server(max_json_body_bytes=1 << 30))
        return self.server.url

    @contextlib.contextmanager
    def system(self, system: str, size: int, workers: int) -> Iterator[Target]:
        """The server side of one cell, torn down when the block ends."""
        if system == "optserver":
            from optserver_client import Client

            weights = np.random.default_rng(0).standard_normal(size, dtype=np.float32)
            with Client(self.optserver_url(), timeout=300) as client:
                session = client.create_session({"w": weights}, {"name": "adam", "lr": LR})
                try:
                    yield Target(
                        system, size, workers, url=client.url, session_id=session.id,
                        token=session.token or "",
                    )  # fmt: skip
                finally:
                    with contextlib.suppress(Exception):
                        session.delete()
            return
        replies: Queue[Any] = self.ctx.Queue()
        if system == "rpc":
            from optserver.embedded import free_port

            target = Target(system, size, workers, port=free_port(), rpc_channels=self.rpc_channels)
            process = self.ctx.Process(target=rpc_server_main, args=(target, replies), daemon=True)
        else:
            process = self.ctx.Process(
                target=tcp_server_main, args=(system == "kernel", size, replies), daemon=True
            )
        process.start()
        try:
            (answer,) = wait_for(replies, "ready", 1, [process], STARTUP_TIMEOUT)
            if system == "rpc":
                self.notes["rpc"] = str(answer)
            else:
                target = Target(system, size, workers, port=int(answer))
            yield target
        finally:
            # The rpc server ends by itself once its workers shut down; the TCP servers never do.
            stop(process, EXIT_TIMEOUT if system == "rpc" else 0.0)
            replies.close()

    def measure(self, system: str, size: int, workers: int) -> Cell:
        cell = Cell(system, size, workers)
        messages: Queue[Any] = self.ctx.Queue()
        start, finish = self.ctx.Event(), self.ctx.Event()
        processes: list[SpawnProcess] = []
        grace = 5.0  # after a failure; a measured cell's workers get EXIT_TIMEOUT to shut down
        try:
            with self.system(system, size, workers) as target:
                try:
                    for rank in range(workers):
                        process = self.ctx.Process(
                            target=worker_main,
                            args=(target, rank, self.budget, messages, start, finish),
                            daemon=True,
                        )
                        process.start()
                        processes.append(process)
                    wait_for(messages, "ready", workers, processes, STARTUP_TIMEOUT)
                    before = cpu_sample()
                    start.set()
                    timeout = self.budget.seconds + STARTUP_TIMEOUT
                    results = wait_for(messages, "result", workers, processes, timeout)
                    after = cpu_sample()
                    grace = EXIT_TIMEOUT
                finally:
                    finish.set()
                    for process in processes:
                        stop(process, grace)
        except Exception as error:
            cell.error = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
            print(f"{LABELS[system]} P={size} x{workers}: failed\n{error}", file=sys.stderr)
            return cell
        finally:
            messages.close()
        cell.own_cores, cell.other_cores = cores_used(before, after)
        cell.seconds = max(r[1] for r in results) - min(r[0] for r in results)
        cell.latencies = [t for r in results for t in r[2]]
        cell.steps = len(cell.latencies)
        return cell

    def close(self) -> None:
        self.stack.close()


def size_label(size: int) -> str:
    exponent = len(str(size)) - 1
    return f"1e{exponent}" if size == 10**exponent else str(size)


@dataclass(frozen=True)
class Ratio:
    """The ratio column of the tables: ``reference``'s steps/s over the row's (or the row's
    over the reference's, ``row_over_reference``), in the same cell."""

    reference: str = "optserver"
    title: str = "optserver / row"
    row_over_reference: bool = False

    def of(self, reference: float, row: float) -> float:
        return row / reference if self.row_over_reference else reference / row


def table(cells: Sequence[Cell], ratio: Ratio = Ratio()) -> str:
    columns = ("P", "workers", "system", "steps/s", "p50 ms", "p90 ms", ratio.title,
               "steps", "own CPU", "other CPU")  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    refs = {
        (c.size, c.workers): c.rate for c in cells if c.system == ratio.reference and not c.error
    }
    for c in cells:
        head = [size_label(c.size), str(c.workers), LABELS[c.system]]
        if c.error:
            lines.append("| " + " | ".join([*head, f"failed: {c.error}"] + [""] * 6) + " |")
            continue
        p50, p90 = np.percentile(np.array(c.latencies) * 1e3, [50, 90])
        ref = refs.get((c.size, c.workers))
        shown = f"{ratio.of(ref, c.rate):.2f}" if ref and c.rate else "-"
        row = [f"{c.rate:,.1f}", f"{p50:.3f}", f"{p90:.3f}", shown, str(c.steps),
               f"{c.own_cores:.2f}", f"{c.other_cores:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(head + row) + " |")
    return "\n".join(lines)


def spread(rounds: Sequence[Sequence[Cell]], ratio: Ratio = Ratio()) -> str:
    """Per cell, the median and range of steps/s and of the ratio column, over rounds."""
    columns = ("P", "workers", "system", "steps/s median (min-max)",
               f"{ratio.title} median (min-max)")  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for index, first in enumerate(rounds[0]):
        rates, ratios = [], []
        for cells in rounds:
            cell = cells[index]
            ref = next(
                (c.rate for c in cells if (c.system, c.size, c.workers, c.error)
                 == (ratio.reference, first.size, first.workers, None)),
                None,
            )  # fmt: skip
            if cell.error or not cell.rate:
                continue
            rates.append(cell.rate)
            if ref:
                ratios.append(ratio.of(ref, cell.rate))
        head = [size_label(first.size), str(first.workers), LABELS[first.system]]
        if not rates or not ratios:
            lines.append("| " + " | ".join([*head, "failed", ""]) + " |")
            continue
        lines.append("| " + " | ".join([
            *head,
            f"{np.median(rates):,.1f} ({min(rates):,.1f}-{max(rates):,.1f})",
            f"{np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def run_rounds(
    bench: Bench, plan: Sequence[tuple[int, int]], systems: Sequence[str], rounds: int
) -> list[list[Cell]]:
    """Every cell of ``plan`` (size, workers) for every system, ``rounds`` times, the systems
    taking turns; progress on stderr; the bench is closed at the end."""
    measured: list[list[Cell]] = []
    try:
        for _ in range(max(1, rounds)):
            cells = []
            for size, workers in plan:
                for system in systems:
                    cell = bench.measure(system, size, workers)
                    cells.append(cell)
                    status = cell.error or f"{cell.rate:,.1f} steps/s"
                    print(f"{LABELS[system]:>10} P={size_label(size)} x{workers}: {status}",
                          file=sys.stderr, flush=True)  # fmt: skip
            measured.append(cells)
    finally:
        bench.close()
    return measured


def print_tables(rounds: Sequence[Sequence[Cell]], ratio: Ratio = Ratio()) -> None:
    """The last round's table and, over several rounds, the spread."""
    print()
    print(table(rounds[-1], ratio))
    if len(rounds) > 1:
        print()
        print(f"Over {len(rounds)} rounds (the table above is the last):")
        print()
        print(spread(rounds, ratio))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="P=1e3 and 1e6, one worker, short")
    parser.add_argument("--sizes", type=float, nargs="+", help="single-worker sizes")
    parser.add_argument("--workers", type=int, help="workers of the multi-worker cell (0: none)")
    parser.add_argument("--multi-size", type=float, default=1e6, help="P of that cell")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--budget", type=float, help="timed seconds per cell")
    parser.add_argument("--min-steps", type=int, help="least timed steps per worker")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every cell this many times, the systems taking turns, and add a table "
        "of the ratios' median and range (a reference that varies from run to run shows)",
    )
    parser.add_argument(
        "--rpc-channels",
        default="basic",
        help="TensorPipe channels, comma-separated ('basic': tensors over the uv transport; "
        "'': TensorPipe's choice, which may copy between processes without TCP)",
    )
    args = parser.parse_args()
    quick = args.quick
    sizes = [int(s) for s in (args.sizes or ([1e3, 1e6] if quick else [1e3, 1e6, 1e7]))]
    multi = args.workers if args.workers is not None else (0 if quick else 4)
    budget = Budget(
        seconds=args.budget if args.budget is not None else (0.5 if quick else 2.0),
        min_steps=args.min_steps if args.min_steps is not None else (5 if quick else 15),
        warmup_steps=3 if quick else 5,
        warmup_seconds=0.2 if quick else 0.5,
    )
    plan = [(size, 1) for size in sizes] + ([(int(args.multi_size), multi)] if multi > 0 else [])
    bench = Bench(args, budget)
    began = time.monotonic()
    rounds = run_rounds(bench, plan, args.systems, args.rounds)
    print(
        f"Adam lr {LR}, float32; {os.cpu_count()} CPUs; timed >= {budget.seconds:g} s and >= "
        f"{budget.min_steps} steps per worker per cell; total {time.monotonic() - began:.0f} s"
    )
    if "rpc" in bench.notes:
        channels = ",".join(bench.rpc_channels) or "default"
        print(f"torch rpc: {bench.notes['rpc']}, TensorPipe uv transport, channels {channels}")
    print_tables(rounds)


if __name__ == "__main__":
    main()
