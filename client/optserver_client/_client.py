"""The synchronous client: :class:`Client` and :class:`Session`, over the fast transport of
``_wire`` for plain-http URLs, :class:`httpx.Client` otherwise."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, TypeVar, Unpack

import httpx

from optserver_client._codec import Array, TensorLike
from optserver_client._protocol import (
    UNSET,
    BodyReader,
    Call,
    ClientCore,
    Reply,
    SessionCore,
    Tensors,
    Unset,
    retry_push,
)
from optserver_client._retry import RetryPolicy
from optserver_client._wire import Transport, usable
from optserver_client.buffers import DEFAULT_POOL_BYTES, BufferPool
from optserver_client.exceptions import ConflictError, StaleGradientError
from optserver_client.vocabulary import RETRY_AFTER_HEADER

__all__ = ["Client", "ClientOptions", "Session"]

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientOptions(TypedDict, total=False):
    """The keyword arguments of :class:`Client` (for :meth:`Session.attach`)."""

    admin_key: str | None
    timeout: float | httpx.Timeout
    retries: int
    backoff: float
    binary: bool
    transport: httpx.BaseTransport | None
    fast_path: bool
    buffer_pool_bytes: int


class Client:
    """A connection to an optserver: creates, lists and imports sessions.

    ``binary=True`` sends and receives tensors as safetensors (the default; JSON otherwise).
    ``retries`` and ``backoff`` set the retry policy (see the package documentation);
    ``transport`` replaces the network, e.g. with :class:`httpx.MockTransport` in tests.
    ``fast_path=True`` (the default) sends requests to an ``http://`` URL through the client's
    own HTTP/1.1 transport: scatter-gather writes of the arrays' bytes, responses read straight
    into their buffer, a fraction of httpx's per-request cost; with ``fast_path=False``, a
    ``transport``, an ``https://`` URL or a proxy configured for the host (the ``*_proxy``
    environment variables), everything goes through httpx. :attr:`fast_path` tells which.
    Response bodies of 1 MiB or more are read into buffers reused once nothing holds the arrays
    of an earlier answer any more, up to ``buffer_pool_bytes`` kept (0: always fresh memory,
    which costs a page fault per page). The client is thread-safe and pools connections; close
    it, or use it as a context manager.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        admin_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        retries: int = 5,
        backoff: float = 0.1,
        binary: bool = True,
        transport: httpx.BaseTransport | None = None,
        fast_path: bool = True,
        buffer_pool_bytes: int = DEFAULT_POOL_BYTES,
    ) -> None:
        self._core = ClientCore(binary=binary, admin_key=admin_key)
        self._policy = RetryPolicy(retries, backoff)
        self._http = httpx.Client(base_url=url, timeout=timeout, transport=transport)
        base = self._http.base_url
        use = fast_path and transport is None and usable(base)
        # Response bodies of 1 MiB or more reuse buffers the caller no longer holds.
        self._buffers = BufferPool(buffer_pool_bytes)
        self._wire = Transport(base, timeout, self._buffers) if use else None

    @property
    def url(self) -> str:
        return str(self._http.base_url)

    @property
    def fast_path(self) -> bool:
        """Whether requests go through the fast transport (see the class), not httpx."""
        return self._wire is not None

    @property
    def binary(self) -> bool:
        return self._core.binary

    def create_session(
        self,
        params: Tensors | None = None,
        optimizer: str | Mapping[str, Any] = "adam",
        *,
        mode: str | Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        name: str | None = None,
        nonfinite: str | None = None,
        dtype: str | None = "float32",
    ) -> Session:
        """Create a session, with initial weights ``params`` cast to ``dtype`` (None: keep each
        array's float32/float64 dtype). In binary mode the weights follow in a PUT; if that
        fails, the new session is deleted again."""
        plan = self._core.create_session(
            params,
            optimizer,
            mode=mode,
            schedule=schedule,
            name=name,
            nonfinite=nonfinite,
            dtype=dtype,
        )
        core = self._request(plan.create)
        if plan.upload:
            try:
                self._request(core.set_params(plan.upload))
            except Exception:
                with contextlib.suppress(Exception):
                    self._request(core.delete())
                raise
        return Session(self, core)

    def session(self, id: str, token: str | None = None) -> Session:
        """A handle on an existing session; without ``token``, the admin key opens it."""
        return Session(self, self._core.session(id, token))

    def list_sessions(self) -> list[dict[str, Any]]:
        return self._request(self._core.list_sessions())

    def import_state(
        self, data: bytes | bytearray | memoryview, *, name: str | None = None
    ) -> Session:
        """A new session resuming from :meth:`Session.export_state`'s document."""
        return Session(self, self._request(self._core.import_state(data, name)))

    def health(self) -> dict[str, Any]:
        return self._request(self._core.health())

    def close(self) -> None:
        if self._wire is not None:
            self._wire.close()
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r}, binary={self.binary})"

    def _request(self, call: Call[T]) -> T:
        """Send ``call``, retrying as its policy allows; its parsed result or an exception."""
        attempts = self._policy.start(call.method, self.url.rstrip("/") + call.path, call.retry)
        while True:
            try:
                reply = self._send(call)
            except httpx.RequestError as error:
                time.sleep(attempts.after_error(error))
                continue
            delay = attempts.after_status(reply.status, reply.headers.get(RETRY_AFTER_HEADER))
            if delay is None:
                return call.finish(reply)
            time.sleep(delay)

    def _send(self, call: Call[Any]) -> Reply:
        if self._wire is not None:
            answer = self._wire.request(
                call.method, call.path, call.params, call.headers, call.body_parts()
            )
            return Reply(answer.status, httpx.Headers(answer.headers), answer.body)
        content, extra = call.request_content()
        request = self._http.build_request(
            call.method, call.path, params=call.params, headers={**call.headers, **extra},
            content=content,
        )  # fmt: skip
        response = self._http.send(request, stream=True)
        try:
            reader = BodyReader(response.headers, self._buffers.allocate)
            for chunk in response.iter_bytes():
                reader.feed(chunk)
        finally:
            response.close()
        return Reply(response.status_code, response.headers, reader.body())


