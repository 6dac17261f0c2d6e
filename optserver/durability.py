"""The data directory: every acknowledged change survives a crash, and a restart resumes exactly.

Layout of ``--data-dir``:

- ``wal-NNNNNNNN.log``: the journal (:mod:`optserver.journal`). Each record is one change,
  encoded as a safetensors document whose ``__metadata__["event"]`` says what happened:
  ``created`` (a whole session: id, token digest, options, tensors, state), ``params`` (weights
  set), ``step`` (a push: its gradients and weights, lr, per-group options, base_version,
  worker, idempotency key and how it was answered), ``round`` (a sync round's pushes),
  ``config`` (options changed), ``deleted``, ``rejected`` (bookkeeping only). A step's record
  is written before the step is applied and, with the default fsync policy, on disk before it
  is acknowledged.
- ``snapshot-NNNNNNNN.safetensors``: every session at the moment segment NNNNNNNN began
  (tensors ``<session>/params/...``, ``<session>/state/...``, ``<session>/memo/...`` and one JSON
  record per session), with a CRC-32 of its data. Written to a temporary file, fsynced and
  renamed; then the older snapshots and segments are removed.

Start-up loads the newest snapshot and replays the segments from its number on. Replaying a
step runs the same optimizer arithmetic on the same inputs, so the result is bit for bit the
state before the crash. A torn last record is dropped with a warning; a snapshot that fails its
checksum, or damage inside the journal, stops start-up with a message that names the file,
before anything is served (nothing is ever half-loaded).

- ``LOCK``: one server at a time. The server holds an exclusive ``flock`` on it for its whole
  life (released on close, or by the kernel when the process dies) and writes its pid into it;
  a second server on the same directory stops at start with a message naming the holder.

Disk faults (a full disk, exhausted inodes, a read-only or failing filesystem). A change whose
record cannot be written is refused before it is made: the recorder methods raise
:class:`~optserver.errors.DiskFull` (507, ``ENOSPC``/``EDQUOT``) or
:class:`~optserver.errors.JournalUnavailable` (503), both with ``Retry-After``; ``rejected``
records are bookkeeping and are dropped with a warning instead. :meth:`DataDir.health` says
whether the journal can write (``/readyz``), and :meth:`DataDir.probe`, called about once a
second while it cannot, finds out when it can again, so the server recovers by itself. A
failed fsync is different: the journal fails closed for the rest of the process (see
:mod:`optserver.journal`); every waiter and every later change gets 503 ``journal-unavailable``
and ``/readyz`` says that a restart recovers every acknowledged change. A snapshot that cannot
be written (no space for it, no inode for the next segment) removes its temporary file, keeps
every segment, logs a warning and is retried after a back-off.

Over 400 lines: recording, recovery and snapshots share one journal, one directory lock and
one snapshot lock; it reads sessions only through their public API (a snapshot copies them
inside :meth:`SessionStore.frozen`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from optserver_client import safetensors_io
from optserver_client.safetensors_io import BYTES, DTYPES, SafetensorsError
from pydantic import TypeAdapter

from optserver.errors import DiskFull, JournalUnavailable, NonfiniteResult, ProblemError
from optserver.journal import (
    FsyncPolicy,
    Journal,
    JournalCorrupt,
    JournalError,
    JournalFailed,
    State,
    fsync_directory,
    iterate,
    segments,
)
from optserver.modes import Mode
from optserver.push import Push, RoundMember
from optserver.replies import Answer
from optserver.session import Session
from optserver.snapshot import parse_record, restore_session, session_tensors
from optserver.store import SessionStore

__all__ = ["DataDir", "DataDirError"]

log = logging.getLogger("optserver.durability")
_SNAPSHOT = re.compile(r"^snapshot-(\d{8})\.safetensors$")
_ALL_DTYPES = {**DTYPES, **BYTES}
_MODE: TypeAdapter[Mode] = TypeAdapter(Mode)
LOCK_NAME = "LOCK"
#: Retry-After (seconds) for a full disk, for a write that failed otherwise, for a failed fsync.
RETRY_DISK_FULL_S, RETRY_UNWRITABLE_S, RETRY_FAILED_S = 5.0, 2.0, 30.0
#: After a failed snapshot, wait this long before the next (doubling up to the second value).
SNAPSHOT_BACKOFF_S = (2.0, 60.0)
#: At most one warning per this many seconds about dropped ``rejected`` records.
_DROPPED_WARNING_S = 10.0
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DataDirError(RuntimeError):
    """The data directory cannot be loaded; the message says which file and why."""


def _encode(
    event: dict[str, Any], tensors: Mapping[str, np.ndarray] | None = None
) -> tuple[bytes | memoryview, ...]:
    """A record's payload as pieces (the header, then views of the arrays): the journal writes
    them as they are, without joining a step's gradients into one more copy."""
    return safetensors_io.encode_parts(tensors or {}, {"event": orjson.dumps(event).decode()})


