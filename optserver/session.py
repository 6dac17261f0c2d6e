"""One training job: named tensors, one optimizer, per-tensor state, a version, and the
mutations that change them.

Thread-safe and synchronous; it knows nothing of HTTP and encodes nothing. The session's lock
(an ``RLock``) protects everything it holds: weights, optimizer state, version, options,
counters, worker statistics and the idempotency memory. Each mutation, under the lock:

1. admits the change (:mod:`optserver.admission`): nothing changes if it is refused;
2. records it with the :class:`~optserver.push.Recorder` (journal before apply): if that
   raises, nothing changes;
3. applies it, and for a push freezes the weights its answer carries
   (:class:`~optserver.frozen.Frozen`), which are encoded after the lock is released.

Over 400 lines on purpose: the mutations share one lock, one set of invariants (a refused
change leaves everything as it was) and the bookkeeping of rejections; split across modules
they would have to reach into each other's state.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from optserver_client.vocabulary import ProblemSlug

from optserver.admission import (
    admit,
    check_weights,
    hyper,
    known_names,
    param_dtype,
    prepare,
)
from optserver.config import NonFinitePolicy
from optserver.errors import InvalidTensor, NonfiniteResult, ProblemError, UnprocessableContent
from optserver.frozen import Frozen
from optserver.modes import Mode
from optserver.optim import OptState
from optserver.optim.errors import NonFiniteStep
from optserver.optim.groups import GroupPlan, ParamGroup, ParamGroups
from optserver.optim.schedules import Schedule, create_schedule
from optserver.push import Outcome, Push, Recorder, RoundMember
from optserver.replay import ReplayCache
from optserver.replies import Answer
from optserver.sharding import Sharding
from optserver.workers import OpenStep, StalenessHistogram, WorkerBook

__all__ = ["KEEP", "SKIPPED", "Session", "SessionLimits"]


class _Keep(enum.Enum):
    KEEP = "keep"


#: "Leave unchanged", where None is a meaningful value (no schedule).
KEEP = _Keep.KEEP
#: The rejection reason of a push acknowledged but not applied (``skip`` policy): a counter's
#: name, not a problem.
SKIPPED = "nonfinite-skipped"


@dataclass(frozen=True)
class SessionLimits:
    """What one session may hold (from :class:`~optserver.store.StoreLimits`)."""

    max_tensors_per_session: int
    max_tensor_elements: int
    idempotency_keys: int
    idempotency_bytes: int
    max_total_bytes: int | None


class Session:
    """One training job: named tensors, one optimizer, per-tensor state, a version."""

    def __init__(
        self,
        *,
        name: str,
        optimizer: ParamGroups,
        schedule: Schedule | None,
        mode: Mode,
        nonfinite: NonFinitePolicy,
        limits: SessionLimits,
        token_digest: bytes,
        id: str | None = None,
        sharding: Sharding | None = None,
    ) -> None:
        self.id = id or uuid.uuid4().hex
        #: Its part of a sharded session (see :mod:`optserver.sharding`), or None.
        self.sharding = sharding
        self.name = name
        #: The optimizer and its parameter groups.
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
        """Hold the session still (e.g. while reading several of its fields)."""
        with self._lock:
            yield self

    def select(self, names: list[str] | None) -> dict[str, np.ndarray]:
        """Tensors by name (all when None), in the session's order; call under :meth:`locked`
        (they are the session's own arrays: they change with the next step)."""
        if names is None:
            return dict(self.params)
        missing = [n for n in names if n not in self.params]
        if missing:
            raise InvalidTensor(
                f"unknown tensor {missing[0]!r}; the session has {known_names(self.params)}",
                slug=ProblemSlug.UNKNOWN_TENSOR,
                tensor=missing[0],
            )
        return {n: self.params[n] for n in dict.fromkeys(names)}

    def pull(self, names: list[str] | None) -> tuple[int, Frozen]:
        """The version and copies of the tensors :meth:`select` names, taken together."""
        with self._lock:
            return self.version, Frozen(self.select(names))

    @property
    def base_lr(self) -> float:
        return float(self.optimizer.hparams.lr)

    def scheduled_lr(self, group: ParamGroup | None = None) -> float:
        """The learning rate the next step will use (without a per-push override), in
        ``group`` (None: the base's): the schedule scales each group's own rate."""
        lr = self.base_lr if group is None else float(group.optimizer.hparams.lr)
        if self.schedule is None:
            return lr
        return self.schedule.lr(lr, self.version)

    @property
    def memory_bytes(self) -> int:
        return sum(p.nbytes for p in self.params.values()) + sum(
            s.nbytes for s in self.state.values()
        )

    def tensor_info(self) -> list[dict[str, Any]]:
        group_of = self.optimizer.group_of
        return [
            {
                "name": n, "shape": list(p.shape), "dtype": str(p.dtype),
                "step": self.state[n].step, "group": group_of(n).name,
            }
            for n, p in self.params.items()
        ]  # fmt: skip

    def group_info(self) -> list[dict[str, Any]]:
        """Each parameter group (``default`` last): its tensors, its options as they are
        (the base's with its overrides) and the learning rate its next step will use."""
        members = self.optimizer.members(self.params)
        return [
            {
                "name": group.name,
                "params": members[group.name],
                "optimizer": group.optimizer.config(),
                "lr": self.scheduled_lr(group),
            }
            for group in (*self.optimizer.groups, self.optimizer.default)
        ]

    def nonfinite_tensors(self) -> list[str]:
        """Tensors whose weights or optimizer state hold NaN or Inf (only the ``allow``
        policy, or an import under it, can put them there)."""
        return [n for n, s in self.state.items() if s.nonfinite]

    def info(self) -> dict[str, Any]:
        """Everything ``GET /v1/sessions/{id}`` shows (shaped by ``schemas.SessionInfo``)."""
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
                "groups": self.group_info(),
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
                "sharding": None if self.sharding is None else self.sharding.model_dump(),
            }

    def counters(self) -> Counter[str]:
        """This session's counts, flat (``rejected:<reason>`` for rejections)."""
        counts = Counter(
            {"steps_applied": self.steps_applied, "pushes_received": self.pushes_received}
        )
        counts.update({f"rejected:{reason}": n for reason, n in self.rejected.items()})
        return counts

    # --- bookkeeping ---------------------------------------------------------------------

    def reject(self, reason: str, worker: str | None = None) -> None:
        """Count a push refused outside :meth:`step` (an undecodable body, a failed round)."""
        with self._lock:
            self.pushes_received += 1
            self._count_rejection(reason, worker)
            if self.recorder is not None:
                self.recorder.rejected(self, str(reason), worker)

    def _count_rejection(self, reason: str, worker: str | None) -> None:
        reason = str(reason)  # a plain str, also for a ProblemSlug: counters become JSON keys
        self.rejected[reason] += 1
        stats = self.workers.get(worker)
        if stats is not None:
            stats.pushes += 1
            stats.rejected[reason] += 1

    @contextmanager
    def _counting(self, workers: Collection[str | None]) -> Iterator[None]:
        """Count a problem raised inside as a rejection of each of ``workers``' pushes."""
        try:
            yield
        except ProblemError as exc:
            for worker in workers:
                self._count_rejection(exc.slug, worker)
            raise

    def judged_version(self, push: Push) -> int:
        """The version at which ``push`` is admitted (ssp's staleness) and its rate set (the
        schedule's, ssp's scaling): the session's; but the version of the first part for the
        other parts of a worker's step pushed in parts (the same worker and ``base_version``,
        up to its completing push), so that a step is admitted or refused whole, at one rate,
        whatever other workers push between its parts."""
        stats = self.workers.peek(push.worker)
        open_step = None if stats is None else stats.open_step
        if open_step is not None and open_step.base_version == push.base_version:
            return open_step.version
        return self.version

    def _applied(self, pushes: list[Push], *, partial: bool = False) -> None:
        """Bookkeeping of one applied step made of ``pushes`` (one, or a sync round's);
        ``partial``: a part of a worker's step that a later push completes (the version
        counts whole steps)."""
        for push in pushes:
            # A part opens (or continues) its step at the version it was judged at.
            opened = OpenStep(push.base_version, self.judged_version(push)) if partial else None
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
                stats.last_version = self.version + (not partial)
                stats.open_step = opened
        self.updated_at = time.time()
        if partial:
            return
        self.version += 1
        self.steps_applied += 1

    # --- options and weights ---------------------------------------------------------------

    def configure(
        self,
        *,
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | _Keep | None = KEEP,
        mode: Mode | None = None,
        nonfinite: NonFinitePolicy | None = None,
    ) -> int | None:
        """Change hyperparameters, schedule (None removes it), mode or NaN policy.

        Returns the durability ticket (see :class:`~optserver.push.Recorder`)."""
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
                new_optimizer = hyper(partial(self.optimizer.with_options, changes))
                for dtype in {p.dtype for p in self.params.values()}:
                    hyper(partial(new_optimizer.check_dtype, dtype))
            new_schedule = self.schedule
            if not isinstance(schedule, _Keep):
                new_schedule = hyper(partial(create_schedule, schedule))
            before = (self.optimizer, self.schedule, self.mode, self.nonfinite)
            self.optimizer, self.schedule = new_optimizer, new_schedule
            if mode is not None:
                self.mode = mode
            if nonfinite is not None:
                self.nonfinite = nonfinite
            try:  # the journal records the new options: set them, and put them back on failure
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
            nonfinite = check_weights(self, tensors)
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
                        state = self.state[name] = self.optimizer.init_tensor(name, current)
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

    def restore_tensor(self, name: str, *, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace a tensor's optimizer state by an exported one (import, recovery)."""
        with self._lock:
            param = self.params[name]
            state = self.state[name] = self.optimizer.restore_tensor(
                name, param, step=step, arrays=arrays
            )
            state.nonfinite = state.holds_nonfinite(param)

    def _register(self, name: str, value: np.ndarray) -> None:
        param = np.array(value, dtype=param_dtype(value.dtype), order="C", copy=True)
        self.params[name] = param
        self.state[name] = self.optimizer.init_tensor(name, param)

    # --- pushes ----------------------------------------------------------------------------

    def replay(self, key: str | None, answer: Answer, fingerprint: str | None) -> Outcome | None:
        """The outcome of an earlier push with this idempotency key, or None; 422 if the key
        came with a different ``fingerprint``."""
        with self._lock:
            memo = self.replays.lookup(key, fingerprint)
            if memo is None:
                return None
            tensors = memo.tensors
            if tensors is None:  # too large to keep: the weights it named, as they are now
                tensors = Frozen({n: self.params[n] for n in memo.names if n in self.params})
            return Outcome(
                memo.version, memo.applied, tensors, Answer(answer.fmt, memo.returns),
                memo.ticket, replayed=True,
            )  # fmt: skip

    def step(
        self, push: Push, *, key: str | None, answer: Answer, fingerprint: str | None = None
    ) -> Outcome:
        """Apply one push (or replay the outcome of an earlier push with the same key and
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
            with self._counting([push.worker]):
                admitted = admit(self, push)
                ticket = None
                if self.recorder is not None:
                    ticket = self.recorder.stepped(self, push, key, answer, fingerprint)
                apply = admitted.apply
                if apply:
                    apply = self._update(admitted.plan, push.params, admitted.large)
            if apply:
                self._applied([push], partial=push.partial)
            else:
                self._count_rejection(
                    SKIPPED if not admitted.apply else ProblemSlug.NONFINITE_RESULT, push.worker
                )
            return self._outcome(push, key, answer, fingerprint, apply, ticket)

    def try_step(
        self, push: Push, *, key: str | None, answer: Answer, fingerprint: str | None = None
    ) -> Outcome | None:
        """:meth:`step`, if the session's lock is free at once; None otherwise (the caller then
        steps in a worker thread). For an event loop stepping a small push itself: it must
        never wait for the lock, which a pull or a snapshot in a thread may hold a while."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self.step(push, key=key, answer=answer, fingerprint=fingerprint)
        finally:
            self._lock.release()

    def _outcome(
        self,
        push: Push,
        key: str | None,
        answer: Answer,
        fingerprint: str | None,
        applied: bool,
        ticket: int | None,
    ) -> Outcome:
        """Freeze the weights the answer carries and remember them under ``key``."""
        tensors = Frozen({n: self.params[n] for n in answer.names(push.grads, self.params)})
        if key is not None:
            self.replays.keep(
                key, answer, tensors, applied=applied, version=self.version,
                fingerprint=fingerprint, ticket=ticket,
            )  # fmt: skip
        return Outcome(self.version, applied, tensors, answer, ticket)

    def check(self, push: Push) -> None:
        """Admit a push without applying it (a sync round checks each push on arrival)."""
        with self._lock:
            try:
                admit(self, push)
            except ProblemError as exc:
                self.pushes_received += 1
                self._count_rejection(exc.slug, push.worker)
                raise

    def apply_round(self, members: list[RoundMember]) -> list[Outcome]:
        """One step with the mean of the members' gradients (a sync round); each member gets
        its own outcome. Raises, applying nothing, if any push no longer fits. Under the
        ``skip`` policy a member whose gradient holds NaN or Inf is left out of the mean (and
        answered with ``applied: false``); if every member is left out, nothing is applied."""
        with self._lock:
            self.pushes_received += len(members)
            first: Push | None = None
            finite: list[bool] = []
            large: set[str] = set()
            with self._counting([m.push.worker for m in members]):
                for member in members:
                    admitted = admit(self, member.push)
                    first = member.push if first is None else first
                    finite.append(admitted.apply)
                    large |= admitted.large
                ticket = None
                if self.recorder is not None:
                    ticket = self.recorder.round_applied(self, members)
            contributing = [m for m, ok in zip(members, finite, strict=True) if ok]
            for member, ok in zip(members, finite, strict=True):
                if not ok:
                    self._count_rejection(SKIPPED, member.push.worker)
            if contributing:
                with self._counting([m.push.worker for m in contributing]):
                    mean = _mean(contributing, self.params)
                    assert first is not None  # a round has members
                    # The round steps with the first member's options (its lr, its groups').
                    plan = prepare(self, mean, self.params, first, self.judged_version(first))
                    stepped = self._update(plan, {}, large)
                if stepped:
                    self._applied([m.push for m in contributing])
                else:
                    for member in contributing:
                        self._count_rejection(ProblemSlug.NONFINITE_RESULT, member.push.worker)
                    finite = [False] * len(members)
            return [
                self._outcome(m.push, m.key, m.answer, m.fingerprint, applied, ticket)
                for m, applied in zip(members, finite, strict=True)
            ]

    def _update(
        self, plan: GroupPlan, pushed: Mapping[str, np.ndarray], large: Collection[str]
    ) -> bool:
        """Set the pushed weights and step by ``plan`` (checked by admission); under ``reject``
        and ``skip`` a step that would leave NaN or Inf anywhere is undone whole: False under
        ``skip``, 422 under ``reject``."""
        finite = self.nonfinite != "allow"
        registered = [n for n in pushed if n not in self.params]
        saved: dict[str, np.ndarray] = {}  # the weights a refusal restores
        # A new tensor is always guarded; otherwise ask whether any is: if none, none can fail.
        if (
            finite
            and pushed
            and (
                registered
                or self.optimizer.guarded(plan, self.state, {**self.params, **pushed}, large=large)
            )
        ):
            saved = {n: self.params[n].copy() for n in pushed if n in self.params}
        for name, value in pushed.items():
            if name in self.params:
                np.copyto(self.params[name], value)
            else:
                self._register(name, value)
        try:
            self.optimizer.apply(plan, self.state, self.params, finite=finite, large=large)
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
