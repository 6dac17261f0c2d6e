"""Sessions and the store that holds them: tensors, optimizer state, versions, credentials.

Thread-safe and synchronous; it knows nothing of HTTP frameworks. Every mutation of a session
happens under its lock and is validated completely before anything changes, so a rejected
request leaves weights, optimizer state and version exactly as they were. Errors are
:mod:`optserver.errors` problems.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np

from optserver.config import NonFinitePolicy
from optserver.errors import (
    Conflict,
    Forbidden,
    InsufficientStorage,
    InvalidTensor,
    LimitExceeded,
    NonfiniteResult,
    NotFound,
    ProblemError,
    StaleGradient,
    Unauthorized,
    UnprocessableContent,
)
from optserver.modes import AsyncMode, Mode, SSPMode, SyncMode
from optserver.optim import (
    FLOAT_DTYPES,
    HyperparameterError,
    Optimizer,
    OptState,
    TensorError,
    create,
)
from optserver.optim.base import check_fits, magnitude_bound
from optserver.optim.errors import NonFiniteStep
from optserver.optim.kernels import count_nonfinite, scan
from optserver.optim.schedules import Schedule, create_schedule
from optserver.replay import ReplayCache
from optserver.replies import Answer, Reply
from optserver.workers import StalenessHistogram, WorkerBook

__all__ = ["KEEP", "Push", "Reply", "RoundMember", "Session", "SessionStore", "StoreLimits"]


class _Keep(enum.Enum):
    KEEP = "keep"


#: "Leave unchanged", where None is a meaningful value (no schedule).
KEEP = _Keep.KEEP


@dataclass(frozen=True)
class StoreLimits:
    max_sessions: int = 1000
    max_tensors_per_session: int = 10_000
    max_tensor_elements: int = 1 << 28
    idempotency_keys: int = 256
    idempotency_bytes: int = 64 << 20
    #: Bytes of weights and optimizer state over all sessions (None: no quota).
    max_total_bytes: int | None = None


@dataclass
class Push:
    """One worker's gradient push, decoded."""

    grads: dict[str, np.ndarray]
    #: Current weights sent with the push (optimizer-as-a-service); unknown names register.
    params: dict[str, np.ndarray] = field(default_factory=dict)
    lr: float | None = None
    base_version: int | None = None
    worker: str | None = None


