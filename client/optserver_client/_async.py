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
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, TypeVar, Unpack

import httpx

from optserver_client._client import DEFAULT_URL
from optserver_client._codec import Array, TensorLike
from optserver_client._protocol import (
    OUTAGE_PAUSE_S,
    UNSET,
    BodyReader,
    Call,
    ClientCore,
    GroupOptions,
    PushRetries,
    Reply,
    SessionCore,
    Tensors,
    Unset,
)
from optserver_client._retry import RetryPolicy
from optserver_client._sharded import (
    Fanout,
    Flow,
    ShardedCore,
    create_flow,
    import_flow,
    list_sessions,
    open_flow,
    settle,
)
from optserver_client._wire import AsyncTransport, usable
from optserver_client.buffers import DEFAULT_POOL_BYTES, BufferPool
from optserver_client.exceptions import OptserverError
from optserver_client.sharding import DEFAULT_CHUNK_BYTES, shard_urls
from optserver_client.vocabulary import RETRY_AFTER_HEADER

__all__ = ["AsyncClient", "AsyncClientOptions", "AsyncSession", "AsyncShardedSession"]

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
    chunk_bytes: int
    sharded: bool | None


class AsyncClient:
    """The asynchronous :class:`~optserver_client.Client`; close it with ``await aclose()``.

    ``fast_path`` (default True) chooses the fast transport exactly as for the sync client:
    ``http://`` URLs without a ``transport`` or a proxy; :attr:`fast_path` tells whether it is
    in use. It needs an event loop with ``add_writer`` (asyncio's default on Unix). Several
    URLs are the shards of sharded sessions, as for the sync client.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        admin_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        retries: int = 5,
        backoff: float = 0.1,
        binary: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        fast_path: bool = True,
        buffer_pool_bytes: int = DEFAULT_POOL_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        sharded: bool | None = None,
    ) -> None:
        urls = shard_urls(url)
        #: Whether sessions are sharded ones (default: with several URLs; one URL can be a
        #: sharded session's only shard).
        self._sharding = len(urls) > 1 if sharded is None else sharded
        if len(urls) > 1 and not self._sharding:
            raise ValueError("several URLs are the shards of sharded sessions: sharded=False")
        self._core = ClientCore(binary=binary, admin_key=admin_key)
        self._policy = RetryPolicy(retries, backoff)
        self._http = httpx.AsyncClient(base_url=urls[0], timeout=timeout, transport=transport)
        base = self._http.base_url
        use = fast_path and transport is None and usable(base)
        # Response bodies of 1 MiB or more reuse buffers the caller no longer holds.
        self._buffers = BufferPool(buffer_pool_bytes)
        self._wire = AsyncTransport(base, timeout, self._buffers) if use else None
        self._chunk_bytes = chunk_bytes
        #: The shards, this client first (itself alone without sharding).
        self._shards: tuple[AsyncClient, ...] = (self,)
        if len(urls) > 1:
            self._shards += tuple(
                AsyncClient(
                    u, admin_key=admin_key, timeout=timeout, retries=retries, backoff=backoff,
                    binary=binary, transport=transport, fast_path=fast_path,
                    buffer_pool_bytes=buffer_pool_bytes,
                )
                for u in urls[1:]
            )  # fmt: skip

    @property
    def url(self) -> str:
        """The (first shard's) server URL."""
        return str(self._http.base_url)

    @property
    def urls(self) -> tuple[str, ...]:
        """Every shard's URL (one without sharding)."""
        return tuple(shard.url for shard in self._shards)

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
        id: str | None = None,
        token: str | None = None,
    ) -> AsyncSession:
        """See :meth:`optserver_client.Client.create_session`."""
        if self._sharding:
            return await self._create_sharded(
                params, optimizer, mode=mode, schedule=schedule, name=name,
                nonfinite=nonfinite, dtype=dtype, id=id, token=token,
            )  # fmt: skip
        plan = self._core.create_session(
            params,
            optimizer,
            mode=mode,
            schedule=schedule,
            name=name,
            nonfinite=nonfinite,
            dtype=dtype,
            id=id,
            token=token,
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

    async def _create_sharded(
        self,
        params: Tensors | None,
        optimizer: str | Mapping[str, Any],
        *,
        mode: str | Mapping[str, Any] | None,
        schedule: Mapping[str, Any] | None,
        name: str | None,
        nonfinite: str | None,
        dtype: str | None,
        id: str | None,
        token: str | None,
    ) -> AsyncShardedSession:
        flow = create_flow(
            [shard._core for shard in self._shards], params, optimizer, mode=mode,
            schedule=schedule, name=name, nonfinite=nonfinite, dtype=dtype,
            chunk_bytes=self._chunk_bytes, id=id, token=token,
        )  # fmt: skip
        return AsyncShardedSession(self, await self._drive(flow), self._shards)

    def session(self, id: str, token: str | None = None) -> AsyncSession:
        """A handle on an existing session; without ``token``, the admin key opens it. With
        several URLs, the session's shards (in any order: the first call reads which is which
        from their descriptions)."""
        if not self._sharding:
            return AsyncSession(self, self._core.session(id, token))
        return AsyncShardedSession(self, None, self._shards, id=id, token=token)

    async def list_sessions(self) -> list[dict[str, Any]]:
        """See :meth:`optserver_client.Client.list_sessions`."""
        if not self._sharding:
            return await self._request(self._core.list_sessions())
        return await self._fan(list_sessions([s._core for s in self._shards]))

    async def import_state(
        self, data: bytes | bytearray | memoryview, *, name: str | None = None
    ) -> AsyncSession:
        """See :meth:`optserver_client.Client.import_state`."""
        if not self._sharding:
            return AsyncSession(self, await self._request(self._core.import_state(data, name)))
        flow = import_flow([shard._core for shard in self._shards], data, name, self._chunk_bytes)
        return AsyncShardedSession(self, await self._drive(flow), self._shards)

    async def health(self) -> dict[str, Any]:
        """The server's health; with several URLs, ``{"status", "shards": [...]}``."""
        if len(self._shards) == 1:
            return await self._request(self._core.health())
        calls = {i: s._core.health() for i, s in enumerate(self._shards)}
        answers = await self._fan(Fanout(calls, dict))
        shards = [answers[i] for i in range(len(self._shards))]
        status = "ok" if all(a.get("status") == "ok" for a in shards) else "degraded"
        return {"status": status, "shards": shards}

    async def aclose(self) -> None:
        for shard in self._shards[1:]:
            await shard.aclose()
        if self._wire is not None:
            self._wire.close()
        await self._http.aclose()

    async def _drive(self, flow: Flow[T]) -> T:
        """Run a flow of fanouts to its end (see ``_sharded``)."""
        try:
            fanout = next(flow)
            while True:
                try:
                    result = await self._fan(fanout)
                except Exception as error:
                    fanout = flow.throw(error)
                else:
                    fanout = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _fan(self, fanout: Fanout[T], shards: Sequence[AsyncClient] | None = None) -> T:
        """Send a fanout's calls to their shards at once; merge, or raise (see ``settle``)."""
        targets = self._shards if shards is None else shards
        indices = list(fanout.calls)
        outcomes = await asyncio.gather(
            *(targets[i]._request(fanout.calls[i]) for i in indices), return_exceptions=True
        )
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        for i, outcome in zip(indices, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):  # cancellation and the like: at once
                    raise outcome
                errors[i] = outcome
            else:
                results[i] = outcome
        return settle(fanout, results, errors, [t.url for t in targets])

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
                call.method, call.path, call.params, call.headers, call.body_parts(), call.sink
            )
            return Reply(answer.status, httpx.Headers(answer.headers), answer.body, answer.decoded)
        content, extra = call.request_content()
        request = self._http.build_request(
            call.method, call.path, params=call.params, headers={**call.headers, **extra},
            content=_aiter(content) if isinstance(content, Iterator) else content,
        )  # fmt: skip
        response = await self._http.send(request, stream=True)
        try:
            reader = BodyReader(
                response.status_code, response.headers, self._buffers.allocate, call.sink
            )
            async for chunk in response.aiter_bytes():
                reader.feed(chunk)
        finally:
            await response.aclose()
        return Reply(response.status_code, response.headers, reader.body(), reader.decoded())


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
        cls,
        url: str | Sequence[str],
        id: str,
        token: str,
        **client_options: Unpack[AsyncClientOptions],
    ) -> AsyncSession:
        """Open an existing session from its id and token, with its own :class:`AsyncClient`
        (several URLs: a sharded session's shards, an :class:`AsyncShardedSession`)."""
        client = AsyncClient(url, **client_options)
        session = client.session(id, token)
        session._owns_client = True
        return session

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
    def versions(self) -> tuple[int, ...]:
        """Each shard's version: ``(version,)`` for a session of one server."""
        return (self._core.version,)

    @property
    def last_applied(self) -> bool | None:
        return self._core.last_applied

    async def step(
        self,
        grads: Tensors,
        *,
        lr: float | None = None,
        groups: GroupOptions | None = None,
        params: Tensors | None = None,
        base_version: int | None = None,
        worker: str | None = None,
        return_: Literal["stepped", "all"] = "stepped",
        key: str | None = None,
        partial: bool = False,
    ) -> dict[str, Array]:
        """See :meth:`optserver_client.Session.step`."""
        call = self._core.step(
            grads,
            lr=lr,
            groups=groups,
            params=params,
            base_version=base_version,
            worker=worker,
            return_=return_,
            key=key,
            partial=partial,
        )
        return await self._client._request(call)

    async def train_step(
        self,
        compute: Callable[[dict[str, Array]], Tensors | Awaitable[Tensors]],
        weights: dict[str, Array] | None = None,
        *,
        worker: str | None = None,
        lr: float | None = None,
        groups: GroupOptions | None = None,
        retries: int = 5,
        patience: float = 0.0,
    ) -> dict[str, Array]:
        """See :meth:`Session.train_step`; ``compute`` may be a coroutine function.

        One worker iteration that copes with staleness, failed rounds and outages.

        ``compute(weights)`` returns gradients; they are pushed with ``base_version`` = the
        version of ``weights`` (those returned by the previous ``train_step`` or ``pull``; pulled
        when None). If the server refuses them as stale (ssp, or late for a sync round), fresh
        weights are pulled and ``compute`` runs again; if a sync round failed at its deadline,
        the same gradients are pushed again; at most ``retries`` times. If a server cannot be
        reached or fails (a shard restarting), the same push is sent again, with the same
        Idempotency-Key, for up to ``patience`` seconds: it is applied exactly once, on every
        shard. Returns the new weights (every tensor).
        """
        if weights is None:
            weights = await self.pull()
        grads = await _maybe_await(compute(weights))
        push = PushRetries(self.version, retries, patience)
        while True:
            try:
                return await self.step(
                    grads, base_version=push.base_version, worker=worker, lr=lr, groups=groups,
                    return_="all", key=push.key,
                )  # fmt: skip
            except OptserverError as error:
                action = push.after(error, time.monotonic())
                if action == "outage":
                    await asyncio.sleep(OUTAGE_PAUSE_S)
                elif action == "recompute":
                    grads = await _maybe_await(compute(await self.pull()))
                    push.recomputed(self.version)

    async def push(
        self,
        grads: Tensors,
        *,
        lr: float | None = None,
        groups: GroupOptions | None = None,
        params: Tensors | None = None,
        base_version: int | None = None,
        worker: str | None = None,
        key: str | None = None,
    ) -> int:
        """See :meth:`optserver_client.Session.push`."""
        call = self._core.step(
            grads,
            lr=lr,
            groups=groups,
            params=params,
            base_version=base_version,
            worker=worker,
            return_="none",
            key=key,
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


class AsyncShardedSession(AsyncSession):
    """The asynchronous :class:`~optserver_client.ShardedSession`. One made by
    :meth:`AsyncClient.session` or :meth:`AsyncSession.attach` reads the shards' descriptions
    on its first call (``version`` and ``versions`` are 0 until then)."""

    def __init__(
        self,
        client: AsyncClient,
        core: ShardedCore | None,
        shards: Sequence[AsyncClient],
        *,
        id: str | None = None,
        token: str | None = None,
        owns_client: bool = False,
    ) -> None:
        first = core.cores[0] if core is not None else client._core.session(id or "", token)
        super().__init__(client, first, owns_client=owns_client)
        self._sharded = core
        self._shard_clients = tuple(shards)
        self._opening = asyncio.Lock()

    async def _ready(self) -> ShardedCore:
        """The session's layout and shards in order: read from their descriptions once."""
        async with self._opening:
            if self._sharded is None:
                shards = self._shard_clients
                flow = open_flow([s._core for s in shards], self._core.id, self._core.token)
                core, order = await self._client._drive(flow)
                self._shard_clients = tuple(shards[p] for p in order)
                self._core, self._sharded = core.cores[0], core
            return self._sharded

    async def _run(self, plan: Callable[[ShardedCore], Fanout[T]]) -> T:
        core = await self._ready()
        return await self._client._fan(plan(core), self._shard_clients)

    @property
    def version(self) -> int:
        return 0 if self._sharded is None else self._sharded.version

    @property
    def versions(self) -> tuple[int, ...]:
        """Each shard's version, as the last answers showed."""
        return () if self._sharded is None else self._sharded.versions

    @property
    def urls(self) -> tuple[str, ...]:
        """The shards' URLs (in shard order, once the session is opened)."""
        return tuple(shard.url for shard in self._shard_clients)

    @property
    def last_applied(self) -> bool | None:
        return None if self._sharded is None else self._sharded.last_applied

    async def step(
        self,
        grads: Tensors,
        *,
        lr: float | None = None,
        groups: GroupOptions | None = None,
        params: Tensors | None = None,
        base_version: int | None = None,
        worker: str | None = None,
        return_: Literal["stepped", "all"] = "stepped",
        key: str | None = None,
        partial: bool = False,
    ) -> dict[str, Array]:
        """See :meth:`optserver_client.ShardedSession.step`."""
        return await self._run(
            lambda core: core.step(
                grads, lr=lr, groups=groups, params=params, base_version=base_version,
                worker=worker, return_=return_, key=key, partial=partial,
            )
        )  # fmt: skip

    async def push(
        self,
        grads: Tensors,
        *,
        lr: float | None = None,
        groups: GroupOptions | None = None,
        params: Tensors | None = None,
        base_version: int | None = None,
        worker: str | None = None,
        key: str | None = None,
    ) -> int:
        await self._run(
            lambda core: core.step(
                grads, lr=lr, groups=groups, params=params, base_version=base_version,
                worker=worker, return_="none", key=key,
            )
        )  # fmt: skip
        return self.version

    async def pull(self, names: str | Iterable[str] | None = None) -> dict[str, Array]:
        return await self._run(lambda core: core.pull(names))

    async def set_params(self, params: Mapping[str, TensorLike]) -> dict[str, Any]:
        return await self._run(lambda core: core.set_params(params))

    async def info(self) -> dict[str, Any]:
        """See :meth:`optserver_client.ShardedSession.info`."""
        return await self._run(lambda core: core.info())

    async def update(
        self,
        *,
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | Unset | None = UNSET,
        mode: str | Mapping[str, Any] | None = None,
        nonfinite: str | None = None,
    ) -> dict[str, Any]:
        return await self._run(
            lambda core: core.update(
                optimizer=optimizer, schedule=schedule, mode=mode, nonfinite=nonfinite
            )
        )

    async def export_state(self) -> bytes:
        """See :meth:`optserver_client.ShardedSession.export_state`."""
        return await self._run(lambda core: core.export_state())

    async def delete(self) -> None:
        await self._run(lambda core: core.delete())

    def __repr__(self) -> str:
        return (
            f"AsyncShardedSession(id={self.id!r}, shards={len(self._shard_clients)}, "
            f"versions={self.versions})"
        )


async def _aiter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _maybe_await(value: Tensors | Awaitable[Tensors]) -> Tensors:
    if inspect.isawaitable(value):
        return await value
    return value
