"""The timing loop the micro-benchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(call: Callable[[], object], repeat: int) -> float:
    """The median time of ``call`` over ``repeat`` runs, in ms, after three untimed ones
    (compilation, lazily created state, first page faults)."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
