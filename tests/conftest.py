from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.live import LiveServer, live_server

# Test servers (subprocesses, and in-process apps) skip the background kernel warm-up: dozens
# of them start during a run, and a cold warm-up's compilation would compete with the
# latency-sensitive tests. tests/test_warm_up.py turns it on where it is the subject.
os.environ.setdefault("OPTSERVER_WARM_UP", "false")


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    """A server with default settings and no admin key."""
    with live_server() as s:
        yield s


@pytest.fixture(scope="session")
def admin_server() -> Iterator[LiveServer]:
    """A server with an admin key and small limits."""
    with live_server(
        admin_key="admin-secret-key",
        max_body_bytes=1 << 20,
        max_sessions=50,
        max_tensors_per_session=8,
        max_tensor_elements=100_000,
        max_json_depth=4,
    ) as s:
        yield s
