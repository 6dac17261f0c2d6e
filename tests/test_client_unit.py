"""Unit tests of the Python client (optserver_client) against scripted in-memory transports."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import MISSING
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy
from optserver_client import (
    APIError,
    AsyncClient,
    AsyncSession,
    AuthenticationError,
    Client,
    ConflictError,
    LimitExceededError,
    NotFoundError,
    OptserverError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ProtocolError,
    ServerError,
    Session,
    StaleGradientError,
    TransportError,
    ValidationError,
    safetensors_io,
)
from optserver_client._codec import (
    as_array,
    decode_json_tensor,
    decode_safetensors,
    encode_json,
    encode_json_tensor,
)
from optserver_client._protocol import retry_push
from optserver_client._retry import MAX_BACKOFF, Retry, RetryPolicy
from optserver_client.exceptions import error_from_parts, error_from_response
from optserver_client.vocabulary import (
    BINARY,
    IDEMPOTENCY_KEY_HEADER,
    JSON,
    PROBLEM,
    PROBLEM_TYPE_BASE,
    REPLAYED_HEADER,
    RETRY_AFTER_HEADER,
    VERSION_HEADER,
    ProblemSlug,
    problem_type,
)

from optserver import errors as server_errors
from optserver import wire as server_wire

Grads = dict[str, np.ndarray]

FLOATS = ["float16", "float32", "float64"]

# -- helpers ------------------------------------------------------------------------------------

Outcome = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class Script:
    """A transport that answers each request with the next scripted outcome, and records them."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.requests: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if not self.outcomes:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            if isinstance(outcome, httpx.RequestError):
                outcome.request = request
            raise outcome
        if isinstance(outcome, httpx.Response):
            return outcome
        return outcome(request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)


def client_for(script: Script, **options: Any) -> Client:
    options.setdefault("backoff", 0.0)
    return Client("http://optserver.test", transport=script.transport, **options)


def async_client_for(script: Script, **options: Any) -> AsyncClient:
    options.setdefault("backoff", 0.0)
    return AsyncClient("http://optserver.test", transport=script.transport, **options)


