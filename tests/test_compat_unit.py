"""Unit tests of optserver_client.compat, the seed article's optimizers computed remotely.

An in-memory fake of the session and step routes applies the server's (torch.optim-form)
equations to what the client sends; the tests compare the results with the seed article's
equations (its code's defects fixed) written out in numpy.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy
from optserver_client import Client, ValidationError, compat
from optserver_client.compat import (
    AdaGradOptimizer,
    AdamOptimizer,
    DefaultRMSPropOptimizer,
    DefaultSGDOptimizer,
    Optimizer,
    RMSPropMomentumOptimizer,
    RMSPropOptimizer,
    SGDMomentumOptimizer,
    SGDOptimizer,
)

BINARY = "application/octet-stream"

# -- a fake optserver: sessions and optimizer-as-a-service steps ----------------------------------


class FakeSession:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.version = 0
        self.params: dict[str, np.ndarray] = {}
        self.state: dict[str, dict[str, Any]] = {}
        self.grads: list[dict[str, np.ndarray]] = []  # as received

    def step(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> np.ndarray:
        """One step of the server's optimizers (torch.optim's form), on a copy of p."""
        c, s = self.config, self.state.setdefault(name, {"t": 0})
        s["t"] += 1
        p = p.copy()
        if c["name"] == "sgd":
            m = c.get("momentum", 0.0)
            if m:
                s["buf"] = g.copy() if "buf" not in s else m * s["buf"] + g
                g = s["buf"]
            p -= lr * g
        elif c["name"] == "adagrad":
            s["sum"] = s.get("sum", 0.0) + g * g
            p -= lr * g / (np.sqrt(s["sum"]) + c.get("eps", 1e-10))
        elif c["name"] == "rmsprop":
            a, eps = c.get("alpha", 0.99), c.get("eps", 1e-8)
            s["sq"] = a * s.get("sq", 0.0) + (1 - a) * g * g
            avg = np.sqrt(s["sq"] + eps) if c.get("eps_inside_sqrt") else np.sqrt(s["sq"]) + eps
            if c.get("momentum", 0.0):
                s["buf"] = c["momentum"] * s.get("buf", 0.0) + g / avg
                p -= lr * s["buf"]
            else:
                p -= lr * g / avg
        elif c["name"] == "adam":
            (b1, b2), eps, t = c.get("betas", (0.9, 0.999)), c.get("eps", 1e-8), s["t"]
            s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
            s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
            p -= lr / (1 - b1**t) * s["m"] / (np.sqrt(s["v"]) / np.sqrt(1 - b2**t) + eps)
        else:
            raise AssertionError(f"unknown optimizer {c}")
        return p


class FakeServer:
    def __init__(self) -> None:
        self.sessions: dict[str, FakeSession] = {}
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.requests: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        parts = request.url.path.strip("/").split("/")
        if request.method == "POST" and parts == ["v1", "sessions"]:
            body = json.loads(request.content)
            self.created.append(body)
            session_id = uuid.uuid4().hex[:8]
            self.sessions[session_id] = FakeSession(body["optimizer"])
            answer = {"id": session_id, "token": "tok-" + session_id, "version": 0, "params": []}
            return httpx.Response(201, json=answer)
        session = self.sessions.get(parts[2]) if len(parts) > 2 else None
        if session is None:
            return httpx.Response(404, json={"type": "urn:optserver:problem:not-found"})
        assert request.headers["Authorization"] == f"Bearer tok-{parts[2]}"
        if request.method == "DELETE":
            self.deleted.append(parts[2])
            del self.sessions[parts[2]]
            return httpx.Response(204)
        assert request.method == "POST"
        assert parts[3:] == ["step"]
        return self.step(session, request)

    def step(self, session: FakeSession, request: httpx.Request) -> httpx.Response:
        assert request.headers["Content-Type"] == BINARY
        assert request.headers["Idempotency-Key"]
        tensors = safetensors.numpy.load(request.content)
        header_len = int.from_bytes(request.content[:8], "little")
        metadata = json.loads(request.content[8 : 8 + header_len])["__metadata__"]
        grads = {n: t for n, t in tensors.items() if not n.startswith("params/")}
        session.grads.append(grads)
        if any(not np.isfinite(g).all() for g in grads.values()):
            problem = {"type": "urn:optserver:problem:invalid-tensor", "detail": "NaN"}
            return httpx.Response(422, json=problem)
        out = {}
        for name, g in grads.items():
            p = tensors.get("params/" + name, session.params.get(name))
            assert p is not None and p.dtype == g.dtype and p.shape == g.shape
            session.params[name] = out[name] = session.step(name, p, g, float(metadata["lr"]))
        session.version += 1
        body = safetensors.numpy.save(out, metadata={"version": str(session.version)})
        headers = {"Content-Type": BINARY, "Optserver-Version": str(session.version)}
        return httpx.Response(200, content=body, headers=headers)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    client = Client("http://optserver.test", transport=httpx.MockTransport(fake.handler))
    compat.set_client(client)
    yield fake
    compat.set_client(None)
    client.close()


# -- the seed article's equations, with its code's defects fixed ----------------------------------


class SeedReference:
    """``update(w, alpha, dw, dr, lambdaa)`` exactly as the article's equations read."""

    def __init__(self, kind: str, rho: float = 0.9, epsilon: float = 1e-4, rho2: float = 0.999):
        self.kind, self.rho, self.epsilon, self.rho2 = kind, rho, epsilon, rho2
        self.delta, self.t = 1e-5, 0
        self.v: Any = 0.0
        self.r: Any = 0.0
        self.s: Any = 0.0

    def update(self, w: Any, alpha: float, dw: Any, dr: Any, lambdaa: float = 1.0) -> Any:
        g, self.t = dw + lambdaa * dr, self.t + 1
        if self.kind == "sgd":
            return w - alpha * g
        if self.kind == "sgd-momentum":
            self.v = self.epsilon * self.v - alpha * g
            return w + self.v
        if self.kind == "adagrad":
            self.r = self.r + g**2
            return w - alpha * g / (self.delta + np.sqrt(self.r))
        if self.kind in ("rmsprop", "rmsprop-momentum"):
            self.r = self.rho * self.r + (1 - self.rho) * g**2
            if self.kind == "rmsprop":
                return w - alpha * g / np.sqrt(self.delta + self.r)
            self.v = self.epsilon * self.v - alpha * g / np.sqrt(self.delta + self.r)
            return w + self.v
        assert self.kind == "adam"
        self.s = self.rho * self.s + (1 - self.rho) * g
        self.r = self.rho2 * self.r + (1 - self.rho2) * g**2
        s_hat, r_hat = self.s / (1 - self.rho**self.t), self.r / (1 - self.rho2**self.t)
        return w - alpha * s_hat / (np.sqrt(r_hat) + self.delta)


