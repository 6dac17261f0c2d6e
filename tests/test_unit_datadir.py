"""The data directory on its own (optserver.durability.DataDir): changes made to a store are
there again, bit for bit, after closing and reopening it, from a snapshot or from the journal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from optserver.config import Settings
from optserver.durability import DataDir, DataDirError
from optserver.journal import segments
from optserver.modes import SyncMode
from optserver.replies import Answer
from optserver.snapshot import export_session
from optserver.store import Push, RoundMember, SessionStore, StoreLimits

ANSWER = Answer("json")


def new_store() -> SessionStore:
    return SessionStore(StoreLimits.from_settings(Settings()))


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def everything(store: SessionStore, *, clock: bool = True) -> dict[str, Any]:
    """Every session's tensors (weights, optimizer state, kept answers) as dtype, shape and
    bytes, and its complete record, private part included: what "bit for bit" compares.

    ``clock=False`` leaves out the two wall-clock stamps that replaying the journal sets to
    the time of the replay (the session's ``updated_at``, each worker's ``last_seen``): the
    journal's records do not carry them. A snapshot keeps them."""
    out: dict[str, Any] = {}
    for session in sorted(store.sessions(), key=lambda s: s.id):
        with session.locked():
            tensors, metadata = export_session(session, private=True)
        records = {k: orjson.loads(v) for k, v in metadata.items()}
        if not clock:
            for record in records.values():
                if isinstance(record, dict) and record.get("private"):
                    record["private"].pop("updated_at")
                    for worker in record["private"]["workers"].values():
                        worker.pop("last_seen")
        out[session.id] = {
            "tensors": {
                name: (str(a.dtype), a.shape, np.ascontiguousarray(a).tobytes())
                for name, a in tensors.items()
            },
            "metadata": records,
        }
    return out


def make_changes(store: SessionStore) -> dict[str, str]:
    """Every kind of change the journal records; the ids of the sessions made."""
    adam, _ = store.create(
        optimizer={"name": "adam", "lr": 0.01, "amsgrad": True},
        name="adam",
        params={"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": f32(0.5)},
    )
    rng = np.random.default_rng(7)
    for i in range(3):
        g = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": f32(0.1 * i)}
        adam.step(Push(grads=g, worker=f"w{i % 2}"), key=f"k{i}", answer=ANSWER, fingerprint="f")
    adam.put_params({"extra": np.arange(5, dtype=np.float64)})
    adam.step(Push(grads={"extra": np.ones(5)}, lr=0.5), key=None, answer=Answer("binary", "all"))
    adam.configure(optimizer={"lr": 0.02}, schedule={"name": "step", "step_size": 2})

    sync, _ = store.create(
        optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.9},
        mode=SyncMode(name="sync", workers=2, timeout_s=10),
        params={"v": f32(1.0, 2.0)},
    )
    sync.apply_round(
        [
            RoundMember(Push(grads={"v": f32(1.0, 0.0)}, worker="a"), "r1", ANSWER, "fa"),
            RoundMember(Push(grads={"v": f32(0.0, 1.0)}, worker="b"), None, ANSWER),
        ]
    )
    gone, _ = store.create(optimizer="sgd", params={"x": f32(1.0)})
    store.delete(gone.id)
    return {"adam": adam.id, "sync": sync.id, "gone": gone.id}


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "data"


def opened(path: Path, **options: Any) -> tuple[DataDir, SessionStore]:
    data_dir = DataDir(path, **options)
    store = new_store()
    data_dir.open(store)
    return data_dir, store


@pytest.mark.parametrize("snapshot", [True, False], ids=["from-snapshot", "from-journal"])
def test_reopening_restores_every_session_bit_for_bit(directory: Path, snapshot: bool) -> None:
    data_dir, store = opened(directory, fsync="always")
    ids = make_changes(store)
    before = everything(store, clock=snapshot)
    assert set(before) == {ids["adam"], ids["sync"]}
    data_dir.close(snapshot=snapshot)
    snapshots = sorted(p.name for p in directory.glob("snapshot-*.safetensors"))
    assert bool(snapshots) == snapshot

    again, restored = opened(directory)
    try:
        assert everything(restored, clock=snapshot) == before
        # The restored sessions go on exactly as the originals would have: same replay of
        # a remembered key, and the same next step.
        adam = restored.get(ids["adam"])
        replayed = adam.step(
            Push(grads={"w": np.zeros((3, 4), np.float32)}), key="k2", answer=ANSWER,
            fingerprint="f",
        )  # fmt: skip
        assert replayed.replayed and replayed.version == 3
    finally:
        again.close()


def test_a_restored_store_steps_like_the_original(directory: Path) -> None:
    data_dir, store = opened(directory, fsync="never")
    ids = make_changes(store)
    data_dir.close(snapshot=False)
    store.set_recorder(None)  # the original carries on in memory only
    again, restored = opened(directory, fsync="never")
    push = Push(grads={"w": np.full((3, 4), 0.25, np.float32), "b": f32(-1.0)})
    for s in (store, restored):
        s.get(ids["adam"]).step(push, key=None, answer=ANSWER)
    original, reopened = everything(store)[ids["adam"]], everything(restored)[ids["adam"]]
    assert original["tensors"] == reopened["tensors"]
    again.close()


def test_a_torn_last_record_is_dropped(directory: Path) -> None:
    data_dir, store = opened(directory)
    make_changes(store)
    before = everything(store, clock=False)
    data_dir.close(snapshot=False)
    last = segments(directory)[-1].path
    size = last.stat().st_size
    with open(last, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00")  # a record's head cut short by a crash
    again, restored = opened(directory)
    assert everything(restored, clock=False) == before
    assert last.stat().st_size == size
    again.close()


def test_damage_inside_the_journal_stops_start_up(directory: Path) -> None:
    data_dir, store = opened(directory)
    make_changes(store)
    data_dir.close(snapshot=False)
    last = segments(directory)[-1].path
    data = bytearray(last.read_bytes())
    data[12] ^= 0xFF  # inside the first record's payload, with records after it
    last.write_bytes(bytes(data))
    with pytest.raises(DataDirError, match="damaged"):
        opened(directory)
    # Nothing was left locked: the directory opens once it is repaired.
    last.write_bytes(b"")
    again, restored = opened(directory)
    assert len(restored) == 0
    again.close()


def test_one_data_directory_per_server(directory: Path) -> None:
    data_dir, _ = opened(directory)
    with pytest.raises(DataDirError, match="in use"):
        opened(directory)
    data_dir.close()
    again, _ = opened(directory)
    again.close()


def test_health_and_snapshots_while_open(directory: Path) -> None:
    data_dir, store = opened(directory, snapshot_bytes=1 << 30, snapshot_interval_s=3600)
    assert data_dir.health() == (True, None)
    assert data_dir.probe() is True
    assert data_dir.due() is False  # nothing written yet
    make_changes(store)
    assert data_dir.due() is False  # neither big nor old enough
    before = everything(store)
    path = data_dir.snapshot()
    assert path is not None and path.exists()
    # The snapshot covers everything before the segment it began: older segments are gone.
    number = int(path.name.removeprefix("snapshot-").removesuffix(".safetensors"))
    assert [s.number for s in segments(directory)] == [number]
    data_dir.close()
    ok, reason = data_dir.health()
    assert not ok and reason is not None and "not open" in reason
    again, restored = opened(directory)
    assert everything(restored) == before
    again.close()
