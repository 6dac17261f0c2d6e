"""The optimizer abstraction: hyperparameters, typed per-tensor state and in-place steps.

In the spirit of optax, an optimizer is ``init(params) -> state`` and
``update(grads, state, params)``; unlike optax, ``update`` changes the parameters and the state
in place (numpy arrays, fused kernels), because a parameter server owns both and copying
gigabytes per step is what it must not do. ``update`` is :meth:`Optimizer.prepare`, which
checks the gradients and the learning rate once and returns a :class:`Plan`, then
:meth:`Optimizer.apply`, which steps it; a caller that must refuse a bad update before it does
anything else (the store journals an update before applying it) calls the two itself.

Finite steps. ``update(..., finite=True)`` is atomic with respect to NaN and Inf: either every
weight and state value it writes is finite, or it raises :class:`NonFiniteStep` with everything
as it was. Undoing an in-place step needs the old values, and copying them costs more than the
step itself, so copies are taken only for the tensors where a non-finite result is possible:

- every kernel reports whether any value it wrote exceeds the dtype's magnitude bound
  ``R = finfo.max ** (1/4)`` (``R**2`` for state holding squares); a tensor whose last write
  stayed inside is *checked* (``TensorState.unchecked`` is False);
- each optimizer bounds its outputs from its hyperparameters when every input is inside
  (:meth:`Optimizer.output_bound`); if that bound is far below ``finfo.max``, a checked tensor
  with a gradient inside ``R`` cannot produce NaN or Inf;
- any other tensor is stepped first, with a copy of its weights and state, and restored if the
  step left a value that is not finite.

So ordinary training (weights and gradients far below 1e9 in float32) pays one compare per
output and no copy; a tensor near the edge pays a copy per step until its values are small again.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np

from optserver.optim import kernels
from optserver.optim.checks import (
    Plan,
    TensorSpec,
    check_grad,
    check_param,
    check_param_dtype,
)
from optserver.optim.errors import HyperparameterError, NonFiniteStep, TensorError
from optserver.optim.hparams import Hyperparams, _coerce, require
from optserver.optim.state import OptState, TensorState

__all__ = ["Optimizer", "apply_parts", "magnitude_bound"]

#: An output bound at most this fraction of ``finfo.max`` leaves room for rounding.
_HEADROOM = 1 / 16


def magnitude_bound(dtype: np.dtype[Any]) -> float:
    """``R``: values of at most this magnitude (squares: ``R**2``) are "inside" (see above).
    ``finfo.max ** (1/4)``: 1.4e9 for float32, 1.2e77 for float64."""
    return math.pow(float(np.finfo(dtype).max), 0.25)


H = TypeVar("H", bound=Hyperparams)
S = TypeVar("S", bound=TensorState)


class Optimizer(ABC, Generic[H, S]):
    """An optimizer: hyperparameters plus the rule that steps one tensor in place.

    Over named tensors: :meth:`init`, then per update :meth:`update`, or :meth:`prepare` (the
    update's only check) and :meth:`apply`. Subclasses set :attr:`name`, :attr:`hparams_type`,
    :attr:`state_type`, :attr:`kernel_factory`, :attr:`scalars_type` and implement
    :meth:`init_tensor`, :meth:`_step` (which builds the kernel's scalars and runs it) and,
    where an option adds arrays, :meth:`_complete`.
    """

    name: ClassVar[str]
    hparams_type: ClassVar[type[Hyperparams]]
    state_type: ClassVar[type[TensorState]]
    #: The factory of the module's fused kernels (keyword flags -> kernel) and the type of
    #: the scalars they take: what a warm-up compiles ahead (see optserver.optim.warmup).
    kernel_factory: ClassVar[Callable[..., kernels.Kernel[Any]]]
    scalars_type: ClassVar[type[tuple[Any, ...]]]

    def __init__(self, hparams: H | None = None, /, **options: Any) -> None:
        if hparams is not None and options:
            raise TypeError("pass either a Hyperparams instance or keyword options, not both")
        if hparams is None:
            hparams = self.hparams_type.from_mapping(options)  # type: ignore[assignment]
        elif not isinstance(hparams, self.hparams_type):
            raise TypeError(f"{self.name} takes {self.hparams_type.__name__}, got {hparams!r}")
        self.hparams: H = hparams  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hparams!r})"

    # --- configuration -------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **every hyperparameter}``: enough to build the same optimizer."""
        return {"name": self.name, **self.hparams.to_dict()}

    def with_options(self, changes: Mapping[str, Any]) -> Self:
        """A copy with some hyperparameters changed (validated); existing state stays valid."""
        return type(self)(self.hparams.replace(changes))

    # --- per tensor ------------------------------------------------------------------------

    @abstractmethod
    def init_tensor(self, param: np.ndarray) -> S:
        """Fresh state for one parameter (arrays zeroed, in the parameter's dtype)."""

    def step_tensor(
        self, param: np.ndarray, grad: np.ndarray, state: S, *, lr: float | None = None
    ) -> None:
        """One step of one tensor, in place. ``lr`` overrides the configured rate for this step."""
        check_param("param", param)
        check_grad("grad", grad, param)
        rate = self.hparams.lr if lr is None else self.check_lr(lr, (param.dtype,))
        self._apply(param, grad, state, rate)

    def _apply(self, param: np.ndarray, grad: np.ndarray, state: S, lr: float) -> bool:
        """Step one tensor; whether a written value went outside the magnitude bound (then
        the tensor is left unchecked, and flagged if it now holds NaN or Inf)."""
        self._complete(state, param)
        state.step += 1
        bound = magnitude_bound(param.dtype)
        outside = self._step(
            param, np.asarray(grad, dtype=param.dtype, order="C"), state, lr, bound, bound * bound
        )
        state.unchecked = outside
        # Inside the bound means finite; outside is rare (values near the edge): look closer.
        state.nonfinite = outside and state.holds_nonfinite(param)
        return outside

    @abstractmethod
    def _step(
        self, p: np.ndarray, g: np.ndarray, state: S, lr: float, bound: float, bound_sq: float
    ) -> bool:
        """Advance ``state`` (its step already counted) and ``p`` by ``g`` (cast to p's dtype);
        the kernel's answer: whether a value it wrote is outside ``bound`` (``bound_sq`` for
        squares)."""

    def output_bound(self, lr: float, bound: float) -> float:
        """An upper bound of the magnitude of every value one step computes, when the
        weights, gradient and linear state are within ``bound`` and squared state within
        ``bound**2`` (Python floats; ``inf`` where no bound holds, e.g. a zero ``eps``).
        Optimizers without one are always stepped with a rollback copy."""
        return math.inf

    def check_dtype(self, dtype: np.dtype[Any]) -> None:
        """Every float hyperparameter is finite in ``dtype`` (lr=1e300 is not, in float32)."""
        for option, value in self.hparams.to_dict().items():
            values = value if isinstance(value, list) else [value]
            for index, item in enumerate(values):
                if isinstance(item, float):
                    where = option if len(values) == 1 else f"{option}[{index}]"
                    self._check_fits(where, item, dtype)

    def _check_fits(self, option: str, value: float, dtype: np.dtype[Any]) -> None:
        largest = float(np.finfo(dtype).max)
        if not abs(value) <= largest:
            raise HyperparameterError(
                f"{self.name}: {option} = {value!r} is beyond the range of {dtype} "
                f"(largest {largest:.7g}): it would be Inf in the tensors' dtype",
                option=option,
            )

    def _complete(self, state: S, param: np.ndarray) -> None:
        """Allocate arrays an option needs but the state lacks (an option changed mid-run)."""

    def state_arrays(self) -> int:
        """How many parameter-sized state arrays a tensor needs with these options."""
        probe = np.zeros(1)
        state = self.init_tensor(probe)
        self._complete(state, probe)
        return len(state.arrays())

    def restore_tensor(
        self, param: np.ndarray, *, step: int, arrays: Mapping[str, np.ndarray]
    ) -> S:
        """State rebuilt from exported arrays, validated against ``param``; arrays are copied."""
        known = self.state_type.array_names()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TensorError(f"{self.name} state: step must be an integer >= 0, got {step!r}")
        fields: dict[str, Any] = {"step": step}
        for key, array in arrays.items():
            if key not in known:
                raise TensorError(
                    f"{self.name} state: unknown array {key!r}; expected one of {', '.join(known)}"
                )
            if not isinstance(array, np.ndarray) or array.shape != param.shape:
                shape = getattr(array, "shape", None)
                raise TensorError(
                    f"{self.name} state array {key!r} has shape {list(shape or [])}; "
                    f"expected {list(param.shape)}"
                )
            if array.dtype != param.dtype:
                raise TensorError(
                    f"{self.name} state array {key!r} has dtype {array.dtype}; "
                    f"expected {param.dtype}"
                )
            fields[key] = np.array(array, dtype=param.dtype, order="C", copy=True)
        fresh = self.init_tensor(param)
        for key in known:
            # Required arrays may only be absent for a state that never stepped.
            if key not in fields and getattr(fresh, key) is not None and step > 0:
                raise TensorError(f"{self.name} state: array {key!r} is missing")
            fields.setdefault(key, getattr(fresh, key))
        return self.state_type(**fields)  # type: ignore[return-value]

    # --- over named tensors (optax style) -------------------------------------------------

    def init(self, params: Mapping[str, np.ndarray]) -> OptState:
        """Fresh state for every named parameter."""
        for name, param in params.items():
            check_param(name, param)
        return {name: self.init_tensor(param) for name, param in params.items()}

    def guarded(
        self,
        grads: Mapping[str, np.ndarray],
        state: OptState,
        params: Mapping[str, np.ndarray],
        *,
        lr: float | None = None,
        large: Collection[str] = (),
    ) -> list[str]:
        """The tensors a ``finite`` update steps with a rollback copy: those whose result may
        hold NaN or Inf (see the module's docstring). ``large``: tensors whose gradient (or
        weights just set) the caller found outside :func:`magnitude_bound`; a tensor without
        state counts as unchecked."""
        rate = self.hparams.lr if lr is None else lr
        safe: dict[np.dtype[Any], bool] = {}
        out = []
        for name in grads:
            dtype = params[name].dtype
            if dtype not in safe:
                bound = self.output_bound(rate, magnitude_bound(dtype))
                safe[dtype] = bound <= float(np.finfo(dtype).max) * _HEADROOM
            current = state.get(name)
            if name in large or current is None or current.unchecked or not safe[dtype]:
                out.append(name)
        return out

    def prepare(
        self,
        grads: Mapping[str, np.ndarray],
        params: Mapping[str, np.ndarray | TensorSpec],
        *,
        lr: float | None = None,
    ) -> Plan:
        """Check an update once, reading no tensor's values: each gradient names a parameter
        of ``params`` (arrays, or the :class:`TensorSpec` of weights the caller will set before
        :meth:`apply`) and fits its shape and dtype; ``lr`` (None: the configured rate) is valid
        and finite in the dtypes it steps. Raises :class:`TensorError` or
        :class:`HyperparameterError`; the :class:`Plan` it returns is what :meth:`apply` steps.
        """
        specs: dict[str, TensorSpec] = {}
        for name in grads:
            target = params.get(name)
            if target is None:
                raise TensorError(f"gradient {name!r} names no parameter", tensor=name)
            spec = specs[name] = TensorSpec.of(target)
            check_param_dtype(name, spec.dtype)
        rate = None if lr is None else self.check_lr(lr, {s.dtype for s in specs.values()})
        for name, grad in grads.items():
            check_grad(name, grad, specs[name])
        return Plan(grads=dict(grads), lr=rate, specs=specs)

    def apply(
        self,
        plan: Plan,
        state: OptState,
        params: Mapping[str, np.ndarray],
        *,
        finite: bool = False,
        large: Collection[str] = (),
    ) -> None:
        """Step the parameters of a :meth:`prepare`-d update in place, advancing their state.

        Each parameter must be the writable C-contiguous array of the shape and dtype the plan
        was checked against, and have this optimizer's state (a per-tensor check that reads no
        data: ``apply`` does not check the update again); nothing is touched otherwise. With
        ``finite``, a step that would leave NaN or Inf in any weight or state value raises
        :class:`NonFiniteStep` and changes nothing; ``large`` must then name every tensor whose
        gradient is not within :func:`magnitude_bound` (:func:`kernels.scan` tells), NaN and
        Inf included.
        """
        apply_parts([(self, plan)], state, params, finite=finite, large=large)

    def rate_of(self, plan: Plan) -> float:
        """The learning rate ``plan`` steps with: its own, else the configured one."""
        return float(self.hparams.lr if plan.lr is None else plan.lr)

    def check_applicable(
        self, plan: Plan, state: OptState, params: Mapping[str, np.ndarray]
    ) -> None:
        """The per-tensor check :meth:`apply` makes before touching anything (see there)."""
        for name in plan.grads:
            param = params.get(name)
            if param is None:
                raise TensorError(f"gradient {name!r} names no parameter", tensor=name)
            check_param(name, param)
            if TensorSpec.of(param) != plan.specs[name]:
                raise TensorError(
                    f"parameter {name!r} is {list(param.shape)} {param.dtype}; its update "
                    f"was checked for {list(plan.specs[name].shape)} {plan.specs[name].dtype}",
                    tensor=name,
                )
            if name not in state:
                raise TensorError(f"parameter {name!r} has no optimizer state", tensor=name)
            if not isinstance(state[name], self.state_type):
                raise TensorError(f"state of {name!r} is not {self.name} state", tensor=name)

    def update(
        self,
        grads: Mapping[str, np.ndarray],
        state: OptState,
        params: Mapping[str, np.ndarray],
        *,
        lr: float | None = None,
        finite: bool = False,
        large: Collection[str] = (),
    ) -> None:
        """Step the parameters named in ``grads`` in place, advancing their state:
        :meth:`prepare` then :meth:`apply` (see both).

        Every tensor is checked before any is touched, so a bad gradient changes nothing.
        """
        plan = self.prepare(grads, params, lr=lr)
        self.apply(plan, state, params, finite=finite, large=large)

    def check_lr(self, lr: float, dtypes: Iterable[np.dtype[Any]] = ()) -> float:
        """Validate a per-step learning-rate override as strictly as the configured one (the
        same coercion and rule, without rebuilding every hyperparameter on each step), and
        finite in the ``dtypes`` of the tensors it steps; the rate as a float."""
        value = float(_coerce(self.name, "lr", lr, float))  # type: ignore[arg-type]
        require(value >= 0.0, self.name, "lr", lr, ">= 0")
        for dtype in dtypes:
            self._check_fits("lr", value, dtype)
        return value


def apply_parts(
    parts: Sequence[tuple[Optimizer[Any, Any], Plan]],
    state: OptState,
    params: Mapping[str, np.ndarray],
    *,
    finite: bool = False,
    large: Collection[str] = (),
) -> None:
    """:meth:`Optimizer.apply` of several plans as one update: each part's tensors stepped by
    its optimizer (parameter groups, :mod:`optserver.optim.groups`). With ``finite`` the
    whole update is undone if any tensor of any part would hold NaN or Inf."""
    for optimizer, plan in parts:
        optimizer.check_applicable(plan, state, params)
    rates = [optimizer.rate_of(plan) for optimizer, plan in parts]
    if not finite:
        for (optimizer, plan), rate in zip(parts, rates, strict=True):
            for name, grad in plan.grads.items():
                optimizer._apply(params[name], grad, state[name], rate)
        return
    guarded = [
        (optimizer, rate, name, plan.grads[name])
        for (optimizer, plan), rate in zip(parts, rates, strict=True)
        for name in optimizer.guarded(plan.grads, state, params, lr=rate, large=large)
    ]
    saved: list[tuple[str, np.ndarray, dict[str, Any]]] = []
    # First the guarded: these may fail, and undoing them is all a failure takes.
    for optimizer, rate, name, grad in guarded:
        saved.append((name, params[name].copy(), state[name].checkpoint()))
        optimizer._apply(params[name], grad, state[name], rate)
        if state[name].nonfinite:
            for undo, weights, checkpoint in saved:
                np.copyto(params[undo], weights)
                state[undo].rollback(checkpoint)
            raise NonFiniteStep(
                f"the step would leave NaN or Inf in tensor {name!r} (its weights or "
                f"{optimizer.name} state): nothing was changed",
                tensor=name,
            )
    done = {name for _, _, name, _ in guarded}
    for (optimizer, plan), rate in zip(parts, rates, strict=True):
        for name, grad in plan.grads.items():
            if name in done:
                continue
            optimizer._apply(params[name], grad, state[name], rate)
            # output_bound says this cannot happen; if it did, the bound has a bug.
            assert not state[name].nonfinite, f"unguarded step of {name!r} was not finite"
