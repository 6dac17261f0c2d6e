"""The Python client and the seed drop-in against a real server."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from optserver_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    LimitExceededError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    Session,
    StaleGradientError,
    ValidationError,
    compat,
)

from optserver.optim import create as create_optimizer
from tests.live import LiveServer


def random_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}


@pytest.mark.parametrize("binary", [True, False], ids=["safetensors", "json"])
def test_client_session_end_to_end(server: LiveServer, binary: bool) -> None:
    config = {"name": "adam", "lr": 0.01, "amsgrad": True}
    params = random_params()
    local = {n: p.copy() for n, p in params.items()}
    opt = create_optimizer(config)
    state = opt.init(local)
    rng = np.random.default_rng(1)
    with Client(server.url, binary=binary) as client:
        session = client.create_session(params, config, name="e2e")
        assert session.version == 0
        for _ in range(3):
            grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in local.items()}
            new = session.step(grads)
            opt.update(grads, state, local)
            for n in local:
                np.testing.assert_array_equal(new[n], local[n])
        assert session.version == 3
        assert session.push({"b": np.ones(3, np.float32)}) == 4
        opt.update({"b": np.ones(3, np.float32)}, state, local)
        pulled = session.pull()
        np.testing.assert_array_equal(pulled["b"], local["b"])
        assert set(session.pull(["w"])) == {"w"}
        info = session.info()
        assert info["name"] == "e2e" and info["counters"]["steps_applied"] == 4
        assert session.update(optimizer={"lr": 0.5})["optimizer"]["lr"] == 0.5

        blob = session.export_state()
        twin = client.import_state(blob, name="twin")
        assert twin.id != session.id and twin.version == 4
        g = {"w": np.ones((4, 3), np.float32)}
        a, b = session.step(g), twin.step(g)
        np.testing.assert_array_equal(a["w"], b["w"])

        assert session.token is not None
        worker = Session.attach(server.url, session.id, session.token, binary=binary)
        with worker:
            np.testing.assert_array_equal(worker.pull()["w"], a["w"])
        session.delete()
        twin.delete()
        with pytest.raises(NotFoundError):
            session.info()


def test_client_errors_are_typed(server: LiveServer, admin_server: LiveServer) -> None:
    with Client(server.url) as client:
        one = client.create_session(random_params(), "sgd")
        two = client.create_session(random_params(), "sgd")
        with pytest.raises(ValidationError) as info:
            one.step({"w": np.zeros((3, 4), np.float32)})
        assert info.value.status == 422 and "'w'" in info.value.detail
        with pytest.raises(AuthenticationError):
            Session.attach(server.url, one.id, "wrong-token").pull()
        with pytest.raises(PermissionDeniedError):
            Session.attach(server.url, one.id, str(two.token)).pull()
        ssp = client.create_session(
            random_params(), "sgd", mode={"name": "ssp", "max_staleness": 0}
        )
        ssp.push({"b": np.ones(3, np.float32)})
        with pytest.raises(StaleGradientError) as stale:
            ssp.step({"b": np.ones(3, np.float32)}, base_version=0)
        assert stale.value.current_version == 1
    with Client(admin_server.url, admin_key=admin_server.admin_key) as client:
        big = client.create_session(None, "sgd")
        with pytest.raises(PayloadTooLargeError):
            big.set_params({"w": np.zeros(400_000, np.float32)})
        with pytest.raises(LimitExceededError):
            big.set_params({f"t{i}": np.zeros(1, np.float32) for i in range(9)})
    with Client(admin_server.url) as client, pytest.raises(AuthenticationError):
        client.create_session(None, "sgd")


class DropFirstResponse(httpx.BaseTransport):
    """Passes requests to the server, but loses the first step's answer on the way back."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.dropped = 0
        self.keys: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path.endswith("/step"):
            self.keys.append(request.headers["idempotency-key"])
            if not self.dropped:
                self.dropped += 1
                response.read()
                response.close()
                raise httpx.ReadError("connection reset while reading the answer")
        return response


def test_retry_after_a_lost_answer_applies_the_push_once(server: LiveServer) -> None:
    transport = DropFirstResponse()
    with Client(server.url, transport=transport, backoff=0.01) as client:
        session = client.create_session({"w": np.zeros(2, np.float32)}, {"name": "sgd", "lr": 1.0})
        new = session.step({"w": np.ones(2, np.float32)})
    assert transport.dropped == 1 and len(transport.keys) == 2
    assert transport.keys[0] == transport.keys[1]
    assert new["w"].tolist() == [-1.0, -1.0]
    assert session.version == 1