class Session:
    """One training session on the server: push gradients, pull weights, manage the session.

    ``version`` is the last session version a response showed. Arrays returned are writable
    numpy arrays; in binary mode they are views of the response body, which nothing else holds.
    """

    def __init__(self, client: Client, core: SessionCore, *, owns_client: bool = False) -> None:
        self._client = client
        self._core = core
        self._owns_client = owns_client

    @classmethod
    def attach(cls, url: str, id: str, token: str, **client_options: Unpack[ClientOptions]) -> Self:
        """Open an existing session from its id and token (a worker's entry point).

        The session owns its own :class:`Client`, which :meth:`close` closes.
        """
        client = Client(url, **client_options)
        return cls(client, client._core.session(id, token), owns_client=True)

    @property
    def client(self) -> Client:
        return self._client

    @property
    def id(self) -> str:
        return self._core.id

    @property
    def token(self) -> str | None:
        return self._core.token

    @property
    def version(self) -> int:
        return self._core.version

    @property
    def last_applied(self) -> bool | None:
        """Whether the last step was applied (False: e.g. skipped by the non-finite policy)."""
        return self._core.last_applied

    def step(
        self,
        grads: Tensors,
        *,
        lr: float | None = None,
        params: Tensors | None = None,
        base_version: int | None = None,
        worker: str | None = None,
        return_: Literal["stepped", "all"] = "stepped",
    ) -> dict[str, Array]:
        """Push gradients, apply one optimizer step, and return the new weights.

        ``params`` are the current weights (optimizer-as-a-service style), ``lr`` overrides the
        learning rate for this step only, ``base_version`` is the version the gradients were
        computed on (ssp mode; StaleGradientError when too old). Retries never apply it twice.
        """
        call = self._core.step(
            grads,
            lr=lr,
            params=params,
            base_version=base_version,
            worker=worker,
            return_=return_,
        )
        return self._client._request(call)

    def train_step(
        self,
        compute: Callable[[dict[str, Array]], Tensors],
        weights: dict[str, Array] | None = None,
        *,
        worker: str | None = None,
        lr: float | None = None,
        retries: int = 5,
    ) -> dict[str, Array]:
        """One worker iteration that copes with staleness and failed rounds.

        ``compute(weights)`` returns gradients; they are pushed with ``base_version`` = the
        version of ``weights`` (those returned by the previous ``train_step`` or ``pull``; pulled
        when None). If the server refuses them as stale (ssp, or late for a sync round), fresh
        weights are pulled and ``compute`` runs again; if a sync round failed at its deadline,
        the same gradients are pushed again; at most ``retries`` times. Returns the new weights
        (every tensor).
        """
        if weights is None:
            weights = self.pull()
        grads = compute(weights)
        for attempt in range(retries + 1):
            try:
                return self.step(
                    grads, base_version=self.version, worker=worker, lr=lr, return_="all"
                )
            except (StaleGradientError, ConflictError) as error:
                action = retry_push(error)
                if action is None or attempt == retries:
                    raise
                if action == "recompute":
                    grads = compute(self.pull())
        raise AssertionError("unreachable")  # pragma: no cover

    def push(
        self,
        grads: Tensors,
        *,
        lr: float | None = None,
        params: Tensors | None = None,
        base_version: int | None = None,
        worker: str | None = None,
    ) -> int:
        """Like :meth:`step` but without weights in the answer; returns the new version."""
        call = self._core.step(
            grads,
            lr=lr,
            params=params,
            base_version=base_version,
            worker=worker,
            return_="none",
        )
        self._client._request(call)
        return self._core.version

    def pull(self, names: str | Iterable[str] | None = None) -> dict[str, Array]:
        """The current weights (all, or those named); ``version`` tells which step they follow."""
        return self._client._request(self._core.pull(names))

    def set_params(self, params: Mapping[str, TensorLike]) -> dict[str, Any]:
        """Set or replace weights; returns the server's answer (version and tensor list)."""
        return self._client._request(self._core.set_params(params))

    def info(self) -> dict[str, Any]:
        return self._client._request(self._core.info())

    def update(
        self,
        *,
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | Unset | None = UNSET,
        mode: str | Mapping[str, Any] | None = None,
        nonfinite: str | None = None,
    ) -> dict[str, Any]:
        """Change hyperparameters (e.g. ``optimizer={"lr": 0.01}``), schedule (None removes
        it), mode or non-finite policy while training; returns the session's description."""
        call = self._core.update(
            optimizer=optimizer, schedule=schedule, mode=mode, nonfinite=nonfinite
        )
        return self._client._request(call)

    def export_state(self) -> bytes:
        """Everything needed to resume exactly, as one safetensors document."""
        return self._client._request(self._core.export_state())

    def delete(self) -> None:
        self._client._request(self._core.delete())

    def close(self) -> None:
        """Close the client if this session owns it (see :meth:`attach`); never deletes."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, version={self.version})"