def json_response(status: int, body: Any, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def problem(status: int, slug: str, detail: str = "", **extra: Any) -> httpx.Response:
    body = {"type": f"urn:optserver:problem:{slug}", "title": slug, "status": status}
    body.update(detail=detail, **extra)
    return httpx.Response(
        status, content=json.dumps(body).encode(), headers={"Content-Type": PROBLEM}
    )


def tensors_response(
    tensors: dict[str, np.ndarray], version: int, *, applied: bool = True
) -> httpx.Response:
    metadata = {"version": str(version), "applied": "true" if applied else "false"}
    body = safetensors.numpy.save(tensors, metadata=metadata)
    return httpx.Response(
        200, content=body, headers={"Content-Type": BINARY, "Optserver-Version": str(version)}
    )


def header_of(document: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors document (the package's load drops __metadata__)."""
    size = int.from_bytes(document[:8], "little")
    header: dict[str, Any] = json.loads(document[8 : 8 + size])
    return header


def info(session_id: str = "s1", version: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "id": session_id,
        "name": None,
        "version": version,
        "optimizer": {"name": "adam", "lr": 0.001},
        "mode": {"name": "async"},
        "schedule": None,
        "lr": 0.001,
        "nonfinite": "reject",
        "params": [],
        "counters": {},
        **extra,
    }


def connect_error() -> httpx.ConnectError:
    return httpx.ConnectError("connection refused")


@pytest.fixture
def grads() -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(0.5) * np.ones(3)}


# -- codec --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 1, 3)])
def test_safetensors_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = rng.standard_normal(shape).astype(dtype)
    document = safetensors_io.encode({"t": array, "u": array * 2}, {"version": "7"})
    tensors, metadata = decode_safetensors(bytearray(document))
    assert metadata == {"version": "7"}
    for name, expected in (("t", array), ("u", array * 2)):
        assert tensors[name].dtype == np.dtype(dtype)
        assert tensors[name].shape == shape
        np.testing.assert_array_equal(tensors[name], expected)
    # The reference implementation reads what we write.
    np.testing.assert_array_equal(safetensors.numpy.load(bytes(document))["t"], array)


def test_safetensors_decode_views_are_writable_only_over_a_bytearray() -> None:
    document = safetensors.numpy.save({"w": np.ones(4, np.float32)})
    writable, _ = decode_safetensors(bytearray(document))
    assert writable["w"].flags.writeable
    writable["w"][0] = 5.0
    readonly, _ = decode_safetensors(document)
    assert not readonly["w"].flags.writeable


@pytest.mark.parametrize(
    "document",
    [
        b"\x01\x00",
        (1000).to_bytes(8, "little") + b"{}",
        (2).to_bytes(8, "little") + b"[]",
        (9).to_bytes(8, "little") + b"not json!",
        b"",
    ],
)
def test_safetensors_decode_rejects_malformed_documents(document: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_safetensors(document)


def test_safetensors_decode_rejects_offsets_outside_the_document() -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    document = len(header).to_bytes(8, "little") + header + b"\x00" * 8  # 8 of 16 bytes
    with pytest.raises(ProtocolError, match="not inside"):
        decode_safetensors(document)


@pytest.mark.parametrize("dtype", FLOATS)
def test_json_round_trip(dtype: str) -> None:
    array = np.array([[1.5, -2.25], [3.0, 0.125]], dtype=dtype)
    encoded = json.loads(encode_json({"t": encode_json_tensor(array)}))
    np.testing.assert_array_equal(decode_json_tensor(encoded["t"], dtype), array)
    assert decode_json_tensor(encoded["t"], dtype).dtype == np.dtype(dtype)


def test_json_rank_zero_is_a_bare_number() -> None:
    assert encode_json_tensor(np.array(2.5, np.float32)) == 2.5
    decoded = decode_json_tensor(2.5)
    assert decoded.shape == ()
    assert decoded.dtype == np.float32


def test_json_decodes_to_float32_by_default_and_null_to_nan() -> None:
    decoded = decode_json_tensor([1.0, None, 3.0])
    assert decoded.dtype == np.float32
    assert np.isnan(decoded[1])
    assert decode_json_tensor([1, 2], "float64").dtype == np.float64
    with pytest.raises(ProtocolError):
        decode_json_tensor([[1.0], [2.0, 3.0]])


def test_json_refuses_non_finite_values() -> None:
    with pytest.raises(ValueError, match="binary"):
        encode_json_tensor(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="binary"):
        encode_json_tensor(np.array(np.inf, dtype=np.float32))
    with pytest.raises(ValueError, match="binary"):
        encode_json({"grads": {}, "lr": float("nan")})


def test_json_encodes_numpy_scalars_in_options() -> None:
    document = {"lr": np.float32(0.5), "betas": np.array([0.9, 0.99])}
    assert json.loads(encode_json(document)) == {"lr": 0.5, "betas": [0.9, 0.99]}


def test_as_array_keeps_float_dtypes_and_defaults_the_rest() -> None:
    f32 = np.dtype("float32")
    assert as_array([1.0, 2.0], default=f32).dtype == np.float32
    assert as_array(np.arange(3), default=f32).dtype == np.float32
    assert as_array(np.zeros(3, np.float64), default=f32).dtype == np.float64
    assert as_array(np.zeros(3, np.float16), default=f32).dtype == np.float16
    assert as_array(np.zeros(3), np.dtype("float32"), default=f32).dtype == np.float32
    scalar = as_array(3.0, default=f32)
    assert scalar.shape == ()
    assert scalar == 3.0


def test_as_array_makes_c_contiguous_little_endian_arrays() -> None:
    f32 = np.dtype("float32")
    transposed = np.arange(6, dtype=np.float32).reshape(2, 3).T
    array = as_array(transposed, default=f32)
    assert array.flags.c_contiguous
    np.testing.assert_array_equal(array, transposed)
    big = np.arange(4, dtype=">f8")
    little = as_array(big, default=f32)
    assert little.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(little, big)
    document = safetensors_io.encode({"b": little}, None)
    np.testing.assert_array_equal(safetensors.numpy.load(bytes(document))["b"], big)


def test_as_array_rejects_non_numeric_values() -> None:
    with pytest.raises(TypeError):
        as_array({"a": 1}, default=np.dtype("float32"))


def test_as_array_accepts_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    f32 = np.dtype("float32")
    tensor = torch.arange(6, dtype=torch.float64).reshape(2, 3).t().requires_grad_()
    array = as_array(tensor, default=f32)
    assert array.dtype == np.float64
    assert array.flags.c_contiguous
    np.testing.assert_array_equal(array, tensor.detach().numpy())
    assert as_array(torch.ones(2, dtype=torch.bfloat16), default=f32).dtype == np.float32
    assert as_array(torch.tensor(1.5), default=f32).shape == ()
    document = safetensors_io.encode({"t": as_array(torch.ones(3), default=f32)}, None)
    np.testing.assert_array_equal(safetensors.numpy.load(bytes(document))["t"], np.ones(3))


def test_codec_does_not_import_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from optserver_client._codec import as_array\n"
        "as_array([1.0], default=np.dtype('float32'))\n"
        "as_array(np.ones(2), default=np.dtype('float32'))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, ValidationError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (406, ValidationError),
        (409, ConflictError),
        (413, PayloadTooLargeError),
        (415, ValidationError),
        (422, ValidationError),
        (429, LimitExceededError),
        (507, LimitExceededError),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (418, APIError),
    ],
)
def test_problem_maps_to_exception_class(status: int, cls: type[APIError]) -> None:
    response = problem(status, "some-problem", "what to fix", tensor="w")
    error = error_from_response(response)
    assert type(error) is cls
    assert isinstance(error, OptserverError)
    assert error.status == status
    assert error.type == "urn:optserver:problem:some-problem"
    assert error.title == "some-problem"
    assert error.detail == "what to fix"
    assert error.problem["tensor"] == "w"
    assert error.response_headers["content-type"] == PROBLEM
    assert "what to fix" in str(error)


def test_stale_gradient_carries_current_version() -> None:
    response = problem(409, "stale-gradient", "push is 5 versions behind", current_version=42)
    error = error_from_response(response)
    assert isinstance(error, StaleGradientError)
    assert isinstance(error, ConflictError)
    assert error.current_version == 42


def test_stale_gradient_falls_back_to_the_version_header() -> None:
    body = b'{"type": "urn:optserver:problem:stale-gradient", "status": 409}'
    headers = {"Content-Type": PROBLEM, "Optserver-Version": "17"}
    error = error_from_parts(409, headers, body)
    assert isinstance(error, StaleGradientError)
    assert error.current_version == 17
    other = error_from_parts(409, {"Content-Type": PROBLEM}, b'{"type": "urn:x:conflict"}')
    assert type(other) is ConflictError


def test_non_json_error_bodies() -> None:
    html = httpx.Response(
        502, text="<html>upstream down</html>", headers={"Content-Type": "text/html"}
    )
    error = error_from_response(html)
    assert isinstance(error, ServerError)
    assert error.title == "Bad Gateway"
    assert "upstream down" in error.detail
    assert error.problem["status"] == 502
    empty = error_from_parts(404, {}, b"")
    assert isinstance(empty, NotFoundError)
    assert empty.detail == ""
    assert str(empty) == "404 Not Found"
    broken = error_from_parts(400, {"Content-Type": PROBLEM}, b"{not json")
    assert isinstance(broken, ValidationError)
    assert broken.detail == "{not json"


# -- retries and idempotency ----------------------------------------------------------------------


def test_retry_delays_grow_exponentially_with_cap_and_jitter() -> None:
    policy = RetryPolicy(retries=10, backoff=0.1)
    for attempt in range(8):
        expected = min(MAX_BACKOFF, 0.1 * 2**attempt)
        assert expected <= policy.delay(attempt) <= expected * 1.1
    assert policy.delay(50) <= MAX_BACKOFF * 1.1
    assert 3.0 <= policy.delay(0, retry_after=3.0) <= 3.3
    assert policy.delay(0, retry_after=1e6) <= MAX_BACKOFF * 1.1
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(retries=-1)


def test_push_retried_after_connection_error_with_the_same_idempotency_key(grads: Grads) -> None:
    script = Script(connect_error(), httpx.ReadError("reset"), tensors_response(grads, 1))
    with client_for(script) as client:
        result = client.session("s1", "tok").step(grads)
    np.testing.assert_array_equal(result["w"], grads["w"])
    keys = {r.headers["Idempotency-Key"] for r in script.requests}
    assert len(script.requests) == 3
    assert len(keys) == 1
    assert len(keys.pop()) == 32
    assert script.requests[0].content == script.requests[2].content


def test_each_logical_push_gets_its_own_idempotency_key(grads: Grads) -> None:
    script = Script(json_response(200, {"version": 1}), json_response(200, {"version": 2}))
    with client_for(script) as client:
        session = client.session("s1", "tok")
        session.push(grads)
        session.push(grads)
    first, second = (r.headers["Idempotency-Key"] for r in script.requests)
    assert first != second


def test_503_is_retried_then_succeeds() -> None:
    script = Script(
        problem(503, "unavailable"),
        tensors_response({"w": np.ones(2, np.float32)}, 4),
    )
    with client_for(script) as client:
        session = client.session("s1", "tok")
        weights = session.pull()
    assert len(script.requests) == 2
    np.testing.assert_array_equal(weights["w"], np.ones(2))
    assert session.version == 4


def test_gives_up_after_retries_with_transport_error(grads: Grads) -> None:
    script = Script(*(connect_error() for _ in range(3)))
    with client_for(script, retries=2) as client, pytest.raises(TransportError) as caught:
        client.session("s1", "tok").step(grads)
    assert len(script.requests) == 3
    assert caught.value.attempts == 3
    assert isinstance(caught.value.error, httpx.ConnectError)
    assert caught.value.__cause__ is caught.value.error
    assert "3 attempts" in str(caught.value)


def test_503_until_retries_are_used_up_raises_server_error() -> None:
    script = Script(*(problem(503, "unavailable") for _ in range(3)))
    with client_for(script, retries=2) as client, pytest.raises(ServerError) as caught:
        client.health()
    assert caught.value.status == 503
    assert len(script.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 404, 409, 413, 422, 429, 500])