def _decode(payload: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    tensors, metadata = safetensors_io.decode(payload, dtypes=_ALL_DTYPES)
    return orjson.loads(metadata["event"]), tensors


def _answer(event: dict[str, Any]) -> Answer:
    return Answer(event["answer"]["fmt"], event["answer"]["returns"])


def _prefixed(prefix: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}{name}": array for name, array in tensors.items()}


def _unprefix(prefix: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class DataDir:
    """Records changes (the store's :class:`~optserver.store.Recorder`), snapshots, recovers."""

    def __init__(
        self,
        path: Path,
        *,
        fsync: FsyncPolicy = "always",
        fsync_interval_s: float = 1.0,
        snapshot_bytes: int = 256 << 20,
        snapshot_interval_s: float = 300.0,
    ) -> None:
        self.path = path
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.snapshot_bytes = snapshot_bytes
        self.snapshot_interval_s = snapshot_interval_s
        self.journal: Journal | None = None
        self.store: SessionStore | None = None
        self._lock_fd = -1
        self._snapshot_lock = threading.Lock()
        self._snapshot_requested = threading.Event()
        self._last_snapshot = time.monotonic()
        self._snapshot_failures = 0
        self._snapshot_retry_at = 0.0  # monotonic; no snapshot is started before it
        self._dropped = 0  # rejected records not written since the last warning about them
        self._dropped_warned = 0.0

    # --- start-up ------------------------------------------------------------------------

    def open(self, store: SessionStore) -> None:
        """Lock the directory, load the newest snapshot, replay the journal, then record every
        change of ``store``. Raises :class:`DataDirError` (and holds no lock) if it cannot."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataDirError(f"cannot create the data directory {self.path}: {exc}") from exc
        self._lock_fd = _lock_directory(self.path)
        try:
            self._recover(store)
        except BaseException:
            self._unlock()
            raise

    def _recover(self, store: SessionStore) -> None:
        self.store = store
        store.set_recorder(None)
        replayed = 0
        try:
            first = self._load_snapshot(store)
            for segment, payloads in iterate(self.path, first):
                for index, payload in enumerate(payloads):
                    try:
                        self._replay(store, *_decode(payload))
                    except (ProblemError, SafetensorsError, KeyError, ValueError) as exc:
                        raise DataDirError(
                            f"{segment.path}: record {index} cannot be replayed: {exc}"
                        ) from exc
                    replayed += 1
            for stale in segments(self.path):
                if stale.number < first:  # a fold interrupted after its snapshot was committed
                    stale.path.unlink()
            number = max([first, *(s.number for s in segments(self.path))])
            self.journal = Journal(self.path, number, self.fsync, self.fsync_interval_s)
        except JournalCorrupt as exc:
            raise DataDirError(str(exc)) from exc
        except OSError as exc:
            raise DataDirError(f"data directory {self.path}: {exc}") from exc
        store.set_recorder(self)
        log.info(
            "data directory %s: %d sessions, %d journal records replayed",
            self.path, len(store), replayed,
        )  # fmt: skip

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            try:
                os.close(fd)  # closing the last descriptor of the file releases the flock
            except OSError as exc:
                log.warning("closing %s: %s", self.path / LOCK_NAME, exc)

    def _load_snapshot(self, store: SessionStore) -> int:
        found = sorted(
            (int(m.group(1)), entry)
            for entry in self.path.iterdir()
            if (m := _SNAPSHOT.match(entry.name))
        )
        for stale in self.path.glob("snapshot.tmp*"):
            stale.unlink()  # an interrupted snapshot: never renamed, so never valid
        if not found:
            return 0
        number, path = found[-1]
        try:
            data = path.read_bytes()
            tensors, metadata = safetensors_io.decode(data, dtypes=_ALL_DTYPES)
            header_len = int.from_bytes(data[:8], "little")
            crc = zlib.crc32(memoryview(data)[8 + header_len :])
            if str(crc) != metadata.get("optserver.crc32"):
                raise DataDirError(f"{path}: its data fails the checksum (the file is damaged)")
            index = orjson.loads(metadata["optserver.snapshot"])
            sessions = []
            for session_id, raw in index["sessions"].items():
                record = parse_record(orjson.dumps(raw))
                sessions.append(
                    restore_session(record, _unprefix(f"{session_id}/", tensors), store.limits)
                )
        except DataDirError:
            raise
        except (OSError, SafetensorsError, ProblemError, KeyError, ValueError) as exc:
            raise DataDirError(f"{path}: the snapshot cannot be loaded: {exc}") from exc
        for session in sessions:
            store.add(session)
        return number

    def _replay(
        self, store: SessionStore, event: dict[str, Any], tensors: dict[str, np.ndarray]
    ) -> None:
        kind = event["type"]
        if kind == "created":
            record = parse_record(orjson.dumps(event["record"]))
            store.add(restore_session(record, tensors, store.limits))
            return
        if kind == "deleted":
            store.delete(event["session"])
            return
        session = store.get(event["session"])
        if kind == "params":
            session.put_params(tensors, reset_state=bool(event.get("reset_state", False)))
        elif kind == "step":
            # A step refused for its result was refused when it arrived too (its record
            # precedes it): replaying it refuses it again, identically.
            with contextlib.suppress(NonfiniteResult):
                session.step(
                    self._push(event, tensors, ""),
                    key=event.get("key"),
                    answer=_answer(event),
                    fingerprint=event.get("fingerprint"),
                )
        elif kind == "round":
            members = [
                RoundMember(
                    self._push(m, tensors, f"m{i}/"), m.get("key"), _answer(m), m.get("fingerprint")
                )
                for i, m in enumerate(event["members"])
            ]
            with contextlib.suppress(NonfiniteResult):  # as a step above
                session.apply_round(members)
        elif kind == "config":
            session.configure(
                optimizer=event["optimizer"],
                schedule=event["schedule"],
                mode=_MODE.validate_python(event["mode"]),
                nonfinite=event["nonfinite"],
            )
        elif kind == "rejected":
            session.reject(event["reason"], event.get("worker"))
        else:
            raise ValueError(f"unknown journal event {kind!r}")

    @staticmethod
    def _push(event: dict[str, Any], tensors: dict[str, np.ndarray], prefix: str) -> Push:
        return Push(
            grads=_unprefix(f"{prefix}g/", tensors),
            params=_unprefix(f"{prefix}p/", tensors),
            lr=event.get("lr"),
            base_version=event.get("base_version"),
            worker=event.get("worker"),
            groups=event.get("groups"),
            partial=bool(event.get("partial", False)),
        )

    # --- the Recorder protocol -------------------------------------------------------------

    def _append(
        self, event: dict[str, Any], tensors: Mapping[str, np.ndarray] | None = None
    ) -> int:
        """Write one record, or raise the problem that refuses the change (nothing written)."""
        journal = self.journal
        if journal is None:
            raise JournalUnavailable(
                f"the data directory {self.path} is not open", retry_after=RETRY_UNWRITABLE_S
            )
        try:
            ticket = journal.append(_encode(event, tensors))
        except JournalError as exc:
            raise self._problem(exc) from exc
        if journal.segment_bytes >= self.snapshot_bytes:
            self._request_snapshot()
        return ticket

    def _problem(self, exc: JournalError) -> ProblemError:
        """The answer to a change the journal could not take: 507 if the disk is full."""
        detail = (
            f"the data directory {self.path} cannot record the change, so it was not made: {exc}"
        )
        if isinstance(exc, JournalFailed):
            return JournalUnavailable(detail, retry_after=RETRY_FAILED_S)
        if exc.errno in _FULL:
            return DiskFull(detail, retry_after=RETRY_DISK_FULL_S)
        return JournalUnavailable(detail, retry_after=RETRY_UNWRITABLE_S)

    def created(self, session: Session) -> int:
        tensors, record = session_tensors(session, private=True)
        return self._append({"type": "created", "record": record.model_dump(mode="json")}, tensors)

    def params_put(
        self, session: Session, tensors: Mapping[str, np.ndarray], reset_state: bool = False
    ) -> int:
        event: dict[str, Any] = {"type": "params", "session": session.id}
        if reset_state:  # only when set: older records read the same
            event["reset_state"] = True
        return self._append(event, tensors)

    @staticmethod
    def _push_event(
        push: Push, key: str | None, answer: Answer, fingerprint: str | None
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "lr": push.lr,
            "base_version": push.base_version,
            "worker": push.worker,
            "key": key,
            "answer": {"fmt": answer.fmt, "returns": answer.returns},
        }
        if fingerprint is not None:
            event["fingerprint"] = fingerprint
        if push.groups is not None:  # only when set: older records read the same
            event["groups"] = push.groups
        if push.partial:
            event["partial"] = True
        return event

    def stepped(
        self,
        session: Session,
        push: Push,
        key: str | None,
        answer: Answer,
        fingerprint: str | None = None,
    ) -> int:
        event = {
            "type": "step",
            "session": session.id,
            **self._push_event(push, key, answer, fingerprint),
        }
        return self._append(event, {**_prefixed("g/", push.grads), **_prefixed("p/", push.params)})

    def round_applied(self, session: Session, members: list[RoundMember]) -> int:
        tensors: dict[str, np.ndarray] = {}
        described = []
        for i, m in enumerate(members):
            tensors.update(_prefixed(f"m{i}/g/", m.push.grads))
            described.append(self._push_event(m.push, m.key, m.answer, m.fingerprint))
        return self._append({"type": "round", "session": session.id, "members": described}, tensors)

    def configured(self, session: Session) -> int:
        return self._append(
            {
                "type": "config",
                "session": session.id,
                "optimizer": session.optimizer.config(),
                "schedule": None if session.schedule is None else session.schedule.config(),
                "mode": session.mode.model_dump(),
                "nonfinite": session.nonfinite,
            }
        )

    def deleted(self, session_id: str) -> int:
        return self._append({"type": "deleted", "session": session_id})

    def rejected(self, session: Session, reason: str, worker: str | None) -> None:
        """Bookkeeping only: never raises; a record that cannot be written is dropped (a
        restart then counts one rejection less)."""
        try:
            self._append(
                {"type": "rejected", "session": session.id, "reason": reason, "worker": worker}
            )
        except ProblemError as exc:
            self._dropped += 1
            now = time.monotonic()
            if now - self._dropped_warned >= _DROPPED_WARNING_S:  # once per outage, not per push
                log.warning(
                    "dropped %d record(s) of rejected pushes: %s", self._dropped, exc.detail
                )
                self._dropped, self._dropped_warned = 0, now

    def wait(self, ticket: int | None) -> None:
        """Block until ``ticket`` is durable; :class:`JournalUnavailable` if its fsync failed."""
        if self.journal is not None:
            try:
                self.journal.wait(ticket)
            except JournalError as exc:
                raise self._unsynced(exc) from exc

    def sync(self) -> None:
        if self.journal is not None:
            try:
                self.journal.sync()
            except JournalError as exc:
                raise self._unsynced(exc) from exc

    def _unsynced(self, exc: JournalError) -> JournalUnavailable:
        return JournalUnavailable(
            f"the data directory {self.path} could not make the change durable: {exc}",
            retry_after=RETRY_FAILED_S,
        )

    # --- health --------------------------------------------------------------------------

    def health(self) -> tuple[bool, str | None]:
        """Whether the journal can record changes now, and if not, why (for ``/readyz``).
        Cheap and lock-free: it reads the journal's current status."""
        journal = self.journal
        if journal is None or journal.closed:
            return False, f"the data directory {self.path} is not open"
        status = journal.status
        if status.state is State.OK:
            return True, None
        return False, f"data directory {self.path}: {status.reason}"

    def probe(self) -> bool:
        """While the journal cannot write, find out whether it can again (it repairs a dirty
        tail, then writes and cuts off a probe): how the server recovers when nobody pushes.
        Blocking: call it from a worker thread."""
        journal = self.journal
        return journal is not None and journal.probe()

    # --- snapshots -------------------------------------------------------------------------

    def _request_snapshot(self) -> None:
        """One snapshot in the background, however many appends ask while it is pending."""
        if self._snapshot_requested.is_set() or time.monotonic() < self._snapshot_retry_at:
            return
        self._snapshot_requested.set()

        def run() -> None:
            try:
                with self._snapshot_lock:  # another snapshot may have just folded the journal
                    due = self.due()
                if due:
                    self.snapshot()
            except Exception:  # a thread's exception would otherwise go to stderr only
                log.exception("the background snapshot failed")
            finally:
                self._snapshot_requested.clear()

        try:
            threading.Thread(target=run, name="optserver-snapshot", daemon=True).start()
        except RuntimeError as exc:  # no thread now: the next append, or maintenance, asks again
            self._snapshot_requested.clear()
            log.warning("cannot start a snapshot thread: %s", exc)

    def due(self) -> bool:
        """Whether the periodic check should snapshot now."""
        journal = self.journal
        if journal is None or journal.segment_bytes == 0 or journal.status.state is not State.OK:
            return False
        if time.monotonic() < self._snapshot_retry_at:
            return False
        return (
            journal.segment_bytes >= self.snapshot_bytes
            or time.monotonic() - self._last_snapshot >= self.snapshot_interval_s
        )

    def snapshot(self) -> Path | None:
        """Write a snapshot of every session and drop the journal before it; None if nothing
        was written (no journal, the journal cannot write, or the snapshot failed: then every
        segment is kept, a warning is logged and the next try waits for a back-off)."""
        if self.journal is None or self.store is None:
            return None
        with self._snapshot_lock:
            store, journal = self.store, self.journal
            if journal.status.state is not State.OK:
                # Failing: nothing to cut. Failed: memory may hold changes whose fsync failed
                # (answered 503); they must not reach a snapshot.
                return None
            try:
                number, tensors, records = self._cut(store, journal)
                path = self._write_snapshot(number, tensors, records)
            except (OSError, JournalError) as exc:
                self._snapshot_failed(exc)
                return None
            self._last_snapshot = time.monotonic()
            self._snapshot_failures, self._snapshot_retry_at = 0, 0.0
            return path

    def _cut(
        self, store: SessionStore, journal: Journal
    ) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
        """Start the next segment and copy every session, with nothing changing in between."""
        with store.frozen() as sessions:
            number = journal.rotate()
            tensors: dict[str, np.ndarray] = {}
            records: dict[str, Any] = {}
            for session in sessions:
                own, record = session_tensors(session, private=True)
                # Weights and state move on as soon as the locks are released: copy them
                # (remembered answers never change: no copy).
                tensors.update(
                    {
                        f"{session.id}/{k}": v if k.startswith("memo/") else v.copy()
                        for k, v in own.items()
                    }
                )
                records[session.id] = record.model_dump(mode="json")
        return number, tensors, records

    def _snapshot_failed(self, exc: BaseException) -> None:
        self._snapshot_failures += 1
        backoff = min(
            SNAPSHOT_BACKOFF_S[0] * 2 ** min(self._snapshot_failures - 1, 16),
            SNAPSHOT_BACKOFF_S[1],
        )
        self._snapshot_retry_at = time.monotonic() + backoff
        log.warning(
            "snapshot of %s failed (%s); every journal segment is kept; next try in %.0f s",
            self.path, exc, backoff,
        )  # fmt: skip

    def _write_snapshot(
        self, number: int, tensors: dict[str, np.ndarray], records: dict[str, Any]
    ) -> Path:
        crc = 0
        for array in tensors.values():
            crc = zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data, crc)
        metadata = {
            "optserver.snapshot": orjson.dumps(
                {"format": 1, "segment": number, "sessions": records}
            ).decode(),
            "optserver.crc32": str(crc),
        }
        final = self.path / f"snapshot-{number:08d}.safetensors"
        temporary = self.path / f"snapshot.tmp-{number:08d}"
        size = 0
        try:
            with open(temporary, "wb") as f:
                # Header, then each tensor straight from its array: no document-sized buffer.
                size += f.write(safetensors_io.header_bytes(tensors, metadata))
                for array in tensors.values():
                    size += f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, final)
        except OSError:
            _remove(temporary)  # never renamed: never valid, and it holds the space we lack
            raise
        # Until the rename is durable, the older snapshot and its segments are what a crash
        # restarts from: a failure here keeps them all (the caller logs it).
        fsync_directory(self.path)
        for old in self.path.iterdir():
            m = _SNAPSHOT.match(old.name)
            if m and int(m.group(1)) < number:
                _remove(old)
        for segment in segments(self.path):
            if segment.number < number:
                _remove(segment.path)  # one left behind is removed at the next start
        log.info("snapshot %s: %d sessions, %d bytes", final.name, len(records), size)
        return final

    def close(self, *, snapshot: bool = True) -> None:
        """Stop recording and let go of the directory; with ``snapshot``, first fold the
        journal into a snapshot (a quick restart) unless nothing changed since the last one."""
        try:
            if snapshot and self.journal is not None and self.journal.segment_bytes > 0:
                self.snapshot()
            if self.journal is not None:
                self.journal.close()
        finally:
            self._unlock()


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _lock_directory(path: Path) -> int:
    """Take the directory's exclusive lock (non-blocking) and write our pid into it; the
    descriptor holds the lock. Raises :class:`DataDirError` naming the holder if it is taken."""
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DataDirError(f"cannot open {lock_path} to lock the data directory: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            by = "another optserver" + ("" if holder is None else f" (pid {holder})")
            raise DataDirError(
                f"the data directory {path} is in use by {by}: one server per directory"
            ) from None
        raise DataDirError(f"cannot lock {lock_path}: {exc}") from exc
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:  # the lock is what counts; the pid only helps the message
        log.warning("cannot write the pid into %s: %s", lock_path, exc)
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
