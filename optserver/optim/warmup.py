"""Compiling the optimizers' kernels before the first step needs them.

numba compiles a kernel on its first call with a new type signature: one per kernel variant
(the flags its factory compiles in), parameter dtype, and whether the gradient is read-only
(numba types such an array apart; the journal's replay steps with read-only gradients).
Compiling one takes about 0.3 s; loading it from numba's disk cache (``cache=True``) a few
milliseconds. Either way, without a warm-up that time lands on the first step that needs it.

:func:`warm_up` calls every variant once on tiny arrays of its own, so that later calls find it
compiled in memory. It enumerates each factory's keyword flags from its signature, and builds
the scalars from their declared types, so a flag or scalar added to a kernel is covered (or, a
scalar of a new kind, refused loudly) without changes here. Variants no valid configuration
reaches (SGD's ``nesterov`` without ``momentum``) are compiled too: enumerating what the
hyperparameters allow would be a second copy of their rules, and from the cache they cost a
few milliseconds.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import logging
import threading
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from optserver.optim import kernels
from optserver.optim.base import magnitude_bound
from optserver.optim.checks import FLOAT_DTYPES
from optserver.optim.kernels import Lerp
from optserver.optim.registry import OPTIMIZERS

__all__ = ["SHARED", "WarmUpThread", "warm_up", "warm_up_in_background"]

log = logging.getLogger(__name__)

#: The key of :func:`warm_up`'s answer for the kernels every optimizer shares (the NaN/Inf
#: scans of gradients, weights and state).
SHARED = "shared"


@dataclass(frozen=True)
class _Family:
    """The kernels of one optimizer module: its factory, its scalars, how many arrays."""

    factory: Callable[..., kernels.Kernel[Any]]
    scalars: type[tuple[Any, ...]]
    #: The length of the kernel's ``arrays`` (parameter, gradient, state or placeholders).
    arrays: int


def _families() -> dict[str, _Family]:
    """Each optimizer's kernels, from the registry (AdamW steps with Adam's): the parameter,
    the gradient and the state's arrays make the kernel's ``arrays``."""
    return {
        name: _Family(cls.kernel_factory, cls.scalars_type, 2 + len(cls.state_type.array_names()))
        for name, cls in OPTIMIZERS.items()
    }


def _flag_sets(factory: Callable[..., object]) -> list[dict[str, bool]]:
    """Every combination of the factory's keyword flags, those with fewer set first: the
    default configurations (no option set) are then ready soonest."""
    names = list(inspect.signature(factory).parameters)
    combos = sorted(itertools.product((False, True), repeat=len(names)), key=sum)
    return [dict(zip(names, combo, strict=True)) for combo in combos]


def _scalars(cls: type[tuple[Any, ...]], dtype: np.dtype[Any]) -> tuple[Any, ...]:
    """A kernel's scalars with the types a step gives them: its dtype's numpy scalars, and
    :class:`Lerp` weights. The values are arbitrary (finite); only the types reach numba."""
    values: dict[str, object] = {}
    for name, hint in typing.get_type_hints(cls).items():
        if hint is Lerp:
            values[name] = Lerp.of(0.1, dtype)
        elif hint == kernels.Scalar:
            values[name] = dtype.type(0.5)
        else:  # a new kind of scalar: teach it here, or the warm-up would miss its type
            raise TypeError(f"{cls.__name__}.{name}: cannot warm up a scalar of type {hint!r}")
    return cls(**values)


def _gradient(dtype: np.dtype[Any], readonly: bool) -> np.ndarray:
    array = np.full(2, 0.25, dtype=dtype)
    array.flags.writeable = not readonly
    return array


def _warm_family(
    family: _Family, flags: dict[str, bool], dtype: np.dtype[Any], readonly: bool
) -> None:
    # Its own arrays for every slot: an unused one gets an empty placeholder of the same type
    # in a real step (kernels.run), so the signature is the one a step compiles.
    arrays = [np.zeros(2, dtype=dtype) for _ in range(family.arrays)]
    arrays[1] = _gradient(dtype, readonly)
    kernels.run(family.factory(**flags), arrays, _scalars(family.scalars, dtype))


def _warm_shared(dtype: np.dtype[Any], readonly: bool) -> None:
    array = _gradient(dtype, readonly)
    kernels.scan(array, magnitude_bound(dtype))
    kernels.count_nonfinite(array)


def warm_up(
    optimizers: Iterable[str] | None = None,
    *,
    dtypes: Iterable[np.dtype[Any] | type[np.floating[Any]]] = FLOAT_DTYPES,
    cancel: threading.Event | None = None,
) -> dict[str, float]:
    """Compile, or load from numba's disk cache, every kernel variant that ``optimizers``
    (names of :data:`OPTIMIZERS`; default: all) can step ``dtypes`` with, and the kernels they
    share, so that no later step waits for numba.

    Writable gradients first, float32 first: requests bring those; read-only ones come from
    the journal's replay, which runs before the server serves anything. Safe to run while steps
    run in other threads: numba compiles under a lock, and a step that needs a variant not ready
    yet compiles it (or waits for it) as it would without a warm-up. ``cancel``: when set, stop
    before the next variant. Returns the seconds spent per optimizer, and on the shared kernels
    and a final garbage collection under :data:`SHARED`; an optimizer whose kernels another
    one warmed already (AdamW after Adam) takes next to nothing.
    """
    names = list(OPTIMIZERS) if optimizers is None else list(optimizers)
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizers {unknown}; known: {', '.join(OPTIMIZERS)}")
    families = _families()
    floats = [np.dtype(d) for d in dtypes]
    if any(dtype not in FLOAT_DTYPES for dtype in floats):
        raise ValueError(f"dtypes must be float32 or float64, got {floats}")
    tasks: list[tuple[str, Callable[[], None]]] = []
    for readonly, dtype in itertools.product((False, True), floats):
        tasks.append((SHARED, partial(_warm_shared, dtype, readonly)))
        for name in names:
            family = families[name]
            tasks += [
                (name, partial(_warm_family, family, flags, dtype, readonly))
                for flags in _flag_sets(family.factory)
            ]
    spent = dict.fromkeys([SHARED, *names], 0.0)
    for name, task in tasks:
        if cancel is not None and cancel.is_set():
            return spent
        start = time.perf_counter()
        task()
        spent[name] += time.perf_counter() - start
    # Compiling leaves some 10**5 new objects for the collector, whose next full pass (50-150
    # ms, holding the interpreter) would otherwise fall on whichever request triggers it.
    start = time.perf_counter()
    gc.collect()
    spent[SHARED] += time.perf_counter() - start
    return spent


class WarmUpThread(threading.Thread):
    """:func:`warm_up` in a daemon thread, logging how long it took; an error is logged, not
    raised (a step still compiles what it needs). ``extra``: more compiled code to warm up
    first, by name (callables that run it once), such as the server's own numba loops outside
    the optimizers. :attr:`spent` holds the seconds per name once done."""

    def __init__(
        self,
        optimizers: Iterable[str] | None = None,
        *,
        extra: Mapping[str, Callable[[], object]] | None = None,
    ) -> None:
        super().__init__(name="optserver-warm-up", daemon=True)
        self.optimizers = None if optimizers is None else list(optimizers)
        self.extra = dict(extra or {})
        self.cancel = threading.Event()
        self.spent: dict[str, float] | None = None

    def run(self) -> None:
        start = time.perf_counter()
        spent: dict[str, float] = {}
        try:
            for name, call in self.extra.items():
                if self.cancel.is_set():
                    break
                begin = time.perf_counter()
                call()
                spent[name] = time.perf_counter() - begin
            spent.update(warm_up(self.optimizers, cancel=self.cancel))
        except Exception:
            log.exception("compiling the numba kernels ahead failed")
            return
        total = time.perf_counter() - start
        if self.cancel.is_set():
            log.debug("kernel warm-up stopped after %.2f s", total)
            return
        self.spent = spent
        each = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in spent.items())
        log.info("numba kernels ready in %.2f s (%s)", total, each)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop after the variant in progress (one compilation, under a second) and wait up to
        ``timeout`` for it: an exiting interpreter should not tear LLVM down under a compile.
        Whether the thread has ended."""
        self.cancel.set()
        self.join(timeout)
        return not self.is_alive()


def warm_up_in_background(
    optimizers: Iterable[str] | None = None,
    *,
    extra: Mapping[str, Callable[[], object]] | None = None,
) -> WarmUpThread:
    """Start :func:`warm_up` of ``optimizers`` (default: all) in a :class:`WarmUpThread`."""
    thread = WarmUpThread(optimizers, extra=extra)
    thread.start()
    return thread