class Recorder(Protocol):
    """Where changes go to become durable (the data directory's journal). Each method returns
    a ticket: the change is durable once ``wait(ticket)`` returns.

    A change is recorded before it is made: if recording raises (a problem: the disk is full
    or failing), nothing changes. ``rejected`` is bookkeeping and never raises."""

    def created(self, session: Session) -> int: ...
    def params_put(
        self, session: Session, tensors: Mapping[str, np.ndarray], reset_state: bool
    ) -> int: ...
    def stepped(
        self, session: Session, push: Push, key: str | None, answer: Answer,
        fingerprint: str | None,
    ) -> int: ...  # fmt: skip
    def round_applied(self, session: Session, members: list[RoundMember]) -> int: ...
    def configured(self, session: Session) -> int: ...
    def deleted(self, session_id: str) -> int: ...
    def rejected(self, session: Session, reason: str, worker: str | None) -> None: ...
    def wait(self, ticket: int | None) -> None: ...
    def sync(self) -> None: ...


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Session:
    """One training job: named tensors, one optimizer, per-tensor state, a version."""

    def __init__(
        self,
        *,
        name: str,
        optimizer: Optimizer[Any, Any],
        schedule: Schedule | None,
        mode: Mode,
        nonfinite: NonFinitePolicy,
        limits: StoreLimits,
        token_digest: bytes,
        id: str | None = None,
    ) -> None:
        self.id = id or uuid.uuid4().hex
        self.name = name
        self.optimizer = optimizer
        self.schedule = schedule
        self.mode: Mode = mode
        self.nonfinite: NonFinitePolicy = nonfinite
        self.limits = limits
        self.token_digest = token_digest
        self.params: dict[str, np.ndarray] = {}
        self.state: OptState = {}
        self.version = 0
        self.steps_applied = 0
        self.pushes_received = 0
        self.rejected: Counter[str] = Counter()
        self.workers = WorkerBook()
        self.staleness = StalenessHistogram()
        self.created_at = self.updated_at = time.time()
        self.last_used = time.time()
        #: Set by the store when a data directory records changes; None while recovering.
        self.recorder: Recorder | None = None
        #: Set by the store: bytes held by all sessions, for the total-bytes quota.
        self.total_bytes: Callable[[], int] | None = None
        self._lock = threading.RLock()
        #: Answers by idempotency key (guarded by the session's lock).
        self.replays = ReplayCache(limits.idempotency_keys, limits.idempotency_bytes)

    # --- reading -----------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[Session]:
        """Hold the session still (e.g. while encoding its tensors)."""
        with self._lock:
            yield self

    def select(self, names: list[str] | None) -> dict[str, np.ndarray]:
        """Tensors by name (all when None), in the session's order; call under :meth:`locked`."""
        if names is None:
            return dict(self.params)
        missing = [n for n in names if n not in self.params]
        if missing:
            raise InvalidTensor(
                f"unknown tensor {missing[0]!r}; the session has {self._known()}",
                slug="unknown-tensor",
                tensor=missing[0],
            )
        return {n: self.params[n] for n in dict.fromkeys(names)}

    def _known(self) -> str:
        names = list(self.params)
        if not names:
            return "no tensors yet"
        shown = ", ".join(repr(n) for n in names[:10])
        return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")

    @property
    def base_lr(self) -> float:
        return float(self.optimizer.hparams.lr)

    def scheduled_lr(self) -> float:
        """The learning rate the next step will use (without a per-push override)."""
        if self.schedule is None:
            return self.base_lr
        return self.schedule.lr(self.base_lr, self.version)

    @property
    def memory_bytes(self) -> int:
        return sum(p.nbytes for p in self.params.values()) + sum(
            s.nbytes for s in self.state.values()
        )

    def tensor_info(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "shape": list(p.shape), "dtype": str(p.dtype), "step": self.state[n].step}
            for n, p in self.params.items()
        ]

    def nonfinite_tensors(self) -> list[str]:
        """Tensors whose weights or optimizer state hold NaN or Inf (only the ``allow``
        policy, or an import under it, can put them there)."""
        return [n for n, s in self.state.items() if s.nonfinite]

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {
                "id": self.id,
                "name": self.name,
                "version": self.version,
                "optimizer": self.optimizer.config(),
                "mode": self.mode.model_dump(),
                "schedule": None if self.schedule is None else self.schedule.config(),
                "lr": self.scheduled_lr(),
                "nonfinite": self.nonfinite,
                "nonfinite_tensors": self.nonfinite_tensors(),
                "params": self.tensor_info(),
                "counters": {
                    "steps_applied": self.steps_applied,
                    "pushes_received": self.pushes_received,
                    "pushes_rejected": sum(self.rejected.values()),
                    "rejected_by_reason": dict(self.rejected),
                    "staleness": self.staleness.to_dict(),
                },
                "workers": self.workers.to_dict(),
                "memory_bytes": self.memory_bytes,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
            }

    def counters(self) -> Counter[str]:
        """This session's counts, flat (``rejected:<reason>`` for rejections)."""
        counts = Counter(
            {"steps_applied": self.steps_applied, "pushes_received": self.pushes_received}
        )
        counts.update({f"rejected:{reason}": n for reason, n in self.rejected.items()})
        return counts

    # --- changing ------------------------------------------------------------------------

    def reject(self, reason: str, worker: str | None = None) -> None:
        """Count a push refused outside :meth:`step` (an undecodable body, a failed round)."""
        with self._lock:
            self.pushes_received += 1
            self._count_rejection(reason, worker)
            if self.recorder is not None:
                self.recorder.rejected(self, reason, worker)

    def _count_rejection(self, reason: str, worker: str | None) -> None:
        self.rejected[reason] += 1
        stats = self.workers.get(worker)
        if stats is not None:
            stats.pushes += 1
            stats.rejected[reason] += 1

    def configure(
        self,
        *,
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | _Keep | None = KEEP,
        mode: Mode | None = None,
        nonfinite: NonFinitePolicy | None = None,
    ) -> int | None:
        """Change hyperparameters, schedule (None removes it), mode or NaN policy.

        Returns the durability ticket (see :class:`Recorder`)."""
        with self._lock:
            new_optimizer = self.optimizer
            if optimizer is not None:
                changes = dict(optimizer)
                name = changes.pop("name", self.optimizer.name)
                if name != self.optimizer.name:
                    raise UnprocessableContent(
                        f"cannot change the optimizer from {self.optimizer.name!r} to {name!r}: "
                        "its state would not carry over; create a new session",
                        option="name",
                    )
                new_optimizer = _hyper(lambda: self.optimizer.with_options(changes))
                for dtype in {p.dtype for p in self.params.values()}:
                    _hyper(partial(new_optimizer.check_dtype, dtype))
            new_schedule = self.schedule
            if not isinstance(schedule, _Keep):
                new_schedule = _hyper(lambda: create_schedule(schedule))
            before = (self.optimizer, self.schedule, self.mode, self.nonfinite)
            self.optimizer, self.schedule = new_optimizer, new_schedule
            if mode is not None:
                self.mode = mode
            if nonfinite is not None:
                self.nonfinite = nonfinite
            try:
                ticket = None if self.recorder is None else self.recorder.configured(self)
            except BaseException:
                self.optimizer, self.schedule, self.mode, self.nonfinite = before
                raise
            if new_optimizer is not before[0]:
                for state in self.state.values():
                    state.unchecked = True  # the bound depends on the options; state unused
                    # until now (an option switched back on) was not checked either
            self.updated_at = time.time()
            return ticket

    def put_params(
        self, tensors: Mapping[str, np.ndarray], *, reset_state: bool = False
    ) -> int | None:
        """Set weights: same shape and dtype keep their optimizer state (unless
        ``reset_state``); a new shape or dtype, or a new name, starts fresh state."""
        with self._lock:
            self._check_new_tensors(tensors, replace_shapes=True)
            nonfinite = {name: bool(count_nonfinite(value)) for name, value in tensors.items()}
            if self.nonfinite != "allow":
                for name, bad in nonfinite.items():
                    if bad:
                        raise InvalidTensor(
                            f"weights {name!r} hold NaN or Inf values (nonfinite policy "
                            f"{self.nonfinite!r})",
                            slug="nonfinite",
                            tensor=name,
                        )
            ticket = None
            if self.recorder is not None:
                ticket = self.recorder.params_put(self, tensors, reset_state)
            for name, value in tensors.items():
                current = self.params.get(name)
                if (
                    current is not None
                    and current.shape == value.shape
                    and (current.dtype == value.dtype)
                ):
                    np.copyto(current, value)
                    state = self.state[name]
                    if reset_state:
                        state = self.state[name] = self.optimizer.init_tensor(current)
                    state.unchecked = True
                    # The flag is kept exact: only state that had NaN or Inf needs a look.
                    state.nonfinite = nonfinite[name] or (
                        state.nonfinite and state.holds_nonfinite()
                    )
                else:
                    self._register(name, value)
                    self.state[name].nonfinite = nonfinite[name]
            self.updated_at = time.time()
            return ticket

    def _register(self, name: str, value: np.ndarray) -> None:
        param = np.array(value, dtype=_param_dtype(value.dtype), order="C", copy=True)
        self.params[name] = param
        self.state[name] = self.optimizer.init_tensor(param)

    def _check_new_tensors(
        self, tensors: Mapping[str, np.ndarray], *, replace_shapes: bool
    ) -> None:
        new = [n for n in tensors if n not in self.params]
        if len(self.params) + len(new) > self.limits.max_tensors_per_session:
            raise LimitExceeded(
                f"session would hold {len(self.params) + len(new)} tensors; the limit is "
                f"{self.limits.max_tensors_per_session}",
                slug="too-many-tensors",
            )
        for name, value in tensors.items():
            if value.dtype.kind != "f":
                raise InvalidTensor(
                    f"tensor {name!r} has dtype {value.dtype}; parameters are float32 or float64",
                    tensor=name,
                    received=str(value.dtype),
                )
            if value.size > self.limits.max_tensor_elements:
                raise InvalidTensor(
                    f"tensor {name!r} has {value.size} elements; the limit is "
                    f"{self.limits.max_tensor_elements}",
                    slug="tensor-too-large",
                    tensor=name,
                )
            current = self.params.get(name)
            if current is not None and not replace_shapes:
                _check_same(name, "weights", value, current)
            dtype = _param_dtype(value.dtype)
            if current is None or current.dtype != dtype:
                _hyper(partial(self.optimizer.check_dtype, dtype))
        self._check_quota(tensors)

    def _check_quota(self, tensors: Mapping[str, np.ndarray]) -> None:
        """507 if the new or resized tensors (with their optimizer state) would not fit."""
        quota = self.limits.max_total_bytes
        if quota is None or self.total_bytes is None:
            return
        added = 0
        for name, value in tensors.items():
            current = self.params.get(name)
            if current is not None and current.shape == value.shape:
                continue
            nbytes = value.size * _param_dtype(value.dtype).itemsize
            added += nbytes * (1 + self.optimizer.state_arrays()) - (
                0 if current is None else current.nbytes + self.state[name].nbytes
            )
        held = self.total_bytes()
        if added > 0 and held + added > quota:
            raise InsufficientStorage(
                f"the server holds {held} bytes of tensors and optimizer state; these tensors "
                f"would add {added}, over the quota of {quota}",
                held=held,
                needed=added,
                quota=quota,
            )

    def _check_finite(
        self, name: str, value: np.ndarray, dtype: np.dtype[Any], what: str
    ) -> tuple[bool, bool]:
        """False if the push should be skipped (raises under the reject policy), and whether
        a value is outside the magnitude bound of ``dtype`` (see :mod:`optserver.optim.base`)."""
        if self.nonfinite == "allow":
            return True, True  # nothing is guarded under allow: no need to know
        bad, large = scan(value, magnitude_bound(dtype))
        if not bad:
            return True, large
        if self.nonfinite == "skip":
            return False, True
        raise InvalidTensor(
            f"{what} {name!r} holds {bad} NaN or Inf value{'s' if bad > 1 else ''} "
            "(this session's nonfinite policy is 'reject')",
            slug="nonfinite",
            tensor=name,
        )

    def _update(
        self,
        grads: Mapping[str, np.ndarray],
        pushed: Mapping[str, np.ndarray],
        lr: float | None,
        large: Collection[str],
    ) -> bool:
        """Set the pushed weights and step; under ``reject`` and ``skip`` a step that would
        leave NaN or Inf anywhere is undone whole: False under ``skip``, 422 under ``reject``."""
        finite = self.nonfinite != "allow"
        registered = [n for n in pushed if n not in self.params]
        saved: dict[str, np.ndarray] = {}  # the weights a refusal restores
        # A new tensor is always guarded; otherwise ask whether any is: if none, none can fail.
        if (
            finite
            and pushed
            and (
                registered
                or self.optimizer.guarded(
                    grads, self.state, {**self.params, **pushed}, lr=lr, large=large
                )
            )
        ):
            saved = {n: self.params[n].copy() for n in pushed if n in self.params}
        for name, value in pushed.items():
            if name in self.params:
                np.copyto(self.params[name], value)
            else:
                self._register(name, value)
        try:
            self.optimizer.update(grads, self.state, self.params, lr=lr, finite=finite, large=large)
        except NonFiniteStep as exc:
            for name, old in saved.items():
                np.copyto(self.params[name], old)
            for name in registered:
                del self.params[name], self.state[name]
            if self.nonfinite == "skip":
                return False
            raise NonfiniteResult(
                f"{exc} (nonfinite policy 'reject': lower lr, clip the gradients, or check "
                "eps and the weights)",
                tensor=exc.tensor,
            ) from None
        return True

    def step(
        self, push: Push, *, key: str | None, answer: Answer, fingerprint: str | None = None
    ) -> Reply:
        """Apply one push (or replay the answer to an earlier push with the same key and
        ``fingerprint``; the same key with another fingerprint is refused)."""
        with self._lock:
            try:
                replayed = self.replay(key, answer, fingerprint)
            except ProblemError as exc:
                self.pushes_received += 1
                self._count_rejection(exc.slug, push.worker)
                raise
            if replayed is not None:
                return replayed
            self.pushes_received += 1
            try:
                lr, apply, large = self._validate(push)
            except ProblemError as exc:
                self._count_rejection(exc.slug, push.worker)
                raise
            ticket = None
            if self.recorder is not None:
                try:
                    ticket = self.recorder.stepped(self, push, key, answer, fingerprint)
                except ProblemError as exc:
                    self._count_rejection(exc.slug, push.worker)
                    raise
            if apply:
                lr = self._staleness_scaled(push, lr)
                try:
                    apply = self._update(push.grads, push.params, lr, large)
                except ProblemError as exc:
                    self._count_rejection(exc.slug, push.worker)
                    raise
                if apply:
                    self._applied([push])
                else:
                    self._count_rejection("nonfinite-result", push.worker)
            else:
                self._count_rejection("nonfinite-skipped", push.worker)
            chosen = answer.names(push.grads, self.params)
            tensors = {n: self.params[n] for n in chosen}
            reply = answer(self.version, apply, tensors).with_ticket(ticket)
            if key is not None:
                self.replays.remember(key, reply, answer, tensors, apply, fingerprint)
            return reply

    def _staleness_scaled(self, push: Push, lr: float | None) -> float | None:
        """ssp with ``staleness_scaling: inverse``: lr/(1+s) for a gradient s steps stale."""
        if (
            push.base_version is None
            or not isinstance(self.mode, SSPMode)
            or self.mode.staleness_scaling != "inverse"
        ):
            return lr
        staleness = self.version - push.base_version
        return (self.scheduled_lr() if lr is None else lr) / (1 + staleness)

    def _applied(self, pushes: list[Push]) -> None:
        """Bookkeeping of one applied step made of ``pushes`` (one, or a sync round's)."""
        for push in pushes:
            stats = self.workers.get(push.worker)
            if push.base_version is not None:
                staleness = self.version - push.base_version
                self.staleness.observe(staleness)
                if stats is not None:
                    stats.staleness.observe(staleness)
            if stats is not None:
                stats.pushes += 1
                stats.applied += 1
                stats.last_base_version = push.base_version
                stats.last_version = self.version + 1
        self.version += 1
        self.steps_applied += 1
        self.updated_at = time.time()

    def check(self, push: Push) -> None:
        """Validate a push without applying it (a sync round checks each push on arrival)."""
        with self._lock:
            try:
                self._validate(push)
            except ProblemError as exc:
                self.pushes_received += 1
                self._count_rejection(exc.slug, push.worker)
                raise

    def apply_round(self, members: list[RoundMember]) -> list[Reply]:
        """One step with the mean of the members' gradients (a sync round); each member gets
        its own answer. Raises, applying nothing, if any push no longer fits. Under the
        ``skip`` policy a member whose gradient holds NaN or Inf is left out of the mean (and
        answered with ``applied: false``); if every member is left out, nothing is applied."""
        with self._lock:
            self.pushes_received += len(members)
            lr: float | None = None
            finite: list[bool] = []
            large: set[str] = set()
            try:
                for member in members:
                    member_lr, member_finite, member_large = self._validate(member.push)
                    lr = member_lr if lr is None else lr
                    finite.append(member_finite)
                    large |= member_large
            except ProblemError as exc:
                for member in members:
                    self._count_rejection(exc.slug, member.push.worker)
                raise
            ticket = None
            if self.recorder is not None:
                try:
                    ticket = self.recorder.round_applied(self, members)
                except ProblemError as exc:
                    for member in members:
                        self._count_rejection(exc.slug, member.push.worker)
                    raise
            contributing = [m for m, ok in zip(members, finite, strict=True) if ok]
            for member, ok in zip(members, finite, strict=True):
                if not ok:
                    self._count_rejection("nonfinite-skipped", member.push.worker)
            if contributing:
                try:
                    stepped = self._update(_mean(contributing, self.params), {}, lr, large)
                except ProblemError as exc:
                    for member in contributing:
                        self._count_rejection(exc.slug, member.push.worker)
                    raise
                if stepped:
                    self._applied([m.push for m in contributing])
                else:
                    for member in contributing:
                        self._count_rejection("nonfinite-result", member.push.worker)
                    finite = [False] * len(members)
            replies = []
            for member, applied in zip(members, finite, strict=True):
                chosen = member.answer.names(member.push.grads, self.params)
                tensors = {n: self.params[n] for n in chosen}
                reply = member.answer(self.version, applied, tensors).with_ticket(ticket)
                if member.key is not None:
                    self.replays.remember(
                        member.key, reply, member.answer, tensors, applied, member.fingerprint
                    )
                replies.append(reply)
            return replies

    def _validate(self, push: Push) -> tuple[float | None, bool, set[str]]:
        """The push's learning rate, whether to apply it (False: skipped under ``skip``), and
        the tensors whose gradient or weights are outside the magnitude bound; raises a
        problem, changing nothing, if the push cannot be applied."""
        if not push.grads:
            raise InvalidTensor("the push carries no gradients", slug="no-gradients")
        if isinstance(self.mode, SSPMode) and push.base_version is not None:
            staleness = self.version - push.base_version
            if staleness > self.mode.max_staleness:
                raise StaleGradient(
                    f"gradient computed on version {push.base_version} is {staleness} steps "
                    f"behind version {self.version}; max_staleness is "
                    f"{self.mode.max_staleness}: pull and retry",
                    current_version=self.version,
                    base_version=push.base_version,
                )
        if isinstance(self.mode, SyncMode):
            if not push.worker:
                raise UnprocessableContent(
                    "sync mode needs the pushing worker's id ('worker'): a round takes one "
                    "gradient per worker",
                    slug="worker-required",
                )
            if push.params:
                raise UnprocessableContent(
                    "sync mode takes gradients only: weights cannot be sent with a push",
                    slug="params-in-sync-round",
                )
            if push.base_version is not None and push.base_version < self.version:
                raise StaleGradient(
                    f"gradient computed on version {push.base_version} is late: its round "
                    f"closed; the session is at version {self.version}: pull and retry",
                    current_version=self.version,
                    base_version=push.base_version,
                )
        if push.base_version is not None and push.base_version > self.version:
            raise Conflict(
                f"base_version {push.base_version} is ahead of the session's version "
                f"{self.version}",
                slug="future-version",
                current_version=self.version,
            )
        lr = None
        if push.lr is not None:
            stepped = (push.params.get(n, self.params.get(n)) for n in push.grads)
            dtypes = {_param_dtype(p.dtype) for p in stepped if p is not None}
            _hyper(lambda: self.optimizer.check_lr(push.lr, dtypes))  # type: ignore[arg-type]
            lr = push.lr
        elif self.schedule is not None:
            lr = self.scheduled_lr()
        extra = [n for n in push.params if n not in push.grads]
        if extra:
            raise InvalidTensor(
                f"weights {extra[0]!r} were sent without a gradient", tensor=extra[0]
            )
        self._check_new_tensors(push.params, replace_shapes=False)
        apply, large = True, set()
        for name, value in push.params.items():
            ok, outside = self._check_finite(name, value, _param_dtype(value.dtype), "weights")
            apply = ok and apply
            if outside:
                large.add(name)
        for name, grad in push.grads.items():
            param = push.params.get(name, self.params.get(name))
            if param is None:
                raise InvalidTensor(
                    f"gradient {name!r} names no tensor; the session has {self._known()} "
                    "(send its weights as params to register it)",
                    slug="unknown-tensor",
                    tensor=name,
                )
            _check_same(name, "gradient", grad, param)
            ok, outside = self._check_finite(name, grad, _param_dtype(param.dtype), "gradient")
            apply = ok and apply
            if outside:
                large.add(name)
        return lr, apply, large

    def replay(
        self, key: str | None, answer: Answer, fingerprint: str | None = None
    ) -> Reply | None:
        """The answer to an earlier push with this idempotency key, encoded as ``answer``
        asks, or None; 422 if the key came with a different ``fingerprint``."""
        with self._lock:
            return self.replays.replay(key, answer, fingerprint, self.params)

    def authorize(self, token: str | None, admin_key: str | None) -> None:
        """Raise unless ``token`` is this session's token or the admin key."""
        if token is None:
            raise Unauthorized("this route needs 'Authorization: Bearer <session token>'")
        if admin_key is not None and hmac.compare_digest(token.encode(), admin_key.encode()):
            return
        if not hmac.compare_digest(_digest(token), self.token_digest):
            raise Unauthorized(f"the token does not open session {self.id}")


