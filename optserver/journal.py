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
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "FsyncPolicy",
    "Journal",
    "JournalCorrupt",
    "Segment",
    "fsync_directory",
    "read_segment",
    "segments",
]

FsyncPolicy = Literal["always", "interval", "never"]
_HEAD = struct.Struct("<II")
_NAME = re.compile(r"^wal-(\d{8})\.log$")
#: A record larger than this is corruption, not data (bounds what a bad length can allocate).
MAX_RECORD = 1 << 34
log = logging.getLogger("optserver.journal")


class JournalCorrupt(RuntimeError):
    """A record in the middle of the log fails its checksum: the data directory is damaged."""


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
    """The writer. Thread-safe; :meth:`append` returns a ticket for :meth:`wait`."""

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
        fsync_directory(directory)
        self._lock = threading.Lock()
        self._synced = threading.Condition()
        self._written = 0  # bytes appended over the journal's life: tickets are positions
        self._durable = 0
        self._segment_bytes = os.fstat(self._fd).st_size
        self._closed = False
        self._error: BaseException | None = None
        self._flusher: threading.Thread | None = None
        if policy != "never":
            self._flusher = threading.Thread(
                target=self._flush_loop, name="optserver-fsync", daemon=True
            )
            self._flusher.start()

    @property
    def segment_bytes(self) -> int:
        return self._segment_bytes

    def append(self, payload: bytes | bytearray | memoryview) -> int:
        """Write one record; the returned ticket becomes durable per the fsync policy."""
        head = _HEAD.pack(len(payload), zlib.crc32(payload))
        with self._lock:
            if self._closed:
                raise RuntimeError("the journal is closed")
            _write_all(self._fd, head)
            _write_all(self._fd, payload)
            size = len(head) + len(payload)
            self._written += size
            self._segment_bytes += size
            ticket = self._written
        if self.policy == "always":
            with self._synced:
                self._synced.notify_all()
        return ticket

    def wait(self, ticket: int | None) -> None:
        """Block until ``ticket`` is on disk (policy ``always``; otherwise return at once)."""
        if ticket is None or self.policy != "always":
            return
        with self._synced:
            while self._durable < ticket:
                if self._error is not None:
                    raise RuntimeError("the journal cannot fsync") from self._error
                if self._closed:
                    return
                self._synced.wait(1.0)

    def _flush_loop(self) -> None:
        while True:
            with self._synced:
                if self.policy == "always":
                    while self._durable >= self._written and not self._closed:
                        self._synced.wait(1.0)
                else:
                    self._synced.wait(self.interval_s)
                if self._closed:
                    return
            with self._lock:
                target, fd = self._written, self._fd
            try:
                os.fsync(fd)
            except OSError as exc:  # a full or failing disk: make every waiter fail loudly
                log.error("fsync of the journal failed: %s", exc)
                with self._synced:
                    self._error = exc
                    self._synced.notify_all()
                return
            with self._synced:
                self._durable = max(self._durable, target)
                self._synced.notify_all()

    def rotate(self) -> int:
        """Close the current segment (durably) and start the next; its number is returned.

        The caller holds everything still that could append, so the cut is exact.
        """
        with self._lock:
            os.fsync(self._fd)
            os.close(self._fd)
            self.number += 1
            self._fd = os.open(
                segment_path(self.directory, self.number),
                os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                0o600,
            )
            self._segment_bytes = 0
            target = self._written
        fsync_directory(self.directory)
        with self._synced:
            self._durable = max(self._durable, target)
            self._synced.notify_all()
        return self.number

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            os.fsync(self._fd)
            os.close(self._fd)
            target = self._written
            self._closed = True
        with self._synced:
            self._durable = max(self._durable, target)
            self._synced.notify_all()
        if self._flusher is not None:
            self._flusher.join(5)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]
