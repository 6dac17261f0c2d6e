"""The kernel warm-up: a first step after it does not wait for numba.

Timings are taken on a cold numba cache (an empty ``NUMBA_CACHE_DIR`` per test), in a process
of their own, so that nothing compiled earlier helps; only the warmed step is timed against the
50 ms budget, never the warm-up itself (whose length depends on the machine). Cold, that step
compiles its kernel (some 0.3 s); warmed, it takes a few milliseconds.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from optserver_client import Client

from optserver import idempotency
from optserver.optim import OPTIMIZERS, create, kernels, warm_up
from optserver.optim.warmup import SHARED, WarmUpThread, _flag_sets
from tests.live import live_server

#: The first step's budget (the performance issue's).
BUDGET_S = 0.050
#: What the server logs once its warm-up is done.
READY = "kernels ready in"

FIRST_STEP = """
import json, sys, time
import numpy as np
from optserver.optim import create, warm_up
from optserver.optim.adam import adam_kernel

if sys.argv[1] == "warm":
    warm_up(["adam"])
kernel = adam_kernel(amsgrad=False, decay=False)
before = len(kernel.signatures)
params = {"w": np.zeros(1000, np.float32)}
grads = {"w": np.full(1000, 0.5, np.float32)}
start = time.perf_counter()
opt = create({"name": "adam", "lr": 1e-3})
opt.update(grads, opt.init(params), params)
elapsed = time.perf_counter() - start
print(json.dumps({"elapsed": elapsed, "compiled": len(kernel.signatures) - before}))
"""


def first_step(cache: Path, how: str) -> dict[str, Any]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", FIRST_STEP, how],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_first_adam_step_after_the_warm_up_is_fast(tmp_path: Path) -> None:
    result = first_step(tmp_path / "numba", "warm")
    assert result["compiled"] == 0
    assert result["elapsed"] < BUDGET_S, result


def test_without_the_warm_up_the_first_step_compiles(tmp_path: Path) -> None:
    # The control of the test above: its cache is cold, so the step has a kernel to get.
    assert first_step(tmp_path / "numba", "cold")["compiled"] == 1


def dispatchers() -> dict[str, Any]:
    """Every numba function the server runs, by a readable name."""
    out: dict[str, Any] = {
        "scan": kernels._outside,
        "count_nonfinite": kernels._count_nonfinite,
        "fingerprint": idempotency._weighted_sum,
    }
    for name, cls in OPTIMIZERS.items():
        for flags in _flag_sets(cls.kernel_factory):
            out[f"{name}{sorted(k for k, v in flags.items() if v)}"] = cls.kernel_factory(**flags)
    return out


def signatures() -> dict[str, int]:
    return {name: len(d.signatures) for name, d in dispatchers().items()}


#: Configurations that reach every flag of every kernel factory, and a change of options
#: mid-run (SGD's momentum dropped once its buffer exists).
CONFIGS: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
    *[({"name": "sgd", "momentum": m, "weight_decay": d}, None)
      for m, d in itertools.product((0.0, 0.9), (0.0, 0.1))],
    ({"name": "sgd", "momentum": 0.9, "nesterov": True}, None),
    ({"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, None),
    ({"name": "sgd", "momentum": 0.9}, {"momentum": 0.0}),
    ({"name": "sgd", "momentum": 0.9, "weight_decay": 0.1}, {"momentum": 0.0}),
    *[({"name": "adagrad", "weight_decay": d}, None) for d in (0.0, 0.1)],
    *[({"name": "rmsprop", "centered": c, "momentum": m, "weight_decay": d,
        "eps_inside_sqrt": e}, None)
      for c, m, d, e in itertools.product((False, True), (0.0, 0.9), (0.0, 0.1), (False, True))],
    *[({"name": "adam", "amsgrad": a, "weight_decay": d}, None)
      for a, d in itertools.product((False, True), (0.0, 0.1))],
    *[({"name": "adamw", "amsgrad": a}, None) for a in (False, True)],
]  # fmt: skip


def test_every_configuration_finds_its_kernels_ready() -> None:
    spent = warm_up()
    idempotency.warm_up()
    assert set(spent) == {SHARED, *OPTIMIZERS}
    assert all(seconds >= 0 for seconds in spent.values())
    before = signatures()
    for (config, change), dtype, readonly in itertools.product(
        CONFIGS, (np.float32, np.float64), (False, True)
    ):
        opt = create(config)
        params = {"w": np.full(4, 0.5, dtype)}
        state = opt.init(params)
        grad = np.full(4, 0.25, dtype)
        grad.flags.writeable = not readonly  # as gradients decoded from bytes are
        opt.update({"w": grad}, state, params, finite=True, large=["w"])
        if change is not None:
            opt = opt.with_options(change)
        opt.update({"w": grad}, state, params)
        kernels.scan(grad, 1.0)
        kernels.scan(np.full_like(grad, np.nan), 1.0)  # the count after the check
        kernels.count_nonfinite(grad)
        idempotency.fingerprint(grad.tobytes(), "", "")
    after = signatures()
    assert {name: after[name] - before[name] for name in after if after[name] != before[name]} == {}


def test_warm_up_refuses_what_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="unknown optimizers"):
        warm_up(["lbfgs"])
    with pytest.raises(ValueError, match="float32 or float64"):
        warm_up(["adam"], dtypes=[np.float16])


def test_a_cancelled_warm_up_stops_before_compiling() -> None:
    calls: list[str] = []
    thread = WarmUpThread(["adam"], extra={"extra": lambda: calls.append("extra")})
    thread.cancel.set()
    thread.start()
    assert thread.stop(60)
    assert calls == [] and thread.spent is None


def test_a_failing_warm_up_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def fail() -> None:
        raise RuntimeError("no compiler today")

    thread = WarmUpThread(["adam"], extra={"broken": fail})
    with caplog.at_level(logging.ERROR):
        thread.start()
        assert thread.stop(60)
    assert thread.spent is None
    assert "no compiler today" in caplog.text


def test_server_warms_up_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))  # the server inherits it
    log = tmp_path / "server.log"
    start = time.monotonic()
    with live_server(log_file=log, log_level="info", startup_timeout=60, warm_up=True) as server:
        # Compiling every kernel cold takes some 25 s of CPU: /healthz answered long before.
        assert time.monotonic() - start < 15
        assert READY not in log.read_text()
        begin = time.perf_counter()
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        assert time.perf_counter() - begin < 1.0
        deadline = time.monotonic() + 600
        while READY not in log.read_text():
            assert time.monotonic() < deadline, "the warm-up did not finish within 600 s"
            time.sleep(0.1)
        with Client(server.url) as client:
            w = np.zeros(1000, np.float32)
            session = client.create_session({"w": w}, {"name": "adam", "lr": 1e-3})
            begin = time.perf_counter()
            weights = session.step({"w": np.full(1000, 0.5, np.float32)})
            elapsed = time.perf_counter() - begin
    assert weights["w"].shape == (1000,)
    assert elapsed < BUDGET_S, elapsed