def test_no_retry_on_error_statuses_other_than_503(status: int, grads: Grads) -> None:
    script = Script(problem(status, "nope"))
    with client_for(script) as client, pytest.raises(APIError) as caught:
        client.session("s1", "tok").step(grads)
    assert caught.value.status == status
    assert len(script.requests) == 1


def test_stale_push_raises_stale_gradient_error(grads: Grads) -> None:
    script = Script(problem(409, "stale-gradient", "too old", current_version=9))
    with client_for(script) as client, pytest.raises(StaleGradientError) as caught:
        client.session("s1", "tok").push(grads, base_version=2)
    assert caught.value.current_version == 9


def test_mutating_calls_retry_only_when_the_request_was_never_sent() -> None:
    created = json_response(201, info(token="t"))
    script = Script(connect_error(), httpx.ConnectTimeout("slow"), created)
    with client_for(script) as client:
        client.create_session(optimizer="sgd")
    assert len(script.requests) == 3
    script = Script(httpx.ReadError("reset mid-answer"))
    with client_for(script) as client, pytest.raises(TransportError):
        client.create_session(optimizer="sgd")
    assert len(script.requests) == 1
    script = Script(problem(503, "unavailable"))
    with client_for(script) as client, pytest.raises(ServerError):
        client.session("s1", "tok").update(optimizer={"lr": 0.1})
    assert len(script.requests) == 1


