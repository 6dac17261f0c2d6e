"""The asynchronous client: :class:`AsyncClient` and :class:`AsyncSession`.

The same surface as :mod:`optserver_client._client`, with coroutines, over the asyncio twin of
the fast transport (``_wire``) or :class:`httpx.AsyncClient`, chosen alike. Only the I/O
differs; requests, parsing and the retry policy are the shared ones of ``_protocol`` and
``_retry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, TypeVar, Unpack

import httpx

from optserver_client._client import DEFAULT_URL
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
from optserver_client._wire import AsyncTransport, usable
from optserver_client.buffers import DEFAULT_POOL_BYTES, BufferPool
from optserver_client.exceptions import ConflictError, StaleGradientError
from optserver_client.vocabulary import RETRY_AFTER_HEADER

__all__ = ["AsyncClient", "AsyncClientOptions", "AsyncSession"]

T = TypeVar("T")


class AsyncClientOptions(TypedDict, total=False):
    """The keyword arguments of :class:`AsyncClient` (for :meth:`AsyncSession.attach`)."""

    admin_key: str | None
    timeout: float | httpx.Timeout
    retries: int
    backoff: float
    binary: bool
    transport: httpx.AsyncBaseTransport | None
    fast_path: bool
    buffer_pool_bytes: int


class AsyncClient:
    """The asynchronous :class:`~optserver_client.Client`; close it with ``await aclose()``.

    ``fast_path`` (default True) chooses the fast transport exactly as for the sync client:
    ``http://`` URLs without a ``transport`` or a proxy; :attr:`fast_path` tells whether it is
    in use. It needs an event loop with ``add_writer`` (asyncio's default on Unix).
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
        transport: httpx.AsyncBaseTransport | None = None,
        fast_path: bool = True,
        buffer_pool_bytes: int = DEFAULT_POOL_BYTES,
    ) -> None:
        self._core = ClientCore(binary=binary, admin_key=admin_key)
        self._policy = RetryPolicy(retries, backoff)
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, transport=transport)
        base = self._http.base_url
        use = fast_path and transport is None and usable(base)
        # Response bodies of 1 MiB or more reuse buffers the caller no longer holds.
        self._buffers = BufferPool(buffer_pool_bytes)
        self._wire = AsyncTransport(base, timeout, self._buffers) if use else None

    @property
    def url(self) -> str:
        return str(self._http.base_url)

    @property
    def fast_path(self) -> bool:
        """Whether requests go through the fast transport, not httpx."""
        return self._wire is not None

    @property
    def binary(self) -> bool:
        return self._core.binary

    async def create_session(
        self,
        params: Tensors | None = None,
        optimizer: str | Mapping[str, Any] = "adam",
        *,
        mode: str | Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        name: str | None = None,
        nonfinite: str | None = None,
        dtype: str | None = "float32",
    ) -> AsyncSession:
        """See :meth:`optserver_client.Client.create_session`."""
        plan = self._core.create_session(
            params,
            optimizer,
            mode=mode,
            schedule=schedule,
            name=name,
            nonfinite=nonfinite,
            dtype=dtype,
        )
        core = await self._request(plan.create)
        if plan.upload:
            try:
                await self._request(core.set_params(plan.upload))
            except Exception:
                with contextlib.suppress(Exception):
                    await self._request(core.delete())
                raise
        return AsyncSession(self, core)

    def session(self, id: str, token: str | None = None) -> AsyncSession:
        """A handle on an existing session; without ``token``, the admin key opens it."""
        return AsyncSession(self, self._core.session(id, token))

    async def list_sessions(self) -> list[dict[str, Any]]:
        return await self._request(self._core.list_sessions())

    async def import_state(
        self, data: bytes | bytearray | memoryview, *, name: str | None = None
    ) -> AsyncSession:
        return AsyncSession(self, await self._request(self._core.import_state(data, name)))

    async def health(self) -> dict[str, Any]:
        return await self._request(self._core.health())

    async def aclose(self) -> None:
        if self._wire is not None:
            self._wire.close()
        await self._http.aclose()

    close = aclose  # the sync client's name, as a coroutine too

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r}, binary={self.binary})"

    async def _request(self, call: Call[T]) -> T:
        attempts = self._policy.start(call.method, self.url.rstrip("/") + call.path, call.retry)
        while True:
            try:
                reply = await self._send(call)
            except httpx.RequestError as error:
                await asyncio.sleep(attempts.after_error(error))
                continue
            delay = attempts.after_status(reply.status, reply.headers.get(RETRY_AFTER_HEADER))
            if delay is None:
                return call.finish(reply)
            await asyncio.sleep(delay)

    async def _send(self, call: Call[Any]) -> Reply:
        if self._wire is not None:
            answer = await self._wire.request(
                call.method, call.path, call.params, call.headers, call.body_parts()
            )
            return Reply(answer.status, httpx.Headers(answer.headers), answer.body)
        content, extra = call.request_content()
        request = self._http.build_request(
            call.method, call.path, params=call.params, headers={**call.headers, **extra},
            content=_aiter(content) if isinstance(content, Iterator) else content,
        )  # fmt: skip
        response = await self._http.send(request, stream=True)
        try:
            reader = BodyReader(response.headers, self._buffers.allocate)
            async for chunk in response.aiter_bytes():
                reader.feed(chunk)
        finally:
            await response.aclose()
        return Reply(response.status_code, response.headers, reader.body())


