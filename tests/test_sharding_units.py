"""Placement and chunking of sharded sessions (``optserver_client.sharding`` and the sans-I/O
planning of ``optserver_client._sharded``), without servers."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optserver_client._protocol import ClientCore, PushRetries, retry_push
from optserver_client._sharded import ShardedCore, join_tensors, list_sessions, split_tensors
from optserver_client.exceptions import ConflictError, ShardError, TransportError, ValidationError
from optserver_client.sharding import (
    DEFAULT_CHUNK_BYTES,
    MAX_SHARDS,
    Layout,
    chunk_name,
    shard_urls,
)


def test_only_tensors_above_the_threshold_with_two_rows_or_more_are_cut() -> None:
    layout = Layout.plan(
        {
            "big": ((1000, 10), 4),  # 40000 bytes
            "exact": ((100,), 4),  # 400 bytes: not above
            "scalar": ((), 8),
            "one_row": ((1, 100_000), 4),
            "few_rows": ((3, 10_000), 4),  # 3 rows over 8 shards: 3 chunks
        },
        count=8,
        chunk_bytes=400,
    )
    assert layout.split == {"big": 8, "few_rows": 3}


def test_the_default_threshold_is_a_few_megabytes() -> None:
    assert 1 << 20 <= DEFAULT_CHUNK_BYTES <= 16 << 20
    layout = Layout.plan({"w": ((1 << 20,), 4), "b": ((10,), 4)}, count=2)
    assert layout.split == {} and Layout.plan({"w": ((2 << 20,), 4)}, count=2).split == {"w": 2}


def test_a_name_taken_by_a_chunk_is_refused() -> None:
    with pytest.raises(ValueError, match="'w#1' has the name of a chunk of 'w'"):
        Layout.plan({"w": ((100,), 4), "w#1": ((1,), 4)}, count=2, chunk_bytes=10)
    # Unless that tensor is not cut: then the name is free.
    assert Layout.plan({"w": ((2,), 4), "w#1": ((1,), 4)}, count=2, chunk_bytes=10).split == {}


@pytest.mark.parametrize(
    ("count", "chunk_bytes", "split"),
    [(0, 10, {}), (MAX_SHARDS + 1, 10, {}), (2, 0, {}), (2, 10, {"w": 1}), (2, 10, {"w": 3})],
)
def test_impossible_layouts_are_refused(
    count: int, chunk_bytes: int, split: dict[str, int]
) -> None:
    with pytest.raises(ValueError, match=r"shards|chunk_bytes|chunks"):
        Layout(count, chunk_bytes, split)


def test_placement_is_sha256_of_the_name_plus_the_chunk_index() -> None:
    layout = Layout(5)
    for name in ("w", "layer.0.weight", "ünïcode"):
        h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
        assert [layout.shard_of(name, k) for k in range(7)] == [(h + k) % 5 for k in range(7)]


def test_names_spread_evenly_and_a_tensor_cut_n_ways_uses_every_shard() -> None:
    layout = Layout(4, 16, {"w": 4})
    counts = Counter(layout.shard_of(f"layer{i}.weight") for i in range(4000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 900
    assert sorted(piece.shard for piece in layout.pieces("w", 10)) == [0, 1, 2, 3]


@given(rows=st.integers(1, 300), chunks=st.integers(2, 16))
def test_chunks_partition_the_rows_evenly_in_order(rows: int, chunks: int) -> None:
    chunks = min(chunks, rows) if rows >= 2 else 2
    if rows < chunks:
        with pytest.raises(ValueError, match="cannot fill"):
            Layout(16, 1, {"w": chunks}).pieces("w", rows)
        return
    pieces = Layout(16, 1, {"w": chunks}).pieces("w", rows)
    sizes = [p.stop - p.start for p in pieces]
    assert [p.start for p in pieces] == [0, *np.cumsum(sizes)[:-1].tolist()]
    assert sum(sizes) == rows and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first rows % chunks get the extra row
    assert [p.remote for p in pieces] == [chunk_name("w", k) for k in range(chunks)]


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 6),
    shapes=st.lists(
        st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5
    ),
    chunk_bytes=st.sampled_from([1, 16, 64, 1 << 20]),
)
def test_split_then_join_gives_back_every_tensor_from_views(
    count: int, shapes: list[tuple[int, ...]], chunk_bytes: int
) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        f"t{i}": rng.standard_normal(shape).astype(np.float32) for i, shape in enumerate(shapes)
    }
    layout = Layout.plan({n: (a.shape, a.itemsize) for n, a in tensors.items()}, count, chunk_bytes)
    parts = split_tensors(layout, tensors)
    assert set(parts) <= set(range(count))
    for part in parts.values():
        for remote, array in part.items():
            owner = layout.owner(remote)
            source = tensors[remote if owner is None else owner[0]]
            assert array.size == 0 or np.shares_memory(array, source)  # a view: no copy
            assert array.flags.c_contiguous
    joined = join_tensors(layout, parts.values())
    assert joined.keys() == tensors.keys()
    for name, array in tensors.items():
        assert joined[name].shape == array.shape and np.array_equal(joined[name], array)


def test_owner_reads_only_the_chunks_of_cut_tensors() -> None:
    layout = Layout(3, 1, {"w": 3, "a#b": 2})
    assert layout.owner("w#2") == ("w", 2)
    assert layout.owner("a#b#1") == ("a#b", 1)
    for name in ("w#3", "w#02", "w#-1", "w", "x#0", "w#", "a#b"):
        assert layout.owner(name) is None, name


def test_descriptors_round_trip_and_bad_ones_are_refused() -> None:
    layout = Layout(3, 1234, {"w": 2})
    for index in range(3):
        descriptor: dict[str, Any] = layout.descriptor(index)
        assert descriptor["index"] == index
        assert Layout.from_descriptor(descriptor) == layout
    for bad in ({}, {"count": "x", "chunk_bytes": 1}, {"count": 2, "chunk_bytes": 1, "split": 5}):
        with pytest.raises(ValueError, match="not a sharding description"):
            Layout.from_descriptor(bad)


def test_shard_urls_from_a_list_or_a_comma_separated_string() -> None:
    assert shard_urls("http://a:1") == ["http://a:1"]
    assert shard_urls(" http://a:1, http://b:2 ,") == ["http://a:1", "http://b:2"]
    assert shard_urls(("http://a:1", "http://b:2")) == ["http://a:1", "http://b:2"]
    for bad in ("", [], ",", ["http://a:1", "http://a:1"]):
        with pytest.raises(ValueError, match=r"no server URL|listed twice"):
            shard_urls(bad)


def _problem(status: int, slug: str | None = None) -> Exception:
    from optserver_client.exceptions import error_from_parts
    from optserver_client.vocabulary import PROBLEM, problem_type

    body: dict[str, Any] = {"status": status, "title": "t", "detail": "d"}
    if slug is not None:
        body["type"] = problem_type(slug)
    return error_from_parts(status, {"Content-Type": PROBLEM}, json.dumps(body).encode())


def test_what_train_step_does_after_each_kind_of_failure() -> None:
    outage = TransportError("down", error=httpx.ConnectError("refused"), attempts=1)
    stale, failed = _problem(409, "stale-gradient"), _problem(409, "round-failed")
    unavailable, invalid = _problem(503), _problem(422, "nonfinite")
    assert [retry_push(e) for e in (outage, unavailable, stale, failed, invalid)] == [
        "outage", "outage", "recompute", "repeat", None,
    ]  # fmt: skip

    def partial(*errors: Exception) -> ShardError:
        return ShardError(dict(enumerate(errors)), {}, key="k")

    assert retry_push(partial(outage, unavailable)) == "outage"
    assert retry_push(partial(failed)) == retry_push(partial(outage, failed)) == "complete"
    # Stale on some shards, applied on others: the same request would be refused again.
    assert retry_push(partial(stale)) is None and retry_push(partial(failed, invalid)) is None


def test_push_retries_keep_the_key_but_for_new_gradients_and_bound_everything() -> None:
    outage = TransportError("down", error=httpx.ConnectError("refused"), attempts=1)
    push = PushRetries(base_version=7, retries=2, patience=10.0)
    key = push.key
    assert push.after(outage, now=100.0) == "outage" and push.key == key
    assert push.after(outage, now=109.0) == "outage"
    with pytest.raises(TransportError):  # patience spent
        push.after(outage, now=110.0)
    assert push.after(ShardError({0: _problem(409, "round-failed")}, {}), 111.0) == "complete"
    assert push.key == key and push.base_version == 7  # the same request: the key binds it
    assert push.after(_problem(409, "stale-gradient"), 112.0) == "recompute"
    assert push.key != key  # other gradients: another key
    with pytest.raises(ConflictError):  # the retry budget (2) is spent
        push.after(_problem(409, "stale-gradient"), 113.0)
    with pytest.raises(ValidationError):
        PushRetries(0, 5, 0.0).after(_problem(422), 0.0)
    with pytest.raises(TransportError):  # no patience: an outage is raised at once
        PushRetries(0, 5, 0.0).after(outage, 0.0)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([0.0, 1.0, -2.5, 3e38, -3e38, 1e19, np.nan, np.inf, -np.inf]),
        max_size=20,
    ),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_the_fast_finite_test_agrees_with_numpy(values: list[float], dtype: Any) -> None:
    from optserver_client._sharded import _all_finite

    with np.errstate(over="ignore"):
        array = np.array(values, dtype=dtype)  # 3e38 is inf in float16
    assert _all_finite(array) == bool(np.isfinite(array).all())  # and no warning
    assert _all_finite(array.reshape(-1, 1)[::2]) == bool(np.isfinite(array[::2]).all())


def test_join_reads_into_the_given_array_only_when_it_is_the_one_expected() -> None:
    layout = Layout(2, 1, {"w": 2})
    whole = np.arange(12, dtype=np.float32).reshape(6, 2)
    out = np.empty((6, 2), np.float32)
    landed = {"w#0": out[:3], "w#1": out[3:]}
    landed["w#0"][...] = whole[:3]  # as a sink writes: in place
    copied = {"w#1": whole[3:].copy()}  # this one came back elsewhere
    joined = join_tensors(layout, [{"w#0": landed["w#0"]}, copied], {"w": out})
    assert joined["w"] is out and np.array_equal(out, whole)
    # An array of another shape (the tensor changed since): the chunks are joined anew.
    stale = np.zeros((4, 2), np.float32)
    joined = join_tensors(layout, [{"w#0": whole[:3]}, {"w#1": whole[3:]}], {"w": stale})
    assert joined["w"] is not stale and np.array_equal(joined["w"], whole)


@given(rows=st.integers(4, 50), count=st.integers(1, 4), cut=st.booleans())
def test_stored_names_the_pieces_without_their_rows(rows: int, count: int, cut: bool) -> None:
    layout = Layout(count, 1, {"w": count} if cut and count >= 2 else {})
    pieces = layout.pieces("w", rows)
    assert layout.stored("w") == [(p.shard, p.remote) for p in pieces]
    array = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    assert np.array_equal(np.concatenate([p.of(array) for p in pieces]), array)


def _shard_info(layout: Layout, index: int, id: str, names: list[str]) -> dict[str, Any]:
    """A shard's description of its part of session ``id`` (what GET /v1/sessions lists)."""
    return {
        "id": id,
        "name": id,
        "version": 3 - index,
        "nonfinite": "reject",
        "params": [{"name": n, "shape": [2, 3], "dtype": "float32"} for n in names],
        "groups": [{"name": "default", "params": names, "lr": 0.1}],
        "sharding": layout.descriptor(index),
    }


