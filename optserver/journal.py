"""An append-only log of checksummed records in numbered segment files, with group commit.

A record is ``length (4 bytes LE) | crc32 of the payload (4 bytes LE) | payload``. Records are
written with ``os.write`` (in the kernel's page cache at once, so a killed process loses
nothing), and made durable according to the fsync policy:

- ``always``: :meth:`Journal.wait` returns once the record is on disk. One flusher thread
  fsyncs for everybody who is waiting, so concurrent writers share an fsync (group commit).
- ``interval``: the flusher fsyncs every ``interval_s``; ``wait`` does not wait. A power loss
  or kernel crash may lose the last ``interval_s`` of acknowledged records; a killed server
  loses nothing.
- ``never``: no fsync but at rotation and close; the kernel writes back when it likes (a power
  loss may lose more). A killed server loses nothing.

Segments are ``wal-NNNNNNNN.log``; :meth:`rotate` starts the next one (a snapshot then covers
everything before it). Reading stops at a torn last record (a crash in the middle of a write):
:func:`read_segment` reports where the valid records end, and the caller truncates there.

Disk faults. The writer is a small state machine (:class:`State`, read with
:attr:`Journal.status`):

- ``ok``: appends are written.
- ``failing``: the last write failed (a full disk, an I/O error) and the partial record was cut
  off again (``ftruncate`` back to the end of the last good record), so the file holds only
  whole records. Appends are still tried; the first that succeeds, or a successful
  :meth:`Journal.probe`, returns to ``ok``. A refused append raises :class:`JournalUnwritable`
  and nothing of it stays in the log.
- ``dirty``: a write failed and cutting the partial record off failed too. Nothing is appended
  after a partial record (it would turn a torn tail into damage in the middle of the log):
  every append, and every probe, first retries the truncate and is refused until it works.
  A crash meanwhile leaves a torn last record, which start-up drops.
- ``failed``: an fsync failed. After a failed fsync Linux may have dropped the dirty pages and
  forgotten the error, so what is on disk is unknown and retrying would only hide the loss:
  the journal fails closed for the rest of the process. It closes its descriptor, every waiter
  and every later append raises :class:`JournalFailed`; a restart replays what is really on
  disk (with policy ``always`` that is every acknowledged record).

The journal only ever writes to a descriptor it owns: :meth:`Journal.rotate` opens the next
segment before it lets go of the current one and keeps the current one when anything fails; a
journal without a segment holds the descriptor number -1, never a number the process may reuse
for something else (a socket).

Over 400 lines on purpose: the writer's state machine, the group-commit flusher and the
segment reader share one file descriptor, one lock and one set of invariants (nothing is ever
appended after a partial record; a failed fsync fails closed), which stay private here.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

__all__ = [
    "FsyncPolicy",
    "Journal",
    "JournalCorrupt",
    "JournalError",
    "JournalFailed",
    "JournalUnwritable",
    "Segment",
    "State",
    "Status",
    "fsync_directory",
    "read_segment",
    "segments",
]

#: When appended records are forced to disk (the ``fsync`` setting, defined here, where it is
#: implemented, so that the journal needs nothing of the configuration).
FsyncPolicy = Literal["always", "interval", "never"]
#: One buffer of a record (a piece of a tensor's bytes is a memoryview of the array).
_Bytes: TypeAlias = bytes | bytearray | memoryview
_BYTES = (bytes, bytearray, memoryview)
_HEAD = struct.Struct("<II")
_NAME = re.compile(r"^wal-(\d{8})\.log$")
#: A record larger than this is corruption, not data (bounds what a bad length can allocate).
MAX_RECORD = 1 << 34
#: The length field has 32 bits.
_MAX_PAYLOAD = (1 << 32) - 1
#: Bytes a probe writes (and cuts off again): the size that failed, within these bounds.
PROBE_BYTES = (4096, 1 << 20)
log = logging.getLogger("optserver.journal")


class JournalCorrupt(RuntimeError):
    """A record in the middle of the log fails its checksum: the data directory is damaged."""


class JournalError(Exception):
    """The journal cannot take a record; ``cause`` is the operating system's error, if any."""

    def __init__(self, message: str, cause: OSError | None = None) -> None:
        super().__init__(message)
        self.cause = cause

    @property
    def errno(self) -> int | None:
        return None if self.cause is None else self.cause.errno


