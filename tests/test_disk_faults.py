"""Disk faults under a real server: full disks, exhausted inodes, a directory that turns
read-only, failing fsyncs, and two servers on one data directory.

The server tests run on tmpfs mounts made here (so they need root; CI runs as root). A
directory "turns read-only" by mounting a read-only tmpfs on top of it while the server runs:
the journal's open descriptor keeps working, but nothing can be created by path any more.
Faults a real filesystem cannot produce on demand (a failing fsync, a failing truncate) are
injected in-process in the unit tests at the end, which say so.

Every push is SGD with lr 1 and a one-hot gradient: push i adds -1 to element i, so the weights
say exactly which pushes were applied.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy as stn
from optserver_client import Client

from optserver.config import Settings
from optserver.durability import DataDir, DataDirError
from optserver.errors import DiskFull, JournalUnavailable
from optserver.journal import Journal, JournalFailed, JournalUnwritable, State, read_segment
from optserver.push import Push
from optserver.replies import Answer
from optserver.store import SessionStore, StoreLimits
from tests.live import LiveServer, free_port, live_server
from tests.test_durability import kill, one_hot

ST = "application/octet-stream"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root")


# --- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(
    path: Path, *, size: str, nr_inodes: int | None = None, ro: bool = False
) -> Iterator[Path]:
    """A tmpfs mounted on ``path`` for the block (unmounted in any case)."""
    path.mkdir(parents=True, exist_ok=True)
    options = (
        f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes else "") + (",ro" if ro else "")
    )
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        unmount(path)


def unmount(path: Path) -> None:
    for _ in range(50):  # bounded: a server that just died may still hold a file for a moment
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(path)], check=True)


def fill_space(fd: int) -> None:
    """Write to ``fd`` until the filesystem is full."""
    chunk = b"\xee" * (1 << 16)
    for _ in range(1 << 16):  # bounded: 4 GiB at most
        try:
            if os.write(fd, chunk) < len(chunk):
                continue
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            if len(chunk) == 1:
                return
            chunk = chunk[: len(chunk) // 16 or 1]
    raise AssertionError("the filesystem never filled up")


def fill_inodes(directory: Path) -> list[Path]:
    """Create empty files in ``directory`` until no inode is left."""
    directory.mkdir()
    made: list[Path] = []
    for i in range(100_000):  # bounded
        path = directory / f"f{i}"
        try:
            path.touch()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return made
        made.append(path)
    raise AssertionError("the inodes never ran out")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Pushes:
    """One session's pushes over a persistent connection, and which were applied."""

    def __init__(self, server: LiveServer, size: int) -> None:
        self.server, self.size = server, size
        with Client(server.url) as client:
            session = client.create_session(
                {"w": np.zeros(size)}, {"name": "sgd", "lr": 1.0}, dtype="float64"
            )
        self.id, self.token = session.id, str(session.token)
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.applied: set[int] = set()
        self.refused: dict[int, int] = {}
        self.count = 0  # pushes so far: the next one's index

    def next(self) -> httpx.Response:
        self.count += 1
        return self.push(self.count - 1)

    def close(self) -> None:
        self.http.close()

    def push(self, i: int) -> httpx.Response:
        r = self.http.post(
            f"/v1/sessions/{self.id}/step?return=none",
            content=stn.save({"w": one_hot(i, self.size)}),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": ST},
        )
        if r.status_code == 200:
            self.applied.add(i)
        else:
            assert r.status_code in (503, 507), (r.status_code, r.text)
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["content-type"] == "application/problem+json"
            self.refused[i] = r.status_code
        return r

    def weights(self, url: str | None = None) -> np.ndarray:
        r = httpx.get(
            f"{url or self.server.url}/v1/sessions/{self.id}/params",
            headers={"Authorization": f"Bearer {self.token}", "Accept": ST},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return stn.load(r.content)["w"]

    def assert_exactly_applied(self, w: np.ndarray) -> None:
        expected = np.zeros(self.size)
        expected[sorted(self.applied)] = -1.0
        assert set(np.flatnonzero(w).tolist()) == self.applied, sorted(self.refused)
        np.testing.assert_array_equal(w, expected)


def readyz(url: str) -> httpx.Response:
    return httpx.get(url + "/readyz", timeout=10)


def raw_connections(url: str, count: int) -> list[socket.socket]:
    """Connections that never send a request: the server must never write to them."""
    host, port = url.removeprefix("http://").split(":")
    return [socket.create_connection((host, int(port)), timeout=5) for _ in range(count)]


def assert_nothing_leaked(sockets: list[socket.socket], session_id: str) -> None:
    for s in sockets:
        s.settimeout(0.05)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            for _ in range(64):  # bounded
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                received += chunk
        # Nothing was asked, so nothing but (at most) an HTTP answer may arrive.
        assert session_id.encode() not in received, received[:200]
        assert b"__metadata__" not in received and b'"event"' not in received, received[:200]
        assert not received or received.startswith(b"HTTP/1.1 "), received[:200]


# --- item 1: a failed rotation ---------------------------------------------------------------


@root_only
@pytest.mark.parametrize("fault", ["inodes", "read-only"])
def test_failed_rotation_never_writes_to_sockets_and_recovers_by_itself(
    tmp_path: Path, fault: str
) -> None:
    """Snapshots fall due while no file can be created in the data directory (no inodes left,
    or the directory turned read-only); then the disk fills up too; then both faults go.

    The journal must keep its segment (never write into a client's socket), pushes must be
    answered 200, or 503/507 with Retry-After and then not be applied, /readyz must say
    503 while the journal cannot write and 200 again by itself once it can (no push needed),
    and a kill -9 then a restart must keep exactly the acknowledged pushes."""
    size = 2000  # a step record of ~16 KB; a snapshot is due after about three
    mount = tmp_path / "fs"
    log = tmp_path / "server.log"
    with tmpfs(mount, size="8m", nr_inodes=64 if fault == "inodes" else None):
        data = mount / "data"
        with live_server(data_dir=data, snapshot_bytes=40_000, log_file=log) as server:
            pushes = Pushes(server, size)
            junk = mount / "junk"
            junk_fd = os.open(junk, os.O_WRONLY | os.O_CREAT, 0o600)  # before inodes run out
            overlay = data
            fillers: list[Path] = []
            sockets: list[socket.socket] = []
            try:
                if fault == "inodes":
                    fillers = fill_inodes(mount / "fill")
                else:
                    subprocess.run(
                        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(overlay)],
                        check=True,
                    )
                # A snapshot falls due and cannot start the next segment.
                for _ in range(10):
                    assert pushes.next().status_code == 200
                    time.sleep(0.1)
                    if "snapshot" in log.read_text():
                        break
                assert "snapshot" in log.read_text(), "no snapshot was attempted"
                sockets = raw_connections(server.url, 4)
                time.sleep(0.2)  # accepted by now: they hold the lowest free descriptors
                for _ in range(5):
                    assert pushes.next().status_code == 200  # the journal kept its segment
                assert readyz(server.url).status_code == 200
                assert_nothing_leaked(sockets, pushes.id)

                # The disk fills up too: now the journal cannot write.
                fill_space(junk_fd)
                for _ in range(4):
                    r = pushes.next()
                    assert r.status_code == 507, r.text
                    assert r.json()["type"] == "urn:optserver:problem:insufficient-storage"
                    assert str(data) in r.json()["detail"]
                ready = readyz(server.url)
                assert ready.status_code == 503
                body = ready.json()
                assert body["status"] == "unavailable" and body["sessions"] == 1
                assert "No space left on device" in body["reason"] and str(data) in body["reason"]
                time.sleep(1.5)  # background probes run meanwhile and keep failing
                assert readyz(server.url).status_code == 503
                assert_nothing_leaked(sockets, pushes.id)
            finally:
                os.close(junk_fd)
                junk.unlink()
                for path in fillers:
                    path.unlink()
                if fault == "read-only":
                    unmount(overlay)

            # It recovers by itself, without a push.
            wait_for(lambda: readyz(server.url).status_code == 200, 10, "/readyz to recover")
            assert readyz(server.url).json()["journal"] == "ok"
            for _ in range(5):
                assert pushes.next().status_code == 200
            assert_nothing_leaked(sockets, pushes.id)
            for s in sockets:
                s.close()
            pushes.assert_exactly_applied(pushes.weights())
            assert len(pushes.refused) == 4
            kill(server)
        text = log.read_text()
        assert "snapshot of" in text and "every journal segment is kept" in text
        assert "Traceback" not in text  # no thread died
        with live_server(data_dir=data) as server:
            pushes.assert_exactly_applied(pushes.weights(server.url))
        pushes.close()


