"""``optserver demo`` as a new user runs it: every optimizer it offers learns in every mode with
its default learning rate, it warns when training went wrong, and its output reads cleanly in
logs (stdout not a terminal)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from optserver.demo import mlp
from optserver.demo.data import load_digits
from optserver.demo.run import DEFAULT_LR, LEARNED, WARN_BELOW_BASELINE, verdict
from tests.live import LiveServer

MODES = ("async", "sync", "ssp")
DEMO = [sys.executable, "-m", "optserver", "demo", "--workers", "2", "--epochs", "3"]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=300)


def _summary(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def untrained_accuracy() -> float:
    data = load_digits()
    return mlp.accuracy(mlp.init_params(0), data.x_test, data.y_test)


def test_the_help_offers_every_optimizer_with_a_default_lr() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "optserver", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": ""},
        check=True,
    ).stdout
    offered = help_text.split("--optimizer", 1)[1].split("<", 1)[1].split(">", 1)[0].split("|")
    assert sorted(offered) == sorted(DEFAULT_LR)
    assert "<async|sync|ssp>" in help_text


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("optimizer", sorted(DEFAULT_LR))
def test_every_optimizer_learns_in_every_mode_with_its_default_lr(
    server: LiveServer, optimizer: str, mode: str, untrained_accuracy: float
) -> None:
    result = _demo("--optimizer", optimizer, "--mode", mode, "--json", "--url", server.url)
    assert result.returncode == 0, result.stderr
    summary = _summary(result)
    assert summary["optimizer"]["lr"] == DEFAULT_LR[optimizer]
    assert summary["mode"] == mode
    # Three short epochs from chance (~0.1): a real gain, and not far below one process.
    assert summary["test_accuracy"] > untrained_accuracy + 0.6, summary
    assert summary["test_accuracy"] >= summary["baseline_accuracy"] - WARN_BELOW_BASELINE
    assert "WARNING" not in result.stderr


def test_the_demo_warns_exactly_when_the_result_is_far_below_the_baseline(
    server: LiveServer,
) -> None:
    """The old default (0.1 with momentum 0.9) trained to chance with 4 async workers while one
    process reached ~0.97, and said nothing. Whether a given run diverges depends on how the
    workers interleave: whatever it does, the warning and the exit status must agree with it."""
    result = subprocess.run(
        [*DEMO[:4], "--workers", "4", "--epochs", "4", "--optimizer", "sgd", "--lr", "0.1",
         "--json", "--url", server.url],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    summary = _summary(result)
    bad = summary["test_accuracy"] < max(
        LEARNED, summary["baseline_accuracy"] - WARN_BELOW_BASELINE
    )
    assert result.returncode == (1 if bad else 0), (summary, result.stderr)
    assert ("WARNING" in result.stderr) == bad, result.stderr
    assert "Traceback" not in result.stderr


def test_verdict() -> None:
    base = {"optimizer": {"name": "sgd", "lr": 0.1}, "mode": "async", "workers": 4}
    assert verdict({**base, "test_accuracy": 0.95, "baseline_accuracy": 0.97}) is None
    far = verdict({**base, "test_accuracy": 0.80, "baseline_accuracy": 0.97})
    assert far is not None and "far below" in far and "0.800" in far and "--lr" in far
    chance = verdict({**base, "test_accuracy": 0.11, "baseline_accuracy": 0.12})
    assert chance is not None and "near chance" in chance
    edge = 0.97 - WARN_BELOW_BASELINE
    assert verdict({**base, "test_accuracy": edge, "baseline_accuracy": 0.97}) is None


def test_a_run_that_learns_nothing_is_flagged_even_when_the_baseline_fails_too(
    server: LiveServer,
) -> None:
    result = _demo("--optimizer", "sgd", "--lr", "2", "--json", "--url", server.url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    summary = _summary(result)
    assert summary["test_accuracy"] < LEARNED
    assert "near chance" in result.stderr, result.stderr


def test_output_without_a_terminal_reads_as_plain_lines(server: LiveServer) -> None:
    result = subprocess.run(
        [*DEMO, "--url", server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        env={**_env(), "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert "optserver demo: summary" in lines  # a line of its own, not glued to a border
    box = set("─━│┃┌┏└┗┐┓┘┛├┡┼╇")
    assert not [line for line in lines if box & set(line)], result.stdout
    assert not [line for line in lines if "\x1b" in line], "no escape codes in logs"
    after = lines[lines.index("optserver demo: summary") + 1 :]
    keys = [line.split(":", 1)[0] for line in after]
    assert {"test accuracy", "baseline (1 process)", "wall time"} <= set(keys), after
    # One line per epoch per worker, and one when each is done.
    assert sum(": epoch " in line for line in lines) == 2 * 3
    assert sum(": done after " in line for line in lines) == 2


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TERM")}
