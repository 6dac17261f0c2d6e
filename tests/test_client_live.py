"""The Python client and the seed drop-in against a real server.

Every test runs through both transports (the ``fast_path`` fixture): the client's own
(``fast_path=True``, the default for http URLs) and httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

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
    __version__,
    compat,
)

from optserver.optim import create as create_optimizer
from tests.live import LiveServer


@pytest.fixture(params=[True, False], ids=["wire", "httpx"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Which transport the test's clients use: the client's own, or httpx."""
    return bool(request.param)


def client(url: str, fast_path: bool, **options: Any) -> Client:
    """A client on the transport the test runs on (checked: it must not fall back silently)."""
    built = Client(url, fast_path=fast_path, **options)
    assert built.fast_path is fast_path
    return built


def random_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}


@pytest.mark.parametrize("binary", [True, False], ids=["safetensors", "json"])
def test_client_session_end_to_end(server: LiveServer, binary: bool, fast_path: bool) -> None:
    config = {"name": "adam", "lr": 0.01, "amsgrad": True}
    params = random_params()
    local = {n: p.copy() for n, p in params.items()}
    opt = create_optimizer(config)
    state = opt.init(local)
    rng = np.random.default_rng(1)
    with client(server.url, fast_path, binary=binary) as c:
        session = c.create_session(params, config, name="e2e")
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
        twin = c.import_state(blob, name="twin")
        assert twin.id != session.id and twin.version == 4
        g = {"w": np.ones((4, 3), np.float32)}
        a, b = session.step(g), twin.step(g)
        np.testing.assert_array_equal(a["w"], b["w"])

        assert session.token is not None
        worker = Session.attach(
            server.url, session.id, session.token, binary=binary, fast_path=fast_path
        )
        assert worker.client.fast_path is fast_path
        with worker:
            np.testing.assert_array_equal(worker.pull()["w"], a["w"])
        session.delete()
        twin.delete()
        with pytest.raises(NotFoundError):
            session.info()


def test_client_errors_are_typed(
    server: LiveServer, admin_server: LiveServer, fast_path: bool
) -> None:
    with client(server.url, fast_path) as c:
        one = c.create_session(random_params(), "sgd")
        two = c.create_session(random_params(), "sgd")
        with pytest.raises(ValidationError) as info:
            one.step({"w": np.zeros((3, 4), np.float32)})
        assert info.value.status == 422 and "'w'" in info.value.detail
        wrong = Session.attach(server.url, one.id, "wrong-token", fast_path=fast_path)
        with wrong, pytest.raises(AuthenticationError):
            wrong.pull()
        other = Session.attach(server.url, one.id, str(two.token), fast_path=fast_path)
        with other, pytest.raises(PermissionDeniedError):
            other.pull()
        ssp = c.create_session(random_params(), "sgd", mode={"name": "ssp", "max_staleness": 0})
        ssp.push({"b": np.ones(3, np.float32)})
        with pytest.raises(StaleGradientError) as stale:
            ssp.step({"b": np.ones(3, np.float32)}, base_version=0)
        assert stale.value.current_version == 1
    with client(admin_server.url, fast_path, admin_key=admin_server.admin_key) as c:
        big = c.create_session(None, "sgd")
        with pytest.raises(PayloadTooLargeError):
            big.set_params({"w": np.zeros(400_000, np.float32)})
        with pytest.raises(LimitExceededError):
            big.set_params({f"t{i}": np.zeros(1, np.float32) for i in range(9)})
    with client(admin_server.url, fast_path) as c, pytest.raises(AuthenticationError):
        c.create_session(None, "sgd")


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

    def close(self) -> None:
        self.inner.close()  # the client closes its transport, which owns this one


