"""Fused element-wise update kernels, compiled with numba.

Each kernel makes one pass over flat, C-contiguous arrays and updates parameter and state in
place, so a step allocates nothing of the parameter's size. The arithmetic follows the order of
torch.optim's single-tensor implementations operation by operation (``addcmul``: ``a + (v*b)*c``,
``addcdiv``: ``a + (v*b)/c``, ``lerp`` as ATen computes it), in the parameter's dtype: the caller
passes scalars already cast to that dtype, and the kernels hold no numeric literals, because
numba would otherwise widen float32 arithmetic to float64 (slower, and not torch's rounding).
Each kernel is built by a factory whose keyword flags are compiled in as constants: one
specialisation per combination in use, compiled on first use and cached on disk, with no branch
left in the loop to stop LLVM from vectorizing it (leaving that to loop unswitching proved
fragile: some option combinations ran ten times slower). ``maximize`` is a ``sign`` scalar of
-1 or 1, because negation is exact.

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

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

__all__ = [
    "Kernel",
    "adagrad",
    "adam",
    "configure_threads",
    "count_nonfinite",
    "lerp_coefficients",
    "rmsprop",
    "run",
    "scan",
    "sgd",
]

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")

#: A compiled kernel: flat arrays and dtype scalars in (the last two: ``bound``, ``bound_sq``),
#: in place; it returns whether any value it wrote is outside the bounds or not finite.
Kernel = Callable[..., bool]


@functools.cache
def sgd(*, momentum: bool, nesterov: bool, first: bool, decay: bool) -> Kernel:
    @_jit
    def kernel(p, g, buf, neg_lr, sign, weight_decay, mu, one_minus_dampening, bound, bound_sq):
        outside = False
        for i in range(p.shape[0]):
            gi = sign * g[i]
            if decay:
                gi = gi + weight_decay * p[i]
            if momentum:
                if first:
                    b = gi
                else:
                    b = buf[i] * mu + one_minus_dampening * gi
                buf[i] = b
                if nesterov:
                    gi = gi + mu * b
                else:
                    gi = b
                q = p[i] + neg_lr * gi
                p[i] = q
                outside = outside | (not (abs(q) + abs(b) <= bound))
            else:
                q = p[i] + neg_lr * gi
                p[i] = q
                outside = outside | (not (abs(q) <= bound))
        return outside

    return kernel


@functools.cache
def adagrad(*, decay: bool) -> Kernel:
    @_jit
    def kernel(p, g, acc, neg_clr, sign, weight_decay, eps, bound, bound_sq):
        outside = False
        for i in range(p.shape[0]):
            gi = sign * g[i]
            if decay:
                gi = gi + weight_decay * p[i]
            s = acc[i] + gi * gi
            acc[i] = s
            q = p[i] + (neg_clr * gi) / (np.sqrt(s) + eps)
            p[i] = q
            outside = outside | (not (abs(q) <= bound)) | (not (s <= bound_sq))
        return outside

    return kernel


def lerp_coefficients(weight: float, dtype: np.dtype[Any]) -> tuple[bool, np.floating[Any]]:
    """ATen computes ``lerp(start, end, w)`` as ``start + w*(end-start)`` for ``|w| < 0.5``,
    else ``end + (w-1)*(end-start)``: the kernels take the choice and the coefficient, computed
    here in the array's dtype."""
    w = dtype.type(weight)
    small = bool(abs(w) < 0.5)
    return small, (w if small else w - dtype.type(1))


@functools.cache
def rmsprop(*, centered: bool, momentum: bool, decay: bool) -> Kernel:
    @_jit
    def kernel(
        p, g, square_avg, grad_avg, buf, neg_lr, sign, weight_decay, alpha, one_minus_alpha,
        lerp_small, lerp_coeff, eps_inside, eps_outside, mu, bound, bound_sq,
    ):  # fmt: skip
        outside = False
        for i in range(p.shape[0]):
            gi = sign * g[i]
            if decay:
                gi = gi + weight_decay * p[i]
            sq = square_avg[i] * alpha + (one_minus_alpha * gi) * gi
            square_avg[i] = sq
            outside = outside | (not (sq <= bound_sq))
            if centered:
                ga = grad_avg[i]
                ga = (ga if lerp_small else gi) + lerp_coeff * (gi - ga)
                grad_avg[i] = ga
                outside = outside | (not (abs(ga) <= bound))
                sq = sq + (-ga) * ga
            # One of eps_inside (the seed's form) and eps_outside (torch's) is 0: exact.
            avg = np.sqrt(sq + eps_inside) + eps_outside
            if momentum:
                b = buf[i] * mu + gi / avg
                buf[i] = b
                q = p[i] + neg_lr * b
                outside = outside | (not (abs(q) + abs(b) <= bound))
            else:
                q = p[i] + (neg_lr * gi) / avg
                outside = outside | (not (abs(q) <= bound))
            p[i] = q
        return outside

    return kernel


