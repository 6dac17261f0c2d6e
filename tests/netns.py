"""Several "hosts" on one machine without containers: Linux network namespaces (root only).

:func:`network` creates, for each named host, a namespace with its own address on a private /24,
all joined by a bridge in a namespace of its own (the veth pairs are created there: nothing is
added to the root namespace but a guard route), and removes everything when the block ends,
also when it fails half-way. The rules it keeps:

- FIRST, ``ip route add unreachable <subnet>`` in the root namespace, so that the test subnet can
  never leave the machine (a subnet that any route or address of the root namespace overlaps is
  never picked; the guard also fails when another run holds that subnet, and the next is tried);
- traffic goes only to addresses of the namespaces made here;
- afterwards: the processes started in them are killed, every namespace is deleted (with its
  veth ends and the bridge), ``/etc/netns/<ns>`` removed, the guard route deleted.

Processes run in a host with :meth:`Network.popen` (``ip netns exec``); the test process itself
reaches the hosts through :meth:`Network.inside`, a thread of its own moved into a host's
namespace (``setns(2)`` moves only the calling thread).
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx

__all__ = ["Host", "Inside", "Network", "netns_unavailable", "network"]

T = TypeVar("T")

#: Candidate subnets: unusual private /24s, the first free one is taken.
CANDIDATES = [ipaddress.IPv4Network(f"10.77.{third}.0/24") for third in range(12, 60)]
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_NETNS_DIR = Path("/var/run/netns")
_ETC_NETNS = Path("/etc/netns")


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here (a reason to skip), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


def _ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination and address of the root namespace (all routing tables)."""
    used: list[ipaddress.IPv4Network] = []
    routes: list[dict[str, Any]] = json.loads(_ip("-j", "-4", "route", "show", "table", "all"))
    addresses: list[dict[str, Any]] = json.loads(_ip("-j", "-4", "addr", "show"))
    texts = [str(r.get("dst", "")) for r in routes]
    for link in addresses:
        texts += [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])]
    for text in texts:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:  # "default", and the like
            continue
        if isinstance(net, ipaddress.IPv4Network):
            used.append(net)
    return used


def _guard(stack: ExitStack) -> ipaddress.IPv4Network:
    """Add the unreachable route of a free candidate subnet (removed when ``stack`` closes)."""
    used = _networks_in_use()
    for subnet in CANDIDATES:
        if any(subnet.overlaps(net) for net in used):
            continue
        try:
            _ip("route", "add", "unreachable", str(subnet))
        except RuntimeError:  # taken meanwhile (another run): try the next
            continue
        stack.callback(_ip, "route", "del", "unreachable", str(subnet))
        return subnet
    raise RuntimeError(f"no free subnet among {CANDIDATES[0]} .. {CANDIDATES[-1]}")


def _tc(netns: str, device: str, rate: str) -> None:
    """Shape what ``device`` sends to ``rate`` (a token bucket; its queue holds 20 ms)."""
    command = ["tc", "-n", netns, "qdisc", "add", "dev", device, "root", "tbf", "rate", rate,
               "burst", "16kb", "latency", "20ms"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")


_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL when the test process dies (no orphan keeps running)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True)
class Host:
    name: str  # also its name in the other hosts' /etc/hosts
    netns: str
    address: str


class Inside:
    """HTTP from the test process, as if from a host: every call runs on one thread of this
    process that has moved into the host's network namespace."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._pool = ThreadPoolExecutor(1, f"netns-{host.name}", self._enter, (host.netns,))
        self._client = httpx.Client(timeout=3.0)

    @staticmethod
    def _enter(netns: str) -> None:
        fd = os.open(_NETNS_DIR / netns, os.O_RDONLY)
        try:
            if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
        finally:
            os.close(fd)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def get(self, url: str, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.call(self._client.get, url, headers=headers)

    def close(self) -> None:
        try:
            self.call(self._client.close)
        finally:
            self._pool.shutdown(wait=True)  # the thread ends: it no longer holds the namespace


@dataclass
class Network:
    subnet: ipaddress.IPv4Network
    hosts: dict[str, Host]
    _stack: ExitStack
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, name: str, port: int) -> str:
        return f"http://{self.hosts[name].address}:{port}"

    def popen(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in host ``name`` (``ip netns exec`` execs it: the process is argv's),
        killed at the latest when the network is removed."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[name].netns, *argv],
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=_die_with_parent,
        )
        self._processes.append(process)
        return process

    def run(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.hosts[name].netns, *argv],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def inside(self, name: str) -> Inside:
        inside = Inside(self.hosts[name])
        self._stack.callback(inside.close)
        return inside

    def _stop_processes(self) -> None:
        """SIGTERM (a Python child measured by coverage writes its data), SIGKILL after 10 s."""
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def network(
    hosts: Mapping[str, int], *, prefix: str | None = None, link_rate: str | None = None
) -> Iterator[Network]:
    """Hosts ``name -> last byte of its address``, each in a namespace ``<prefix>-<name>``.
    ``link_rate`` (``tc`` units, e.g. ``200mbit``): each host's link is that fast each way, as a
    NIC is (a token bucket on both ends of its veth pair)."""
    prefix = prefix or f"osmh{os.getpid()}"
    with ExitStack() as stack:
        subnet = _guard(stack)  # first of all
        if not _ETC_NETNS.exists():  # ours: removed again (when empty)
            _ETC_NETNS.mkdir()
            stack.callback(lambda: _ETC_NETNS.rmdir() if not any(_ETC_NETNS.iterdir()) else None)
        created: dict[str, Host] = {}

        def add_namespace(netns: str) -> None:
            _ip("netns", "add", netns)
            stack.callback(_ip, "netns", "del", netns)
            _ip("-n", netns, "link", "set", "lo", "up")

        bridge = f"{prefix}-br"
        add_namespace(bridge)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        names = "".join(f"{subnet.network_address + last} {name}\n" for name, last in hosts.items())
        for name, last in hosts.items():
            host = Host(name, f"{prefix}-{name}", str(subnet.network_address + last))
            add_namespace(host.netns)
            port = f"v-{name}"[:15]
            # Both ends are created in namespaces of ours: nothing appears in the root one.
            _ip("-n", bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", host.netns)  # fmt: skip
            _ip("-n", bridge, "link", "set", port, "master", "br0", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/{subnet.prefixlen}",
                "dev", "eth0")  # fmt: skip
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            if link_rate is not None:
                for netns, device in ((bridge, port), (host.netns, "eth0")):
                    _tc(netns, device, link_rate)
            etc = _ETC_NETNS / host.netns
            etc.mkdir(parents=True)
            stack.callback(shutil.rmtree, etc, True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{names}")
            created[name] = host
        net = Network(subnet, created, stack)
        stack.callback(net._stop_processes)  # before the namespaces go (callbacks run LIFO)
        yield net