def test_reads_retry_on_read_timeouts() -> None:
    script = Script(httpx.ReadTimeout("slow"), json_response(200, info(version=3)))
    with client_for(script) as client:
        session = client.session("s1", "tok")
        assert session.info()["version"] == 3
    assert session.version == 3
    assert len(script.requests) == 2


# -- request building ---------------------------------------------------------------------------


def test_step_request_in_safetensors(grads: Grads) -> None:
    weights = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    script = Script(tensors_response(weights, 8))
    with client_for(script) as client:
        session = client.session("s1", "tok")
        result = session.step(
            grads, params=weights, lr=0.01, base_version=7, worker="w1", return_="all"
        )
    request = script.requests[0]
    assert request.method == "POST"
    assert request.url.path == "/v1/sessions/s1/step"
    assert request.url.params["return"] == "all"
    assert request.headers["Authorization"] == "Bearer tok"
    assert request.headers["Content-Type"] == BINARY
    assert request.headers["Accept"] == BINARY
    header = header_of(request.content)
    assert header["__metadata__"] == {"lr": "0.01", "base_version": "7", "worker": "w1"}
    sent = safetensors.numpy.load(request.content)
    assert set(sent) == {"w", "b", "params/w", "params/b"}
    np.testing.assert_array_equal(sent["w"], grads["w"])
    assert session.version == 8
    assert session.last_applied is True
    assert result["w"].flags.writeable
    result["w"] += 1.0  # the arrays handed out are the caller's


def test_step_request_in_json(grads: Grads) -> None:
    script = Script(json_response(200, {"version": 3, "applied": False, "params": {"b": 1.5}}))
    with client_for(script, binary=False) as client:
        session = client.session("s1", "tok")
        result = session.step({"b": np.float32(0.5)}, lr=0.1, base_version=2, worker="w")
    request = script.requests[0]
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert request.url.params["return"] == "stepped"
    assert json.loads(request.content) == {
        "grads": {"b": 0.5},
        "lr": 0.1,
        "base_version": 2,
        "worker": "w",
    }
    assert result["b"].shape == ()
    assert result["b"].dtype == np.float32
    assert session.version == 3
    assert session.last_applied is False


def test_push_asks_for_no_weights_and_returns_the_version(grads: Grads) -> None:
    script = Script(
        json_response(200, {"version": 12, "applied": True}, **{"Optserver-Version": "12"})
    )
    with client_for(script) as client:
        session = client.session("s1", "tok")
        assert session.push(grads, lr=0.5) == 12
    request = script.requests[0]
    assert request.url.params["return"] == "none"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Content-Type"] == BINARY
    assert header_of(request.content)["__metadata__"] == {"lr": "0.5"}


def test_gradients_take_the_known_dtype_except_float16() -> None:
    weights = {"w": np.zeros(3, np.float32), "h": np.zeros(3, np.float32)}
    script = Script(tensors_response(weights, 1), json_response(200, {"version": 2}))
    with client_for(script) as client:
        session = client.session("s1", "tok")
        session.pull()  # learns the dtypes
        session.push({"w": np.ones(3, np.float64), "h": np.ones(3, np.float16), "new": [1.0]})
    sent = safetensors.numpy.load(script.requests[1].content)
    assert sent["w"].dtype == np.float32
    assert sent["h"].dtype == np.float16  # compressed transport is kept
    assert sent["new"].dtype == np.float32


def test_gradient_names_that_look_like_weights_fall_back_to_json() -> None:
    script = Script(json_response(200, {"version": 1}))
    with client_for(script) as client:
        client.session("s1", "tok").push({"params/odd": [1.0, 2.0]})
    request = script.requests[0]
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content)["grads"] == {"params/odd": [1.0, 2.0]}


