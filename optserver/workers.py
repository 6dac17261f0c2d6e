"""Per-worker bookkeeping of a session: pushes, rejections, versions seen, staleness."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STALENESS_BUCKETS", "OpenStep", "StalenessHistogram", "WorkerBook", "WorkerStats"]

#: Upper bounds (inclusive) of the staleness histogram's buckets; larger values go to "+Inf".
STALENESS_BUCKETS: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)


@dataclass
class StalenessHistogram:
    """How many steps behind the session's version accepted gradients were computed."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(STALENESS_BUCKETS) + 1))
    total: int = 0

    def observe(self, staleness: int) -> None:
        for i, bound in enumerate(STALENESS_BUCKETS):
            if staleness <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += staleness

    @property
    def count(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict[str, Any]:
        labels = [str(b) for b in STALENESS_BUCKETS] + ["+Inf"]
        return {
            "buckets": dict(zip(labels, self.counts, strict=True)),
            "count": self.count,
            "mean": self.total / self.count if self.count else None,
        }


@dataclass(frozen=True)
class OpenStep:
    """A step the worker pushes in parts (``partial`` pushes) and has not completed yet: the
    ``base_version`` its parts carry, and the session ``version`` its first part was applied
    at, at which its other parts are judged (see :meth:`Session.judged_version
    <optserver.session.Session.judged_version>`)."""

    base_version: int | None
    version: int

    def to_dict(self) -> dict[str, Any]:
        return {"base_version": self.base_version, "version": self.version}


@dataclass
class WorkerStats:
    pushes: int = 0
    applied: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    #: The ``base_version`` of the worker's last push: the newest weights it had seen.
    last_base_version: int | None = None
    #: The session version right after the worker's last applied push.
    last_version: int | None = None
    last_seen: float = 0.0
    staleness: StalenessHistogram = field(default_factory=StalenessHistogram)
    #: The step the worker is pushing in parts, if one is under way.
    open_step: OpenStep | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pushes": self.pushes,
            "applied": self.applied,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected),
            "last_base_version": self.last_base_version,
            "last_version": self.last_version,
            "last_seen": self.last_seen,
            "staleness": self.staleness.to_dict(),
            "open_step": None if self.open_step is None else self.open_step.to_dict(),
        }


class WorkerBook:
    """Stats by worker id, bounded: the longest-silent worker is forgotten past ``limit``."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._workers: OrderedDict[str, WorkerStats] = OrderedDict()

    def __iter__(self) -> Any:
        return iter(self._workers.items())

    def get(self, worker: str | None) -> WorkerStats | None:
        """The worker's stats (created on first sight, marked as seen now); None if anonymous."""
        if not worker:
            return None
        stats = self._workers.get(worker)
        if stats is None:
            stats = self._workers[worker] = WorkerStats()
            while len(self._workers) > self.limit:
                self._workers.popitem(last=False)
        else:
            self._workers.move_to_end(worker)
        stats.last_seen = time.time()
        return stats

    def peek(self, worker: str | None) -> WorkerStats | None:
        """The worker's stats if it has any, as they are (not marked as seen)."""
        return self._workers.get(worker) if worker else None

    def to_dict(self) -> dict[str, Any]:
        return {worker: stats.to_dict() for worker, stats in self._workers.items()}

    def restore(self, data: dict[str, Any]) -> None:
        """From :meth:`to_dict` (e.g. a snapshot); unknown fields are ignored."""
        for worker, entry in data.items():
            stats = WorkerStats(
                pushes=int(entry.get("pushes", 0)),
                applied=int(entry.get("applied", 0)),
                rejected=Counter(
                    {str(k): int(v) for k, v in entry.get("rejected_by_reason", {}).items()}
                ),
                last_base_version=entry.get("last_base_version"),
                last_version=entry.get("last_version"),
                last_seen=float(entry.get("last_seen", 0.0)),
            )
            open_step = entry.get("open_step")
            if open_step is not None:
                base = open_step["base_version"]
                stats.open_step = OpenStep(
                    None if base is None else int(base), int(open_step["version"])
                )
            buckets = entry.get("staleness", {}).get("buckets", {})
            labels = [str(b) for b in STALENESS_BUCKETS] + ["+Inf"]
            stats.staleness.counts = [int(buckets.get(label, 0)) for label in labels]
            mean = entry.get("staleness", {}).get("mean")
            stats.staleness.total = round(mean * stats.staleness.count) if mean else 0
            self._workers[str(worker)] = stats
