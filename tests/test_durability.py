"""Durability: a data directory survives kill -9, torn writes and restarts; TTL and quotas."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from optserver_client import Client, Session

from tests.live import LiveServer, free_port, live_server

N_THREADS, PUSHES = 4, 40


def kill(server: LiveServer) -> None:
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()


def one_hot(index: int, size: int) -> np.ndarray:
    g = np.zeros(size)
    g[index] = 1.0
    return g


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_every_acknowledged_step_survives_kill_9(tmp_path: Path, fsync: str) -> None:
    """Threads push while the server is killed; push i adds -1 to element i (SGD, lr 1), so the
    weights after the restart say exactly which pushes were applied."""
    size = N_THREADS * PUSHES
    acked: list[int] = []
    lock = threading.Lock()
    with live_server(data_dir=tmp_path, fsync=fsync) as server:
        with Client(server.url) as client:
            session = client.create_session({"w": np.zeros(size)}, {"name": "sgd", "lr": 1.0},
                                            dtype="float64")  # fmt: skip

        def worker(k: int) -> None:
            with Session.attach(server.url, session.id, str(session.token), retries=0) as s:
                for i in range(k * PUSHES, (k + 1) * PUSHES):
                    try:
                        s.push({"w": one_hot(i, size)}, worker=f"t{k}")
                    except Exception:
                        return  # the server is gone
                    with lock:
                        acked.append(i)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_THREADS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120  # a server that acknowledges nothing fails, not hangs
        while len(acked) < size // 2:
            assert time.monotonic() < deadline, f"only {len(acked)} pushes acknowledged"
            time.sleep(0.005)
        kill(server)
        for t in threads:
            t.join(10)
    assert 0 < len(acked) < size
    with live_server(data_dir=tmp_path, fsync=fsync) as server:
        revived = Session.attach(server.url, session.id, str(session.token))
        w = revived.pull()["w"]
        info = revived.info()
        applied = set(np.flatnonzero(w == -1.0).tolist())
        assert set(np.unique(w).tolist()) <= {0.0, -1.0}
        assert set(acked) <= applied  # nothing acknowledged is lost
        assert info["version"] == len(applied)  # versions count applied steps, once each
        assert sum(stats["applied"] for stats in info["workers"].values()) == len(applied)
        revived.push({"w": one_hot(0, size)})  # and it goes on
        assert revived.version == len(applied) + 1


def adam_run(server: LiveServer, session: Session | None, grads: np.ndarray) -> Session:
    if session is None:
        with Client(server.url) as client:
            created = client.create_session(
                {"w": np.linspace(-1, 1, grads.shape[1], dtype=np.float32)},
                {"name": "adam", "lr": 0.01, "amsgrad": True},
                schedule={"name": "cosine", "T_max": 50},
            )
        session = Session.attach(server.url, created.id, str(created.token))
    for g in grads:
        session.step({"w": g}, worker="a", base_version=session.version)
    return session


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    grads = np.random.default_rng(0).standard_normal((30, 64)).astype(np.float32)
    with live_server() as reference_server:
        reference = adam_run(reference_server, None, grads)
        expected = reference.export_state()
        expected_w = reference.pull()["w"]
    with live_server(data_dir=tmp_path) as server:
        session = adam_run(server, None, grads[:17])
        kill(server)
    with live_server(data_dir=tmp_path) as server:
        revived = Session.attach(server.url, session.id, str(session.token))
        revived.info()  # learns the version it resumes from
        adam_run(server, revived, grads[17:])
        np.testing.assert_array_equal(revived.pull()["w"], expected_w)
        # Optimizer state too: the exports agree tensor for tensor.
        import safetensors.numpy as stn

        ours, theirs = stn.load(revived.export_state()), stn.load(expected)
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_idempotency_memory_and_worker_stats_survive_a_restart(tmp_path: Path) -> None:
    with live_server(data_dir=tmp_path) as server:
        with Client(server.url) as client:
            session = client.create_session({"w": np.zeros(3, np.float32)}, "sgd")
        url = f"{server.url}/v1/sessions/{session.id}/step"
        headers = {"Authorization": f"Bearer {session.token}", "Idempotency-Key": "abc"}
        body = {"grads": {"w": [1.0, 2.0, 3.0]}, "worker": "w7", "base_version": 0}
        first = httpx.post(url, json=body, headers=headers)
        info = httpx.get(f"{server.url}/v1/sessions/{session.id}", headers=headers).json()
        kill(server)
    with live_server(data_dir=tmp_path) as server:
        url = f"{server.url}/v1/sessions/{session.id}/step"
        again = httpx.post(url, json=body, headers=headers)
        assert again.status_code == 200 and again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
        after = httpx.get(f"{server.url}/v1/sessions/{session.id}", headers=headers).json()
    assert after["version"] == 1
    assert after["workers"]["w7"] == info["workers"]["w7"] | {
        "last_seen": after["workers"]["w7"]["last_seen"]
    }


def test_torn_last_record_is_dropped_with_a_warning(tmp_path: Path) -> None:
    with live_server(data_dir=tmp_path) as server:
        with Client(server.url) as client:
            session = client.create_session(
                {"w": np.zeros(2, np.float32)}, {"name": "sgd", "lr": 1.0}
            )
            session.push({"w": np.ones(2, np.float32)})
        kill(server)
    wal = sorted(tmp_path.glob("wal-*.log"))[-1]
    with open(wal, "ab") as f:  # half a record: a length that runs past the end
        f.write((1000).to_bytes(4, "little") + b"\x00\x00\x00\x00partial")
    log = tmp_path / "server.log"
    with live_server(data_dir=tmp_path, quiet=False, log_file=log) as server:
        revived = Session.attach(server.url, session.id, str(session.token))
        assert revived.pull()["w"].tolist() == [-1.0, -1.0]
        assert revived.push({"w": np.ones(2, np.float32)}) == 2
    assert "runs past the end" in log.read_text()


def start_failure(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPTSERVER_DATA_DIR": str(data_dir), "OPTSERVER_PORT": str(free_port())}
    return subprocess.run([sys.executable, "-m", "optserver", "serve"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_corrupt_snapshot_stops_startup_clearly(tmp_path: Path) -> None:
    with live_server(data_dir=tmp_path) as server, Client(server.url) as client:
        session = client.create_session({"w": np.zeros(1000, np.float32)}, "adam")
        session.push({"w": np.ones(1000, np.float32)})
    snapshot = next(tmp_path.glob("snapshot-*.safetensors"))  # written at the clean shutdown
    data = bytearray(snapshot.read_bytes())
    data[-10] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    result = start_failure(tmp_path)
    assert result.returncode == 1
    assert snapshot.name in result.stderr and "checksum" in result.stderr


def test_damage_inside_the_journal_stops_startup_clearly(tmp_path: Path) -> None:
    with live_server(data_dir=tmp_path) as server:
        with Client(server.url) as client:
            session = client.create_session({"w": np.zeros(4, np.float32)}, "sgd")
            for _ in range(3):
                session.push({"w": np.ones(4, np.float32)})
        kill(server)
    wal = tmp_path / "wal-00000000.log"
    data = bytearray(wal.read_bytes())
    data[12] ^= 0xFF  # inside the first record; valid records follow it
    wal.write_bytes(bytes(data))
    result = start_failure(tmp_path)
    assert result.returncode == 1
    assert wal.name in result.stderr and "damaged" in result.stderr
    assert len(wal.read_bytes()) == len(data)  # nothing was cut off


def test_snapshots_fold_the_journal(tmp_path: Path) -> None:
    with live_server(data_dir=tmp_path, snapshot_bytes=20_000) as server:
        with Client(server.url) as client:
            session = client.create_session({"w": np.zeros(1000, np.float32)}, "adam")
            for _ in range(30):
                session.push({"w": np.ones(1000, np.float32)})
            expected = session.pull()["w"]
        deadline = time.monotonic() + 10
        while not list(tmp_path.glob("snapshot-*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.05)
        kill(server)
    snapshots = list(tmp_path.glob("snapshot-*.safetensors"))
    assert snapshots
    with live_server(data_dir=tmp_path) as server:
        revived = Session.attach(server.url, session.id, str(session.token))
        np.testing.assert_array_equal(revived.pull()["w"], expected)
        assert revived.info()["version"] == 30
        # The journal before the newest snapshot is gone (at the latest, at start-up).
        number = max(int(p.stem.split("-")[1]) for p in tmp_path.glob("snapshot-*.safetensors"))
        assert all(int(w.stem.split("-")[1]) >= number for w in tmp_path.glob("wal-*.log"))


def test_idle_sessions_expire(tmp_path: Path) -> None:
    with live_server(data_dir=tmp_path, session_ttl_s=1) as server:
        with Client(server.url) as client:
            idle = client.create_session({"w": np.zeros(1, np.float32)}, "sgd")
            busy = client.create_session({"w": np.zeros(1, np.float32)}, "sgd")
        busy_session = Session.attach(server.url, busy.id, str(busy.token))
        for _ in range(12):
            busy_session.pull()
            time.sleep(0.2)
        r = httpx.get(
            f"{server.url}/v1/sessions/{idle.id}", headers={"Authorization": f"Bearer {idle.token}"}
        )
        assert r.status_code == 404
        assert busy_session.info()["id"] == busy.id
        kill(server)
    with live_server(data_dir=tmp_path) as server:
        r = httpx.get(
            f"{server.url}/v1/sessions/{idle.id}", headers={"Authorization": f"Bearer {idle.token}"}
        )
        assert r.status_code == 404  # the expiry was recorded too


def test_total_bytes_quota() -> None:
    with live_server(max_total_bytes=10_000) as server, Client(server.url) as client:
        session = client.create_session({"w": np.zeros(500, np.float32)}, "sgd")  # 2 KB
        r = httpx.put(
            f"{server.url}/v1/sessions/{session.id}/params",
            json={"params": {"big": [0.0] * 1000}},  # adam would be 12 KB; sgd 4 KB + 2 KB ok
            headers={"Authorization": f"Bearer {session.token}"},
        )
        assert r.status_code == 200
        r = httpx.post(server.url + "/v1/sessions",
                       json={"optimizer": "adam", "params": {"w": [0.0] * 1000}})  # fmt: skip
        assert r.status_code == 507 and r.headers["content-type"] == "application/problem+json"
        problem: dict[str, Any] = r.json()
        assert problem["type"].endswith("insufficient-storage") and "10000" in problem["detail"]
        info = session.info()
        assert info["memory_bytes"] == 6000
