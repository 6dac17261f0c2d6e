"""The idempotency memory on its own (optserver.replay.ReplayCache): what it keeps, how a
replay is encoded, which key it drops first."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest
import safetensors.numpy as stn
from optserver_client.vocabulary import BINARY, JSON

from optserver.errors import IdempotencyKeyReused
from optserver.replay import ReplayCache
from optserver.replies import Answer, Reply

W = {"w": np.array([0.5, 1.5], dtype=np.float32)}


def keep(
    cache: ReplayCache,
    key: str,
    tensors: dict[str, np.ndarray],
    *,
    version: int = 1,
    answer: Answer | None = None,
    fingerprint: str | None = "fp",
    applied: bool = True,
) -> Reply:
    answer = answer or Answer("json")
    reply = answer(version, applied, tensors)
    cache.remember(key, reply, answer, tensors, applied, fingerprint)
    return reply


def test_unknown_and_absent_keys_replay_nothing() -> None:
    cache = ReplayCache(8, 1 << 20)
    assert cache.replay(None, Answer("json"), "fp", W) is None
    assert cache.replay("new", Answer("json"), "fp", W) is None
    keep(cache, "k", W)
    assert cache.replay(None, Answer("json"), "fp", W) is None


def test_a_replay_is_the_first_answer_in_the_encoding_asked_for() -> None:
    cache = ReplayCache(8, 1 << 20)
    first = keep(cache, "k", W, version=7)
    again = cache.replay("k", Answer("json"), "fp", {})
    assert again is not None and again.replayed and again.version == 7
    assert again.media_type == JSON
    assert bytes(again.body) == bytes(first.body)
    assert orjson.loads(bytes(again.body)) == {
        "version": 7,
        "applied": True,
        "params": {"w": [0.5, 1.5]},
    }
    binary = cache.replay("k", Answer("binary"), "fp", {})
    assert binary is not None and binary.media_type == BINARY and binary.replayed
    decoded = stn.load(bytes(binary.body))
    assert decoded["w"].dtype == np.float32
    np.testing.assert_array_equal(decoded["w"], W["w"])


def test_the_first_return_option_is_kept() -> None:
    cache = ReplayCache(8, 1 << 20)
    keep(cache, "k", {}, answer=Answer("json", "none"), applied=False, version=3)
    # The retry's own return option does not change what was answered.
    again = cache.replay("k", Answer("json", "all"), "fp", W)
    assert again is not None
    assert orjson.loads(bytes(again.body)) == {"version": 3, "applied": False}


def test_a_key_is_bound_to_its_request() -> None:
    cache = ReplayCache(8, 1 << 20)
    keep(cache, "k", W, fingerprint="first")
    with pytest.raises(IdempotencyKeyReused) as raised:
        cache.replay("k", Answer("json"), "second", W)
    problem = raised.value.to_problem()
    assert problem["status"] == 422 and problem["key"] == "k"
    # No fingerprint to compare on either side: not checked.
    assert cache.replay("k", Answer("json"), None, W) is not None
    keep(cache, "old", W, fingerprint=None)
    assert cache.replay("old", Answer("json"), "anything", W) is not None


def test_the_least_recently_used_key_goes_first() -> None:
    cache = ReplayCache(2, 1 << 20)
    keep(cache, "a", W)
    keep(cache, "b", W)
    assert cache.replay("a", Answer("json"), "fp", W) is not None  # a is now the newest
    keep(cache, "c", W)
    assert [k for k, _ in cache.entries()] == ["a", "c"]
    assert cache.replay("b", Answer("json"), "fp", W) is None


def test_the_byte_budget_drops_old_answers() -> None:
    big = {"x": np.zeros(64, dtype=np.float32)}  # 256 bytes, a quarter of the budget
    cache = ReplayCache(100, 1024)
    for key in "abcde":
        keep(cache, key, big)
    kept = [k for k, _ in cache.entries()]
    assert kept == ["b", "c", "d", "e"]
    assert sum(m.size for _, m in cache.entries()) == 1024


def test_an_answer_over_a_quarter_of_the_budget_is_kept_by_version_only() -> None:
    cache = ReplayCache(8, 1000)
    large = {"w": np.arange(64, dtype=np.float32)}  # 256 bytes > 1000 // 4
    keep(cache, "k", large, version=4)
    ((key, memo),) = list(cache.entries())
    assert (key, memo.size, memo.names, memo.version) == ("k", 0, ("w",), 4)
    # Its replay is encoded from the weights as they are now.
    now = {"w": np.full(64, 2.0, dtype=np.float32)}
    again = cache.replay("k", Answer("binary"), "fp", now)
    assert again is not None and again.version == 4
    np.testing.assert_array_equal(stn.load(bytes(again.body))["w"], now["w"])
    # A tensor that is gone by now is left out.
    gone = cache.replay("k", Answer("json"), "fp", {})
    assert gone is not None
    assert orjson.loads(bytes(gone.body)) == {"version": 4, "applied": True, "params": {}}


def test_no_keys_keeps_nothing() -> None:
    cache = ReplayCache(0, 1 << 20)
    keep(cache, "k", W)
    assert list(cache.entries()) == []
    assert cache.replay("k", Answer("json"), "fp", W) is None


def test_restore_brings_entries_back_within_the_bounds() -> None:
    source = ReplayCache(8, 1 << 20)
    for key, version in (("a", 1), ("b", 2), ("c", 3)):
        keep(source, key, W, version=version)
    target = ReplayCache(2, 1 << 20)
    target.restore(dict(source.entries()))
    assert [k for k, _ in target.entries()] == ["b", "c"]
    again = target.replay("c", Answer("json"), "fp", {})
    original = source.replay("c", Answer("json"), "fp", {})
    assert again is not None and original is not None
    assert bytes(again.body) == bytes(original.body)


def test_the_journal_ticket_rides_with_the_replay() -> None:
    cache = ReplayCache(8, 1 << 20)
    answer = Answer("json")
    reply = dataclasses.replace(answer(1, True, W), ticket=42)
    cache.remember("k", reply, answer, W, True, "fp")
    again = cache.replay("k", answer, "fp", W)
    assert again is not None and again.ticket == 42