class Relay:
    """A loopback TCP relay in front of a server, for the fast path (which takes no httpx
    transport): records each request's head, and with ``drop_first_step`` loses the first
    step's answer on the way back (the server has applied it) by closing the client's side."""

    def __init__(self, url: str, *, drop_first_step: bool = False) -> None:
        self.upstream = urlsplit(url).port
        self.drop_first_step = drop_first_step
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.heads: list[dict[str, str]] = []
        self.dropped = 0
        self.connections: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._relay, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _relay(self, downstream: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        self.connections += [downstream, upstream]
        pending = {downstream: b"", upstream: b""}
        with contextlib.suppress(OSError), downstream, upstream:
            while (request := _message(downstream, pending)) is not None:
                head, body = request
                lines = head.decode("latin-1").split("\r\n")
                fields = dict(line.split(": ", 1) for line in lines[1:])
                self.heads.append({k.lower(): v for k, v in fields.items()} | {"": lines[0]})
                upstream.sendall(head + b"\r\n\r\n" + body)
                response = _message(upstream, pending)
                assert response is not None
                if self.drop_first_step and "/step" in lines[0] and not self.dropped:
                    self.dropped += 1
                    return  # the server answered; the client never hears it
                downstream.sendall(response[0] + b"\r\n\r\n" + response[1])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(10)


def _message(
    sock: socket.socket, pending: dict[socket.socket, bytes]
) -> tuple[bytes, bytes] | None:
    """One HTTP message's head and Content-Length body from ``sock``; None at EOF."""
    data = pending[sock]
    while b"\r\n\r\n" not in data:
        more = sock.recv(1 << 16)
        if not more:
            return None
        data += more
    head, _, data = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        length = int(value) if name.strip().lower() == b"content-length" else length
    chunks = [data]
    while sum(map(len, chunks)) < length:
        more = sock.recv(1 << 20)
        if not more:
            return None
        chunks.append(more)
    data = b"".join(chunks)
    pending[sock] = data[length:]
    return head, data[:length]


@contextlib.contextmanager
def relay(url: str, *, drop_first_step: bool = False) -> Iterator[Relay]:
    r = Relay(url, drop_first_step=drop_first_step)
    try:
        yield r
    finally:
        r.close()


def test_retry_after_a_lost_answer_applies_the_push_once(
    server: LiveServer, fast_path: bool
) -> None:
    with contextlib.ExitStack() as stack:
        if fast_path:  # the answer is lost between the server and the client's own transport
            lossy = stack.enter_context(relay(server.url, drop_first_step=True))
            c = stack.enter_context(client(lossy.url, True, backoff=0.01))
        else:  # the answer is lost inside httpx's transport
            transport = DropFirstResponse()
            c = stack.enter_context(Client(server.url, transport=transport, backoff=0.01))
            assert not c.fast_path  # a transport given: httpx, always
        session = c.create_session({"w": np.zeros(2, np.float32)}, {"name": "sgd", "lr": 1.0})
        new = session.step({"w": np.ones(2, np.float32)})
    if fast_path:
        dropped = lossy.dropped
        keys = [h["idempotency-key"] for h in lossy.heads if "/step" in h[""]]
    else:
        dropped, keys = transport.dropped, transport.keys
    assert dropped == 1 and len(keys) == 2
    assert keys[0] == keys[1]
    assert new["w"].tolist() == [-1.0, -1.0]
    assert session.version == 1


def test_fast_path_is_the_default_for_http_urls(server: LiveServer) -> None:
    """Seen from the server's side: the client's own transport says so in its User-Agent."""
    with relay(server.url) as seen:
        with Client(seen.url) as default:
            assert default.fast_path
            assert default.health() == {"status": "ok"}
        with Client(seen.url, transport=httpx.HTTPTransport()) as given:
            assert not given.fast_path
            assert given.health() == {"status": "ok"}
        with Client(seen.url, fast_path=False) as off:
            assert not off.fast_path
            assert off.health() == {"status": "ok"}
    agents = [head["user-agent"] for head in seen.heads]
    assert agents[0] == f"optserver-client/{__version__}"
    assert [agent.startswith("python-httpx/") for agent in agents[1:]] == [True, True]
    with Client("https://127.0.0.1:1") as secure:
        assert not secure.fast_path  # https stays on httpx

    async def async_choices() -> list[bool]:
        choices = []
        for options in ({}, {"fast_path": False}, {"transport": httpx.AsyncHTTPTransport()}):
            async with AsyncClient(server.url, **options) as c:
                assert await c.health() == {"status": "ok"}
                choices.append(c.fast_path)
        return choices

    assert asyncio.run(async_choices()) == [True, False, False]


def test_async_client(server: LiveServer, fast_path: bool) -> None:
    async def run() -> list[float]:
        async with AsyncClient(server.url, fast_path=fast_path) as c:
            assert c.fast_path is fast_path
            session = await c.create_session({"w": np.zeros(3, np.float32)}, "sgd")
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
def compat_client(server: LiveServer, fast_path: bool) -> Iterator[Client]:
    shared = client(server.url, fast_path)
    compat.set_client(shared)
    yield shared
    compat.set_client(None)
    shared.close()


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