class AsyncSession:
    """The asynchronous :class:`~optserver_client.Session`."""

    def __init__(
        self, client: AsyncClient, core: SessionCore, *, owns_client: bool = False
    ) -> None:
        self._client = client
        self._core = core
        self._owns_client = owns_client

    @classmethod
    def attach(
        cls, url: str, id: str, token: str, **client_options: Unpack[AsyncClientOptions]
    ) -> Self:
        """Open an existing session from its id and token, with its own :class:`AsyncClient`."""
        client = AsyncClient(url, **client_options)
        return cls(client, client._core.session(id, token), owns_client=True)

    @property
    def client(self) -> AsyncClient:
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
        return self._core.last_applied

    async def step(
        self,
        grads: Tensors,
        *,
        lr: float | None = None,
        params: Tensors | None = None,
        base_version: int | None = None,
        worker: str | None = None,
        return_: Literal["stepped", "all"] = "stepped",
    ) -> dict[str, Array]:
        """See :meth:`optserver_client.Session.step`."""
        call = self._core.step(
            grads,
            lr=lr,
            params=params,
            base_version=base_version,
            worker=worker,
            return_=return_,
        )
        return await self._client._request(call)

    async def train_step(
        self,
        compute: Callable[[dict[str, Array]], Tensors | Awaitable[Tensors]],
        weights: dict[str, Array] | None = None,
        *,
        worker: str | None = None,
        lr: float | None = None,
        retries: int = 5,
    ) -> dict[str, Array]:
        """See :meth:`Session.train_step`; ``compute`` may be a coroutine function.

        One worker iteration that copes with staleness and failed rounds.

        ``compute(weights)`` returns gradients; they are pushed with ``base_version`` = the
        version of ``weights`` (those returned by the previous ``train_step`` or ``pull``; pulled
        when None). If the server refuses them as stale (ssp, or late for a sync round), fresh
        weights are pulled and ``compute`` runs again; if a sync round failed at its deadline,
        the same gradients are pushed again; at most ``retries`` times. Returns the new weights
        (every tensor).
        """
        if weights is None:
            weights = await self.pull()
        grads = await _maybe_await(compute(weights))
        for attempt in range(retries + 1):
            try:
                return await self.step(
                    grads, base_version=self.version, worker=worker, lr=lr, return_="all"
                )
            except (StaleGradientError, ConflictError) as error:
                action = retry_push(error)
                if action is None or attempt == retries:
                    raise
                if action == "recompute":
                    grads = await _maybe_await(compute(await self.pull()))
        raise AssertionError("unreachable")  # pragma: no cover

    async def push(
        self,
        grads: Tensors,
        *,
        lr: float | None = None,
        params: Tensors | None = None,
        base_version: int | None = None,
        worker: str | None = None,
    ) -> int:
        call = self._core.step(
            grads,
            lr=lr,
            params=params,
            base_version=base_version,
            worker=worker,
            return_="none",
        )
        await self._client._request(call)
        return self._core.version

    async def pull(self, names: str | Iterable[str] | None = None) -> dict[str, Array]:
        return await self._client._request(self._core.pull(names))

    async def set_params(self, params: Mapping[str, TensorLike]) -> dict[str, Any]:
        return await self._client._request(self._core.set_params(params))

    async def info(self) -> dict[str, Any]:
        return await self._client._request(self._core.info())

    async def update(
        self,
        *,
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | Unset | None = UNSET,
        mode: str | Mapping[str, Any] | None = None,
        nonfinite: str | None = None,
    ) -> dict[str, Any]:
        call = self._core.update(
            optimizer=optimizer, schedule=schedule, mode=mode, nonfinite=nonfinite
        )
        return await self._client._request(call)

    async def export_state(self) -> bytes:
        return await self._client._request(self._core.export_state())

    async def delete(self) -> None:
        await self._client._request(self._core.delete())

    async def aclose(self) -> None:
        """Close the client if this session owns it (see :meth:`attach`); never deletes."""
        if self._owns_client:
            await self._client.aclose()

    close = aclose

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncSession(id={self.id!r}, version={self.version})"


async def _aiter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _maybe_await(value: Tensors | Awaitable[Tensors]) -> Tensors:
    if inspect.isawaitable(value):
        return await value
    return value