def test_async_client(server: LiveServer) -> None:
    async def run() -> list[float]:
        async with AsyncClient(server.url) as client:
            session = await client.create_session({"w": np.zeros(3, np.float32)}, "sgd")
            results = await asyncio.gather(
                *(session.step({"w": np.ones(3, np.float32)}) for _ in range(10))
            )
            assert sorted(int(r["w"][0] * -1000 + 0.5) for r in results) == list(range(1, 11))
            info = await session.info()
            await session.delete()
            return [info["version"]]

    assert asyncio.run(run()) == [10]


# --- the seed drop-in --------------------------------------------------------------------


@pytest.fixture
def compat_client(server: LiveServer) -> Iterator[Client]:
    client = Client(server.url)
    compat.set_client(client)
    yield client
    compat.set_client(None)
    client.close()


class SeedLayer:
    """A layer written the seed article's way: it calls the optimizer exactly like this."""

    def __init__(self, optimizer: Any, shape: tuple[int, int], seed: int) -> None:
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.w = torch.randn(shape, generator=generator)
        self.dr_dw = torch.zeros(shape)
        self.optimizer = copy.copy(optimizer)

    def update(self, dl_dw: Any, alpha: float, lambdaa: float) -> None:
        self.w = self.optimizer.update(self.w, alpha, dl_dw, self.dr_dw, lambdaa)


def seed_reference(name: str, w: np.ndarray, grads: list[np.ndarray], alpha: float) -> np.ndarray:
    """The seed's equations with its defects fixed, in float64 (constants from the article)."""
    w = w.astype(np.float64)
    s = np.zeros_like(w)
    r = np.zeros_like(w)
    v = np.zeros_like(w)
    delta = 1e-5
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        if name == "sgd":
            w = w - alpha * g
        elif name == "sgd-momentum":
            v = 1e-4 * v - alpha * g
            w = w + v
        elif name == "adagrad":
            r = r + g * g
            w = w - alpha * g / (delta + np.sqrt(r))
        elif name == "rmsprop":
            r = 0.9 * r + 0.1 * g * g
            w = w - alpha * g / np.sqrt(delta + r)
        elif name == "rmsprop-momentum":
            r = 0.9 * r + 0.1 * g * g
            v = 1e-4 * v - alpha * g / np.sqrt(delta + r)
            w = w + v
        elif name == "adam":
            s = 0.9 * s + 0.1 * g
            r = 0.999 * r + 0.001 * g * g
            w = w - alpha * (s / (1 - 0.9**t)) / (np.sqrt(r / (1 - 0.999**t)) + delta)
    return w


SEED: dict[str, Callable[[], compat.Optimizer]] = {
    "sgd": lambda: compat.SGDOptimizer(),
    "sgd-momentum": lambda: compat.SGDOptimizer(momentum=True),
    "adagrad": lambda: compat.AdaGradOptimizer(),
    "rmsprop": lambda: compat.RMSPropOptimizer(),
    "rmsprop-momentum": lambda: compat.RMSPropOptimizer(momentum=True),
    "adam": lambda: compat.AdamOptimizer(),
}


@pytest.mark.parametrize("name", sorted(SEED))
def test_seed_network_code_runs_unchanged(compat_client: Client, name: str) -> None:
    torch = pytest.importorskip("torch")
    prototype = SEED[name]()
    layers = [SeedLayer(prototype, (5, 3), 0), SeedLayer(prototype, (3, 2), 1)]
    assert layers[0].optimizer is not layers[1].optimizer
    start = [layer.w.numpy().copy() for layer in layers]
    rng = np.random.default_rng(2)
    history: list[list[np.ndarray]] = [[], []]
    for _ in range(20):
        for k, layer in enumerate(layers):
            g = rng.standard_normal(tuple(layer.w.shape)).astype(np.float32)
            history[k].append(g)
            layer.update(torch.from_numpy(g), 0.01, 0.1)
            assert isinstance(layer.w, torch.Tensor) and layer.w.dtype == torch.float32
    for k, layer in enumerate(layers):
        expected = seed_reference(name, start[k], history[k], 0.01)
        np.testing.assert_allclose(layer.w.numpy(), expected, rtol=2e-5, atol=1e-6)
    sessions = {layer.optimizer.session.id for layer in layers if layer.optimizer.session}
    assert len(sessions) == 2  # one remote state per layer, as the seed's copies intend
    for layer in layers:
        layer.optimizer.close()