def test_step_argument_checks(grads: Grads) -> None:
    with client_for(Script()) as client:
        session = client.session("s1", "tok")
        with pytest.raises(ValueError, match="at least one gradient"):
            session.step({})
        with pytest.raises(ValueError, match="return_"):
            session.step(grads, return_="some")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at least one of"):
            session.update()


def test_pull_names_and_encodings() -> None:
    script = Script(tensors_response({"a": np.ones(2), "b": np.zeros(1)}, 5))
    with client_for(script) as client:
        session = client.session("s1", "tok")
        weights = session.pull(["a", "b"])
    request = script.requests[0]
    assert request.method == "GET"
    assert request.url.params["names"] == "a,b"
    assert request.headers["Accept"] == BINARY
    assert weights["a"].dtype == np.float64
    assert session.version == 5

    script = Script(json_response(200, {"version": 6, "params": {"a": [1.0, 2.0]}}))
    with client_for(script, binary=False) as client:
        session = client.session("s1", "tok")
        session._core.dtypes["a"] = np.dtype("float64")
        weights = session.pull("a")
    assert script.requests[0].url.params["names"] == "a"
    assert script.requests[0].headers["Accept"] == "application/json"
    assert weights["a"].dtype == np.float64  # JSON decodes to the tensor's known dtype
    assert session.version == 6


def test_create_session_binary_posts_then_puts_the_weights() -> None:
    params: dict[str, Any] = {"w": np.ones((2, 2), np.float64), "b": [0.0, 0.0]}
    put_answer = {
        "version": 0,
        "params": [
            {"name": "w", "shape": [2, 2], "dtype": "float32", "step": 0},
            {"name": "b", "shape": [2], "dtype": "float32", "step": 0},
        ],
    }
    script = Script(json_response(201, info("abc", token="secret")), json_response(200, put_answer))
    with client_for(script, admin_key="admin") as client:
        session = client.create_session(
            params,
            {"name": "sgd", "lr": 0.1, "momentum": 0.9},
            mode="async",
            schedule={"name": "step", "step_size": 30, "gamma": 0.1},
            name="job",
            nonfinite="skip",
        )
    create, put = script.requests
    assert create.method == "POST"
    assert create.url.path == "/v1/sessions"
    assert create.headers["Authorization"] == "Bearer admin"
    assert json.loads(create.content) == {
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "name": "job",
        "mode": {"name": "async"},
        "schedule": {"name": "step", "step_size": 30, "gamma": 0.1},
        "nonfinite": "skip",
        "dtype": "float32",
    }
    assert put.method == "PUT"
    assert put.url.path == "/v1/sessions/abc/params"
    assert put.headers["Authorization"] == "Bearer secret"
    assert put.headers["Content-Type"] == BINARY
    sent = safetensors.numpy.load(put.content)
    assert sent["w"].dtype == np.float32  # cast to the session's dtype
    assert sent["b"].shape == (2,)
    assert (session.id, session.token, session.version) == ("abc", "secret", 0)
    assert "secret" not in repr(session)


def test_create_session_json_sends_the_weights_inline() -> None:
    script = Script(json_response(201, info("abc", token="t")))
    with client_for(script, binary=False) as client:
        client.create_session({"w": np.ones(2)}, dtype="float64")
    body = json.loads(script.requests[0].content)
    assert body["params"] == {"w": [1.0, 1.0]}
    assert body["dtype"] == "float64"
    assert body["optimizer"] == {"name": "adam"}
    assert "Authorization" not in script.requests[0].headers  # no admin key configured


def test_create_session_deletes_the_session_when_the_upload_fails() -> None:
    script = Script(
        json_response(201, info("abc", token="t")),
        problem(413, "payload-too-large", "body too large"),
        httpx.Response(204),
    )
    with client_for(script) as client, pytest.raises(PayloadTooLargeError):
        client.create_session({"w": np.ones(2)})
    assert [r.method for r in script.requests] == ["POST", "PUT", "DELETE"]
    assert script.requests[2].url.path == "/v1/sessions/abc"


def test_create_session_rejects_unsupported_dtype() -> None:
    with (
        client_for(Script()) as client,
        pytest.raises(ValueError, match="float16, float32 or float64"),
    ):
        client.create_session({"w": [1.0]}, dtype="int32")


def test_set_params_json_mode_and_mixed_dtypes() -> None:
    answer = {"version": 4, "params": [{"name": "w", "shape": [2], "dtype": "float64"}]}
    script = Script(json_response(200, answer))
    with client_for(script, binary=False) as client:
        session = client.session("s1", "tok")
        assert session.set_params({"w": np.array([1.0, 2.0])})["version"] == 4
        with pytest.raises(ValueError, match="mix"):
            session.set_params({"a": np.ones(1, np.float32), "b": np.ones(1, np.float64)})
    assert json.loads(script.requests[0].content) == {
        "params": {"w": [1.0, 2.0]},
        "dtype": "float64",
    }
    assert session.version == 4
    assert session._core.dtypes["w"] == np.float64