CASES: list[tuple[str, Callable[[], Optimizer], SeedReference]] = [
    ("sgd", lambda: SGDOptimizer(), SeedReference("sgd")),
    ("sgd-momentum", lambda: SGDOptimizer(True, 0.5), SeedReference("sgd-momentum", epsilon=0.5)),
    ("adagrad", AdaGradOptimizer, SeedReference("adagrad")),
    ("rmsprop", lambda: RMSPropOptimizer(rho=0.8), SeedReference("rmsprop", rho=0.8)),
    (
        "rmsprop-momentum",
        lambda: RMSPropOptimizer(momentum=True, rho=0.8, epsilon=0.3),
        SeedReference("rmsprop-momentum", rho=0.8, epsilon=0.3),
    ),
    ("adam", lambda: AdamOptimizer(0.8, 0.99), SeedReference("adam", rho=0.8, rho2=0.99)),
]


# -- tests --------------------------------------------------------------------------------------


def test_server_configs_and_seed_constants() -> None:
    assert SGDOptimizer().config() == {"name": "sgd", "momentum": 0.0}
    assert SGDOptimizer(momentum=True).config() == {"name": "sgd", "momentum": 1e-4}
    assert SGDOptimizer(True, epsilon=0.9).config() == {"name": "sgd", "momentum": 0.9}
    assert AdaGradOptimizer().config() == {"name": "adagrad", "eps": 1e-5}
    rmsprop = {"name": "rmsprop", "alpha": 0.9, "eps": 1e-5, "eps_inside_sqrt": True}
    assert RMSPropOptimizer().config() == {**rmsprop, "momentum": 0.0}
    assert RMSPropOptimizer(True).config() == {**rmsprop, "momentum": 1e-4}
    assert RMSPropOptimizer(True, rho=0.5, epsilon=0.2).config() == {
        **rmsprop,
        "alpha": 0.5,
        "momentum": 0.2,
    }
    assert AdamOptimizer().config() == {"name": "adam", "betas": [0.9, 0.999], "eps": 1e-5}
    assert AdamOptimizer(rho1=0.5, rho2=0.6).config()["betas"] == [0.5, 0.6]
    assert AdaGradOptimizer().delta == DefaultRMSPropOptimizer().delta == AdamOptimizer().delta
    assert AdamOptimizer().delta == 1e-5
    assert SGDMomentumOptimizer().epsilon == 1e-4
    assert RMSPropMomentumOptimizer().rho == 0.9