@functools.cache
def adam(*, amsgrad: bool, decay: bool) -> Kernel:
    @_jit
    def kernel(
        p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, neg_step_size, sign, weight_decay,
        decay_factor, lerp_small, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
        bound, bound_sq,
    ):  # fmt: skip
        # decay: weight decay added to the gradient (Adam); AdamW's decoupled decay is
        # decay_factor = 1 - lr*wd, which is 1 (exact) otherwise.
        outside = False
        for i in range(p.shape[0]):
            gi = sign * g[i]
            pi = p[i] * decay_factor
            if decay:
                gi = gi + weight_decay * pi
            m = exp_avg[i]
            m = (m if lerp_small else gi) + lerp_coeff * (gi - m)
            exp_avg[i] = m
            v = exp_avg_sq[i] * beta2 + (one_minus_beta2 * gi) * gi
            exp_avg_sq[i] = v
            if amsgrad:
                v = max(max_exp_avg_sq[i], v)
                max_exp_avg_sq[i] = v
            q = pi + (neg_step_size * m) / (np.sqrt(v) / bias_correction2_sqrt + eps)
            p[i] = q
            # A sum of magnitudes: NaN and Inf propagate into it (max() could drop a NaN).
            # exp_avg_sq <= max_exp_avg_sq, so checking v covers both under amsgrad.
            outside = outside | (not (abs(q) + abs(m) <= bound)) | (not (v <= bound_sq))
        return outside

    return kernel


@_jit
def _count_nonfinite(a):
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
def _scan(a, bound):
    nonfinite = 0
    outside = False
    for i in range(a.shape[0]):
        x = a[i]
        if not np.isfinite(x):
            nonfinite += 1
        outside = outside | (not (abs(x) <= bound))
    return nonfinite, outside


def scan(array: np.ndarray, bound: float) -> tuple[int, bool]:
    """How many elements are NaN or Inf, and whether any is outside ``|x| <= bound`` (NaN and
    Inf are): one pass, no temporary array."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype == np.float16 or flat.dtype.kind != "f":
        wide = flat.astype(np.float64)  # rare path: numba lacks float16 here
        return int(np.count_nonzero(~np.isfinite(wide))), bool(not (np.abs(wide) <= bound).all())
    nonfinite, outside = _scan(flat, flat.dtype.type(bound))
    return int(nonfinite), bool(outside)


# Below this many elements per part, splitting costs more than it saves.
MIN_PART = 1 << 17

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


def run(kernel: Kernel, arrays: Sequence[np.ndarray | None], *scalars: object) -> bool:
    """Apply ``kernel(*arrays, *scalars)`` over flat views, split over threads when large.

    ``arrays[0]`` is the parameter; all arrays are C-contiguous and of its shape, or None for
    one an option does not use (passed on as an empty placeholder). Returns the kernel's answer
    (any written value outside its bound), over all parts.
    """
    first = arrays[0]
    assert first is not None
    # A placeholder of its own memory: a view like p[:0] would share p's address and defeat
    # the vectorizer's run-time aliasing checks.
    empty = _EMPTY[first.dtype]
    flat = [empty if a is None else a.reshape(-1) for a in arrays]
    n = flat[0].shape[0]
    parts = min(_threads, n // MIN_PART)
    if parts <= 1:
        return bool(kernel(*flat, *scalars))
    bounds = [n * k // parts for k in range(parts + 1)]

    def part(k: int) -> list[np.ndarray]:
        lo, hi = bounds[k], bounds[k + 1]
        return [a[lo:hi] if a.shape[0] == n else a for a in flat]

    pool = _executor()
    futures: list[Future[bool]] = [pool.submit(kernel, *part(k), *scalars) for k in range(1, parts)]
    outside = bool(kernel(*part(0), *scalars))
    for future in futures:
        outside = bool(future.result()) or outside
    return outside