class JournalUnwritable(JournalError):
    """The record was not written (nothing of it stays in the log); a retry may succeed."""


class JournalFailed(JournalError):
    """An fsync failed, or the journal is closed: it takes nothing more in this process."""


class State(enum.Enum):
    OK = "ok"
    FAILING = "failing"
    DIRTY = "dirty"
    FAILED = "failed"


@dataclass(frozen=True)
class Status:
    """The writer's state; replaced as a whole, so readers need no lock."""

    state: State
    reason: str | None = None
    error: OSError | None = None


_OK = Status(State.OK)


@dataclass(frozen=True)
class Segment:
    number: int
    path: Path


def segments(directory: Path) -> list[Segment]:
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Segment(int(match.group(1)), entry))
    return sorted(found, key=lambda s: s.number)


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"wal-{number:08d}.log"


def fsync_directory(directory: Path) -> None:
    """Make renames and new files in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_segment(path: Path) -> tuple[list[bytes], int, str | None, bool]:
    """The payloads of a segment's valid records, the byte length they span, why reading
    stopped early (None if the file ended cleanly), and whether that looks like a torn last
    write (the bad record reaches the end of the file) rather than damage."""
    data = path.read_bytes()
    payloads: list[bytes] = []
    position = 0
    while position < len(data):
        if len(data) - position < _HEAD.size:
            return payloads, position, f"{len(data) - position} stray bytes at the end", True
        length, crc = _HEAD.unpack_from(data, position)
        start = position + _HEAD.size
        if length > MAX_RECORD or start + length > len(data):
            return payloads, position, f"a record of {length} bytes runs past the end", True
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            last = start + length == len(data)
            return payloads, position, "a record fails its checksum", last
        payloads.append(payload)
        position = start + length
    return payloads, position, None, False


def iterate(directory: Path, first: int) -> Iterator[tuple[Segment, list[bytes]]]:
    """Every segment numbered ``first`` or later with its records; a torn tail of the last
    segment is cut off (with a warning), damage anywhere else raises :class:`JournalCorrupt`."""
    found = [s for s in segments(directory) if s.number >= first]
    for index, segment in enumerate(found):
        payloads, end, problem, torn = read_segment(segment.path)
        if problem is not None:
            if index != len(found) - 1 or not torn:
                raise JournalCorrupt(
                    f"{segment.path}: {problem} at byte {end}, and more follows: the log is "
                    "damaged (not a write cut short); restore the data directory from a backup"
                )
            log.warning(
                "%s: %s at byte %d (a write cut short by a crash); dropping it: the push it "
                "held was never acknowledged",
                segment.path,
                problem,
                end,
            )
            with open(segment.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        yield segment, payloads


class Journal:
    """The writer. Thread-safe; :meth:`append` returns a ticket for :meth:`wait`.

    Locks, always taken in this order: ``_fsync_lock`` (held while an fsync runs on the
    current descriptor, so nobody closes it meanwhile), ``_lock`` (the descriptor, the
    counters and the state), ``_synced`` (the durable position, for waiters).
    """

    def __init__(
        self, directory: Path, number: int, policy: FsyncPolicy = "always", interval_s: float = 1.0
    ) -> None:
        self.directory = directory
        self.policy = policy
        self.interval_s = interval_s
        self.number = number
        self._fd = os.open(
            segment_path(directory, number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        try:
            fsync_directory(directory)
            # The caller cut any torn tail off: the file ends at a record boundary.
            self._segment_bytes = os.fstat(self._fd).st_size
        except OSError:
            os.close(self._fd)
            raise
        self._fsync_lock = threading.Lock()
        self._lock = threading.Lock()
        self._synced = threading.Condition()
        self._written = 0  # bytes appended over the journal's life: tickets are positions
        self._durable = 0
        self._failed_size = 0  # the size of the last record that could not be written
        self._status = _OK
        self._closed = False
        self._flusher: threading.Thread | None = None
        if policy != "never":
            self._flusher = threading.Thread(
                target=self._flush_loop, name="optserver-fsync", daemon=True
            )
            self._flusher.start()

    # --- reading the state -----------------------------------------------------------------

    @property
    def segment_bytes(self) -> int:
        """Bytes of whole records in the current segment (where the next record starts)."""
        return self._segment_bytes

    @property
    def status(self) -> Status:
        return self._status

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fd(self) -> int:
        """The current segment's descriptor; -1 once the journal has none."""
        return self._fd

    @property
    def path(self) -> Path:
        return segment_path(self.directory, self.number)

    # --- writing -----------------------------------------------------------------------------

    def append(self, payload: _Bytes | Sequence[_Bytes]) -> int:
        """Write one record (``payload``: its bytes, or its pieces in order, written as they
        are: a large record is neither joined nor copied); the returned ticket becomes durable
        per the fsync policy.

        Raises :class:`JournalUnwritable` (nothing was written: retry later) or
        :class:`JournalFailed` (the journal takes nothing more in this process)."""
        pieces = [payload] if isinstance(payload, _BYTES) else list(payload)
        views = [memoryview(piece).cast("B") for piece in pieces]
        length = sum(len(view) for view in views)
        if length > _MAX_PAYLOAD:
            raise ValueError(f"a record holds at most {_MAX_PAYLOAD} bytes, not {length}")
        crc = 0
        for view in views:  # zlib releases the GIL on large buffers
            crc = zlib.crc32(view, crc)
        head = _HEAD.pack(length, crc)
        size = len(head) + length
        with self._lock:
            self._check_appendable()
            try:
                _write_all(self._fd, head)
                for view in views:
                    _write_all(self._fd, view)
            except OSError as exc:
                self._failed_size = size
                self._write_failed(exc)
                raise JournalUnwritable(f"writing to {self.path} failed: {exc}", exc) from exc
            self._written += size
            self._segment_bytes += size
            ticket = self._written
            if self._status.state is State.FAILING:
                self._status = _OK
                log.warning("the journal %s writes again", self.path)
        if self.policy == "always":
            with self._synced:
                self._synced.notify_all()
        return ticket

    def _check_appendable(self) -> None:
        """Raise unless a record may be written now; repairs a dirty tail first. Holds _lock."""
        if self._closed:
            raise JournalFailed("the journal is closed")
        status = self._status
        if status.state is State.FAILED:
            raise JournalFailed(status.reason or "the journal failed", status.error)
        if status.state is State.DIRTY and not self._repair():
            status = self._status
            raise JournalUnwritable(status.reason or "the journal's tail is dirty", status.error)

    def _write_failed(self, exc: OSError) -> None:
        """Cut a partial record off so that nothing follows it. Holds _lock."""
        was = self._status.state
        try:
            os.ftruncate(self._fd, self._segment_bytes)
        except OSError as cut:
            self._status = Status(
                State.DIRTY,
                f"writing to {self.path} failed ({exc}) and cutting the partial record off at "
                f"byte {self._segment_bytes} failed ({cut}); no record is appended until the "
                "cut succeeds",
                cut,
            )
            log.error("%s", self._status.reason)
            return
        self._status = Status(State.FAILING, f"writing to {self.path} failed: {exc}", exc)
        if was is State.OK:  # log transitions, not every refused record of a long outage
            log.warning("%s; changes are refused until it writes again", self._status.reason)

    def _repair(self) -> bool:
        """Retry cutting a dirty tail off; whether the tail is clean now. Holds _lock."""
        try:
            os.ftruncate(self._fd, self._segment_bytes)
        except OSError as exc:
            previous = self._status.error
            self._status = Status(self._status.state, self._status.reason, exc)
            if previous is None or previous.errno != exc.errno:
                log.error("cutting the partial record off %s failed again: %s", self.path, exc)
            return False
        self._status = Status(
            State.FAILING, f"{self.path}: a partial record was cut off; writing failed before"
        )
        log.warning("%s: the partial record is cut off", self.path)
        return True

    def probe(self) -> bool:
        """Try whether writing works again, without a client's record: repair a dirty tail,
        then write a probe of the size that failed and cut it off. Whether the journal is ok.

        The probe starts with a record length that runs past its end: a crash before the cut
        leaves what start-up drops as a torn last record."""
        with self._lock:
            if self._closed or self._status.state is State.FAILED:
                return False
            if self._status.state is State.OK:
                return True
            if self._status.state is State.DIRTY and not self._repair():
                return False
            size = min(max(self._failed_size, PROBE_BYTES[0]), PROBE_BYTES[1])
            probe = _HEAD.pack(size, 0) + bytes(size - _HEAD.size)
            try:
                _write_all(self._fd, probe)
            except OSError as exc:
                self._write_failed(exc)
                return False
            try:
                os.ftruncate(self._fd, self._segment_bytes)
            except OSError as exc:
                self._status = Status(
                    State.DIRTY,
                    f"cutting a probe off {self.path} at byte {self._segment_bytes} failed: {exc}",
                    exc,
                )
                log.error("%s", self._status.reason)
                return False
            self._status = _OK
            log.warning("the journal %s writes again", self.path)
            return True

    # --- durability ----------------------------------------------------------------------------

    def wait(self, ticket: int | None) -> None:
        """Block until ``ticket`` is on disk (policy ``always``; otherwise return at once).

        Raises :class:`JournalFailed` if the fsync failed (the record may not be on disk)."""
        if ticket is None or self.policy != "always":
            return
        with self._synced:
            while self._durable < ticket:
                status = self._status
                if status.state is State.FAILED:
                    raise JournalFailed(status.reason or "the journal failed", status.error)
                if self._closed:
                    raise JournalFailed("the journal closed before the record was on disk")
                if self._flusher is not None and not self._flusher.is_alive():
                    raise JournalFailed("the journal's fsync thread is gone")  # never hang
                self._synced.wait(1.0)

    def _flush_loop(self) -> None:
        try:
            self._flush_until_stopped()
        except BaseException as exc:  # a dead flusher would leave every waiter hanging
            log.exception("the journal's fsync thread failed")
            self._fail(f"the journal's fsync thread failed: {exc!r}", None)

    def _flush_until_stopped(self) -> None:
        while True:
            with self._synced:
                if self.policy == "always":
                    while self._durable >= self._written and self._running():
                        self._synced.wait(1.0)
                else:
                    self._synced.wait(self.interval_s)
                if not self._running():
                    return
            self._flush_once()

    def _running(self) -> bool:
        return not self._closed and self._status.state is not State.FAILED

    def _flush_once(self) -> None:
        with self._fsync_lock:
            with self._lock:
                fd, target = self._fd, self._written
            if fd < 0 or target <= self._durable:
                return
            try:
                os.fsync(fd)
            except OSError as exc:
                self._fail(f"fsync of {self.path} failed: {exc}", exc)
                return
        self._mark_durable(target)

    def _mark_durable(self, target: int) -> None:
        with self._synced:
            self._durable = max(self._durable, target)
            self._synced.notify_all()

    def _fail(self, reason: str, cause: OSError | None) -> None:
        """Fail closed (see the module's docstring). Must not hold _lock."""
        with self._lock:
            self._fail_locked(reason, cause)
        with self._synced:
            self._synced.notify_all()

    def _fail_locked(self, reason: str, cause: OSError | None) -> None:
        if self._status.state is State.FAILED:
            return
        restart = (
            "every acknowledged change" if self.policy == "always" else "what reached the disk"
        )
        message = (
            f"{reason}; what is on disk is unknown, so the journal takes no more changes in "
            f"this process: restart the server (it recovers {restart})"
        )
        # Descriptor gone and error logged before the state says so: whoever sees "failed"
        # sees the rest too.
        fd, self._fd = self._fd, -1
        _close_quietly(fd, self.path)
        log.error("%s", message)
        self._status = Status(State.FAILED, message, cause)

    def rotate(self) -> int:
        """Start the next segment (the current one made durable first); its number is returned.

        The next segment is opened before the current one is let go; if anything fails the
        journal keeps writing to the current segment and this raises :class:`JournalError`
        (:class:`JournalFailed` if fsyncing the current segment failed). The caller holds
        everything still that could append, so the cut is exact.
        """
        with self._fsync_lock, self._lock:
            self._check_appendable()
            if self._status.state is not State.OK:
                raise JournalUnwritable(self._status.reason or "the journal cannot write")
            new_path = segment_path(self.directory, self.number + 1)
            try:
                new_fd = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            except OSError as exc:
                raise JournalUnwritable(f"cannot create {new_path}: {_brief(exc)}", exc) from exc
            try:
                if os.fstat(new_fd).st_size != 0:  # only an abandoned rotation leaves one
                    raise OSError(errno.EEXIST, f"{new_path} exists and is not empty")
                fsync_directory(self.directory)
            except OSError as exc:
                _close_quietly(new_fd, new_path)
                raise JournalUnwritable(f"cannot start {new_path}: {_brief(exc)}", exc) from exc
            try:
                os.fsync(self._fd)
            except OSError as exc:
                _close_quietly(new_fd, new_path)
                _unlink_quietly(new_path)
                self._fail_locked(f"fsync of {self.path} failed: {exc}", exc)
                failed = self._status
                with self._synced:
                    self._synced.notify_all()
                raise JournalFailed(failed.reason or str(exc), exc) from exc
            old_fd, old_path = self._fd, self.path
            self._fd, self.number, self._segment_bytes = new_fd, self.number + 1, 0
            _close_quietly(old_fd, old_path)  # fsynced: nothing is lost if close complains
            target = self._written
        self._mark_durable(target)
        return self.number

    def sync(self) -> None:
        """Wait until everything appended so far is durable (policy ``always``)."""
        self.wait(self._written)

    def close(self) -> None:
        with self._fsync_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            fd, self._fd = self._fd, -1
            target = self._written
            durable = False
            if fd >= 0:
                try:
                    os.fsync(fd)
                    durable = True
                except OSError as exc:
                    self._fail_locked(f"fsync of {self.path} at close failed: {exc}", exc)
                _close_quietly(fd, self.path)
        if durable:
            self._mark_durable(target)
        else:
            with self._synced:
                self._synced.notify_all()
        if self._flusher is not None:
            self._flusher.join(5)


def _write_all(fd: int, data: _Bytes) -> None:
    view = memoryview(data).cast("B")
    while view:  # bounded: every round writes at least one byte or raises
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write() made no progress")
        view = view[written:]


def _brief(exc: OSError) -> str:
    """The error without the file name (the message names the file already)."""
    if exc.errno is None:
        return str(exc)
    return f"[Errno {exc.errno}] {exc.strerror}"


def _close_quietly(fd: int, path: Path) -> None:
    if fd < 0:
        return
    try:
        os.close(fd)
    except OSError as exc:  # on Linux the descriptor is released even then
        log.warning("closing %s: %s", path, exc)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