def test_factories_return_the_seed_classes_and_all_are_optimizers() -> None:
    assert type(SGDOptimizer()) is DefaultSGDOptimizer
    assert type(SGDOptimizer(momentum=True)) is SGDMomentumOptimizer
    assert type(RMSPropOptimizer()) is DefaultRMSPropOptimizer
    assert type(RMSPropOptimizer(momentum=True)) is RMSPropMomentumOptimizer
    for _, make, _ in CASES:
        assert isinstance(make(), Optimizer)
    with pytest.raises(TypeError):
        Optimizer()  # type: ignore[abstract]


@pytest.mark.parametrize(("kind", "make", "reference"), CASES, ids=[c[0] for c in CASES])
def test_matches_the_seed_equations(
    server: FakeServer, kind: str, make: Callable[[], Optimizer], reference: SeedReference
) -> None:
    rng = np.random.default_rng(1)
    optimizer = make()
    w: np.ndarray = rng.standard_normal((4, 3))
    expected = w
    for _ in range(6):
        dw, dr = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
        w = optimizer.update(w, 0.05, dw, dr, 0.3)
        expected = reference.update(expected, 0.05, dw, dr, 0.3)
        np.testing.assert_allclose(w, expected, rtol=1e-12, atol=1e-12)
    assert len(server.created) == 1
    assert server.created[0]["optimizer"] == optimizer.config()


def test_step_carries_weights_combined_gradient_and_lr(server: FakeServer) -> None:
    optimizer = SGDOptimizer()
    w, dw, dr = np.ones(3, np.float32), np.full(3, 2.0, np.float32), np.full(3, 4.0, np.float32)
    new = optimizer.update(w, 0.25, dw, dr, lambdaa=0.5)
    request = server.requests[-1]
    sent = safetensors.numpy.load(request.content)
    np.testing.assert_array_equal(sent["w_3"], dw + 0.5 * dr)
    np.testing.assert_array_equal(sent["params/w_3"], w)
    header_len = int.from_bytes(request.content[:8], "little")
    assert json.loads(request.content[8 : 8 + header_len])["__metadata__"]["lr"] == "0.25"
    np.testing.assert_allclose(new, w - 0.25 * 4.0)
    np.testing.assert_array_equal(w, np.ones(3))  # the input is not modified


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_weights_keep_their_type_and_dtype(server: FakeServer, dtype: type[Any]) -> None:
    w: np.ndarray = np.ones((2, 2), dtype)
    new = AdamOptimizer().update(w, 0.1, np.ones((2, 2), dtype), np.zeros((2, 2), dtype))
    assert isinstance(new, np.ndarray)
    assert new.dtype == dtype
    assert new.flags.writeable
    np.testing.assert_allclose(new, 0.9, rtol=1e-3)


def test_torch_weights_keep_their_type_dtype_and_device(server: FakeServer) -> None:
    torch = pytest.importorskip("torch")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        w = torch.ones(3, 2, dtype=dtype)
        dw = torch.full((3, 2), 0.5, dtype=dtype, requires_grad=True)
        dr = torch.Tensor([0])  # what the article's no-op regularizer hands to update
        new = DefaultSGDOptimizer().update(w, 0.1, dw, dr, 1.0)
        assert isinstance(new, torch.Tensor)
        assert new.dtype == dtype
        assert new.device == w.device
        assert new.shape == w.shape
        torch.testing.assert_close(new, torch.full((3, 2), 0.95, dtype=dtype))


def test_python_float_weights(server: FakeServer) -> None:
    new = SGDOptimizer().update(1.0, 0.5, 1.0, 0.0)
    assert isinstance(new, float)
    assert new == 0.5
    assert "w_scalar" in server.sessions[next(iter(server.sessions))].params


def test_gradient_that_does_not_fit_the_weights(server: FakeServer) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        SGDOptimizer().update(np.ones(3), 0.1, np.ones(4), 0.0)


def test_non_finite_gradient_is_refused(server: FakeServer) -> None:
    with pytest.raises(ValidationError):
        AdamOptimizer().update(np.ones(2), 0.1, np.array([1.0, np.nan]), np.zeros(2))


