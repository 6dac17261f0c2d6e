"""The journal on its own: records, segments, torn tails, fsync policies (optserver.journal).

The record format is the module's documented one: ``length (u32 LE) | crc32 (u32 LE) |
payload``; the tests build and damage files by that description, not through the writer.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from optserver.journal import (
    FsyncPolicy,
    Journal,
    JournalFailed,
    JournalUnwritable,
    State,
    read_segment,
    segments,
)

POLICIES: tuple[FsyncPolicy, ...] = ("always", "interval", "never")


def record(payload: bytes) -> bytes:
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def state(journal: Journal) -> State:
    return journal.status.state


def write_all(journal: Journal, payloads: list[bytes]) -> list[int]:
    return [journal.append(p) for p in payloads]


def test_a_record_given_in_pieces_is_the_record_of_their_bytes(tmp_path: Path) -> None:
    """A record may be handed over as pieces (a header and views of arrays): one record, its
    length and checksum those of the pieces' bytes joined, and nothing of it copied first."""
    array = np.arange(1000, dtype=np.float32)
    pieces: list[bytes | bytearray | memoryview] = [
        b"head", array.view(np.uint8).data, memoryview(b""), bytearray(b"tail"),
    ]  # fmt: skip
    whole = b"head" + array.tobytes() + b"tail"
    journal = Journal(tmp_path, 1, "never")
    try:
        assert journal.append(pieces) == len(record(whole))
        journal.append(array.data)  # a view of another format (float32): its bytes
    finally:
        journal.close()
    assert journal.path.read_bytes() == record(whole) + record(array.tobytes())


@pytest.mark.parametrize("policy", POLICIES)
def test_append_then_read_back(tmp_path: Path, policy: FsyncPolicy) -> None:
    payloads = [b"", b"one", bytes(range(256)) * 40]
    journal = Journal(tmp_path, 1, policy, interval_s=0.01)
    try:
        tickets = write_all(journal, payloads)
        assert tickets == sorted(tickets) and len(set(tickets)) == 3
        expected_size = sum(len(record(p)) for p in payloads)
        assert tickets[-1] == journal.segment_bytes == expected_size
        for ticket in tickets:
            journal.wait(ticket)  # returns: durable (always) or not waited for (others)
        journal.wait(None)
        journal.sync()
        assert state(journal) is State.OK
        # Written with os.write: readable at once, before any close or fsync.
        assert journal.path.read_bytes() == b"".join(record(p) for p in payloads)
    finally:
        journal.close()
    assert journal.closed and journal.fd == -1
    assert read_segment(journal.path) == (payloads, expected_size, None, False)
    assert [s.path.name for s in segments(tmp_path)] == ["wal-00000001.log"]


def test_reopening_appends_after_the_existing_records(tmp_path: Path) -> None:
    first = Journal(tmp_path, 7)
    first.append(b"a")
    first.close()
    second = Journal(tmp_path, 7)
    assert second.segment_bytes == len(record(b"a"))
    second.append(b"b")
    second.close()
    payloads, end, problem, torn = read_segment(second.path)
    assert (payloads, problem, torn) == ([b"a", b"b"], None, False)
    assert end == second.path.stat().st_size


def test_rotation_starts_numbered_segments(tmp_path: Path) -> None:
    journal = Journal(tmp_path, 3)
    journal.append(b"in three")
    assert journal.rotate() == 4
    assert journal.number == 4 and journal.segment_bytes == 0
    journal.append(b"in four")
    journal.close()
    found = segments(tmp_path)
    assert [(s.number, s.path.name) for s in found] == [
        (3, "wal-00000003.log"),
        (4, "wal-00000004.log"),
    ]
    assert [read_segment(s.path)[0] for s in found] == [[b"in three"], [b"in four"]]
    (tmp_path / "wal-5.log").write_bytes(b"not a segment name")
    (tmp_path / "notes.txt").write_bytes(b"")
    assert [s.number for s in segments(tmp_path)] == [3, 4]


def test_rotation_refuses_a_next_segment_that_holds_data(tmp_path: Path) -> None:
    (tmp_path / "wal-00000002.log").write_bytes(record(b"left behind"))
    journal = Journal(tmp_path, 1)
    journal.append(b"kept")
    with pytest.raises(JournalUnwritable, match="exists and is not empty"):
        journal.rotate()
    assert journal.number == 1  # still writing to the current segment
    journal.append(b"still here")
    journal.close()
    assert read_segment(tmp_path / "wal-00000001.log")[0] == [b"kept", b"still here"]
    assert read_segment(tmp_path / "wal-00000002.log")[0] == [b"left behind"]


@pytest.mark.parametrize(
    ("tail", "problem"),
    [
        (b"\x05\x00", "2 stray bytes at the end"),
        (struct.pack("<II", 100, 0) + b"short", "a record of 100 bytes runs past the end"),
        (struct.pack("<II", 3, zlib.crc32(b"abc") ^ 1) + b"abc", "a record fails its checksum"),
    ],
)
def test_a_torn_tail_is_reported_where_the_valid_records_end(
    tmp_path: Path, tail: bytes, problem: str
) -> None:
    good = record(b"first") + record(b"second")
    path = tmp_path / "wal-00000001.log"
    path.write_bytes(good + tail)
    assert read_segment(path) == ([b"first", b"second"], len(good), problem, True)


