"""What the optimizers' fused kernels share: compilation, typed scalars, ATen's lerp, threads.

Each optimizer's kernel lives next to its equations, in the optimizer's module. A kernel is a
numba function ``kernel(arrays, s) -> bool``: ``arrays`` is a tuple of flat, C-contiguous
arrays (the parameter first), ``s`` a :class:`~typing.NamedTuple` of the step's scalars,
declared per optimizer (``AdamScalars``, ...) and built by keyword, so that a misplaced scalar
is a type error rather than a silently wrong step. numba passes a NamedTuple of numbers and
booleans by value, field access costs nothing in the loop, and :data:`Kernel` ties a kernel to
its scalars' type, so :func:`run` refuses another optimizer's scalars.

A kernel makes one pass over its arrays and updates parameter and state in place, so a step
allocates nothing of the parameter's size. The arithmetic follows the order of torch.optim's
single-tensor implementations operation by operation, in the parameter's dtype; the ATen
operations it spells out are

- ``add(a, b, alpha)``: ``a + alpha*b``;
- ``addcmul(a, b, c, value)``: ``a + (value*b)*c``;
- ``addcdiv(a, b, c, value)``: ``a + (value*b)/c``;
- ``lerp(start, end, w)``: see :func:`lerp`.

The scalars are numpy scalars of the parameter's dtype (:data:`Scalar`, which a Python float
is not, so mypy catches a missing cast), and the kernels hold no numeric literals, because
numba would otherwise widen float32 arithmetic to float64 (slower, and not torch's rounding).
``maximize`` is a ``sign`` scalar of -1 or 1, because negation is exact. Options that change
the arithmetic are keyword flags of the kernel's factory, compiled in as constants: one
specialisation per combination in use, compiled on first use and cached on disk, with no branch
left in the loop to stop LLVM from vectorizing it (leaving that to loop unswitching proved
fragile: some option combinations ran ten times slower).

Kernels release the GIL; :func:`run` splits large arrays into contiguous parts that run on a
shared thread pool. Arrays that an option does not need are passed as empty placeholders.

Every kernel also answers one question about what it wrote, at the cost of a compare per output
(about 5% on Adam at 1e7 float32, where a separate pass would cost half the step): is any written
value outside the magnitude bound, ``|x| <= bound`` for weights and linear state, ``x <= bound_sq``
for state that holds squares (NaN and Inf are outside by construction: the comparisons are
written so that NaN fails them)? False means every value the tensor holds is provably small,
which is what lets the next step skip its rollback copy (see :mod:`optserver.optim.base`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, TypeAlias, TypeVar, cast

import numba
import numpy as np

__all__ = [
    "Arrays",
    "Kernel",
    "Lerp",
    "Scalar",
    "configure_threads",
    "count_nonfinite",
    "jit",
    "lerp",
    "run",
    "scan",
]

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound=tuple[Any, ...])

#: A scalar in the parameter's dtype (``np.float32(x)`` or ``np.float64(x)``).
Scalar: TypeAlias = np.floating[Any]
#: A kernel's arrays: flat views, the parameter first, in the order its signature names them.
Arrays: TypeAlias = tuple[np.ndarray, ...]
#: A compiled kernel taking scalars of type ``S``; it steps ``arrays`` in place and returns
#: whether any value it wrote is outside the bounds or not finite.
Kernel: TypeAlias = Callable[[Arrays, S], bool]

_njit = numba.njit(nogil=True, cache=True, error_model="numpy")


def jit(function: F) -> F:
    """Compile ``function`` with numba (no GIL, cached on disk, numpy's float semantics),
    keeping its signature for the type checker. Modules apply it as ``@_jit``: the coverage
    configuration excludes functions so decorated, whose compiled bodies no tracer sees."""
    return cast(F, _njit(function))


_jit = jit


class Lerp(NamedTuple):
    """The weight of ``lerp(start, end, w)`` as ATen's kernel uses it (see :func:`lerp`)."""

    #: ``|w| < 0.5``: ATen starts from ``start``, else from ``end``.
    small: bool
    #: ``w`` when small, else ``w - 1``, in the array's dtype.
    weight: Scalar

    @classmethod
    def of(cls, weight: float, dtype: np.dtype[Any]) -> Lerp:
        # ATen casts the weight to the tensor's dtype first, then picks the form.
        w = dtype.type(weight)
        small = bool(abs(w) < 0.5)
        return cls(small, w if small else w - dtype.type(1))


@_jit
def lerp(start: Any, end: Any, w: Lerp) -> Any:
    """``start + w*(end - start)`` rounded as ATen's ``lerp``: for ``|w| < 0.5`` exactly that,
    else ``end + (w-1)*(end - start)`` (ATen writes ``end - (end-start)*(1-w)``: the same
    value, as rounding is symmetric in sign). The two forms round differently, so torch's
    moving averages ``lerp_(x, 1 - beta)`` are matched only this way."""
    return (start if w.small else end) + w.weight * (end - start)


@_jit
def _count_nonfinite(a: np.ndarray) -> int:
    count = 0
    for i in range(a.shape[0]):
        if not np.isfinite(a[i]):
            count += 1
    return count


def count_nonfinite(array: np.ndarray) -> int:
    """How many elements are NaN or Inf: one pass, no temporary array."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype == np.float16:
        return int(np.count_nonzero(~np.isfinite(flat)))  # rare path: numba lacks float16 here
    return int(_count_nonfinite(flat))


@_jit
def _outside(a: np.ndarray, bound: Scalar) -> bool:
    # No branch in the loop, so it vectorizes: 1e6 float32 in 0.04 ms, where counting as well
    # takes 0.067 (measured hot, 2-core EPYC).
    outside = False
    for i in range(a.shape[0]):
        outside = outside | (not (abs(a[i]) <= bound))
    return outside


def scan(array: np.ndarray, bound: float) -> tuple[int, bool]:
    """How many elements are NaN or Inf, and whether any is outside ``|x| <= bound`` (NaN and
    Inf are): one pass when all are within it, two otherwise; no temporary array."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype == np.float16 or flat.dtype.kind != "f":
        wide = flat.astype(np.float64)  # rare path: numba lacks float16 here
        return int(np.count_nonzero(~np.isfinite(wide))), bool(not (np.abs(wide) <= bound).all())
    if not _outside(flat, flat.dtype.type(bound)):  # the common case: all within the bound
        return 0, False
    return count_nonfinite(flat), True


# Below this many elements per part, splitting costs more than it saves. Measured on 2 cores
# with the pool's threads idle between steps, as in a server (Adam, float32): 1e6 elements take
# 0.27 ms on one thread and 0.30 on two, 2e6 0.64 on either, 4e6 1.52 and 1.23, 1e7 4.1 and 3.6:
# waking a sleeping thread costs about what a part of a few million elements saves.
MIN_PART = 1 << 21

_EMPTY = {np.dtype(t): np.empty(0, dtype=t) for t in (np.float32, np.float64)}

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_threads = max(1, min(8, os.cpu_count() or 1))


def configure_threads(threads: int) -> int:
    """Set how many threads one large step may use (default: the CPU count, at most 8).

    Returns the previous setting.
    """
    global _pool, _threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=False)
        previous, _pool, _threads = _threads, None, threads
    return previous


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_threads - 1, thread_name_prefix="optserver-kernel")
        return _pool


