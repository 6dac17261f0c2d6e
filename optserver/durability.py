"""The data directory: every acknowledged change survives a crash, and a restart resumes exactly.

Layout of ``--data-dir``:

- ``wal-NNNNNNNN.log``: the journal (:mod:`optserver.journal`). Each record is one change,
  encoded as a safetensors document whose ``__metadata__["event"]`` says what happened:
  ``created`` (a whole session: id, token digest, options, tensors, state), ``params`` (weights
  set), ``step`` (a push: its gradients and weights, lr, base_version, worker, idempotency key
  and how it was answered), ``round`` (a sync round's pushes), ``config`` (options changed),
  ``deleted``, ``rejected`` (bookkeeping only). A step's record is written before the step is
  applied and, with the default fsync policy, on disk before it is acknowledged.
- ``snapshot-NNNNNNNN.safetensors``: every session at the moment segment NNNNNNNN began
  (tensors ``<session>/params/...``, ``<session>/state/...``, ``<session>/memo/...`` and one JSON
  record per session), with a CRC-32 of its data. Written to a temporary file, fsynced and
  renamed; then the older snapshots and segments are removed.

Start-up loads the newest snapshot and replays the segments from its number on. Replaying a
step runs the same optimizer arithmetic on the same inputs, so the result is bit for bit the
state before the crash. A torn last record is dropped with a warning; a snapshot that fails its
checksum, or damage inside the journal, stops start-up with a message that names the file,
before anything is served (nothing is ever half-loaded).
"""

from __future__ import annotations

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

from optserver.errors import ProblemError
from optserver.journal import (
    FsyncPolicy,
    Journal,
    JournalCorrupt,
    fsync_directory,
    iterate,
    segments,
)
from optserver.modes import Mode
from optserver.replies import Answer
from optserver.snapshot import parse_record, restore_session, session_tensors
from optserver.store import Push, RoundMember, Session, SessionStore

__all__ = ["DataDir", "DataDirError"]

log = logging.getLogger("optserver.durability")
_SNAPSHOT = re.compile(r"^snapshot-(\d{8})\.safetensors$")
_ALL_DTYPES = {**DTYPES, **BYTES}
_MODE: TypeAdapter[Mode] = TypeAdapter(Mode)


class DataDirError(RuntimeError):
    """The data directory cannot be loaded; the message says which file and why."""


