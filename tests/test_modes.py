"""Multi-worker modes against a real server: sync rounds, ssp, per-worker bookkeeping, the demo."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from optserver_client import Client, ConflictError, Session, StaleGradientError

from optserver.demo import mlp
from optserver.demo.data import load_digits
from tests.live import LiveServer, live_server


def sync_session(client: Client, workers: int, timeout: float, **mode: Any) -> Session:
    return client.create_session(
        {"w": np.zeros(4, np.float32)},
        {"name": "sgd", "lr": 1.0},
        mode={"name": "sync", "workers": workers, "timeout_s": timeout, **mode},
    )


def push_all(
    server: LiveServer, session: Session, grads: dict[str, np.ndarray], **kw: Any
) -> dict[str, Any]:
    """Push every worker's gradient at once (one thread each); answers or errors by worker."""
    out: dict[str, Any] = {}

    def push(worker: str, grad: np.ndarray) -> None:
        with Session.attach(server.url, session.id, str(session.token), retries=0) as s:
            try:
                out[worker] = (s.step({"w": grad}, worker=worker, **kw), time.monotonic())
            except Exception as exc:
                out[worker] = (exc, time.monotonic())

    threads = [threading.Thread(target=push, args=item) for item in grads.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_sync_round_applies_the_mean_once(server: LiveServer) -> None:
    rng = np.random.default_rng(0)
    grads = {f"w{k}": rng.standard_normal(4).astype(np.float32) for k in range(3)}
    with Client(server.url) as client:
        session = sync_session(client, 3, 30)
        answers = push_all(server, session, grads)
        mean = np.mean(np.stack(list(grads.values())), axis=0)
        for worker, (answer, _) in answers.items():
            assert isinstance(answer, dict), (worker, answer)
            np.testing.assert_allclose(answer["w"], -mean, rtol=1e-6)
        info = session.info()
    assert info["version"] == 1 and info["counters"]["steps_applied"] == 1
    assert {w: s["applied"] for w, s in info["workers"].items()} == {"w0": 1, "w1": 1, "w2": 1}


def test_sync_deadline_proceeds_with_min_workers(server: LiveServer) -> None:
    grads = {"a": np.full(4, 2.0, np.float32), "b": np.full(4, 4.0, np.float32)}
    with Client(server.url) as client:
        session = sync_session(client, 3, 0.5, min_workers=2)
        start = time.monotonic()
        answers = push_all(server, session, grads)
        for answer, at in answers.values():
            assert isinstance(answer, dict)
            assert answer["w"].tolist() == [-3.0] * 4  # mean of the two that came
            assert at - start >= 0.45  # waited for the deadline, not for the dead worker
        assert session.info()["version"] == 1


def test_sync_deadline_without_enough_workers_fails_cleanly(server: LiveServer) -> None:
    with Client(server.url) as client:
        session = sync_session(client, 2, 0.3)
        start = time.monotonic()
        answers = push_all(server, session, {"a": np.ones(4, np.float32)})
        error, at = answers["a"]
        assert isinstance(error, ConflictError) and error.type.endswith("round-failed")
        assert "1 of the 2" in error.detail and 0.25 < at - start < 5
        info = session.info()
        assert info["version"] == 0 and info["counters"]["rejected_by_reason"] == {
            "round-failed": 1
        }
        assert session.pull()["w"].tolist() == [0.0] * 4
        # The next round starts fresh.
        answers = push_all(
            server, session, {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}
        )
        assert all(isinstance(a, dict) for a, _ in answers.values())


def test_sync_duplicate_late_and_anonymous_pushes(server: LiveServer) -> None:
    with Client(server.url) as client:
        session = sync_session(client, 2, 30)
        first: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: first.update(push_all(server, session, {"a": np.ones(4, np.float32)}))
        )
        thread.start()
        time.sleep(0.3)
        worker = Session.attach(server.url, session.id, str(session.token), retries=0)
        with pytest.raises(ConflictError) as duplicate:
            worker.step({"w": np.ones(4, np.float32)}, worker="a")
        assert duplicate.value.type.endswith("duplicate-push") and "'a'" in duplicate.value.detail
        worker.step({"w": np.full(4, 3.0, np.float32)}, worker="b")  # completes the round
        thread.join(10)
        assert first["a"][0]["w"].tolist() == [-2.0] * 4  # mean of a's first push and b's
        with pytest.raises(StaleGradientError) as late:
            worker.step({"w": np.ones(4, np.float32)}, worker="a", base_version=0)
        assert late.value.current_version == 1
        with pytest.raises(Exception, match="worker"):
            worker.step({"w": np.ones(4, np.float32)})
        worker.close()


