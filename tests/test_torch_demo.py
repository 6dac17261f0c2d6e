"""``optserver demo --framework torch``: worker processes train a torch model with
RemoteOptimizer in a plain torch loop, next to the same loop in one process with torch.optim."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.live import LiveServer

DEMO = [sys.executable, "-m", "optserver", "demo", "--framework", "torch", "--json"]


def _run(*args: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    result = subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1])), result


def test_four_async_workers_come_within_a_point_of_one_torch_process(server: LiveServer) -> None:
    summary, result = _run("--workers", "4", "--url", server.url)
    assert summary["framework"] == "torch" and summary["mode"] == "async"
    assert summary["steps"] == summary["pushes"] > 0
    assert summary["test_accuracy"] >= summary["baseline_accuracy"] - 0.01, summary
    assert "WARNING" not in result.stderr


@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_the_torch_workers_learn_in_the_other_modes(server: LiveServer, mode: str) -> None:
    summary, _ = _run("--workers", "2", "--epochs", "3", "--mode", mode, "--url", server.url)
    assert summary["mode"] == mode
    assert summary["test_accuracy"] > 0.8, summary
    if mode == "sync":
        assert summary["pushes"] == 2 * summary["steps"]  # one push per worker per round