def test_update_patch_bodies() -> None:
    script = Script(*(json_response(200, info()) for _ in range(3)))
    with client_for(script) as client:
        session = client.session("s1", "tok")
        session.update(optimizer={"lr": 0.01})
        session.update(schedule=None, nonfinite="allow")
        session.update(mode={"name": "ssp", "max_staleness": 2}, schedule={"name": "step"})
    bodies = [json.loads(r.content) for r in script.requests]
    assert all(r.method == "PATCH" for r in script.requests)
    assert bodies == [
        {"optimizer": {"lr": 0.01}},
        {"schedule": None, "nonfinite": "allow"},
        {"schedule": {"name": "step"}, "mode": {"name": "ssp", "max_staleness": 2}},
    ]


def test_admin_routes_health_import_export_delete() -> None:
    state = safetensors.numpy.save({"w": np.ones(2, np.float32)}, metadata={"version": "3"})
    script = Script(
        json_response(200, {"sessions": [info("a"), info("b")]}),
        json_response(200, {"status": "ok"}),
        httpx.Response(200, content=state, headers={"Content-Type": BINARY}),
        json_response(201, info("c", version=3, token="t2")),
        httpx.Response(204),
    )
    with client_for(script, admin_key="adm") as client:
        assert [s["id"] for s in client.list_sessions()] == ["a", "b"]
        assert client.health() == {"status": "ok"}
        exported = client.session("a").export_state()
        restored = client.import_state(exported, name="copy")
        restored.delete()
    listing, health, export, imported, deleted = script.requests
    assert listing.headers["Authorization"] == "Bearer adm"
    assert "Authorization" not in health.headers
    assert health.url.path == "/healthz"
    assert export.url.path == "/v1/sessions/a/state"
    assert export.headers["Authorization"] == "Bearer adm"  # admin key opens every session
    assert export.headers["Accept"] == BINARY
    assert exported == state
    assert imported.url.path == "/v1/sessions/import"
    assert imported.url.params["name"] == "copy"
    assert imported.headers["Content-Type"] == BINARY
    assert imported.content == state
    assert (restored.id, restored.token, restored.version) == ("c", "t2", 3)
    assert deleted.method == "DELETE"
    assert deleted.headers["Authorization"] == "Bearer t2"


def test_session_ids_are_quoted_in_paths() -> None:
    script = Script(json_response(200, info("a/b")))
    with client_for(script) as client:
        client.session("a/b", "t").info()
    assert script.requests[0].url.raw_path == b"/v1/sessions/a%2Fb"


def test_unreadable_success_bodies_raise_protocol_error() -> None:
    script = Script(httpx.Response(200, content=b"oops", headers={"Content-Type": BINARY}))
    with client_for(script) as client, pytest.raises(ProtocolError):
        client.session("s1", "t").pull()
    script = Script(httpx.Response(201, json={"no": "id"}))
    with client_for(script) as client, pytest.raises(ProtocolError):
        client.create_session()


def test_attach_owns_and_closes_its_client() -> None:
    script = Script(json_response(200, info(version=2)))
    with Session.attach("http://optserver.test", "s1", "tok", transport=script.transport) as s:
        assert s.info()["version"] == 2
        assert s.client.url == "http://optserver.test"
    assert s.client._http.is_closed
    with client_for(Script()) as client:
        handle = client.session("s1", "tok")
        handle.close()  # not its client: stays open
        assert not client._http.is_closed


def test_base_url_prefix_is_kept() -> None:
    script = Script(json_response(200, {"status": "ok"}))
    with Client("http://proxy.test/optserver", transport=script.transport) as client:
        client.health()
    assert str(script.requests[0].url) == "http://proxy.test/optserver/healthz"


# -- async --------------------------------------------------------------------------------------


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_async_push_retried_with_the_same_idempotency_key(grads: Grads) -> None:
    script = Script(
        connect_error(), httpx.RemoteProtocolError("dropped"), tensors_response(grads, 3)
    )

    async def main() -> dict[str, np.ndarray]:
        async with async_client_for(script) as client:
            return await client.session("s1", "tok").step(grads, lr=0.1)

    result = run(main())
    np.testing.assert_array_equal(result["b"], grads["b"])
    assert len({r.headers["Idempotency-Key"] for r in script.requests}) == 1
    assert len(script.requests) == 3


def test_async_503_then_success() -> None:
    script = Script(problem(503, "busy"), json_response(200, {"status": "ok"}))

    async def main() -> dict[str, Any]:
        async with async_client_for(script) as client:
            return await client.health()

    assert run(main()) == {"status": "ok"}
    assert len(script.requests) == 2