@dataclass
class RoundMember:
    """One push of a sync round, with what its answer should carry."""

    push: Push
    key: str | None
    answer: Answer
    fingerprint: str | None = None


def _mean(members: list[RoundMember], params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per tensor, the mean of the gradients the members sent for it (in its dtype)."""
    sums: dict[str, np.ndarray] = {}
    counts: Counter[str] = Counter()
    for member in members:
        for name, grad in member.push.grads.items():
            if name in sums:
                np.add(sums[name], grad, out=sums[name])
            else:
                sums[name] = np.array(grad, dtype=params[name].dtype, copy=True)
            counts[name] += 1
    for name, total in sums.items():
        np.divide(total, total.dtype.type(counts[name]), out=total)
    return sums


def _check_same(name: str, what: str, value: np.ndarray, param: np.ndarray) -> None:
    """The core's shape and dtype check, as a problem with the mismatch's details."""
    try:
        check_fits(name, what, value, param.shape, _param_dtype(param.dtype))
    except TensorError as exc:
        slug = f"{exc.mismatch}-mismatch" if exc.mismatch else "invalid-tensor"
        raise InvalidTensor(
            str(exc), slug=slug, tensor=name, expected=exc.expected, received=exc.received
        ) from None


def _param_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Parameters are float32 or float64; float16 weights are stored as float32."""
    dtype = np.dtype(dtype).newbyteorder("=")
    return dtype if dtype in FLOAT_DTYPES else np.dtype(np.float32)


def _hyper(build: Callable[[], Any]) -> Any:
    """Run a hyperparameter-validating call; its errors become 422 problems."""
    try:
        return build()
    except HyperparameterError as exc:
        raise UnprocessableContent(
            str(exc), slug="invalid-hyperparameter", option=exc.option
        ) from None


_DELETED_KEPT = 10_000


class SessionStore:
    """All sessions of a server, with their credentials."""

    def __init__(self, limits: StoreLimits | None = None, admin_key: str | None = None) -> None:
        self.limits = limits or StoreLimits()
        self.admin_key = admin_key
        self.recorder: Recorder | None = None
        #: Counters of deleted sessions, so that the server's totals never go down.
        self._retired: Counter[str] = Counter()
        self._sessions: dict[str, Session] = {}
        self._owners: dict[bytes, str] = {}  # token digest -> session id, to answer 403
        #: Digests of deleted sessions' tokens (bounded): their holders get 404, not 401.
        self._deleted: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def totals(self) -> dict[str, Any]:
        """Steps applied, pushes received and rejections by reason, over every session this
        server has held (since it started)."""
        counts = Counter(self._retired)
        for session in self.sessions():
            with session.locked():
                counts.update(session.counters())
        rejected = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("rejected:")}
        return {
            "steps_applied": counts["steps_applied"],
            "pushes_received": counts["pushes_received"],
            "rejected": rejected,
        }

    def total_bytes(self) -> int:
        # Without the store's lock: callers hold a session's lock (lock order: store first).
        return sum(s.memory_bytes for s in list(self._sessions.values()))

    def set_recorder(self, recorder: Recorder | None) -> None:
        """Record every change from now on (None: stop, e.g. while replaying the journal)."""
        with self._lock:
            self.recorder = recorder
            for session in self._sessions.values():
                session.recorder = recorder

    def sync(self) -> None:
        """Wait until every change recorded so far is durable."""
        if self.recorder is not None:
            self.recorder.sync()

    @staticmethod
    def new_token() -> tuple[str, bytes]:
        """A fresh session token and the digest that is all the server keeps of it."""
        token = secrets.token_urlsafe(32)
        return token, _digest(token)

    def create(
        self,
        *,
        optimizer: str | Mapping[str, Any],
        name: str | None = None,
        mode: Mode | None = None,
        schedule: Mapping[str, Any] | str | None = None,
        nonfinite: NonFinitePolicy = "reject",
        params: Mapping[str, np.ndarray] | None = None,
        id: str | None = None,
        dtype: np.dtype[Any] | None = None,
    ) -> tuple[Session, str]:
        """A new session and its token (the only time the token is seen in clear). ``dtype``:
        the weights' dtype the session is declared for (its hyperparameters must be finite
        in it)."""
        token, digest = self.new_token()
        built = _hyper(lambda: create(optimizer))
        if dtype is not None:
            _hyper(lambda: built.check_dtype(_param_dtype(dtype)))
        session = Session(
            name=name or "",
            optimizer=built,
            schedule=_hyper(lambda: create_schedule(schedule)),
            mode=mode or AsyncMode(),
            nonfinite=nonfinite,
            limits=self.limits,
            token_digest=digest,
            id=id,
        )
        session.total_bytes = self.total_bytes
        if params:
            session.put_params(params)
        self.add(session)
        return session, token

    def add(self, session: Session) -> None:
        """Hold ``session`` (new, imported or recovered) and record it."""
        session.total_bytes = self.total_bytes
        quota = self.limits.max_total_bytes
        if quota is not None and self.total_bytes() + session.memory_bytes > quota:
            raise InsufficientStorage(
                f"the server holds {self.total_bytes()} bytes; this session would add "
                f"{session.memory_bytes}, over the quota of {quota}",
                quota=quota,
            )
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise LimitExceeded(
                    f"the server holds {len(self._sessions)} sessions, its limit; delete one first",
                    slug="too-many-sessions",
                )
            if session.id in self._sessions:
                raise Conflict(f"session {session.id} exists already")
            if self.recorder is not None:
                with session.locked():
                    self.recorder.created(session)
            self._sessions[session.id] = session
            self._owners[session.token_digest] = session.id
            session.recorder = self.recorder

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}", slug="unknown-session")
        return session

    def open(self, session_id: str, token: str | None) -> Session:
        """The session, if ``token`` opens it (401 wrong or missing, 403 another's token).

        Credentials are checked before existence: without a valid token (this or another
        session's, or the admin key) the answer is 401 whether or not the session exists, so
        ids cannot be probed."""
        session = self._sessions.get(session_id)
        if session is None:
            if token is None:
                raise Unauthorized("this route needs 'Authorization: Bearer <session token>'")
            admin = self.admin_key is not None and hmac.compare_digest(
                token.encode(), self.admin_key.encode()
            )
            digest = _digest(token)
            if not admin and digest not in self._owners and digest not in self._deleted:
                raise Unauthorized(f"the token does not open session {session_id}")
            raise NotFound(f"no session {session_id!r}", slug="unknown-session")
        try:
            session.authorize(token, self.admin_key)
            session.last_used = time.time()
        except Unauthorized:
            owner = self._owners.get(_digest(token)) if token is not None else None
            if owner is not None:
                raise Forbidden(
                    f"this token belongs to another session, not to {session_id}"
                ) from None
            raise
        return session

    def check_admin(self, token: str | None) -> None:
        """Raise unless the admin key is configured-off or presented."""
        if self.admin_key is None:
            return
        if token is None:
            raise Unauthorized("this route needs 'Authorization: Bearer <admin key>'")
        if not hmac.compare_digest(token.encode(), self.admin_key.encode()):
            raise Unauthorized("the token is not the admin key")

    def delete(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise NotFound(f"no session {session_id!r}", slug="unknown-session")
            if self.recorder is not None:
                self.recorder.deleted(session_id)
            del self._sessions[session_id]
            self._owners.pop(session.token_digest, None)
            self._deleted[session.token_digest] = None
            if len(self._deleted) > _DELETED_KEPT:
                self._deleted.popitem(last=False)
            session.recorder = None
            with session.locked():
                self._retired.update(session.counters())

    def expire(self, idle_s: float) -> list[str]:
        """Delete the sessions nobody has used for ``idle_s`` seconds; their ids."""
        cutoff = time.time() - idle_s
        gone = []
        for session in self.sessions():
            if max(session.last_used, session.updated_at) < cutoff:
                try:
                    self.delete(session.id)
                except NotFound:
                    continue
                except ProblemError:  # the journal cannot record it now: the next round retries
                    continue
                gone.append(session.id)
        return gone