def test_sync_retry_with_the_same_key_waits_for_the_same_round(server: LiveServer) -> None:
    with Client(server.url) as client:
        session = sync_session(client, 2, 30)
    url = f"{server.url}/v1/sessions/{session.id}/step"
    headers = {"Authorization": f"Bearer {session.token}", "Idempotency-Key": "k-1"}
    body = {"grads": {"w": [1.0, 1.0, 1.0, 1.0]}, "worker": "a"}
    answers: list[httpx.Response] = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(httpx.post(url, json=body, headers=headers, timeout=30))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
        time.sleep(0.2)
    other = httpx.post(
        url,
        json={"grads": {"w": [3.0] * 4}, "worker": "b"},
        headers={"Authorization": f"Bearer {session.token}"},
        timeout=30,
    )
    for t in threads:
        t.join(10)
    assert other.status_code == 200
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json()["params"] == answers[1].json()["params"] == {"w": [-2.0] * 4}


def test_ssp_client_pulls_and_recomputes_when_stale(server: LiveServer) -> None:
    with Client(server.url) as client:
        session = client.create_session(
            {"w": np.zeros(2, np.float32)},
            {"name": "sgd", "lr": 1.0},
            mode={"name": "ssp", "max_staleness": 1},
        )
        weights = session.pull()  # version 0
        other = Session.attach(server.url, session.id, str(session.token))
        for _ in range(3):
            other.push({"w": np.ones(2, np.float32)}, worker="fast")
        seen: list[list[float]] = []

        def compute(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            seen.append(w["w"].tolist())
            return {"w": np.full(2, 0.5, np.float32)}

        session._core.version = 0
        new = session.train_step(compute, weights, worker="slow")
        assert seen == [[0.0, 0.0], [-3.0, -3.0]]  # refused as 3 behind, recomputed on fresh
        assert new["w"].tolist() == [-3.5, -3.5]
        info = session.info()
        other.close()
    slow = info["workers"]["slow"]
    assert slow["rejected_by_reason"] == {"stale-gradient": 1} and slow["applied"] == 1
    assert info["workers"]["fast"]["pushes"] == 3


def test_ssp_inverse_staleness_scaling(server: LiveServer) -> None:
    with Client(server.url) as client:
        session = client.create_session(
            {"w": np.zeros(1, np.float32)},
            {"name": "sgd", "lr": 1.0},
            mode={"name": "ssp", "max_staleness": 5, "staleness_scaling": "inverse"},
        )
        session.push({"w": np.ones(1, np.float32)})  # version 1, w = -1
        new = session.step({"w": np.ones(1, np.float32)}, base_version=0)  # 1 stale: lr 1/2
        assert new["w"].tolist() == [-1.5]


def test_worker_stats_in_metrics(server: LiveServer) -> None:
    with Client(server.url) as client:
        session = client.create_session(
            {"w": np.zeros(1, np.float32)}, "sgd", mode={"name": "ssp", "max_staleness": 0}
        )
        session.push({"w": np.ones(1, np.float32)}, worker="alpha", base_version=0)
        with pytest.raises(StaleGradientError):
            session.push({"w": np.ones(1, np.float32)}, worker="alpha", base_version=0)
    text = httpx.get(server.url + "/metrics").text
    key = f'session="{session.id}",worker="alpha"'
    assert f"optserver_worker_pushes_total{{{key}}} 2.0" in text
    assert f"optserver_worker_rejected_total{{{key}}} 1.0" in text
    assert f"optserver_worker_staleness_count{{{key}}} 1.0" in text
    assert f'optserver_push_staleness_bucket{{le="0.0",session="{session.id}"}} 1.0' in text


def test_fast_demo_run_learns() -> None:
    data = load_digits()
    before = mlp.accuracy(mlp.init_params(0), data.x_test, data.y_test)
    result = subprocess.run(
        [sys.executable, "-m", "optserver", "demo", "--workers", "2", "--epochs", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["workers"] == 2 and summary["mode"] == "async"
    assert summary["steps"] == 2 * 3 * 23  # ceil(ceil(1437/2)/32) steps per epoch per worker
    assert summary["test_accuracy"] > before + 0.5, (before, summary["test_accuracy"])
    assert {"baseline_accuracy", "seconds", "pushes_rejected"} <= summary.keys()


def test_compose_commands_end_to_end(server: LiveServer, tmp_path: Path) -> None:
    """create-session, worker --session-file --shard auto, evaluate: what the compose stack runs."""
    spec = tmp_path / "session.json"
    run = [sys.executable, "-m", "optserver"]
    subprocess.run(
        [
            *run,
            "create-session",
            "--url",
            server.url,
            "--out",
            str(spec),
            "--workers",
            "2",
            "--mode",
            "sync",
        ],
        check=True,
        timeout=60,
    )
    info = json.loads(spec.read_text())
    workers = [
        subprocess.Popen(
            [*run, "worker", "--session-file", str(spec), "--epochs", "2", "--worker-id", f"r{k}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    logs = [w.communicate(timeout=120)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), logs
    assert all("final test_accuracy=" in log for log in logs)
    result = subprocess.run(
        [
            *run,
            "evaluate",
            "--url",
            server.url,
            "--session",
            info["id"],
            "--token",
            info["token"],
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    evaluation = json.loads(result.stdout)
    assert evaluation["version"] == 2 * 23 and evaluation["test_accuracy"] > 0.6


def test_sync_round_skips_a_non_finite_gradient_under_the_skip_policy(server: LiveServer) -> None:
    with Client(server.url) as client:
        session = client.create_session(
            {"w": np.zeros(4, np.float32)},
            {"name": "sgd", "lr": 1.0},
            mode={"name": "sync", "workers": 2, "timeout_s": 30},
            nonfinite="skip",
        )
        bad = np.array([np.nan, 1.0, 1.0, 1.0], np.float32)
        answers = push_all(server, session, {"a": bad, "b": np.full(4, 2.0, np.float32)})
        for answer, _ in answers.values():
            assert isinstance(answer, dict)
            assert answer["w"].tolist() == [-2.0] * 4  # the round's mean leaves the NaN out
        info = session.info()
    assert info["version"] == 1
    assert info["workers"]["a"]["rejected_by_reason"] == {"nonfinite-skipped": 1}
    assert info["workers"]["b"]["applied"] == 1


def test_server_totals_count_a_sync_round_as_one_step() -> None:
    with live_server() as server, Client(server.url) as client:
        session = sync_session(client, 3, 30)
        grads = {f"w{k}": np.ones(4, np.float32) for k in range(3)}
        push_all(server, session, grads)
        with pytest.raises(StaleGradientError):
            session.step({"w": np.ones(4, np.float32)}, worker="w0", base_version=0)
        session.delete()  # totals include deleted sessions
        text = httpx.get(server.url + "/metrics").text
    assert "optserver_steps_applied_total 1.0" in text
    assert "optserver_pushes_received_total 4.0" in text
    assert 'optserver_pushes_rejected_total{reason="stale-gradient"} 1.0' in text
