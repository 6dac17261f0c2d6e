"""The synchronous client: :class:`Client` and :class:`Session`, over the fast transport of
``_wire`` for plain-http URLs, :class:`httpx.Client` otherwise."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, TypeVar, Unpack

import httpx

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
from optserver_client._wire import Transport, usable
from optserver_client.buffers import DEFAULT_POOL_BYTES, BufferPool
from optserver_client.exceptions import OptserverError
from optserver_client.sharding import DEFAULT_CHUNK_BYTES, shard_urls
from optserver_client.vocabulary import RETRY_AFTER_HEADER

__all__ = ["Client", "ClientOptions", "Session", "ShardedSession"]

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
    chunk_bytes: int
    sharded: bool | None


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

    Several URLs (a list, or one string with commas, as ``OPTSERVER_URLS``) are the shards of
    sharded sessions: :meth:`create_session` spreads a session's tensors over all of them
    (tensors of more than ``chunk_bytes`` cut into chunks; see :mod:`optserver_client.sharding`)
    and returns a :class:`ShardedSession`, which talks to every shard at once. With one URL,
    nothing of this applies, unless ``sharded=True`` (a sharded session of one shard).
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
        transport: httpx.BaseTransport | None = None,
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
        self._http = httpx.Client(base_url=urls[0], timeout=timeout, transport=transport)
        base = self._http.base_url
        use = fast_path and transport is None and usable(base)
        # Response bodies of 1 MiB or more reuse buffers the caller no longer holds.
        self._buffers = BufferPool(buffer_pool_bytes)
        self._wire = Transport(base, timeout, self._buffers) if use else None
        self._chunk_bytes = chunk_bytes
        #: The shards, this client first (itself alone without sharding).
        self._shards: tuple[Client, ...] = (self,)
        self._pool: ThreadPoolExecutor | None = None
        if len(urls) > 1:
            self._shards += tuple(
                Client(
                    u, admin_key=admin_key, timeout=timeout, retries=retries, backoff=backoff,
                    binary=binary, transport=transport, fast_path=fast_path,
                    buffer_pool_bytes=buffer_pool_bytes,
                )
                for u in urls[1:]
            )  # fmt: skip
            # One thread per shard: the calls of a step go out together (I/O releases the GIL).
            self._pool = ThreadPoolExecutor(len(urls), thread_name_prefix="optserver-shard")

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
        id: str | None = None,
        token: str | None = None,
    ) -> Session:
        """Create a session, with initial weights ``params`` cast to ``dtype`` (None: keep each
        array's float32/float64 dtype). In binary mode the weights follow in a PUT; if that
        fails, the new session is deleted again (on every shard, for a sharded one). ``id``
        and ``token`` choose the session's (default: random ones; a server refuses an id it
        holds already, or a token that opens another session, with ConflictError)."""
        if self._sharding:
            return self._create_sharded(
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
        core = self._request(plan.create)
        if plan.upload:
            try:
                self._request(core.set_params(plan.upload))
            except Exception:
                with contextlib.suppress(Exception):
                    self._request(core.delete())
                raise
        return Session(self, core)

    def _create_sharded(
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
    ) -> ShardedSession:
        flow = create_flow(
            [shard._core for shard in self._shards], params, optimizer, mode=mode,
            schedule=schedule, name=name, nonfinite=nonfinite, dtype=dtype,
            chunk_bytes=self._chunk_bytes, id=id, token=token,
        )  # fmt: skip
        return ShardedSession(self, self._drive(flow), self._shards)

    def session(self, id: str, token: str | None = None) -> Session:
        """A handle on an existing session; without ``token``, the admin key opens it. With
        several URLs, the session's shards: each shard's description says which it is, so the
        URLs may come in any order."""
        if not self._sharding:
            return Session(self, self._core.session(id, token))
        core, order = self._drive(open_flow([s._core for s in self._shards], id, token))
        return ShardedSession(self, core, tuple(self._shards[p] for p in order))

    def list_sessions(self) -> list[dict[str, Any]]:
        """The server's sessions; with several URLs, the sharded sessions over them, each once
        and described as :meth:`ShardedSession.info` describes it (a session of one of the
        servers alone is listed by a client of that URL)."""
        if not self._sharding:
            return self._request(self._core.list_sessions())
        return self._fan(list_sessions([s._core for s in self._shards]))

    def import_state(
        self, data: bytes | bytearray | memoryview, *, name: str | None = None
    ) -> Session:
        """A new session resuming from :meth:`Session.export_state`'s document. With several
        URLs, it is spread over them, whatever number of shards it was exported from."""
        if not self._sharding:
            return Session(self, self._request(self._core.import_state(data, name)))
        flow = import_flow([shard._core for shard in self._shards], data, name, self._chunk_bytes)
        return ShardedSession(self, self._drive(flow), self._shards)

    def health(self) -> dict[str, Any]:
        """The server's health; with several URLs, ``{"status", "shards": [...]}``."""
        if len(self._shards) == 1:
            return self._request(self._core.health())
        answers = self._fan(Fanout({i: s._core.health() for i, s in enumerate(self._shards)}, dict))
        shards = [answers[i] for i in range(len(self._shards))]
        status = "ok" if all(a.get("status") == "ok" for a in shards) else "degraded"
        return {"status": status, "shards": shards}

    def close(self) -> None:
        for shard in self._shards[1:]:
            shard.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self._wire is not None:
            self._wire.close()
        self._http.close()

    def _drive(self, flow: Flow[T]) -> T:
        """Run a flow of fanouts to its end (see ``_sharded``)."""
        try:
            fanout = next(flow)
            while True:
                try:
                    result = self._fan(fanout)
                except Exception as error:
                    fanout = flow.throw(error)
                else:
                    fanout = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _fan(self, fanout: Fanout[T], shards: Sequence[Client] | None = None) -> T:
        """Send a fanout's calls to their shards at once; merge, or raise (see ``settle``)."""
        targets = self._shards if shards is None else shards
        pool = self._pool
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        calls = list(fanout.calls.items())
        # All but the last on the pool's threads, the last on this one (one hand-off fewer).
        futures = {i: pool.submit(targets[i]._request, c) for i, c in calls[:-1]} if pool else {}
        for i, call in calls[len(futures) :] if futures else calls:
            try:
                results[i] = targets[i]._request(call)
            except Exception as error:
                errors[i] = error
        for i, future in futures.items():
            try:
                results[i] = future.result()
            except Exception as error:
                errors[i] = error
        return settle(fanout, results, errors, [t.url for t in targets])

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
                call.method, call.path, call.params, call.headers, call.body_parts(), call.sink
            )
            return Reply(answer.status, httpx.Headers(answer.headers), answer.body, answer.decoded)
        content, extra = call.request_content()
        request = self._http.build_request(
            call.method, call.path, params=call.params, headers={**call.headers, **extra},
            content=content,
        )  # fmt: skip
        response = self._http.send(request, stream=True)
        try:
            reader = BodyReader(
                response.status_code, response.headers, self._buffers.allocate, call.sink
            )
            for chunk in response.iter_bytes():
                reader.feed(chunk)
        finally:
            response.close()
        return Reply(response.status_code, response.headers, reader.body(), reader.decoded())


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
    def attach(
        cls,
        url: str | Sequence[str],
        id: str,
        token: str,
        **client_options: Unpack[ClientOptions],
    ) -> Session:
        """Open an existing session from its id and token (a worker's entry point); several
        URLs: a sharded session's shards (a :class:`ShardedSession`).

        The session owns its own :class:`Client`, which :meth:`close` closes.
        """
        client = Client(url, **client_options)
        try:
            session = client.session(id, token)
        except BaseException:
            client.close()
            raise
        session._owns_client = True
        return session

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
    def versions(self) -> tuple[int, ...]:
        """Each shard's version: ``(version,)`` for a session of one server."""
        return (self._core.version,)

    @property
    def last_applied(self) -> bool | None:
        """Whether the last step was applied (False: e.g. skipped by the non-finite policy)."""
        return self._core.last_applied

    def step(
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
        """Push gradients, apply one optimizer step, and return the new weights.

        ``params`` are the current weights (optimizer-as-a-service style), ``lr`` overrides the
        learning rate for this step only, ``groups`` any hyperparameter of a parameter group
        for this step only (``{"head": {"lr": 0.01, "betas": (0.9, 0.99)}}``), ``base_version``
        is the version the gradients were computed on (ssp mode; StaleGradientError when too
        old), ``partial`` marks a part of a step that a later push completes (gradients pushed
        bucket by bucket: the version advances with the last). Retries never apply it twice:
        they carry the push's Idempotency-Key, ``key`` (default: a new one), which a later
        push of the same gradients may carry again, to the same effect.
        """
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
        return self._client._request(call)

    def train_step(
        self,
        compute: Callable[[dict[str, Array]], Tensors],
        weights: dict[str, Array] | None = None,
        *,
        worker: str | None = None,
        lr: float | None = None,
        groups: GroupOptions | None = None,
        retries: int = 5,
        patience: float = 0.0,
    ) -> dict[str, Array]:
        """One worker iteration that copes with staleness, failed rounds and outages.

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
            weights = self.pull()
        grads = compute(weights)
        push = PushRetries(self.version, retries, patience)
        while True:
            try:
                return self.step(
                    grads, base_version=push.base_version, worker=worker, lr=lr, groups=groups,
                    return_="all", key=push.key,
                )  # fmt: skip
            except OptserverError as error:
                action = push.after(error, time.monotonic())
                if action == "outage":
                    time.sleep(OUTAGE_PAUSE_S)
                elif action == "recompute":
                    grads = compute(self.pull())
                    push.recomputed(self.version)

    def push(
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
        """Like :meth:`step` but without weights in the answer; returns the new version."""
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


class ShardedSession(Session):
    """A session spread over several servers (see :mod:`optserver_client.sharding`), with the
    API of :class:`Session`; every operation talks to the shards concerned at once.

    ``version`` is the number of steps every shard has applied (the least of ``versions``, each
    shard's own): a push of every tensor steps every shard, so the shards' versions stay equal,
    and a ``base_version`` is compared by each shard with its own. A shard that fails while the
    others succeed raises :class:`~optserver_client.ShardError`, which names it; for a step, its
    ``key`` completes the step exactly once when the same gradients are pushed with it again.
    """

    def __init__(
        self,
        client: Client,
        core: ShardedCore,
        shards: Sequence[Client],
        *,
        owns_client: bool = False,
    ) -> None:
        super().__init__(client, core.cores[0], owns_client=owns_client)
        self._sharded = core
        self._shard_clients = tuple(shards)

    @property
    def version(self) -> int:
        return self._sharded.version

    @property
    def versions(self) -> tuple[int, ...]:
        """Each shard's version, as the last answers showed."""
        return self._sharded.versions

    @property
    def urls(self) -> tuple[str, ...]:
        """The shards' URLs, in shard order."""
        return tuple(shard.url for shard in self._shard_clients)

    @property
    def last_applied(self) -> bool | None:
        return self._sharded.last_applied

    def _run(self, fanout: Fanout[T]) -> T:
        return self._client._fan(fanout, self._shard_clients)

    def step(
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
        return self._run(
            self._sharded.step(
                grads, lr=lr, groups=groups, params=params, base_version=base_version,
                worker=worker, return_=return_, key=key, partial=partial,
            )
        )  # fmt: skip

    def push(
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
        self._run(
            self._sharded.step(
                grads, lr=lr, groups=groups, params=params, base_version=base_version,
                worker=worker, return_="none", key=key,
            )
        )  # fmt: skip
        return self.version

    def pull(self, names: str | Iterable[str] | None = None) -> dict[str, Array]:
        return self._run(self._sharded.pull(names))

    def set_params(self, params: Mapping[str, TensorLike]) -> dict[str, Any]:
        return self._run(self._sharded.set_params(params))

    def info(self) -> dict[str, Any]:
        """The session's description: shard 0's, with ``version`` (the least), ``versions``,
        the whole tensors under ``params``, the layout under ``sharding``, and every shard's
        own description under ``shards``."""
        return self._run(self._sharded.info())

    def update(
        self,
        *,
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | Unset | None = UNSET,
        mode: str | Mapping[str, Any] | None = None,
        nonfinite: str | None = None,
    ) -> dict[str, Any]:
        return self._run(
            self._sharded.update(
                optimizer=optimizer, schedule=schedule, mode=mode, nonfinite=nonfinite
            )
        )

    def export_state(self) -> bytes:
        """One document of the whole session (chunks joined), which a client of any number
        of shards imports: resharding is an export and an import."""
        return self._run(self._sharded.export_state())

    def delete(self) -> None:
        self._run(self._sharded.delete())

    def __repr__(self) -> str:
        return (
            f"ShardedSession(id={self.id!r}, shards={len(self._shard_clients)}, "
            f"versions={self.versions})"
        )
