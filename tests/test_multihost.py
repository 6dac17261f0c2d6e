"""A sharded session across "hosts": two shard servers and three workers, each in a network
namespace of its own with its own address (tests/netns.py), like separate machines on one LAN.

Mid-run, shard 1 is killed with SIGKILL and restarted on the same address, port and data
directory; the workers wait for it (``--patience``) and resend their pending step with its
Idempotency-Key. At the end, every acknowledged step is on both shards exactly once: both
versions equal the steps the workers report, and the model is as good as without the outage.
Root only (CI runs as root): skipped elsewhere, or where ``ip netns`` is unavailable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.netns import Inside, Network, netns_unavailable, network

PYTHON = sys.executable
PORT = 8000
SHARDS = ["shard0", "shard1"]
WORKERS = ["worker0", "worker1", "worker2"]
#: Last byte of each host's address.
HOSTS = {"shard0": 1, "shard1": 2, "worker0": 11, "worker1": 12, "worker2": 13}
SESSION = "multihost"
TOKEN = "multihost-" + "t" * 33
#: 60 epochs of 15 steps per worker: 2700 steps, about 9 s of training here (> 10 s with the
#: outage), and a test accuracy of about 0.97.
EPOCHS = 60
#: Shard 1 is killed once both shards have applied this many steps (of 2700).
KILL_AT = 600
#: How long shard 1 stays down.
OUTAGE_S = 2.0
SERVER_ENV = {"OPTSERVER_LOG_LEVEL": "warning"}


@pytest.fixture
def net() -> Iterator[Network]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with network(HOSTS) as created:
        yield created


def _tails(directory: Path, lines: int = 15) -> str:
    """The last lines of every log of the test (for a failure's message)."""
    out = []
    for path in sorted(directory.glob("*.log")):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {path.name}\n" + "\n".join(text))
    return "\n".join(out)


class Cluster:
    """The servers and workers of the test, and a view from inside worker 0's host."""

    def __init__(self, net: Network, tmp_path: Path) -> None:
        self.net = net
        self.tmp_path = tmp_path
        self.probe: Inside = net.inside("worker0")
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        # The workers and the CLI reach the shards by name (/etc/netns/<ns>/hosts); the probe,
        # a thread of this process, by address (its /etc/hosts is the machine's).
        self.urls = ",".join(f"http://{name}:{PORT}" for name in SHARDS)

    def fail(self, message: str) -> None:
        pytest.fail(f"{message}\n{_tails(self.tmp_path)}")

    def start_server(self, name: str) -> None:
        host = self.net.hosts[name]
        env = {**SERVER_ENV, "OPTSERVER_DATA_DIR": str(self.tmp_path / f"data-{name}")}
        with open(self.tmp_path / f"{name}.log", "ab") as log:  # the child holds its own copy
            self.servers[name] = self.net.popen(
                name,
                [PYTHON, "-m", "optserver", "serve", "--host", host.address, "--port", str(PORT)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_healthy(self, names: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            while True:
                if self.servers[name].poll() is not None:
                    self.fail(f"{name} exited with status {self.servers[name].returncode}")
                try:
                    if self.probe.get(self.net.url(name, PORT) + "/healthz").status_code == 200:
                        break
                except httpx.TransportError:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    self.fail(f"{name} did not answer /healthz within {timeout} s")
                time.sleep(0.1)

    def describe(self, name: str) -> dict[str, Any]:
        """The session as shard ``name`` describes it (GET /v1/sessions/{id})."""
        url = f"{self.net.url(name, PORT)}/v1/sessions/{SESSION}"
        response = self.probe.get(url, TOKEN)
        assert response.status_code == 200, response.text
        description: dict[str, Any] = response.json()
        return description

    def version(self, name: str) -> int:
        return int(self.describe(name)["version"])

    def cli(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.net.run(host, [PYTHON, "-m", "optserver", *args], env=SERVER_ENV)

    def start_workers(self) -> None:
        for index, name in enumerate(WORKERS):
            argv = [
                PYTHON, "-m", "optserver", "worker", "--url", self.urls, "--session", SESSION,
                "--token", TOKEN, "--shard", str(index), "--shards", str(len(WORKERS)),
                "--epochs", str(EPOCHS), "--log", "json", "--patience", "120",
            ]  # fmt: skip
            # The data shard gives each worker its own id (w1..w3) and seed: the namespaces
            # share the machine's hostname, the default of both.
            with (
                open(self.tmp_path / f"{name}.jsonl", "wb") as out,
                open(self.tmp_path / f"{name}.log", "wb") as err,
            ):
                self.workers[name] = self.net.popen(name, argv, stdout=out, stderr=err)

    def workers_running(self) -> None:
        for name, process in self.workers.items():
            if process.poll() is not None:
                self.fail(f"{name} ended (status {process.returncode}) before the outage")

    def done(self, name: str) -> dict[str, Any]:
        lines = (self.tmp_path / f"{name}.jsonl").read_text().strip().splitlines()
        event: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        if event.get("event") != "done":
            self.fail(f"{name}'s last line is not its summary: {lines[-1:]}")
        return event


def test_a_shard_killed_and_restarted_mid_run_loses_no_step_and_applies_none_twice(
    net: Network, tmp_path: Path
) -> None:
    cluster = Cluster(net, tmp_path)
    for name in SHARDS:
        cluster.start_server(name)
    cluster.wait_healthy(SHARDS)

    created = cluster.cli(
        "worker0", "create-session", "--url", cluster.urls, "--session-id", SESSION,
        "--token", TOKEN, "--workers", str(len(WORKERS)), "--mode", "async",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "over 2 shards" in created.stdout
    for index, name in enumerate(SHARDS):
        description = cluster.describe(name)
        assert description["sharding"]["count"] == 2
        assert description["sharding"]["index"] == index
        assert description["params"], f"{name} holds no tensor of the demo's model"
        assert description["version"] == 0

    cluster.start_workers()
    deadline = time.monotonic() + 120
    while min(cluster.version(name) for name in SHARDS) < KILL_AT:
        cluster.workers_running()
        if time.monotonic() > deadline:
            cluster.fail(f"the shards did not reach version {KILL_AT} within 120 s")
        time.sleep(0.1)
    cluster.workers_running()

    killed = cluster.servers["shard1"]
    killed.kill()
    killed.wait()
    before = cluster.version("shard0")
    time.sleep(OUTAGE_S)
    during = cluster.version("shard0")
    # The workers wait for shard 1: shard 0 applies at most the step each had under way.
    assert during - before <= len(WORKERS), (before, during)
    cluster.workers_running()
    cluster.start_server("shard1")  # same namespace, address, port and data directory
    cluster.wait_healthy(["shard1"])
    # The workers go on as soon as shard 1 answers, so both versions move from here on: read
    # shard 1 first, then shard 0, which can be behind shard 1 by the steps under way only.
    restarted = cluster.version("shard1")
    now = cluster.version("shard0")
    assert restarted >= during - len(WORKERS), (restarted, during)
    assert restarted <= now + len(WORKERS), (restarted, now)

    for name, process in cluster.workers.items():
        try:
            status = process.wait(180)
        except subprocess.TimeoutExpired:
            cluster.fail(f"{name} did not finish within 180 s of the restart")
        if status != 0:
            cluster.fail(f"{name} exited with status {status}")
    done = [cluster.done(name) for name in WORKERS]
    steps = sum(int(event["steps"]) for event in done)
    assert len({event["steps"] for event in done}) == 1 and steps > KILL_AT, done
    versions = [cluster.version(name) for name in SHARDS]
    # No acknowledged step lost, none applied twice, on either shard.
    assert versions == [steps, steps], (versions, steps)
    for name in SHARDS:
        seen = cluster.describe(name)["workers"]
        assert {"w1", "w2", "w3"} <= set(seen), seen

    evaluated = cluster.cli(
        "worker1", "evaluate", "--url", cluster.urls, "--session", SESSION, "--token", TOKEN,
        "--json",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["version"] == steps
    assert report["test_accuracy"] >= 0.9, report