def _encode(event: dict[str, Any], tensors: Mapping[str, np.ndarray] | None = None) -> memoryview:
    return safetensors_io.encode(tensors or {}, {"event": orjson.dumps(event).decode()})


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
        self._snapshot_lock = threading.Lock()
        self._snapshot_requested = threading.Event()
        self._last_snapshot = time.monotonic()

    # --- start-up ------------------------------------------------------------------------

    def open(self, store: SessionStore) -> None:
        """Load the newest snapshot, replay the journal, then record every change of ``store``."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.store = store
        store.set_recorder(None)
        first = self._load_snapshot(store)
        replayed = 0
        try:
            for segment, payloads in iterate(self.path, first):
                for index, payload in enumerate(payloads):
                    try:
                        self._replay(store, *_decode(payload))
                    except (ProblemError, SafetensorsError, KeyError, ValueError) as exc:
                        raise DataDirError(
                            f"{segment.path}: record {index} cannot be replayed: {exc}"
                        ) from exc
                    replayed += 1
        except JournalCorrupt as exc:
            raise DataDirError(str(exc)) from exc
        for stale in segments(self.path):
            if stale.number < first:  # a fold interrupted after its snapshot was committed
                stale.path.unlink()
        number = max([first, *(s.number for s in segments(self.path))])
        self.journal = Journal(self.path, number, self.fsync, self.fsync_interval_s)
        store.set_recorder(self)
        log.info(
            "data directory %s: %d sessions, %d journal records replayed",
            self.path, len(store), replayed,
        )  # fmt: skip

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
            session.put_params(tensors)
        elif kind == "step":
            session.step(
                self._push(event, tensors, ""), key=event.get("key"), answer=_answer(event)
            )
        elif kind == "round":
            members = [
                RoundMember(self._push(m, tensors, f"m{i}/"), m.get("key"), _answer(m))
                for i, m in enumerate(event["members"])
            ]
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
        )

    # --- the Recorder protocol -------------------------------------------------------------

    def _append(
        self, event: dict[str, Any], tensors: Mapping[str, np.ndarray] | None = None
    ) -> int:
        assert self.journal is not None, "the data directory is not open"
        ticket = self.journal.append(_encode(event, tensors))
        if self.journal.segment_bytes >= self.snapshot_bytes:
            self._request_snapshot()
        return ticket

    def created(self, session: Session) -> int:
        tensors, record = session_tensors(session, private=True)
        return self._append({"type": "created", "record": record.model_dump(mode="json")}, tensors)

    def params_put(self, session: Session, tensors: Mapping[str, np.ndarray]) -> int:
        return self._append({"type": "params", "session": session.id}, tensors)

    @staticmethod
    def _push_event(push: Push, key: str | None, answer: Answer) -> dict[str, Any]:
        return {
            "lr": push.lr,
            "base_version": push.base_version,
            "worker": push.worker,
            "key": key,
            "answer": {"fmt": answer.fmt, "returns": answer.returns},
        }

    def stepped(self, session: Session, push: Push, key: str | None, answer: Answer) -> int:
        event = {
            "type": "step",
            "session": session.id,
            **self._push_event(push, key, answer),
        }
        return self._append(event, {**_prefixed("g/", push.grads), **_prefixed("p/", push.params)})

    def round_applied(self, session: Session, members: list[RoundMember]) -> int:
        tensors: dict[str, np.ndarray] = {}
        described = []
        for i, m in enumerate(members):
            tensors.update(_prefixed(f"m{i}/g/", m.push.grads))
            described.append(self._push_event(m.push, m.key, m.answer))
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
        self._append(
            {"type": "rejected", "session": session.id, "reason": reason, "worker": worker}
        )

    def wait(self, ticket: int | None) -> None:
        if self.journal is not None:
            self.journal.wait(ticket)

    def sync(self) -> None:
        if self.journal is not None:
            self.journal.wait(self.journal._written)

    # --- snapshots -------------------------------------------------------------------------

    def _request_snapshot(self) -> None:
        """One snapshot in the background, however many appends ask while it is pending."""
        if self._snapshot_requested.is_set():
            return
        self._snapshot_requested.set()

        def run() -> None:
            try:
                with self._snapshot_lock:  # another snapshot may have just folded the journal
                    due = self.due()
                if due:
                    self.snapshot()
            finally:
                self._snapshot_requested.clear()

        threading.Thread(target=run, name="optserver-snapshot", daemon=True).start()

    def due(self) -> bool:
        """Whether the periodic check should snapshot now."""
        if self.journal is None or self.journal.segment_bytes == 0:
            return False
        return (
            self.journal.segment_bytes >= self.snapshot_bytes
            or time.monotonic() - self._last_snapshot >= self.snapshot_interval_s
        )

    def snapshot(self) -> Path | None:
        """Write a snapshot of every session and drop the journal before it."""
        if self.journal is None or self.store is None:
            return None
        with self._snapshot_lock:
            store, journal = self.store, self.journal
            with store._lock:
                sessions = sorted(store._sessions.values(), key=lambda s: s.id)
                for session in sessions:
                    session._lock.acquire()
                try:
                    number = journal.rotate()
                    tensors: dict[str, np.ndarray] = {}
                    records: dict[str, Any] = {}
                    for session in sessions:
                        own, record = session_tensors(session, private=True)
                        # Weights and state move on as soon as the locks are released: copy
                        # them (remembered answers never change: no copy).
                        tensors.update(
                            {
                                f"{session.id}/{k}": v if k.startswith("memo/") else v.copy()
                                for k, v in own.items()
                            }
                        )
                        records[session.id] = record.model_dump(mode="json")
                finally:
                    for session in sessions:
                        session._lock.release()
            path = self._write_snapshot(number, tensors, records)
            self._last_snapshot = time.monotonic()
            return path

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
        with open(temporary, "wb") as f:
            # Header, then each tensor straight from its array: no document-sized buffer.
            size += f.write(safetensors_io.header_bytes(tensors, metadata))
            for array in tensors.values():
                size += f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, final)
        fsync_directory(self.path)
        for old in self.path.iterdir():
            m = _SNAPSHOT.match(old.name)
            if m and int(m.group(1)) < number:
                old.unlink()
        for segment in segments(self.path):
            if segment.number < number:
                segment.path.unlink()
        log.info("snapshot %s: %d sessions, %d bytes", final.name, len(records), size)
        return final

    def close(self, *, snapshot: bool = True) -> None:
        """Stop recording; with ``snapshot``, first fold the journal into a snapshot (a quick
        restart) unless nothing changed since the last one."""
        if snapshot and self.journal is not None and self.journal.segment_bytes > 0:
            self.snapshot()
        if self.journal is not None:
            self.journal.close()
