"""Parameter groups: torch.optim's ``param_groups`` over named tensors.

A :class:`ParamGroups` is a base optimizer and an ordered list of groups. A group names its
tensors, by name (``params``) or by glob pattern (``match``, :mod:`fnmatch` rules, case
sensitive), and overrides any hyperparameter of the base::

    {"name": "adamw", "lr": 3e-4, "weight_decay": 0.1,
     "groups": [{"name": "no_decay", "match": ["*.bias", "*norm*"], "weight_decay": 0.0},
                {"name": "head", "params": ["head.weight"], "lr": 1e-3}]}

A tensor belongs to the first group whose ``params`` name it, else to the first group whose
pattern matches it, else to the ``default`` group: the base itself. A name may be listed in
one group's ``params`` only, as a torch parameter may be in one group only.

A group keeps what it overrides and nothing else: its optimizer is
``base.with_options(overrides)``, so changing the base changes every group that does not
override that option. Changing groups never touches state: every group runs the same
algorithm, so a tensor's state is valid in any of them (arrays an option needs are added when
first needed, as for any change of options).

One update may override, per group, any hyperparameter for that update only (what a torch
scheduler does to ``param_groups`` between steps): :meth:`ParamGroups.prepare` takes those
overrides by group name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
from optserver_client.vocabulary import CHUNK_SEPARATOR

from optserver.optim.base import Optimizer, apply_parts
from optserver.optim.checks import Plan, TensorSpec
from optserver.optim.errors import HyperparameterError, TensorError
from optserver.optim.registry import create
from optserver.optim.state import OptState, TensorState

__all__ = [
    "DEFAULT_GROUP",
    "GroupPlan",
    "ParamGroup",
    "ParamGroups",
    "Rate",
]

#: The group of tensors no group names: the base optimizer.
DEFAULT_GROUP = "default"
#: Bounds on what a configuration may hold (it is untrusted input, journaled on each change).
MAX_GROUPS = 256
MAX_GROUP_NAMES = 100_000
MAX_PATTERNS = 64
MAX_PATTERN_LENGTH = 256
MAX_TENSOR_NAME = 512
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_GROUP_KEYS = ("name", "params", "match")
#: A chunk of a tensor cut over the shards of a sharded session: ``NAME#k``.
_CHUNK = re.compile(rf"^(.+){re.escape(CHUNK_SEPARATOR)}[0-9]+$")

#: This update's learning rate of one group: from the rate set for the update (a push's or
#: a group override's ``lr``, or None) and the group's configured one (what a schedule scales).
Rate = Callable[[float | None, float], float | None]


def _bad(message: str, option: str) -> HyperparameterError:
    return HyperparameterError(message, option=option)


def _in_group(name: str, exc: HyperparameterError, where: str | None = None) -> HyperparameterError:
    """``exc``, a group's option refused, naming the group (``where``: the option's path,
    default ``groups.<name>``)."""
    return _bad(f"group {name!r}: {exc}", f"{where or f'groups.{name}'}.{exc.option}")


@dataclasses.dataclass(frozen=True, eq=False)
class ParamGroup:
    """One group: its name, the tensors it names, what it overrides, and its optimizer."""

    name: str
    params: tuple[str, ...]
    match: tuple[str, ...]
    #: The hyperparameters it overrides, validated (tuples as lists, as in ``config()``).
    options: Mapping[str, Any]
    optimizer: Optimizer[Any, Any]

    def config(self) -> dict[str, Any]:
        """The group as configured: what :meth:`ParamGroups.create` reads back."""
        out: dict[str, Any] = {"name": self.name}
        if self.params:
            out["params"] = list(self.params)
        if self.match:
            out["match"] = list(self.match)
        return {**out, **self.options}

    def matches(self, tensor: str) -> bool:
        return any(fnmatch.fnmatchcase(tensor, pattern) for pattern in self.match)


def _strings(raw: object, where: str, *, most: int, longest: int) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise _bad(f"{where} must be a list of strings, got {raw!r}", where)
    if len(raw) > most:
        raise _bad(f"{where} has {len(raw)} entries; at most {most} are allowed", where)
    for i, item in enumerate(raw):
        if not isinstance(item, str) or not 0 < len(item) <= longest:
            raise _bad(
                f"{where}[{i}] must be a non-empty string of at most {longest} characters, "
                f"got {item!r}",
                where,
            )
    return tuple(raw)


def _group(index: int, raw: object, base: Optimizer[Any, Any]) -> ParamGroup:
    where = f"groups[{index}]"
    if not isinstance(raw, Mapping):
        raise _bad(f"{where} must be an object, got {raw!r}", where)
    name = raw.get("name", str(index))
    if not isinstance(name, str) or not _GROUP_NAME.match(name):
        raise _bad(
            f"{where}.name must be 1-64 letters, digits or '_.:-', got {name!r}", f"{where}.name"
        )
    if name == DEFAULT_GROUP:
        raise _bad(
            f"{where}.name {DEFAULT_GROUP!r} is the group of tensors in no group (the base "
            "options); choose another name",
            f"{where}.name",
        )
    params = _strings(
        raw.get("params", ()), f"{where}.params", most=MAX_GROUP_NAMES, longest=MAX_TENSOR_NAME
    )
    match = _strings(
        raw.get("match", ()), f"{where}.match", most=MAX_PATTERNS, longest=MAX_PATTERN_LENGTH
    )
    overrides = {k: v for k, v in raw.items() if k not in _GROUP_KEYS}
    if "groups" in overrides:
        raise _bad(f"{where}: groups do not nest", f"{where}.groups")
    try:
        optimizer = base.with_options(overrides)
    except HyperparameterError as exc:
        raise _in_group(name, exc, where) from None
    values = optimizer.hparams.to_dict()
    return ParamGroup(name, params, match, {k: values[k] for k in overrides}, optimizer)


@dataclasses.dataclass(frozen=True, eq=False)
class GroupPlan:
    """An update checked by :meth:`ParamGroups.prepare`: one optimizer's plan per group it
    steps (the group's optimizer, with this update's overrides)."""

    parts: tuple[tuple[Optimizer[Any, Any], Plan], ...]

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """Every gradient of the update, by tensor name."""
        return {name: g for _, plan in self.parts for name, g in plan.grads.items()}


class ParamGroups:
    """A session's optimizer: the base and its parameter groups (see the module docstring).

    Immutable: :meth:`with_options` returns a new one."""

    def __init__(self, base: Optimizer[Any, Any], groups: Sequence[ParamGroup] = ()) -> None:
        if len(groups) > MAX_GROUPS:
            raise _bad(f"{len(groups)} groups; at most {MAX_GROUPS} are allowed", "groups")
        if sum(len(g.params) for g in groups) > MAX_GROUP_NAMES:
            raise _bad(f"groups name more than {MAX_GROUP_NAMES} tensors in all", "groups")
        self.base = base
        self.groups = tuple(groups)
        self.default = ParamGroup(DEFAULT_GROUP, (), (), {}, base)
        self._named: dict[str, ParamGroup] = {}
        self._explicit: dict[str, ParamGroup] = {}
        for group in self.groups:
            if group.name in self._named:
                raise _bad(f"two groups are named {group.name!r}", "groups")
            self._named[group.name] = group
            for tensor in group.params:
                other = self._explicit.setdefault(tensor, group)
                if other is not group:
                    raise _bad(
                        f"tensor {tensor!r} is in the params of groups {other.name!r} and "
                        f"{group.name!r}; a tensor belongs to one group",
                        "groups",
                    )
        self._named[DEFAULT_GROUP] = self.default
        self._patterns = [g for g in self.groups if g.match]
        #: Group by tensor name, for tensors the session holds (the caller bounds them).
        self._assigned: dict[str, ParamGroup] = {}

    @classmethod
    def create(cls, config: str | Mapping[str, Any]) -> ParamGroups:
        """Build from ``"adam"`` or ``{"name": "adam", ..., "groups": [...]}`` (untrusted)."""
        if isinstance(config, Mapping) and "groups" in config:
            options = dict(config)
            raw = options.pop("groups")
            return cls.build(create(options), raw)
        return cls(create(config))

    @classmethod
    def build(cls, base: Optimizer[Any, Any], raw: object) -> ParamGroups:
        """The base with the groups of a configuration's ``groups`` list (untrusted)."""
        if not isinstance(raw, (list, tuple)):
            raise _bad(f"groups must be a list of objects, got {raw!r}", "groups")
        if len(raw) > MAX_GROUPS:
            raise _bad(f"{len(raw)} groups; at most {MAX_GROUPS} are allowed", "groups")
        return cls(base, [_group(i, item, base) for i, item in enumerate(raw)])

    def __repr__(self) -> str:
        return f"ParamGroups({self.base!r}, groups={[g.name for g in self.groups]})"

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def hparams(self) -> Any:
        """The base's hyperparameters (those of the ``default`` group)."""
        return self.base.hparams

    def config(self) -> dict[str, Any]:
        """The base's ``config()``, and ``groups`` when there are any."""
        out = self.base.config()
        if self.groups:
            out["groups"] = [group.config() for group in self.groups]
        return out

    # --- membership ------------------------------------------------------------------------

    def group(self, name: str) -> ParamGroup | None:
        """The group called ``name`` (``default`` included), or None."""
        return self._named.get(name)

    def group_of(self, tensor: str) -> ParamGroup:
        """The group ``tensor`` belongs to (call it for tensors the session holds). A chunk
        of a tensor cut over shards (``NAME#k``) is in the group of ``NAME``, unless a group
        names the chunk itself."""
        found = self._assigned.get(tensor)
        if found is None:
            chunk = _CHUNK.match(tensor)
            names = (tensor, chunk.group(1)) if chunk else (tensor,)
            found = next((self._explicit[n] for n in names if n in self._explicit), None)
            if found is None:
                found = next(
                    (g for g in self._patterns if any(g.matches(n) for n in names)), self.default
                )
            self._assigned[tensor] = found
        return found

    def members(self, tensors: Collection[str]) -> dict[str, list[str]]:
        """Tensor names by group name, every group listed (``default`` last), in order."""
        out: dict[str, list[str]] = {g.name: [] for g in (*self.groups, self.default)}
        for tensor in tensors:
            out[self.group_of(tensor).name].append(tensor)
        return out

    # --- configuration -------------------------------------------------------------------

    def with_options(self, changes: Mapping[str, Any]) -> ParamGroups:
        """A copy with base options changed and ``groups`` replaced (a list) or merged (an
        object by group name, RFC 7396 style: a group's changes are merged into it, null
        removes an override or, for a whole group, the group; a new name adds a group)."""
        changes = dict(changes)
        raw = changes.pop("groups", None)
        base = self.base.with_options(changes) if changes else self.base
        if raw is None:
            configs: object = [g.config() for g in self.groups]
        elif isinstance(raw, Mapping):
            configs = self._merged(raw)
        else:
            configs = raw
        return type(self).build(base, configs)

    def _merged(self, patch: Mapping[str, Any]) -> list[dict[str, Any]]:
        current = {g.name: g.config() for g in self.groups}
        for name, delta in patch.items():
            if name == DEFAULT_GROUP:
                raise _bad(
                    f"group {DEFAULT_GROUP!r} is the base: change its options at the top level",
                    "groups",
                )
            if delta is None:
                if current.pop(name, None) is None:
                    raise _bad(f"there is no group {name!r} to remove", f"groups.{name}")
                continue
            if not isinstance(delta, Mapping):
                raise _bad(f"groups.{name} must be an object or null, got {delta!r}", "groups")
            merged = {**current.get(name, {}), **delta, "name": name}
            current[name] = {k: v for k, v in merged.items() if v is not None}
        return list(current.values())

    def check_dtype(self, dtype: np.dtype[Any]) -> None:
        """Every group's hyperparameters are finite in ``dtype``."""
        self.base.check_dtype(dtype)
        for group in self.groups:
            try:
                group.optimizer.check_dtype(dtype)
            except HyperparameterError as exc:
                raise _in_group(group.name, exc) from None

    def state_arrays(self) -> int:
        """The most parameter-sized state arrays a tensor needs in any group."""
        return max(g.optimizer.state_arrays() for g in (self.default, *self.groups))

    # --- per tensor ------------------------------------------------------------------------

    def init_tensor(self, tensor: str, param: np.ndarray) -> TensorState:
        return self.group_of(tensor).optimizer.init_tensor(param)  # type: ignore[no-any-return]

    def restore_tensor(
        self, tensor: str, param: np.ndarray, *, step: int, arrays: Mapping[str, np.ndarray]
    ) -> TensorState:
        optimizer = self.group_of(tensor).optimizer
        return optimizer.restore_tensor(param, step=step, arrays=arrays)  # type: ignore[no-any-return]

    # --- updates ---------------------------------------------------------------------------

    def prepare(
        self,
        grads: Mapping[str, np.ndarray],
        params: Mapping[str, np.ndarray | TensorSpec],
        *,
        lr: float | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        rate: Rate | None = None,
    ) -> GroupPlan:
        """Check an update (see :meth:`Optimizer.prepare`), each tensor by its group's
        optimizer configured, for this update, with that group's ``overrides`` too. ``lr``
        is the update's rate in every group whose overrides set none; ``rate`` (if given)
        turns that (or None) and the group's configured rate into the update's (a schedule
        scales the configured rate, an override's ``lr`` included; a staleness scaling
        scales either)."""
        overrides = overrides or {}
        if not isinstance(overrides, Mapping):
            raise _bad(f"groups must be an object by group name, got {overrides!r}", "groups")
        steppers: dict[str, Optimizer[Any, Any]] = {}
        for name, delta in overrides.items():
            group = self._named.get(name)
            if group is None:
                known = ", ".join(repr(n) for n in self._named)
                raise _bad(f"no group is named {name!r}; the groups are {known}", "groups")
            if not isinstance(delta, Mapping):
                raise _bad(f"groups.{name} must be an object, got {delta!r}", f"groups.{name}")
            try:  # the group as if configured with these options too
                steppers[name] = group.optimizer.with_options(delta) if delta else group.optimizer
            except HyperparameterError as exc:
                raise _in_group(name, exc) from None
        if self.groups:
            split: dict[str, dict[str, np.ndarray]] = {}
            for tensor, grad in grads.items():
                if tensor not in params:  # before group_of, which remembers what it is asked
                    raise TensorError(f"gradient {tensor!r} names no parameter", tensor=tensor)
                split.setdefault(self.group_of(tensor).name, {})[tensor] = grad
        else:
            split = {DEFAULT_GROUP: dict(grads)}
        parts = []
        for name, part in split.items():
            optimizer = steppers.get(name) or self._named[name].optimizer
            chosen = None if "lr" in overrides.get(name, {}) else lr
            final = chosen if rate is None else rate(chosen, float(optimizer.hparams.lr))
            try:
                plan = optimizer.prepare(part, params, lr=final)
                if name in steppers:  # options of this update only: finite in its dtypes too
                    for dtype in {spec.dtype for spec in plan.specs.values()}:
                        optimizer.check_dtype(dtype)
            except HyperparameterError as exc:
                if name not in steppers:
                    raise
                raise _in_group(name, exc) from None
            parts.append((optimizer, plan))
        return GroupPlan(tuple(parts))

    def guarded(
        self,
        plan: GroupPlan,
        state: OptState,
        params: Mapping[str, np.ndarray],
        *,
        large: Collection[str] = (),
    ) -> list[str]:
        """The tensors a ``finite`` update steps with a rollback copy (see
        :meth:`Optimizer.guarded`)."""
        return [
            name
            for optimizer, part in plan.parts
            for name in optimizer.guarded(
                part.grads, state, params, lr=optimizer.rate_of(part), large=large
            )
        ]

    def apply(
        self,
        plan: GroupPlan,
        state: OptState,
        params: Mapping[str, np.ndarray],
        *,
        finite: bool = False,
        large: Collection[str] = (),
    ) -> None:
        """Step a :meth:`prepare`-d update in place: one update, undone whole under
        ``finite`` (see :meth:`Optimizer.apply`)."""
        apply_parts(plan.parts, state, params, finite=finite, large=large)

    def update(
        self,
        grads: Mapping[str, np.ndarray],
        state: OptState,
        params: Mapping[str, np.ndarray],
        *,
        lr: float | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        finite: bool = False,
    ) -> None:
        """:meth:`prepare` then :meth:`apply`."""
        plan = self.prepare(grads, params, lr=lr, overrides=overrides)
        self.apply(plan, state, params, finite=finite)

    def init(self, params: Mapping[str, np.ndarray]) -> OptState:
        """Fresh state for every named parameter, each from its group's optimizer."""
        return {name: self.init_tensor(name, param) for name, param in params.items()}