def test_async_gives_up_and_does_not_retry_4xx(grads: Grads) -> None:
    script = Script(*(connect_error() for _ in range(2)))

    async def give_up() -> None:
        async with async_client_for(script, retries=1) as client:
            await client.session("s1", "tok").push(grads)

    with pytest.raises(TransportError) as caught:
        run(give_up())
    assert caught.value.attempts == 2

    script = Script(problem(422, "invalid-tensor", "shape mismatch"))

    async def invalid() -> None:
        async with async_client_for(script) as client:
            await client.session("s1", "tok").push(grads)

    with pytest.raises(ValidationError, match="shape mismatch"):
        run(invalid())
    assert len(script.requests) == 1


def test_async_surface_matches_the_sync_one() -> None:
    put_answer = {"version": 0, "params": [{"name": "w", "shape": [2], "dtype": "float32"}]}
    script = Script(
        json_response(201, info("abc", token="t")),
        json_response(200, put_answer),
        json_response(200, {"version": 1, "applied": True}, **{"Optserver-Version": "1"}),
        tensors_response({"w": np.full(2, 3.0, np.float32)}, 1),
        json_response(200, info("abc", version=1)),
        httpx.Response(200, content=b"state", headers={"Content-Type": BINARY}),
        httpx.Response(204),
    )

    async def main() -> tuple[AsyncSession, dict[str, np.ndarray], bytes]:
        async with async_client_for(script, admin_key="adm") as client:
            session = await client.create_session({"w": [1.0, 2.0]}, "sgd")
            assert await session.push({"w": [0.1, 0.1]}) == 1
            weights = await session.pull()
            await session.update(optimizer={"lr": 0.5})
            state = await session.export_state()
            await session.delete()
            return session, weights, state

    session, weights, state = run(main())
    assert [r.method for r in script.requests] == [
        "POST",
        "PUT",
        "POST",
        "GET",
        "PATCH",
        "GET",
        "DELETE",
    ]
    assert script.requests[2].url.params["return"] == "none"
    np.testing.assert_array_equal(weights["w"], [3.0, 3.0])
    assert weights["w"].flags.writeable
    assert state == b"state"
    assert session.version == 1
    assert repr(session) == "AsyncSession(id='abc', version=1)"


def test_async_attach_owns_its_client() -> None:
    script = Script(json_response(200, info(version=5)))

    async def main() -> AsyncSession:
        async with AsyncSession.attach(
            "http://optserver.test", "s1", "tok", transport=script.transport
        ) as session:
            await session.info()
        return session

    session = run(main())
    assert session.version == 5
    assert session.client._http.is_closed
    assert script.requests[0].headers["Authorization"] == "Bearer tok"


def test_exports() -> None:
    import optserver_client

    assert optserver_client.__version__ == "0.1.0"
    for name in optserver_client.__all__:
        assert hasattr(optserver_client, name)


# -- one protocol vocabulary, for the server and the client -------------------------------------
# The server's problems, media types and headers are named once, in optserver_client.vocabulary:
# these tests check that both sides read them from there and that the client recognises every
# problem the server can answer with by its exact type.

ROOT = Path(__file__).resolve().parent.parent
VOCABULARY = ROOT / "client" / "optserver_client" / "vocabulary.py"
SOURCES = sorted(
    path
    for folder in (ROOT / "optserver", ROOT / "client" / "optserver_client")
    for path in folder.rglob("*.py")
    if path != VOCABULARY
)
SERVER_SOURCES = [path for path in SOURCES if (ROOT / "optserver") in path.parents]


def _error_classes() -> list[type[server_errors.ProblemError]]:
    found: list[type[server_errors.ProblemError]] = []
    pending: list[type[server_errors.ProblemError]] = [server_errors.ProblemError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: cls.__name__)


def _string_literals(path: Path) -> Iterator[tuple[int, str]]:
    """Each str constant of a module with its line, docstrings left out (they may name a
    header to document it), f-string pieces included."""
    tree = ast.parse(path.read_text("utf-8"))
    docs = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
def test_client_maps_every_problem_slug_the_server_declares(
    cls: type[server_errors.ProblemError],
) -> None:
    assert isinstance(cls.slug, ProblemSlug), f"{cls.__name__}.slug is not a ProblemSlug"
    raised = cls("what went wrong")
    assert raised.type == problem_type(cls.slug)
    body = server_wire.encode_json(raised.to_problem())
    error = error_from_parts(cls.status, {"Content-Type": PROBLEM, **raised.headers}, body)
    assert error.status == cls.status
    assert error.type == problem_type(cls.slug)
    assert error.title == cls.title
    assert isinstance(error, StaleGradientError) == (cls is server_errors.StaleGradient)
    if cls.status >= 500 and cls.status != 507:
        assert isinstance(error, ServerError)