def test_damage_before_the_end_is_not_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "wal-00000001.log"
    bad = struct.pack("<II", 3, zlib.crc32(b"abc") ^ 1) + b"abc"
    path.write_bytes(record(b"first") + bad + record(b"after"))
    payloads, end, problem, torn = read_segment(path)
    assert (payloads, end, problem, torn) == (
        [b"first"],
        len(record(b"first")),
        "a record fails its checksum",
        False,
    )


def test_an_absurd_length_is_not_allocated(tmp_path: Path) -> None:
    path = tmp_path / "wal-00000001.log"
    path.write_bytes(struct.pack("<II", 0xFFFFFFFF, 0) + b"x" * 16)
    payloads, end, problem, torn = read_segment(path)
    assert (payloads, end, torn) == ([], 0, True)
    assert problem == f"a record of {0xFFFFFFFF} bytes runs past the end"


def test_always_waits_for_the_fsync_of_concurrent_writers(tmp_path: Path) -> None:
    journal = Journal(tmp_path, 1, "always")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(20):
                journal.wait(journal.append(f"{n}:{i}".encode()))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    journal.close()
    assert errors == []
    payloads = read_segment(journal.path)[0]
    assert sorted(payloads) == sorted(f"{n}:{i}".encode() for n in range(4) for i in range(20))
    for n in range(4):  # each writer's records in its own order
        mine = [p for p in payloads if p.startswith(f"{n}:".encode())]
        assert mine == [f"{n}:{i}".encode() for i in range(20)]


def test_a_closed_journal_takes_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path, 1, "always")
    ticket = journal.append(b"x")
    journal.close()
    journal.close()  # twice is fine
    journal.wait(ticket)  # made durable by the close
    with pytest.raises(JournalFailed, match="closed"):
        journal.append(b"late")
    assert journal.probe() is False
    assert read_segment(journal.path)[0] == [b"x"]


def test_a_failed_write_is_cut_off_and_writing_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk mid-record: nothing of the record stays, the journal says it is failing,
    and the next append that succeeds (or a probe) returns it to ok."""
    journal = Journal(tmp_path, 1, "never")
    journal.append(b"before")
    real_write = os.write
    calls = {"n": 0}

    def full(fd: int, data: bytes | memoryview) -> int:
        if fd == journal.fd:
            calls["n"] += 1
            if calls["n"] == 2:  # the head went out, the payload finds the disk full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(JournalUnwritable) as raised:
        journal.append(b"refused")
    assert raised.value.errno == errno.ENOSPC
    assert state(journal) is State.FAILING
    assert journal.status.error is not None and journal.status.error.errno == errno.ENOSPC
    assert journal.path.read_bytes() == record(b"before")  # the partial record is gone
    monkeypatch.setattr(os, "write", real_write)

    assert journal.probe() is True
    assert state(journal) is State.OK
    assert journal.path.read_bytes() == record(b"before")  # the probe is cut off too
    journal.append(b"after")
    journal.close()
    assert read_segment(journal.path)[0] == [b"before", b"after"]


def test_a_failed_fsync_fails_the_journal_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path, 1, "always")
    journal.wait(journal.append(b"durable"))

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    ticket = journal.append(b"unknown")
    with pytest.raises(JournalFailed) as raised:
        journal.wait(ticket)
    assert raised.value.errno == errno.EIO
    assert state(journal) is State.FAILED
    assert journal.fd == -1
    with pytest.raises(JournalFailed):
        journal.append(b"refused")
    assert journal.probe() is False
    monkeypatch.undo()
    journal.close()
    assert read_segment(journal.path)[0] == [b"durable", b"unknown"]


def test_interval_makes_records_durable_without_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = threading.Event()
    real_fsync = os.fsync
    journal = Journal(tmp_path, 1, "interval", interval_s=0.01)

    def watched(fd: int) -> None:
        if fd == journal.fd:
            synced.set()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watched)
    journal.wait(journal.append(b"x"))  # does not block
    assert synced.wait(10), "the flusher never fsynced"
    journal.close()


def test_never_leaves_fsync_to_rotation_and_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path, 1, "never")
    fsynced: list[int] = []
    real_fsync = os.fsync

    def counted(fd: int) -> None:
        fsynced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted)
    fd = journal.fd
    for i in range(50):
        journal.append(str(i).encode())
    journal.sync()
    assert fd not in fsynced
    journal.rotate()
    assert fd in fsynced  # the segment it leaves is made durable
    journal.close()


def test_a_payload_over_the_length_field_is_refused(tmp_path: Path) -> None:
    mib = memoryview(bytes(1 << 20))
    huge = [mib] * 4096  # 4 GiB of pieces, all one MiB of memory: one byte too many
    journal = Journal(tmp_path, 1, "never")
    with pytest.raises(ValueError, match="at most 4294967295 bytes, not 4294967296"):
        journal.append(huge)
    journal.close()
    assert journal.path.read_bytes() == b""
