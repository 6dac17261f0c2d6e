"""The command line with shards: ``optserver shards`` starts several servers, ``create-session``,
``worker`` and ``evaluate`` take a comma-separated shard list, ``demo --shards`` trains through
several servers; a session with a chosen id and token can be created by every worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from optserver_client import Session, ShardedSession

from optserver.demo import mlp
from optserver.embedded import free_port
from tests.live import LiveServer, live_server

CLI = [sys.executable, "-m", "optserver"]
TOKEN = "t" * 43


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def two() -> Iterator[list[LiveServer]]:
    with live_server() as a, live_server() as b:
        yield [a, b]


def test_shards_starts_servers_on_consecutive_ports_and_stops_them(tmp_path: Path) -> None:
    port = free_port()
    while True:  # the next port must be free too
        try:
            with socket.create_server(("127.0.0.1", port + 1)):
                break
        except OSError:
            port = free_port()
    process = subprocess.Popen(
        [*CLI, "shards", "--count", "2", "--port", str(port), "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OPTSERVER_LOG_LEVEL": "warning"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        urls = [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        assert line == "OPTSERVER_URLS=" + ",".join(urls)
        for url in urls:
            for _ in range(300):
                try:
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                threading.Event().wait(0.1)
            else:
                pytest.fail(f"{url} never became ready")
        created = cli(
            "create-session", "--url", ",".join(urls), "--session-id", "cli-sharded",
            "--token", TOKEN, "--workers", "1",
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        assert "over 2 shards" in created.stdout
        with Session.attach(urls, "cli-sharded", TOKEN) as session:
            assert isinstance(session, ShardedSession) and session.versions == (0, 0)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-0", "shard-1"]
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_create_session_with_a_chosen_id_once_per_worker(two: list[LiveServer]) -> None:
    """Several workers may each run create-session with --exist-ok: one creates it, the
    others find it, and every shard holds exactly one session of that id."""
    urls = ",".join(s.url for s in two)
    args = ["create-session", "--url", urls, "--session-id", "shared-run", "--workers", "3"]
    outcomes: list[subprocess.CompletedProcess[str]] = []

    def run() -> None:
        outcomes.append(cli(*args, "--exist-ok", env={"OPTSERVER_SESSION_TOKEN": TOKEN}))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [o.returncode for o in outcomes] == [0, 0, 0], [o.stderr for o in outcomes]
    # At most one creator won every shard ("created"); when creators split the shards, each
    # uploads its own and all of them report the session found, whole.
    said = [("created" in o.stdout, "found existing" in o.stdout) for o in outcomes]
    assert sum(created for created, _ in said) <= 1 and all(a != b for a, b in said)
    for server in two:
        listed = httpx.get(server.url + "/v1/sessions").json()["sessions"]
        assert [s["id"] for s in listed].count("shared-run") == 1
    with Session.attach(urls, "shared-run", TOKEN) as session:  # every weight is there
        assert sorted(session.pull()) == sorted(mlp.init_params(0))
    # Without --exist-ok, the session existing is an error that says so.
    again = cli(*args, env={"OPTSERVER_SESSION_TOKEN": TOKEN})
    assert again.returncode == 1 and "exists already" in again.stderr
    # A chosen id needs a token (or --out, for a random one) and --exist-ok needs both.
    assert cli("create-session", "--url", urls, "--session-id", "x").returncode == 2
    assert cli("create-session", "--url", urls, "--exist-ok", "--out", "/dev/null").returncode == 2


def test_worker_and_evaluate_train_through_the_shards(
    two: list[LiveServer], tmp_path: Path
) -> None:
    urls = ",".join(s.url for s in two)
    out = tmp_path / "session.json"
    assert cli("create-session", "--url", urls, "--out", str(out), "--workers", "1").returncode == 0
    spec: dict[str, Any] = json.loads(out.read_text())
    assert spec["url"] == urls
    trained = cli("worker", "--session-file", str(out), "--epochs", "2", "--log", "json")
    assert trained.returncode == 0, trained.stderr
    done = json.loads(trained.stdout.strip().splitlines()[-1])
    result = cli(
        "evaluate", "--session", spec["id"], "--token", spec["token"], "--json",
        env={"OPTSERVER_URLS": urls},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["version"] == done["steps"] > 0
    assert report["test_accuracy"] > 0.5


def test_the_demo_trains_through_two_shards_it_starts() -> None:
    result = cli("demo", "--shards", "2", "--workers", "2", "--epochs", "3", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] > 0.5
    assert summary["shards"] == 2