def test_client_maps_problems_by_their_exact_type() -> None:
    round_failed = server_errors.Conflict("late", slug=ProblemSlug.ROUND_FAILED)
    for slug, action in ((ProblemSlug.STALE_GRADIENT, "recompute"), (None, None)):
        stale = server_errors.Conflict("behind", slug=slug)
        error = error_from_parts(409, {"Content-Type": PROBLEM}, encode_json(stale.to_problem()))
        assert retry_push(error) == action
    error = error_from_parts(409, {"Content-Type": PROBLEM}, encode_json(round_failed.to_problem()))
    assert retry_push(error) == "repeat"
    # Another namespace's types that merely end the same are not ours.
    for suffix in (ProblemSlug.STALE_GRADIENT, ProblemSlug.ROUND_FAILED):
        body = encode_json({"type": f"urn:elsewhere:{suffix}", "status": 409})
        error = error_from_parts(409, {"Content-Type": PROBLEM}, body)
        assert type(error) is ConflictError
        assert retry_push(error) is None


def test_every_problem_slug_is_one_the_server_answers_with() -> None:
    """ProblemSlug holds no slug the server never uses: each member is an error class's default
    or is named as ``ProblemSlug.MEMBER`` in the server's code."""
    used = {cls.slug for cls in _error_classes()}
    for path in SERVER_SOURCES:
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "ProblemSlug"
            ):
                used.add(ProblemSlug[node.attr])
            # The optimizer core's TensorError(mismatch="shape") is answered as
            # ProblemSlug(f"{mismatch}-mismatch").
            if (
                isinstance(node, ast.keyword)
                and node.arg == "mismatch"
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                used.add(ProblemSlug(f"{node.value.value}-mismatch"))
    assert set(ProblemSlug) - used == set()


def test_every_slug_argument_is_a_problem_slug() -> None:
    """A ``slug=`` given as a string literal would be a problem type outside the vocabulary."""
    literal = [
        _where(path, node.lineno)
        for path in SERVER_SOURCES
        for node in ast.walk(ast.parse(path.read_text("utf-8")))
        if isinstance(node, ast.keyword)
        and node.arg == "slug"
        and isinstance(node.value, ast.Constant | ast.JoinedStr)
    ]
    assert literal == []


def test_no_problem_type_or_version_header_literal_outside_vocabulary() -> None:
    found = [
        f"{_where(path, line)}: {value!r}"
        for path in SOURCES
        for line, value in _string_literals(path)
        if PROBLEM_TYPE_BASE in value or VERSION_HEADER.lower() in value.lower()
    ]
    assert found == []


def test_no_media_type_or_header_name_literal_outside_vocabulary() -> None:
    # Exact values only: prose that names a header ("Idempotency-Key {key!r} ...") may stay, and
    # "params/" is left out since the snapshot format has a tensor prefix of its own.
    names = {
        name.lower()
        for name in (
            JSON,
            BINARY,
            PROBLEM,
            VERSION_HEADER,
            IDEMPOTENCY_KEY_HEADER,
            REPLAYED_HEADER,
            RETRY_AFTER_HEADER,
        )
    }
    found = [
        f"{_where(path, line)}: {value!r}"
        for path in SOURCES
        for line, value in _string_literals(path)
        if value.lower() in names
    ]
    assert found == []


@pytest.mark.parametrize(
    "error",
    [
        server_errors.ServiceUnavailable("connections exhausted", retry_after=2),
        server_errors.JournalUnavailable("the disk is read-only", retry_after=3),
    ],
    ids=lambda error: error.slug,
)
def test_the_servers_503_problems_are_the_ones_the_client_retries(
    error: server_errors.ProblemError,
) -> None:
    retry_after = error.headers[RETRY_AFTER_HEADER]
    script = Script(
        httpx.Response(
            error.status,
            content=server_wire.encode_json(error.to_problem()),
            headers={"Content-Type": PROBLEM, **error.headers},
        ),
        json_response(200, {"status": "ok"}),
    )
    with client_for(script) as client:
        assert client.health() == {"status": "ok"}
    assert len(script.requests) == 2
    attempts = RetryPolicy(retries=1, backoff=0.0).start("GET", "/healthz", Retry.SAFE)
    assert attempts.after_status(error.status, retry_after) == pytest.approx(
        float(retry_after), rel=0.11
    )


def test_protocol_definitions_are_single() -> None:
    from optserver import config, journal
    from optserver.api.server import ConnectionLimits

    assert config.FsyncPolicy is journal.FsyncPolicy
    # Limits hold no defaults of their own: the settings' are the only ones.
    for holder in (server_wire.Limits, ConnectionLimits):
        defaulted = [f.name for f in dataclasses.fields(holder) if f.default is not MISSING]
        assert defaulted == [], holder.__name__


def test_client_imports_without_the_server() -> None:
    # Only numpy and httpx: the server's packages (and orjson, optional) are made unimportable.
    code = (
        "import sys\n"
        "for name in ('optserver', 'fastapi', 'starlette', 'pydantic', 'pydantic_settings',\n"
        "             'uvicorn', 'orjson', 'safetensors', 'torch'):\n"
        "    sys.modules[name] = None\n"
        "import optserver_client, optserver_client.compat, optserver_client.vocabulary\n"
        "from optserver_client._codec import encode_json\n"
        "assert encode_json({'a': 1}) == b'{\"a\":1}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
