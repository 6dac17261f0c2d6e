"""A ``torch.optim.Optimizer`` whose steps an optserver session applies::

    from optserver_client.torch import RemoteOptimizer

    opt = RemoteOptimizer(
        model.named_parameters(), url="http://127.0.0.1:8000",
        optimizer="adamw", lr=3e-4, weight_decay=0.1,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=1000)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    torch.save(opt.state_dict(), "opt.pt")

How it maps. Each torch parameter group is a parameter group of the session (named ``"0"``,
``"1"``, ... in order; ``param_groups[i]`` holds every hyperparameter the server knows, with
its defaults filled in). :meth:`RemoteOptimizer.step` sends the gradient of every parameter
that has one in one push (one per shard), with every hyperparameter of ``param_groups`` that
differs from the session's as an option of that push for that step only (what schedulers and
users change between steps), and writes the weights it gets back into the parameters in
place. The session holds the optimizer state; ``state_dict()`` brings it back, in torch's
layout (``state[i]["exp_avg"]``, ...), so that a ``torch.optim`` optimizer can load it too.

Several workers: the first creates the session from its model's weights (``opt.session_id``,
``opt.token``); the others :meth:`RemoteOptimizer.attach` to it, which loads the session's
weights into their model.

``overlap=True`` pushes gradients while backward still runs: each parameter's gradient joins a
bucket as soon as it is accumulated, and a full bucket (``bucket_bytes``) is pushed at once as
a part of the step; the last gradient pushes the rest, and ``step()`` waits for the answers.
Gradients are then sent before ``step()``: whatever changes them after ``backward()``
(``clip_grad_norm_``, a ``GradScaler``'s unscaling, a second backward for accumulation) has no
effect, and is refused where it can be seen (a gradient accumulated twice in one step). As with
torch's optimizer step in backward, each parameter takes its new weights as soon as its part's
answer arrives: from ``backward()`` until ``step()`` returns, do not use the model.

torch is imported when this module is: ``optserver_client`` itself never needs it.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        "optserver_client.torch needs PyTorch: install it (pip install torch); the rest of "
        "optserver_client works without it"
    ) from exc

from optserver_client._client import DEFAULT_URL, Client, Session
from optserver_client._codec import decode_json, decode_safetensors, encode_json
from optserver_client._protocol import OUTAGE_PAUSE_S, PushRetries
from optserver_client._sharded import export_key
from optserver_client.exceptions import OptserverError
from optserver_client.safetensors_io import encode
from optserver_client.vocabulary import (
    PARAMS_PREFIX,
    STATE_FORMAT,
    STATE_FORMAT_KEY,
    STATE_PREFIX,
    STATE_RECORD_KEY,
)

__all__ = ["DEFAULT_BUCKET_BYTES", "RemoteOptimizer"]

#: Gradients pushed together while backward runs, at most about this many bytes per push
#: (DDP's default bucket is 25 MiB; smaller ones start sending sooner on CPU models).
DEFAULT_BUCKET_BYTES = 4 << 20
#: The first bucket of a step is at most this large (DDP's is 1 MiB): the first push starts
#: early in backward.
FIRST_BUCKET = 1 << 20
#: Keys of a torch parameter group that are not hyperparameters.
_GROUP_KEYS = ("params", "param_names")
_DTYPES = (torch.float32, torch.float64)
#: The key of a state dict that carries the session's record (version, mode, schedule).
STATE_DICT_KEY = "optserver"


def _plain(value: Any) -> Any:
    """A hyperparameter as JSON would carry it: tensors and numpy scalars as numbers, tuples
    as lists."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _torch_value(value: Any) -> Any:
    """A hyperparameter from the server as torch keeps it (``betas`` is a tuple)."""
    return tuple(value) if isinstance(value, list) else value


def _hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer config's hyperparameters (the session's, or a group's): without its
    ``name`` and ``groups``."""
    return {k: v for k, v in config.items() if k not in ("name", "groups")}


class _Bucket:
    """Gradients of one step to push together while backward runs (``overlap=True``)."""

    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        #: Bytes by tensor name, in the order the gradients came.
        self.sizes: dict[str, int] = dict(sizes or {})

    @property
    def names(self) -> list[str]:
        return list(self.sizes)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def split(self) -> tuple[_Bucket, _Bucket]:
        """All but the smallest gradient, and a bucket of that one: a push goes out at once
        while something is always left for the step's completing push."""
        keep = min(self.sizes, key=self.sizes.__getitem__)
        rest = {n: b for n, b in self.sizes.items() if n != keep}
        return _Bucket(rest), _Bucket({keep: self.sizes[keep]})


class RemoteOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` backed by an optserver session (see the module docstring).

    ``params``: ``model.named_parameters()`` (the session's tensors take their names),
    ``model.parameters()`` (named ``param0``, ``param1``, ... in order) or torch-style
    parameter group dicts of either. ``url``: one server, or a list (or comma-separated
    string) of shard URLs; or a ready ``client``. ``optimizer`` and ``options``: the session's
    optimizer and its hyperparameters (torch.optim's names). ``mode``, ``schedule``,
    ``nonfinite`` and ``name``: as for :meth:`Client.create_session`. ``worker``: this
    worker's id in the session's statistics (with ``overlap=True``, ``torch-`` and a random
    suffix if not given: the session keeps the parts of a worker's step together by it).
    ``patience``: seconds a step keeps retrying while
    a server is out (0: raise at once); ``retries``: how many stale refusals (ssp) or failed
    rounds (sync) a step retries.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        url: str | Sequence[str] = DEFAULT_URL,
        client: Client | None = None,
        optimizer: str = "adam",
        mode: str | Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        nonfinite: str | None = None,
        name: str | None = None,
        worker: str | None = None,
        overlap: bool = False,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        patience: float = 0.0,
        retries: int = 5,
        admin_key: str | None = None,
        session: str | None = None,
        token: str | None = None,
        **options: Any,
    ) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes!r}")
        if session is not None and options:
            raise TypeError(
                f"an attached optimizer has the session's options; got {sorted(options)} (change "
                "them in param_groups, or for every worker with session.update)"
            )
        self._client = client if client is not None else Client(url, admin_key=admin_key)
        self._owns_client = client is None
        if overlap and worker is None:
            worker = f"torch-{uuid.uuid4().hex[:12]}"
        self.worker = worker
        self.patience = float(patience)
        self.retries = int(retries)
        self.overlap = overlap
        self.bucket_bytes = int(bucket_bytes)
        #: Whether the last step was applied (False: refused as stale and dropped, or
        #: skipped by the session's non-finite policy); None before the first.
        self.last_step_applied: bool | None = None
        self._session: Session | None = None
        #: Per torch group: its tensors' names, the session's group name, and the
        #: hyperparameters the session has for it (what a step's options are relative to).
        self._names: list[list[str]] = []
        self._group_names: list[str] = []
        self._sent: list[dict[str, Any]] = []
        self._hyperparameters: tuple[str, ...] = ()
        #: Until construction ends, torch's add_param_group builds groups the session has.
        self._built = False
        self._staging: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._reset_overlap()
        try:
            if session is not None:
                self._attach(params, session, token)
            else:
                super().__init__(params, dict(options))
                self._create(optimizer, options, mode, schedule, nonfinite, name)
            self._by_name = dict(self._named())
            self._by_tensor = {p: n for n, p in self._by_name.items()}
            self._setup_overlap()
            self._built = True
        except BaseException:
            self.close(delete=session is None and self._session is not None)  # ours: gone
            raise

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def attach(
        cls,
        params: Iterable[Any],
        *,
        session: str,
        token: str | None,
        url: str | Sequence[str] = DEFAULT_URL,
        **kwargs: Any,
    ) -> RemoteOptimizer:
        """A worker's optimizer on an existing session: ``params`` (named as when the session
        was created) are put in the session's parameter groups and take its weights. Without
        ``token``, the client's admin key opens the session."""
        return cls(params, url=url, session=session, token=token, **kwargs)

    def _name_group(self, group: dict[str, Any], start: int) -> list[str]:
        names = group.get("param_names")
        if names is not None:
            return [str(n) for n in names]
        return [f"param{start + i}" for i in range(len(group["params"]))]

    def _check_dtypes(self, group: Mapping[str, Any], names: list[str]) -> None:
        for tensor_name, param in zip(names, group["params"], strict=True):
            if param.dtype not in _DTYPES:
                raise TypeError(
                    f"parameter {tensor_name!r} is {param.dtype}: the session steps float32 "
                    "and float64 parameters (keep a float32 master copy for mixed precision)"
                )

    def _create(
        self,
        optimizer: str,
        options: Mapping[str, Any],
        mode: str | Mapping[str, Any] | None,
        schedule: Mapping[str, Any] | None,
        nonfinite: str | None,
        name: str | None,
    ) -> None:
        count = 0
        groups = []
        weights: dict[str, np.ndarray] = {}
        for index, group in enumerate(self.param_groups):
            names = self._name_group(group, count)
            count += len(names)
            self._check_dtypes(group, names)
            self._names.append(names)
            self._group_names.append(str(index))
            extra = {k: _plain(v) for k, v in group.items() if k not in _GROUP_KEYS}
            groups.append({"name": str(index), "params": names, **extra})
            for tensor_name, param in zip(names, group["params"], strict=True):
                weights[tensor_name] = param.detach().cpu().numpy()
        config = {"name": optimizer, **{k: _plain(v) for k, v in options.items()}, "groups": groups}
        self._session = self._client.create_session(
            weights, config, mode=mode, schedule=schedule, name=name, nonfinite=nonfinite,
            dtype=None,
        )  # fmt: skip
        self._adopt(self._session.info())

    def _attach(self, params: Iterable[Any], session: str, token: str | None) -> None:
        params_given = list(params)
        given: list[tuple[str, torch.Tensor]] = []
        for index, item in enumerate(params_given):
            if isinstance(item, dict):
                raise TypeError(
                    "attach takes the model's parameters (named_parameters() or parameters()); "
                    "their groups are the session's"
                )
            given.append(item if isinstance(item, tuple) else (f"param{index}", item))
        self._session = self._client.session(session, token)
        info = self._session.info()
        by_name = dict(given)
        named = any(isinstance(item, tuple) for item in params_given)
        groups: list[dict[str, Any]] = []
        names_seen = set()
        for server_group in info["groups"]:
            names = [n for n in server_group["params"] if n in by_name]
            if not names:
                continue
            options = _hyperparameters(server_group["optimizer"])
            groups.append(
                {"params": [by_name[n] for n in names],
                 **{k: _torch_value(v) for k, v in options.items()}}
            )  # fmt: skip
            if named:
                groups[-1]["param_names"] = names
            self._names.append(names)
            self._group_names.append(server_group["name"])
            names_seen.update(names)
        missing = [n for n in by_name if n not in names_seen]
        if missing:
            held = [t["name"] for t in info["params"]]
            raise ValueError(
                f"parameter {missing[0]!r} is not in session {session!r}, which holds "
                f"{held[:10]}{' ...' if len(held) > 10 else ''}"
            )
        base = _hyperparameters(info["optimizer"])
        super().__init__(groups, {k: _torch_value(v) for k, v in base.items()})
        self._adopt(info)
        self._load_weights(self._session.pull())

    def _adopt(self, info: Mapping[str, Any]) -> None:
        """Fill ``defaults`` and every group with the session's hyperparameters, and take
        them as what the session has."""
        base = _hyperparameters(info["optimizer"])
        self._hyperparameters = tuple(base)
        self._mode = dict(info["mode"])
        for key, value in base.items():
            self.defaults.setdefault(key, _torch_value(value))
        by_name = {g["name"]: g for g in info["groups"]}
        self._sent = []
        for group, group_name in zip(self.param_groups, self._group_names, strict=True):
            effective = _hyperparameters(by_name[group_name]["optimizer"])
            for key, value in effective.items():
                group.setdefault(key, _torch_value(value))
            self._sent.append({k: _plain(v) for k, v in effective.items()})

    # --- the session ---------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        """The client's handle on the session."""
        if self._session is None:
            raise RuntimeError("the optimizer has no session (closed, or construction failed)")
        return self._session

    @property
    def session_id(self) -> str:
        return self.session.id

    @property
    def token(self) -> str | None:
        """The session's bearer token, for workers that :meth:`attach`."""
        return self.session.token

    @property
    def version(self) -> int:
        """The session's version the parameters' weights are from."""
        return self.session.version

    def close(self, *, delete: bool = False) -> None:
        """Stop using the session (``delete``: delete it on the server too)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if delete and self._session is not None:
            with contextlib.suppress(OptserverError):  # gone already
                self._session.delete()
        if getattr(self, "_owns_client", False):
            self._client.close()
            self._owns_client = False

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- steps -----------------------------------------------------------------------------------

    def _options(self) -> dict[str, dict[str, Any]]:
        """Per session group, the hyperparameters ``param_groups`` has changed (this step's)."""
        out: dict[str, dict[str, Any]] = {}
        for group, group_name, sent in zip(
            self.param_groups, self._group_names, self._sent, strict=True
        ):
            changed = {}
            for key, value in sent.items():
                now = _plain(group.get(key, value))
                if now != value:
                    changed[key] = now
            if changed:
                out[group_name] = changed
        return out

    def _host(self, grads: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The gradients as numpy arrays: views of CPU tensors; a device's copied to pinned
        host memory (one synchronization for all of them)."""
        out: dict[str, np.ndarray] = {}
        staged = False
        for tensor_name, grad in grads.items():
            if grad.is_sparse:
                raise TypeError(f"the gradient of {tensor_name!r} is sparse: push dense ones")
            if grad.device.type == "cpu":
                out[tensor_name] = grad.detach().contiguous().numpy()
                continue
            buffer = self._staging.get(tensor_name)
            if buffer is None or buffer.shape != grad.shape or buffer.dtype != grad.dtype:
                buffer = torch.empty(
                    grad.shape, dtype=grad.dtype, pin_memory=torch.cuda.is_available()
                )
                self._staging[tensor_name] = buffer
            buffer.copy_(grad.detach(), non_blocking=True)
            out[tensor_name] = buffer.numpy()
            staged = True
        if staged:
            torch.cuda.synchronize()
        return out

    def _named(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter with its tensor name in the session, group by group."""
        for group, names in zip(self.param_groups, self._names, strict=True):
            yield from zip(names, group["params"], strict=True)

    def _load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Write the session's weights into the parameters, in place."""
        with torch.no_grad():
            for tensor_name, param in self._named():
                value = weights.get(tensor_name)
                if value is not None:
                    param.copy_(torch.from_numpy(value).reshape(param.shape))

    def _gradients(self) -> dict[str, torch.Tensor]:
        return {name: p.grad for name, p in self._named() if p.grad is not None}

    def _push(
        self,
        grads: Mapping[str, np.ndarray],
        base_version: int,
        *,
        partial: bool = False,
        recompute: Callable[[], dict[str, np.ndarray] | None] | None = None,
    ) -> dict[str, np.ndarray] | None:
        """One push with ``train_step``'s handling of refusals: the same push again through an
        outage (``patience``) or a failed sync round; a stale refusal (ssp) pulls the
        session's weights into the model and calls ``recompute``, or drops the step (None:
        the caller loads the session's weights once)."""
        session = self.session
        retries = PushRetries(base_version, self.retries, self.patience)
        options = self._options()
        while True:
            try:
                answer = session.step(
                    grads, groups=options or None, base_version=retries.base_version,
                    worker=self.worker, return_="stepped", key=retries.key, partial=partial,
                )  # fmt: skip
                self.last_step_applied = session.last_applied
                return answer
            except OptserverError as error:
                action = retries.after(error, time.monotonic())
                if action == "outage":
                    time.sleep(OUTAGE_PAUSE_S)
                elif action == "recompute":
                    fresh = None
                    if recompute is not None:
                        self._load_weights(session.pull())
                        fresh = recompute()
                    if fresh is None:
                        self.last_step_applied = False
                        return None
                    grads = fresh
                    retries.recomputed(session.version)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Push the gradients, step on the server, write the new weights into the parameters.
        ``closure`` (re-evaluates the model, returns the loss) also recomputes gradients
        when the session refuses them as stale."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        def recompute() -> dict[str, np.ndarray] | None:
            if closure is None:
                return None
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                closure()
            return self._host(self._gradients())

        if self.overlap:
            self._finish_overlapped()
            return loss
        grads = self._host(self._gradients())
        if not grads:
            return loss  # as torch: parameters without a gradient are not stepped
        answer = self._push(
            grads, self.session.version, recompute=None if closure is None else recompute
        )
        self._load_weights(answer if answer is not None else self.session.pull())
        return loss

    # --- overlap with backward ---------------------------------------------------------------

    def _setup_overlap(self) -> None:
        if not self.overlap:
            return
        if self._mode.get("name") == "sync":
            raise ValueError(
                "overlap=True pushes a step in parts: it needs an async or ssp session (a sync "
                "round takes one whole push per worker)"
            )
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="optserver-overlap")
        for group in self.param_groups:
            for param in group["params"]:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))

    def _reset_overlap(self) -> None:
        self._bucket = _Bucket()
        self._sent_names: set[str] = set()
        self._pending: list[Future[dict[str, np.ndarray] | None]] = []
        self._final: Future[dict[str, np.ndarray] | None] | None = None
        self._base_version: int | None = None
        self._expected = 0

    def _on_grad(self, param: torch.Tensor) -> None:
        """A parameter's gradient is ready: add it to the bucket. A full bucket is pushed at
        once (a part of the step) but for its smallest gradient, which starts the next; the
        last gradient of the step pushes what remains as the step's completing push, and
        ``step()`` does if some parameter got no gradient."""
        tensor_name = self._by_tensor[param]
        with self._lock:
            if tensor_name in self._sent_names:
                raise RuntimeError(
                    f"the gradient of {tensor_name!r} was accumulated twice in one step: with "
                    "overlap=True each backward pushes its gradients (call step() after each "
                    "backward, or use overlap=False to accumulate)"
                )
            if self._base_version is None:  # the step's first gradient
                self._base_version = self.session.version
                self._expected = sum(
                    p.requires_grad for g in self.param_groups for p in g["params"]
                )
            self._sent_names.add(tensor_name)
            self._bucket.sizes[tensor_name] = param.nbytes
            if len(self._sent_names) >= self._expected:
                self._final = self._launch_final(self._bucket.names)
                self._bucket = _Bucket()
                return
            # The first bucket is small, as DDP's: the first push starts early in backward.
            limit = self.bucket_bytes if self._pending else min(self.bucket_bytes, FIRST_BUCKET)
            if self._bucket.nbytes >= limit and len(self._bucket.sizes) > 1:
                full, self._bucket = self._bucket.split()
                self._launch(full)

    def _launch(self, bucket: _Bucket) -> None:
        assert self._pool is not None and self._base_version is not None
        grads = self._host(self._grads_of(bucket.names))
        base = self._base_version

        def part() -> dict[str, np.ndarray] | None:
            answer = self._push(grads, base, partial=True)
            if answer is not None:
                # As torch's "optimizer step in backward": a parameter whose gradient is
                # accumulated is read by no later part of backward, and may change now (were
                # it saved for backward still, autograd would raise, not compute wrongly).
                self._load_weights(answer)
            return answer

        self._pending.append(self._pool.submit(part))

    def _launch_final(self, names: list[str]) -> Future[dict[str, np.ndarray] | None]:
        """The completing push, sent once every part before it is applied (the version
        advances with it: whoever sees the new version sees the whole step). A part refused
        as stale refuses the step: the session judges a step's parts as of its first one,
        so that none of them was applied either."""
        assert self._pool is not None and self._base_version is not None
        grads = self._host(self._grads_of(names))
        base, parts = self._base_version, list(self._pending)

        def complete() -> dict[str, np.ndarray] | None:
            for part in parts:
                if part.exception() is not None or part.result() is None:
                    return None  # step() raises the part's error, or resyncs
            return self._push(grads, base)

        return self._pool.submit(complete)

    def _grads_of(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The gradients of the parameters ``names`` (each has one: its hook saw it)."""
        out = {}
        for tensor_name in names:
            grad = self._by_name[tensor_name].grad
            assert grad is not None, tensor_name
            out[tensor_name] = grad
        return out

    def _finish_overlapped(self) -> None:
        """Wait for the step's pushes (each part's answer is written into its parameters as
        it comes) and write the completing push's answer into them."""
        with self._lock:
            final = self._final
            if final is None and self._base_version is not None:
                final = self._launch_final(self._bucket.names)
            pending = self._pending
            self._reset_overlap()
        if final is None:
            return  # no gradient this step
        dropped = False
        try:
            for future in pending:
                dropped = future.result() is None or dropped
        finally:
            answer = final.result()
        if answer is not None:
            self._load_weights(answer)
        if dropped or answer is None:
            self._load_weights(self.session.pull())  # a part was dropped as stale: resync

    # --- parameter groups ------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; after construction it also registers the group and
        its tensors with the session (their weights as they are)."""
        super().add_param_group(param_group)
        if not self._built:
            return  # construction: the session has (or gets) every group at once
        group = self.param_groups[-1]
        start = sum(len(n) for n in self._names)
        names = self._name_group(group, start)
        self._check_dtypes(group, names)
        group_name = str(len(self._group_names))
        options = {k: _plain(v) for k, v in group.items() if k not in _GROUP_KEYS}
        options = {k: v for k, v in options.items() if k in self._hyperparameters}
        self.session.update(optimizer={"groups": {group_name: {"params": names, **options}}})
        params = zip(names, group["params"], strict=True)
        self.session.set_params({n: p.detach().cpu().numpy() for n, p in params})
        self._names.append(names)
        self._group_names.append(group_name)
        self._adopt(self.session.info())
        for name, param in zip(names, group["params"], strict=True):
            self._by_tensor[param] = name
            self._by_name[name] = param
            if self.overlap:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))

    # --- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (``state`` by parameter index with torch's array names and a
        ``step``; ``param_groups`` with ``params`` as indices), from the session's export,
        and under ``"optserver"`` the session's record (version, mode, schedule), with which
        :meth:`load_state_dict` continues exactly."""
        arrays, metadata = decode_safetensors(self.session.export_state())
        record = decode_json(metadata[STATE_RECORD_KEY].encode())
        steps = dict(record.get("steps") or {})
        exported: dict[str, dict[str, torch.Tensor]] = {}
        for key, array in arrays.items():
            prefix, tensor_name, field = export_key(key)
            if prefix == STATE_PREFIX:  # a copy: the document's buffer is not kept
                exported.setdefault(tensor_name, {})[field[1:]] = torch.from_numpy(array.copy())
        state: dict[int, dict[str, Any]] = {}
        groups = []
        index = 0
        for group, names in zip(self.param_groups, self._names, strict=True):
            ids = []
            for tensor_name in names:
                entry: dict[str, Any] = exported.get(tensor_name, {})
                if tensor_name in steps:
                    entry["step"] = torch.tensor(float(steps[tensor_name]))
                if entry:
                    state[index] = entry
                ids.append(index)
                index += 1
            saved = {k: v for k, v in group.items() if k != "params"}
            groups.append({**saved, "params": ids})
        for key in ("steps", "private", "sharding"):
            record.pop(key, None)
        return {"state": state, "param_groups": groups, STATE_DICT_KEY: {"record": record}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s dict (or a ``torch.optim`` optimizer's of the
        same algorithm): the session is replaced by one imported from the parameters'
        current weights (load the model's first) and the saved state and options. The new
        session has a new id and token (:attr:`session_id`, :attr:`token`): load before
        other workers attach."""
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} parameter groups; this optimizer has "
                f"{len(self.param_groups)}"
            )
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"parameter group {i} has {len(group['params'])} parameters; the state "
                    f"dict's has {len(saved['params'])}"
                )
        saved_state = state_dict.get("state", {})
        tensors: dict[str, np.ndarray] = {}
        steps: dict[str, int] = {}
        groups = []
        for i, (saved, group, names) in enumerate(
            zip(saved_groups, self.param_groups, self._names, strict=True)
        ):
            for key, value in saved.items():
                if key not in _GROUP_KEYS:
                    group[key] = value
            options = {k: _plain(group[k]) for k in self._hyperparameters if k in group}
            groups.append({"name": str(i), "params": names, **options})
            for tensor_name, param, param_id in zip(
                names, group["params"], saved["params"], strict=True
            ):
                weights = param.detach().cpu().numpy()
                tensors[PARAMS_PREFIX + tensor_name] = weights
                for key, value in dict(saved_state.get(param_id, {})).items():
                    if key == "step":
                        steps[tensor_name] = int(_plain(value))
                    elif isinstance(value, torch.Tensor):
                        array = value.detach().cpu().numpy().astype(weights.dtype, copy=False)
                        tensors[f"{STATE_PREFIX}{tensor_name}/{key}"] = array
        info = self.session.info()
        record = dict(state_dict.get(STATE_DICT_KEY, {}).get("record") or {})
        record.setdefault("name", info["name"])
        record.setdefault("mode", info["mode"])
        record.setdefault("schedule", info["schedule"])
        record.setdefault("nonfinite", info["nonfinite"])
        record.setdefault("version", 0)
        base = {k: v for k, v in info["optimizer"].items() if k != "groups"}
        record["optimizer"] = {**base, "groups": groups}
        record["steps"] = steps
        metadata = {STATE_FORMAT_KEY: STATE_FORMAT, STATE_RECORD_KEY: encode_json(record).decode()}
        old = self.session
        self._session = self._client.import_state(encode(tensors, metadata))
        self._group_names = [str(i) for i in range(len(self.param_groups))]
        self._adopt(self._session.info())
        with contextlib.suppress(OptserverError):
            old.delete()