def test_copy_gives_a_separate_remote_session(server: FakeServer) -> None:
    original = SGDOptimizer(momentum=True, epsilon=0.9)
    w, g = np.zeros(2), np.ones(2)
    first = original.update(w, 0.1, g, 0.0)
    second = original.update(first, 0.1, g, 0.0)  # momentum makes step two differ from one
    for duplicate in (copy.copy(original), copy.deepcopy(original)):
        assert type(duplicate) is SGDMomentumOptimizer
        assert duplicate.epsilon == 0.9
        assert duplicate.session is None
        np.testing.assert_allclose(duplicate.update(w, 0.1, g, 0.0), first)  # fresh state
        assert duplicate.session is not None
        assert original.session is not None
        assert duplicate.session.id != original.session.id
    np.testing.assert_allclose(original.update(second, 0.1, g, 0.0) - second, -0.1 * 2.71)
    assert len(server.sessions) == 3


def test_each_class_copies_with_its_hyperparameters() -> None:
    for _, make, _ in CASES:
        optimizer = make()
        assert copy.copy(optimizer).config() == optimizer.config()
        assert copy.deepcopy(optimizer).config() == optimizer.config()


def test_tensor_names_follow_shapes(server: FakeServer) -> None:
    optimizer = AdaGradOptimizer()
    optimizer.update(np.ones((784, 10), np.float32), 0.1, np.ones((784, 10)), 0.0)
    optimizer.update(np.ones(10, np.float32), 0.1, np.ones(10), 0.0)
    optimizer.update(np.ones((784, 10), np.float32), 0.1, np.ones((784, 10)), 0.0)
    assert len(server.sessions) == 1
    session = next(iter(server.sessions.values()))
    assert set(session.params) == {"w_784x10", "w_10"}
    assert session.state["w_784x10"]["t"] == 2
    assert session.state["w_10"]["t"] == 1


def test_remote_session_is_lazy_and_close_deletes_it(server: FakeServer) -> None:
    optimizer = AdamOptimizer()
    assert optimizer.session is None
    assert server.requests == []
    optimizer.update(np.ones(2), 0.1, np.ones(2), np.zeros(2))
    assert optimizer.session is not None
    session_id = optimizer.session.id
    assert server.created[0]["name"] == "compat-AdamOptimizer"
    optimizer.close()
    optimizer.close()  # idempotent
    assert server.deleted == [session_id]
    assert optimizer.session is None
    assert "AdamOptimizer" in repr(optimizer)


def test_seed_style_network_runs_unchanged(server: FakeServer) -> None:
    """Layers that hold ``copy.copy(optimizer)`` and call ``update`` with torch tensors."""
    torch = pytest.importorskip("torch")

    class Dense:
        def __init__(self, inputs: int, units: int) -> None:
            self.w = torch.rand((inputs, units)) * 0.2 - 0.1
            self.dr_dw = torch.Tensor([0])
            self.optimizer: Any = None

        def backward(self, x: Any, dl: Any, alpha: float, lambdaa: float = 1.0) -> None:
            dl_dw = torch.einsum("ij,ik->jk", x, dl) / dl.shape[0]
            self.w = self.optimizer.update(self.w, alpha, dl_dw, self.dr_dw, lambdaa)

    layers = [Dense(4, 3), Dense(3, 3)]
    for optimizer in (AdamOptimizer(), RMSPropOptimizer(momentum=True)):
        for layer in layers:
            layer.optimizer = copy.copy(optimizer)
        x = torch.rand(5, 4)
        for _ in range(3):
            before = [layer.w.clone() for layer in layers]
            layers[0].backward(x, torch.rand(5, 3), 0.01)
            layers[1].backward(torch.rand(5, 3), torch.rand(5, 3), 0.01, 0.5)
            for layer, old in zip(layers, before, strict=True):
                assert layer.w.dtype == torch.float32
                assert not torch.equal(layer.w, old)
    assert len(server.sessions) == 4  # one per layer and optimizer; the originals stay unused


def test_shared_client_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTSERVER_URL", "http://elsewhere.test:9000")
    monkeypatch.setenv("OPTSERVER_ADMIN_KEY", "adm")
    compat.set_client(None)
    try:
        client = compat.get_client()
        assert client.url == "http://elsewhere.test:9000"
        assert client._core.admin_key == "adm"
        assert compat.get_client() is client  # one per process
    finally:
        compat.set_client(None)
        client.close()


def test_the_shared_client_takes_shards_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPTSERVER_URL", "http://ignored.test:9000")
    monkeypatch.setenv("OPTSERVER_URLS", "http://a.test:9000,http://b.test:9000")
    compat.set_client(None)
    try:
        client = compat.get_client()
        assert client.urls == ("http://a.test:9000", "http://b.test:9000")
    finally:
        compat.set_client(None)
        client.close()
