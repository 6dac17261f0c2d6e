"""The ``optserver`` command with a new user's mistakes: one or two lines that name the bad
value and what is allowed, a non-zero exit, no traceback (unless ``--debug``); and a ``--help``
that shows every server option's environment variable and default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from optserver.config import Settings
from tests.live import LiveServer, free_port

CLI = [sys.executable, "-m", "optserver"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVER_")}
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "COLUMNS": "200", **(env or {})},
    )


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def _mistakes(tmp: Path, live_url: str) -> list[tuple[list[str], dict[str, str], list[str]]]:
    """(arguments, environment, what the message must name) for each ordinary mistake."""
    dead = _dead_url()
    missing = str(tmp / "missing.pem")
    return [
        (["demo", "--mode", "bogus"], {}, ["'bogus'", "async", "sync", "ssp"]),
        (["demo", "--optimizer", "bogus"], {}, ["'bogus'", "sgd", "adagrad", "adamw"]),
        (["demo", "--lr", "-1"], {}, ["--lr", "-1", "positive"]),
        (["demo", "--max-staleness", "-3"], {}, ["--max-staleness", "-3", "0"]),
        (["demo", "--workers", "0"], {}, ["--workers", "'0'", "1"]),
        (["serve", "--port", "99999"], {}, ["--port", "99999", "65535"]),
        (["serve", "--fsync", "sometimes"], {}, ["'sometimes'", "always", "interval", "never"]),
        (["serve", "--log-level", "loud"], {}, ["'loud'", "debug", "info"]),
        (["serve"], {"OPTSERVER_PORT": "notaport"}, ["OPTSERVER_PORT", "notaport", "integer"]),
        (["serve"], {"OPTSERVER_FSYNC": "sometimes"}, ["OPTSERVER_FSYNC", "sometimes", "never"]),
        # A setting without a flag of its own: named as its variable.
        (["serve"], {"OPTSERVER_MAX_SESSIONS": "0"}, ["OPTSERVER_MAX_SESSIONS", "'0'", "1"]),
        (["serve", "--data-dir", "/proc/nope"], {}, ["/proc/nope"]),
        (
            ["serve", "--ssl-certfile", missing, "--ssl-keyfile", missing],
            {},
            ["--ssl-certfile", missing, "does not exist"],
        ),
        (["serve", "--bogus"], {}, ["--bogus"]),
        (["create-session", "--url", dead, "--out", str(tmp / "s.json")], {}, [dead, "reach"]),
        (["demo", "--url", dead, "--workers", "1", "--epochs", "1"], {}, [dead, "reach"]),
        (["worker", "--url", dead, "--session", "s", "--token", "t"], {}, [dead, "reach"]),
        (["worker", "--url", dead, "--session", "s", "--token", "t", "--shard", "x"], {}, ["'x'"]),
        (
            ["evaluate", "--url", live_url, "--session", "nosuchsession", "--token", "t"],
            {},
            ["401", "nosuchsession"],
        ),
        (["evaluate"], {}, ["--url"]),
    ]


CASES = len(_mistakes(Path("/"), "http://x"))


@pytest.mark.parametrize("case", range(CASES))
def test_a_mistake_gets_one_or_two_lines_that_name_it(
    case: int, tmp_path: Path, server: LiveServer
) -> None:
    args, env, named = _mistakes(tmp_path, server.url)[case]
    result = _run(*args, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    assert "Traceback" not in result.stderr and "error" in lines[0], result.stderr
    for part in named:
        assert part in lines[0], (part, lines[0])
    assert not (tmp_path / "s.json").exists()


def test_usage_errors_exit_2_and_failures_exit_1(tmp_path: Path) -> None:
    assert _run("demo", "--mode", "bogus").returncode == 2
    assert (
        _run("create-session", "--url", _dead_url(), "--out", str(tmp_path / "s")).returncode == 1
    )


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how: str, tmp_path: Path) -> None:
    args = ["create-session", "--url", _dead_url(), "--out", str(tmp_path / "s.json")]
    if how == "flag":
        result = _run("--debug", *args)
    else:
        result = _run(*args, env={"OPTSERVER_LOG_LEVEL": "debug"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "TransportError" in result.stderr, result.stderr


def test_serve_help_shows_every_option_with_its_variable_and_default() -> None:
    result = _run("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # the help wraps; compare words
    for name in ("host", "port", "admin_key", "max_body_bytes", "log_level", "data_dir", "fsync"):
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
        assert f"[env var: OPTSERVER_{name.upper()}]" in text, name
        field = Settings.model_fields[name]
        if field.default is not None and name != "max_body_bytes":
            assert f"[default: {field.default}]" in text, name
    assert "[default: 1 GiB]" in text.replace("(", "").replace(")", "")
    assert "<always|interval|never>" in text and "<critical|error|warning|info|debug>" in text
    # What the help said before: its own "[env ...]" text was swallowed as markup.
    assert "Interface ." not in text and "TCP port ." not in text


def test_no_arguments_prints_the_commands() -> None:
    result = _run()
    assert result.returncode == 0
    for command in ("serve", "demo", "worker", "create-session", "evaluate"):
        assert command in result.stdout


def test_the_cli_offers_exactly_the_servers_optimizers_and_modes() -> None:
    """The choices are spelled in the CLI for typing; they must be the server's own."""
    from typing import get_args

    from optserver.cli.options import ModeName, OptimizerName
    from optserver.demo.run import DEFAULT_LR
    from optserver.modes import AsyncMode, SSPMode, SyncMode
    from optserver.optim import OPTIMIZERS

    assert set(get_args(OptimizerName)) == set(OPTIMIZERS) == set(DEFAULT_LR)
    modes = {get_args(m.model_fields["name"].annotation)[0] for m in (AsyncMode, SSPMode, SyncMode)}
    assert set(get_args(ModeName)) == modes
