"""Prometheus metrics of one server, in a registry of its own (tests run several apps).

Label cardinality is bounded whatever clients do: per-session series for the newest
``sessions`` sessions, per-worker series for the first ``workers`` workers of each of them,
everything else folded into ``session="_other"`` / ``worker="_other"``, and label values cut
to ``label_bytes`` bytes. Folding keeps sums: the server-wide totals are exact, and the
per-worker series of a counter add up to what every worker did. A scrape is generated in a
worker thread, one at a time.

The HTTP exchanges are counted by :mod:`optserver.api.middleware`, which feeds the request
families defined here.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import anyio.to_thread
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from optserver.store import Session, SessionStore
from optserver.workers import STALENESS_BUCKETS, StalenessHistogram, WorkerStats

__all__ = ["OTHER", "Metrics", "SessionCollector", "label_value"]

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: The label value of the series that sessions and workers beyond the limits are folded into.
OTHER = "_other"


class Metrics:
    def __init__(
        self,
        store: SessionStore,
        *,
        sessions: int = 16,
        workers: int = 8,
        label_bytes: int = 64,
    ) -> None:
        r = self.registry = CollectorRegistry()
        self.replays = Counter(
            "optserver_idempotent_replays", "Pushes answered from the idempotency memory.",
            registry=r,
        )  # fmt: skip
        self.step_seconds = Histogram(
            "optserver_step_seconds", "Time to apply one push (lock wait excluded).",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.bytes = Counter(
            "optserver_http_bytes", "HTTP body bytes, by direction (in, out).", ["direction"],
            registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "optserver_http_requests", "HTTP requests by method, route and status.",
            ["method", "route", "status"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "optserver_http_request_seconds", "HTTP request latency by route.", ["route"],
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        gauge = Gauge("optserver_sessions", "Sessions held.", registry=r)
        gauge.set_function(lambda: len(store))
        memory = Gauge(
            "optserver_session_memory_bytes", "Bytes of weights and optimizer state held.",
            registry=r,
        )  # fmt: skip
        memory.set_function(lambda: sum(s.memory_bytes for s in store.sessions()))
        self.collector = SessionCollector(
            store, sessions=sessions, workers=workers, label_bytes=label_bytes
        )
        r.register(self.collector)
        # Scrapes take turns; one that arrives while another runs waits and then shares the
        # next generation (never an older one: what happened before it asked is in it).
        self._scrape_lock = asyncio.Lock()
        self._started = self._finished = 0
        self._body = b""

    def generate(self) -> bytes:
        """The exposition text, generated here and now (blocking: keep it off the loop)."""
        return generate_latest(self.registry)

    async def render(self) -> bytes:
        """The exposition text, generated in a worker thread: a scrape of many sessions takes
        a while, and the event loop must keep serving meanwhile."""
        asked = self._started
        async with self._scrape_lock:
            if self._finished > asked:  # began after this scrape arrived: fresh enough
                return self._body
            self._started += 1
            generation = self._started
            body = await anyio.to_thread.run_sync(self.generate)
            self._finished, self._body = generation, body
            return body


def label_value(value: str, limit: int) -> str:
    """``value`` as a label value of at most ``limit`` (>= 9) UTF-8 bytes: kept if it fits
    and encodes, else a prefix plus ``~`` and a digest of the whole, so that distinct long
    names stay distinct series."""
    raw = value.encode("utf-8", "surrogatepass")
    try:
        value.encode()
        if len(raw) <= limit:
            return value
    except UnicodeEncodeError:  # lone surrogates: the exposition could not encode them
        pass
    digest = hashlib.blake2b(raw, digest_size=4).hexdigest()
    prefix = raw[: max(0, limit - 9)].decode("utf-8", "ignore")  # whole characters only
    return f"{prefix}~{digest}"


def _buckets(counts: Iterable[int]) -> list[tuple[str, float]]:
    cumulative, out = 0, list[tuple[str, float]]()
    for bound, count in zip((*STALENESS_BUCKETS, None), counts, strict=True):
        cumulative += count
        out.append(("+Inf" if bound is None else str(float(bound)), cumulative))
    return out


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(STALENESS_BUCKETS) + 1))
    total: int = 0

    def add(self, other: StalenessHistogram | _Histogram) -> None:
        for i, count in enumerate(other.counts):
            self.counts[i] += count
        self.total += other.total


@dataclass
class _Workers:
    """One per-worker series: the sums of the workers it stands for."""

    pushes: int = 0
    applied: int = 0
    rejected: int = 0
    staleness: _Histogram = field(default_factory=_Histogram)
    last_base_version: int | None = None
    members: int = 0

    def add(self, stats: WorkerStats) -> None:
        self.pushes += stats.pushes
        self.applied += stats.applied
        self.rejected += sum(stats.rejected.values())
        self.staleness.add(stats.staleness)
        self.last_base_version = stats.last_base_version
        self.members += 1

    def merge(self, other: _Workers) -> None:
        self.pushes += other.pushes
        self.applied += other.applied
        self.rejected += other.rejected
        self.staleness.add(other.staleness)
        self.last_base_version = other.last_base_version
        self.members += other.members


@dataclass
class _Session:
    memory_bytes: int = 0
    staleness: _Histogram = field(default_factory=_Histogram)


@dataclass
class _Folded:
    """A folded session's contribution, reused while its push count stands still (every
    change to its per-worker bookkeeping comes with a push counted)."""

    session: weakref.ReferenceType[Session]
    pushes_received: int
    workers: _Workers


class SessionCollector:
    """The server's step and push totals, and per-session and per-worker bookkeeping, read
    from the store at scrape time: counted once, where they happen (a sync round is one step),
    and deleted sessions and forgotten workers simply disappear from the per-session series.

    Bounded: the newest ``sessions`` sessions get series of their own, and in each the first
    ``workers`` workers seen by the metrics (they keep their series while the session
    remembers them); the rest are folded into ``_other``."""

    def __init__(
        self, store: SessionStore, *, sessions: int = 16, workers: int = 8, label_bytes: int = 64
    ) -> None:
        self.store = store
        self.max_sessions = sessions
        self.max_workers = workers
        self.label_bytes = label_bytes
        self._lock = threading.Lock()
        self._slots: dict[str, list[str]] = {}  # session id -> workers with series of their own
        self._folded: dict[str, _Folded] = {}

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        steps = CounterMetricFamily("optserver_steps_applied", "Optimizer steps applied.")
        received = CounterMetricFamily("optserver_pushes_received", "Gradient pushes received.")
        refused = CounterMetricFamily(
            "optserver_pushes_rejected", "Pushes refused or skipped, by reason.", labels=["reason"]
        )
        totals = self.store.totals()
        steps.add_metric([], totals["steps_applied"])
        received.add_metric([], totals["pushes_received"])
        for reason, count in sorted(totals["rejected"].items()):
            refused.add_metric([reason], count)
        yield from (steps, received, refused)
        with self._lock:
            per_session, per_worker = self._gather()
        yield from self._families(per_session, per_worker)

    def _gather(self) -> tuple[dict[str, _Session], dict[tuple[str, str], _Workers]]:
        """Per-session and per-worker sums by label (labels that coincide share a series)."""
        per_session: dict[str, _Session] = {}
        per_worker: dict[tuple[str, str], _Workers] = {}
        # Creation order; the newest are the ones worth watching (old ones are often idle), and
        # unlike "most recently used" the choice does not flap from scrape to scrape.
        sessions = self.store.sessions()
        cut = max(0, len(sessions) - self.max_sessions)
        folded, shown = sessions[:cut], sessions[cut:]
        slots: dict[str, list[str]] = {}
        for session in shown:
            label = label_value(session.id, self.label_bytes)
            mine = per_session.setdefault(label, _Session())
            with session.locked():
                mine.memory_bytes += session.memory_bytes
                mine.staleness.add(session.staleness)
                book = dict(session.workers)
                kept = [w for w in self._slots.get(session.id, ()) if w in book]
                del kept[self.max_workers :]
                for worker in reversed(book):  # free slots go to the most recently active
                    if len(kept) >= self.max_workers:
                        break
                    if worker not in kept:
                        kept.append(worker)
                slots[session.id] = kept
                named = set(kept)
                for worker, stats in book.items():
                    key = (
                        label,
                        label_value(worker, self.label_bytes) if worker in named else OTHER,
                    )
                    per_worker.setdefault(key, _Workers()).add(stats)
        self._slots = slots
        cache: dict[str, _Folded] = {}
        rest = _Session()
        rest_workers = _Workers()
        for session in folded:
            with session.locked():
                rest.memory_bytes += session.memory_bytes
                rest.staleness.add(session.staleness)
                known = self._folded.get(session.id)
                if (
                    known is None
                    or known.session() is not session
                    or known.pushes_received != session.pushes_received
                ):
                    sums = _Workers()
                    for _, stats in session.workers:
                        sums.add(stats)
                    known = _Folded(weakref.ref(session), session.pushes_received, sums)
            cache[session.id] = known
            if known.workers.members:
                rest_workers.merge(known.workers)
        self._folded = cache
        if folded:
            per_session.setdefault(OTHER, _Session())
            mine = per_session[OTHER]
            mine.memory_bytes += rest.memory_bytes
            mine.staleness.add(rest.staleness)
            if rest_workers.members:
                per_worker.setdefault((OTHER, OTHER), _Workers()).merge(rest_workers)
        return per_session, per_worker

    def _families(
        self, per_session: dict[str, _Session], per_worker: dict[tuple[str, str], _Workers]
    ) -> Iterator[Metric]:
        labels = ["session", "worker"]
        staleness = HistogramMetricFamily(
            "optserver_push_staleness",
            "Steps between the version a gradient was computed on and the one it was applied "
            "to, per session.",
            labels=["session"],
        )
        pushes = CounterMetricFamily("optserver_worker_pushes", "Pushes by worker.", labels=labels)
        applied = CounterMetricFamily(
            "optserver_worker_applied", "Pushes applied, by worker.", labels=labels
        )
        rejected = CounterMetricFamily(
            "optserver_worker_rejected", "Pushes refused or skipped, by worker.", labels=labels
        )
        seen = GaugeMetricFamily(
            "optserver_worker_last_base_version",
            "The version a worker's last push was computed on.",
            labels=labels,
        )
        session_bytes = GaugeMetricFamily(
            "optserver_session_bytes",
            "Bytes of weights and optimizer state held by a session.",
            labels=["session"],
        )
        worker_staleness = HistogramMetricFamily(
            "optserver_worker_staleness", "Staleness of a worker's applied pushes.", labels=labels
        )
        for label, session in per_session.items():
            session_bytes.add_metric([label], session.memory_bytes)
            staleness.add_metric(
                [label], _buckets(session.staleness.counts), float(session.staleness.total)
            )
        for key, sums in per_worker.items():
            series = list(key)
            pushes.add_metric(series, sums.pushes)
            applied.add_metric(series, sums.applied)
            rejected.add_metric(series, sums.rejected)
            # A version is one worker's: a folded series has none to show.
            if sums.members == 1 and sums.last_base_version is not None:
                seen.add_metric(series, sums.last_base_version)
            worker_staleness.add_metric(
                series, _buckets(sums.staleness.counts), float(sums.staleness.total)
            )
        yield from (session_bytes, staleness, pushes, applied, rejected, seen, worker_staleness)