# --- item 2: disk full, then a crash ----------------------------------------------------------


@root_only
def test_disk_full_then_kill_9_loses_nothing_and_the_server_starts(tmp_path: Path) -> None:
    """Records of ~160 KB meet a disk with 64 KB left, so a write is cut short; the refused
    pushes get 507; a kill -9 while the disk is still full, a restart, more refused pushes, then
    space is freed and pushes are acknowledged; kill -9 again: the server starts and holds
    every acknowledged push and none of the refused ones."""
    size = 20_000
    mount = tmp_path / "fs"
    with tmpfs(mount, size="6m"):
        data = mount / "data"
        junk = mount / "junk"
        with live_server(data_dir=data) as server:
            pushes = Pushes(server, size)
            for i in range(3):
                assert pushes.push(i).status_code == 200
            junk_fd = os.open(junk, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                fill_space(junk_fd)
                os.ftruncate(junk_fd, os.fstat(junk_fd).st_size - (64 << 10))  # 64 KB free
            finally:
                os.close(junk_fd)
            for i in range(3, 6):
                r = pushes.push(i)
                assert r.status_code == 507, r.text
                assert "No space left on device" in r.json()["detail"]
            assert readyz(server.url).status_code == 503
            pushes.assert_exactly_applied(pushes.weights())
            kill(server)
        with live_server(data_dir=data) as server:  # the disk is still full
            pushes.assert_exactly_applied(pushes.weights(server.url))
            pushes.http.close()
            pushes.http = httpx.Client(base_url=server.url, timeout=30)
            pushes.server = server
            for i in range(6, 8):
                assert pushes.push(i).status_code == 507  # a write cut short again
            junk.unlink()
            for i in range(8, 12):
                assert pushes.push(i).status_code == 200
            kill(server)
        with live_server(data_dir=data) as server:
            pushes.assert_exactly_applied(pushes.weights(server.url))
            assert readyz(server.url).status_code == 200
        pushes.close()
        assert sorted(pushes.applied) == [0, 1, 2, 8, 9, 10, 11]


# --- item 3: one server per data directory ----------------------------------------------------


def test_a_second_server_on_the_same_data_directory_refuses_to_start(tmp_path: Path) -> None:
    with live_server(data_dir=tmp_path) as first:
        pushes = Pushes(first, 4)
        assert pushes.push(0).status_code == 200
        env = {
            **os.environ,
            "OPTSERVER_DATA_DIR": str(tmp_path),
            "OPTSERVER_PORT": str(free_port()),
            "OPTSERVER_LOG_LEVEL": "warning",
        }
        second = subprocess.Popen(
            [sys.executable, "-m", "optserver", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _, stderr = second.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            second.kill()
            second.communicate()
            pytest.fail("a second server started on a data directory that is in use")
        assert second.returncode == 1
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert lines[0].startswith("optserver: error: cannot start: ")
        assert str(tmp_path) in lines[0] and f"pid {first.process.pid}" in lines[0]
        assert pushes.push(1).status_code == 200  # the first one goes on
        assert readyz(first.url).status_code == 200
        pushes.close()
    with live_server(data_dir=tmp_path) as server:  # released with the first server
        pushes.assert_exactly_applied(pushes.weights(server.url))


# --- unit tests of the journal and the data directory -------------------------------------------


def state_of(journal: Journal) -> State:
    return journal.status.state  # a call: mypy must not narrow it across appends


def new_data_dir(path: Path, **options: Any) -> tuple[DataDir, SessionStore]:
    store = SessionStore(StoreLimits.from_settings(Settings()))
    data_dir = DataDir(path, **options)
    data_dir.open(store)
    return data_dir, store


def test_failed_fsync_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Injected fault (a real filesystem does not fail fsync on demand): os.fsync raises EIO
    for the journal's segment. The waiter gets 503 journal-unavailable, every later change is
    refused, health says why and that a restart recovers, and the journal lets go of its
    descriptor."""
    data_dir, store = new_data_dir(tmp_path)
    session, _ = store.create(optimizer={"name": "sgd", "lr": 1.0}, params={"w": np.zeros(4)})
    data_dir.sync()  # the session's record is on disk before fsync starts failing
    journal = data_dir.journal
    assert journal is not None
    segment_fd = journal.fd
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if fd == segment_fd:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    answer = Answer("json", "none")
    with caplog.at_level(logging.ERROR, logger="optserver.journal"):
        reply = session.step(Push(grads={"w": np.ones(4)}), key=None, answer=answer)
        with pytest.raises(JournalUnavailable) as waited:
            data_dir.wait(reply.ticket)
    assert waited.value.status == 503 and waited.value.slug == "journal-unavailable"
    assert "Input/output error" in waited.value.detail
    assert any("fsync" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert state_of(journal) is State.FAILED and journal.fd == -1
    version = session.version
    with pytest.raises(JournalUnavailable) as refused:
        session.step(Push(grads={"w": np.ones(4)}), key=None, answer=answer)
    assert refused.value.headers["Retry-After"]
    assert session.version == version  # not applied
    with pytest.raises(JournalFailed):
        journal.append(b"more")
    ok, reason = data_dir.health()
    assert not ok and reason is not None
    assert "fsync" in reason and "restart" in reason and str(tmp_path) in reason
    assert not data_dir.probe()  # fail closed: no way back in this process
    session.reject("malformed-body")  # bookkeeping: dropped, never raises
    data_dir.close()
    monkeypatch.undo()
    # The injected failure kept the page, so the step's record is in the file: the process
    # only refused to vouch for it. A restart replays what is there, intact.
    revived, revived_store = new_data_dir(tmp_path)
    assert revived_store.get(session.id).version == 1
    revived.close()


def test_a_failed_rotation_keeps_the_current_segment(tmp_path: Path) -> None:
    """Real fault: a directory where the next segment should be makes its open fail."""
    journal = Journal(tmp_path, 0)
    first = journal.append(b"one")
    journal.wait(first)
    fd = journal.fd
    (tmp_path / "wal-00000001.log").mkdir()
    with pytest.raises(JournalUnwritable) as failed:
        journal.rotate()
    assert failed.value.errno == errno.EISDIR
    assert journal.fd == fd and journal.number == 0 and state_of(journal) is State.OK
    assert os.fstat(fd).st_ino == os.stat(tmp_path / "wal-00000000.log").st_ino
    journal.wait(journal.append(b"two"))
    assert read_segment(tmp_path / "wal-00000000.log")[0] == [b"one", b"two"]
    (tmp_path / "wal-00000001.log").rmdir()
    assert journal.rotate() == 1
    journal.wait(journal.append(b"three"))
    journal.close()
    assert read_segment(tmp_path / "wal-00000001.log")[0] == [b"three"]
    assert journal.fd == -1


@root_only
def test_a_failed_write_is_cut_off_and_the_probe_finds_the_way_back(tmp_path: Path) -> None:
    """Real fault: a full tmpfs. The partial record is cut off at once; probes fail while the
    disk is full and succeed once space is freed, leaving the segment clean."""
    with tmpfs(tmp_path / "fs", size="512k") as mount:
        journal = Journal(mount, 0)
        journal.wait(journal.append(b"a" * 1000))
        junk_fd = os.open(mount / "junk", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fill_space(junk_fd)
        finally:
            os.close(junk_fd)
        with pytest.raises(JournalUnwritable) as failed:
            journal.append(b"b" * 100_000)
        assert failed.value.errno == errno.ENOSPC
        segment = mount / "wal-00000000.log"
        assert state_of(journal) is State.FAILING
        assert segment.stat().st_size == journal.segment_bytes == 1008
        assert not journal.probe()
        (mount / "junk").unlink()
        assert journal.probe() and state_of(journal) is State.OK
        assert segment.stat().st_size == 1008  # the probe was cut off again
        journal.wait(journal.append(b"c" * 100_000))
        journal.close()
        payloads, _, problem, _ = read_segment(segment)
        assert problem is None and payloads == [b"a" * 1000, b"c" * 100_000]


def test_a_dirty_tail_refuses_appends_until_it_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected faults (a real filesystem does not refuse to shrink a file on demand): a write
    to the segment stops half-way with ENOSPC and ftruncate fails with EIO. Nothing may be
    appended after the partial record; a crash meanwhile leaves only a torn tail."""
    journal = Journal(tmp_path, 0)
    journal.wait(journal.append(b"one"))
    segment = tmp_path / "wal-00000000.log"
    fd = journal.fd
    real_write, real_ftruncate = os.write, os.ftruncate

    def half_write(target: int, data: Any) -> int:
        if target == fd:
            real_write(target, bytes(data)[: max(1, len(data) // 2)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(target, data)

    def failing_ftruncate(target: int, length: int) -> None:
        if target == fd:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_ftruncate(target, length)

    monkeypatch.setattr(os, "write", half_write)
    monkeypatch.setattr(os, "ftruncate", failing_ftruncate)
    with pytest.raises(JournalUnwritable) as failed:
        journal.append(b"two" * 100)
    assert failed.value.errno == errno.ENOSPC
    assert state_of(journal) is State.DIRTY
    monkeypatch.setattr(os, "write", real_write)  # writing would work again, cutting not
    with pytest.raises(JournalUnwritable):
        journal.append(b"three")
    assert not journal.probe()
    payloads, end, problem, torn = read_segment(segment)  # as a crash would leave it
    assert payloads == [b"one"] and problem is not None and torn and end == 11
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    journal.wait(journal.append(b"four"))
    assert state_of(journal) is State.OK
    journal.close()
    assert read_segment(segment)[0::2] == ([b"one", b"four"], None)


@root_only
def test_a_snapshot_that_cannot_be_written_keeps_every_segment_and_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Real fault: a full tmpfs. The temporary file is removed, every segment kept, a warning
    logged, and the next try waits; once space is freed a snapshot folds the journal."""
    with tmpfs(tmp_path / "fs", size="1m") as mount:
        data_dir, store = new_data_dir(mount)
        session, _ = store.create(
            optimizer={"name": "sgd", "lr": 1.0}, params={"w": np.zeros(20_000, np.float32)}
        )
        junk_fd = os.open(mount / "junk", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fill_space(junk_fd)
        finally:
            os.close(junk_fd)
        with caplog.at_level(logging.WARNING, logger="optserver.durability"):
            assert data_dir.snapshot() is None
        assert any("every journal segment is kept" in r.getMessage() for r in caplog.records)
        assert not list(mount.glob("snapshot*"))
        assert (mount / "wal-00000000.log").stat().st_size > 80_000
        (mount / "junk").unlink()
        data_dir.snapshot_bytes = 1000
        data_dir.wait(session.put_params({"w": np.ones(20_000, np.float32)}))
        assert not data_dir.due()  # backing off, though the segment is over snapshot_bytes
        assert data_dir.snapshot() is not None
        assert [p.name for p in mount.glob("wal-*.log")] == ["wal-00000002.log"]
        data_dir.close(snapshot=False)
        revived_dir, revived = new_data_dir(mount)
        assert revived.get(session.id).params["w"].tolist() == [1.0] * 20_000
        revived_dir.close(snapshot=False)


def test_the_data_directory_is_locked_for_one_server(tmp_path: Path) -> None:
    first, _ = new_data_dir(tmp_path)
    with pytest.raises(DataDirError) as refused:
        new_data_dir(tmp_path)
    message = str(refused.value)
    assert str(tmp_path) in message and f"pid {os.getpid()}" in message
    assert (tmp_path / "LOCK").read_text().strip() == str(os.getpid())
    first.close()
    second, _ = new_data_dir(tmp_path)  # released on close
    second.close()


def test_disk_full_maps_to_507_and_rejected_records_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected fault (ENOSPC from os.write on the segment, so no root is needed): changes are
    refused with 507 and nothing changes; a rejected push's bookkeeping never raises."""
    data_dir, store = new_data_dir(tmp_path)
    session, _ = store.create(optimizer={"name": "sgd", "lr": 1.0}, params={"w": np.zeros(4)})
    journal = data_dir.journal
    assert journal is not None
    fd, real_write = journal.fd, os.write

    def full(target: int, data: Any) -> int:
        if target == fd:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(target, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(DiskFull) as refused:
        session.step(Push(grads={"w": np.ones(4)}), key=None, answer=Answer("json", "none"))
    assert refused.value.status == 507 and refused.value.slug == "insufficient-storage"
    assert refused.value.headers["Retry-After"] and str(tmp_path) in refused.value.detail
    assert session.version == 0 and session.params["w"].tolist() == [0.0] * 4
    session.reject("malformed-body")  # never raises
    assert data_dir.health()[0] is False
    monkeypatch.setattr(os, "write", real_write)
    assert data_dir.probe() and data_dir.health() == (True, None)
    data_dir.close()