def test_listing_merges_each_sharded_session_once_in_shard_order() -> None:
    layout = Layout(2, 1, {"w": 2})
    cores = [ClientCore(binary=True, admin_key=None) for _ in range(2)]
    shard0 = [_shard_info(layout, 0, "s", ["b", "w#0"]), _shard_info(layout, 0, "only0", ["b"])]
    shard1 = [_shard_info(layout, 1, "s", ["a", "w#1"]), {"id": "plain", "params": []}]
    other = Layout(2, 2, {"w": 2})  # the same id, but another session's layout
    shard0.append(_shard_info(layout, 0, "mixed", ["w#0"]))
    shard1.append(_shard_info(other, 1, "mixed", ["w#1"]))
    fanout = list_sessions(cores)
    assert sorted(fanout.calls) == [0, 1]
    listed = fanout.merge({1: shard1, 0: shard0})  # the answers in any order
    assert listed == fanout.merge({0: shard0, 1: shard1})
    assert [s["id"] for s in listed] == ["s"]
    (entry,) = listed
    assert entry["version"] == 2 and entry["versions"] == [3, 2]
    assert [(p["name"], p["shape"]) for p in entry["params"]] == [
        ("a", [2, 3]), ("b", [2, 3]), ("w", [4, 3]),
    ]  # fmt: skip
    assert entry["groups"][0]["params"] == ["b", "w", "a"]  # shard 0's first, then shard 1's
    assert [s["sharding"]["index"] for s in entry["shards"]] == [0, 1]
    # A session's own description, too, whatever order its shards answer in.
    core = ShardedCore([c.session("s") for c in cores], layout)
    info = core.info()
    assert info.merge({1: shard1[0], 0: shard0[0]}) == info.merge({0: shard0[0], 1: shard1[0]})
    assert info.merge({1: shard1[0], 0: shard0[0]})["groups"] == entry["groups"]