def run(kernel: Kernel[S], arrays: Sequence[np.ndarray | None], scalars: S) -> bool:
    """Apply ``kernel(arrays, scalars)`` over flat views, split over threads when large.

    ``arrays[0]`` is the parameter; all arrays are C-contiguous and of its shape, or None for
    one an option does not use (passed on as an empty placeholder). Returns the kernel's answer
    (any written value outside its bound), over all parts.
    """
    first = arrays[0]
    assert first is not None
    # A placeholder of its own memory: a view like p[:0] would share p's address and defeat
    # the vectorizer's run-time aliasing checks.
    empty = _EMPTY[first.dtype]
    flat = tuple(empty if a is None else a.reshape(-1) for a in arrays)
    n = flat[0].shape[0]
    parts = min(_threads, n // MIN_PART)
    if parts <= 1:
        return bool(kernel(flat, scalars))
    bounds = [n * k // parts for k in range(parts + 1)]

    def part(k: int) -> Arrays:
        lo, hi = bounds[k], bounds[k + 1]
        return tuple(a[lo:hi] if a.shape[0] == n else a for a in flat)

    pool = _executor()
    futures: list[Future[bool]] = [pool.submit(kernel, part(k), scalars) for k in range(1, parts)]
    outside = bool(kernel(part(0), scalars))
    for future in futures:
        outside = bool(future.result()) or outside
    return outside
