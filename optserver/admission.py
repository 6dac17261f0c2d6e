"""Admission: whether a push, or a set of weights, may change a session, decided before
anything changes.

Every check runs with the session's lock held and reads only; a push that fails any of them is
refused with a problem and leaves the session exactly as it was. The mode's own rules are
methods of the mode (:mod:`optserver.modes`); this module holds the rules every mode shares:
gradients present, versions, learning rate, names, shapes, dtypes, limits, the total-bytes
quota and the NaN policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from optserver_client.vocabulary import ProblemSlug

from optserver.config import NonFinitePolicy
from optserver.errors import (
    Conflict,
    InsufficientStorage,
    InvalidTensor,
    LimitExceeded,
    UnprocessableContent,
)
from optserver.optim import FLOAT_DTYPES, HyperparameterError, TensorError, TensorSpec
from optserver.optim.base import magnitude_bound
from optserver.optim.checks import check_fits
from optserver.optim.groups import GroupPlan, Rate
from optserver.optim.kernels import count_nonfinite, scan
from optserver.push import Push

if TYPE_CHECKING:
    from optserver.session import Session

__all__ = [
    "Admitted",
    "admit",
    "check_new_tensors",
    "check_weights",
    "hyper",
    "known_names",
    "param_dtype",
    "prepare",
]


@dataclass(frozen=True)
class Admitted:
    """An admitted push: the optimizer's checked plan for it (its gradients, and the learning
    rate of this step, the mode's scaling applied), whether to apply it (False: skipped under
    the ``skip`` policy), and the tensors whose gradient or weights are outside the magnitude
    bound of their dtype (see :mod:`optserver.optim.base`)."""

    plan: GroupPlan
    apply: bool
    large: frozenset[str] = field(default_factory=frozenset)


def admit(session: Session, push: Push) -> Admitted:
    """Decide on ``push``; raises a problem, changing nothing, if it cannot be applied."""
    if not push.grads:
        raise InvalidTensor("the push carries no gradients", slug=ProblemSlug.NO_GRADIENTS)
    version = session.judged_version(push)  # the session's, or its step's first part's
    session.mode.admit(push, version)
    if push.base_version is not None and push.base_version > session.version:
        raise Conflict(
            f"base_version {push.base_version} is ahead of the session's version {session.version}",
            slug=ProblemSlug.FUTURE_VERSION,
            current_version=session.version,
        )
    extra = [n for n in push.params if n not in push.grads]
    if extra:
        raise InvalidTensor(f"weights {extra[0]!r} were sent without a gradient", tensor=extra[0])
    check_new_tensors(session, push.params, replace_shapes=False)
    specs: dict[str, TensorSpec] = {}
    for name in push.grads:
        param = push.params.get(name, session.params.get(name))
        if param is None:
            raise InvalidTensor(
                f"gradient {name!r} names no tensor; the session has "
                f"{known_names(session.params)} (send its weights as params to register it)",
                slug=ProblemSlug.UNKNOWN_TENSOR,
                tensor=name,
            )
        specs[name] = TensorSpec(param.shape, param_dtype(param.dtype))
    # The one check of the update's shapes, dtypes and options (the optimizer's own).
    plan = prepare(session, push.grads, specs, push, version)
    apply, large = True, set()
    for name, value in push.params.items():
        ok, outside = _finite(session.nonfinite, name, value, param_dtype(value.dtype), "weights")
        apply = ok and apply
        if outside:
            large.add(name)
    for name, grad in push.grads.items():
        ok, outside = _finite(session.nonfinite, name, grad, specs[name].dtype, "gradient")
        apply = ok and apply
        if outside:
            large.add(name)
    return Admitted(plan, apply, frozenset(large))


def _step_rate(session: Session, push: Push, version: int) -> Rate | None:
    """How ``push``, judged at ``version``, sets a group's learning rate (None: as given): the
    push's (or its group override's), else the schedule's from the group's own rate, as the
    mode scales it (ssp's staleness scaling)."""
    schedule = session.schedule
    scales = session.mode.scales_lr(push)
    if schedule is None and not scales:
        return None

    def rate(lr: float | None, configured: float) -> float | None:
        if lr is None and schedule is not None:
            lr = schedule.lr(configured, version)
        if not scales:
            return lr
        return session.mode.step_lr(push, version, configured if lr is None else lr)

    return rate


def prepare(
    session: Session,
    grads: Mapping[str, np.ndarray],
    params: Mapping[str, np.ndarray | TensorSpec],
    push: Push,
    version: int,
) -> GroupPlan:
    """The optimizer's check of an update with ``push``'s options, judged at ``version``
    (:meth:`Session.judged_version`), its errors as problems."""
    try:
        rate = _step_rate(session, push, version)
        return session.optimizer.prepare(
            grads, params, lr=push.lr, overrides=push.groups, rate=rate
        )
    except TensorError as exc:
        raise _tensor_problem(exc) from None
    except HyperparameterError as exc:
        raise UnprocessableContent(
            str(exc), slug=ProblemSlug.INVALID_HYPERPARAMETER, option=exc.option
        ) from None


#: The problem of each kind of mismatch the core reports.
_MISMATCH = {"shape": ProblemSlug.SHAPE_MISMATCH, "dtype": ProblemSlug.DTYPE_MISMATCH}


def _tensor_problem(exc: TensorError, tensor: str | None = None) -> InvalidTensor:
    slug = _MISMATCH.get(exc.mismatch or "", ProblemSlug.INVALID_TENSOR)
    return InvalidTensor(
        str(exc),
        slug=slug,
        tensor=exc.tensor or tensor,
        expected=exc.expected,
        received=exc.received,
    )


def check_weights(session: Session, tensors: Mapping[str, np.ndarray]) -> dict[str, bool]:
    """Weights that may be set (PUT params): limits, dtypes, quota and the NaN policy; by name,
    whether each holds NaN or Inf (only the ``allow`` policy lets such weights in)."""
    check_new_tensors(session, tensors, replace_shapes=True)
    nonfinite = {name: bool(count_nonfinite(value)) for name, value in tensors.items()}
    if session.nonfinite != "allow":
        for name, bad in nonfinite.items():
            if bad:
                raise InvalidTensor(
                    f"weights {name!r} hold NaN or Inf values (nonfinite policy "
                    f"{session.nonfinite!r})",
                    slug=ProblemSlug.NONFINITE,
                    tensor=name,
                )
    return nonfinite


def check_new_tensors(
    session: Session, tensors: Mapping[str, np.ndarray], *, replace_shapes: bool
) -> None:
    """Tensors that may be added to (or replace ones in) the session."""
    limits = session.limits
    new = [n for n in tensors if n not in session.params]
    if len(session.params) + len(new) > limits.max_tensors_per_session:
        raise LimitExceeded(
            f"session would hold {len(session.params) + len(new)} tensors; the limit is "
            f"{limits.max_tensors_per_session}",
            slug=ProblemSlug.TOO_MANY_TENSORS,
        )
    for name, value in tensors.items():
        if value.dtype.kind != "f":
            raise InvalidTensor(
                f"tensor {name!r} has dtype {value.dtype}; parameters are float32 or float64",
                tensor=name,
                received=str(value.dtype),
            )
        if value.size > limits.max_tensor_elements:
            raise InvalidTensor(
                f"tensor {name!r} has {value.size} elements; the limit is "
                f"{limits.max_tensor_elements}",
                slug=ProblemSlug.TENSOR_TOO_LARGE,
                tensor=name,
            )
        current = session.params.get(name)
        if current is not None and not replace_shapes:
            check_same(name, "weights", value, current)
        dtype = param_dtype(value.dtype)
        if current is None or current.dtype != dtype:
            hyper(partial(session.optimizer.check_dtype, dtype))
    _check_quota(session, tensors)


def _check_quota(session: Session, tensors: Mapping[str, np.ndarray]) -> None:
    """507 if the new or resized tensors (with their optimizer state) would not fit."""
    quota = session.limits.max_total_bytes
    if quota is None or session.total_bytes is None:
        return
    added = 0
    for name, value in tensors.items():
        current = session.params.get(name)
        if current is not None and current.shape == value.shape:
            continue
        nbytes = value.size * param_dtype(value.dtype).itemsize
        added += nbytes * (1 + session.optimizer.state_arrays()) - (
            0 if current is None else current.nbytes + session.state[name].nbytes
        )
    held = session.total_bytes()
    if added > 0 and held + added > quota:
        raise InsufficientStorage(
            f"the server holds {held} bytes of tensors and optimizer state; these tensors "
            f"would add {added}, over the quota of {quota}",
            held=held,
            needed=added,
            quota=quota,
        )


def _finite(
    policy: NonFinitePolicy, name: str, value: np.ndarray, dtype: np.dtype[Any], what: str
) -> tuple[bool, bool]:
    """False if the push should be skipped (raises under the reject policy), and whether
    a value is outside the magnitude bound of ``dtype``."""
    if policy == "allow":
        return True, True  # nothing is guarded under allow: no need to know
    bad, large = scan(value, magnitude_bound(dtype))
    if not bad:
        return True, large
    if policy == "skip":
        return False, True
    raise InvalidTensor(
        f"{what} {name!r} holds {bad} NaN or Inf value{'s' if bad > 1 else ''} "
        "(this session's nonfinite policy is 'reject')",
        slug=ProblemSlug.NONFINITE,
        tensor=name,
    )


def check_same(name: str, what: str, value: np.ndarray, param: np.ndarray) -> None:
    """The core's shape and dtype check, as a problem with the mismatch's details."""
    try:
        check_fits(name, what, value, param.shape, param_dtype(param.dtype))
    except TensorError as exc:
        raise _tensor_problem(exc, name) from None


def known_names(params: Mapping[str, np.ndarray]) -> str:
    """The session's tensor names, for a problem's detail (the first ten)."""
    names = list(params)
    if not names:
        return "no tensors yet"
    shown = ", ".join(repr(n) for n in names[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def param_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Parameters are float32 or float64; float16 weights are stored as float32."""
    dtype = np.dtype(dtype).newbyteorder("=")
    return dtype if dtype in FLOAT_DTYPES else np.dtype(np.float32)


def hyper(build: Callable[[], Any]) -> Any:
    """Run a hyperparameter-validating call; its errors become 422 problems."""
    try:
        return build()
    except HyperparameterError as exc:
        raise UnprocessableContent(
            str(exc), slug=ProblemSlug.INVALID_HYPERPARAMETER, option=exc.option
        ) from None
