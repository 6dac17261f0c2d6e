"""``DocumentSink``: a safetensors document read into its tensors' places as it arrives gives
what ``decode`` gives for the whole document, checks the header alike, and writes into a given
array only when it fits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optserver_client.safetensors_io import DocumentSink, SafetensorsError, decode, encode

DTYPES = [np.float16, np.float32, np.float64]


def read(sink: DocumentSink, document: bytes, sizes: list[int]) -> None:
    """Read ``document`` into ``sink`` in pieces of the given sizes (then the rest)."""
    position, k = 0, 0
    while not sink.done:
        window = sink.window()
        assert len(window) > 0
        count = min(len(window), sizes[k % len(sizes)] if sizes else len(window))
        k += 1
        window[:count] = document[position : position + count]
        position += count
        sink.advance(count)
    assert position == len(document) and len(sink.window()) == 0


def _document(header: bytes, data: int) -> bytes:
    return len(header).to_bytes(8, "little") + header + bytes(data)


tensor = st.tuples(
    st.sampled_from(DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
)


@settings(max_examples=150, deadline=None)
@given(
    specs=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), tensor, max_size=4),
    sizes=st.lists(st.integers(1, 40), max_size=5),
    given_into=st.sets(st.sampled_from(["a", "b", "c", "d"])),
    feed=st.booleans(),
)
def test_reading_in_place_equals_decoding_the_whole(
    specs: dict[str, tuple[Any, tuple[int, ...]]],
    sizes: list[int],
    given_into: set[str],
    feed: bool,
) -> None:
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(shape).astype(dtype) for n, (dtype, shape) in specs.items()}
    document = bytes(encode(tensors, {"version": "3"}))
    into = {n: np.empty_like(tensors[n]) for n in given_into if n in tensors}
    into["absent"] = np.empty(3)
    sink = DocumentSink(len(document), into)
    if feed:  # bytes that arrived elsewhere, copied in
        for start in range(0, len(document), 7):
            sink.feed(document[start : start + 7])
    else:
        read(sink, document, sizes)
    got, metadata = sink.result()
    expected, expected_metadata = decode(document)
    assert metadata == expected_metadata and got.keys() == expected.keys()
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        assert np.array_equal(got[name], array, equal_nan=True)
        assert (got[name] is into.get(name)) == (name in into)
    assert sink.landed == {n for n in into if n in tensors}


def test_only_an_array_that_fits_is_written_into() -> None:
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    document = bytes(encode(tensors))
    readonly = np.empty((2, 3), np.float32)
    readonly.flags.writeable = False
    for misfit in (
        np.empty((3, 2), np.float32),  # shape
        np.empty((2, 3), np.float64),  # dtype
        np.empty((2, 6), np.float32)[:, ::2],  # not contiguous
        readonly,
    ):
        sink = DocumentSink(len(document), {"w": misfit})
        read(sink, document, [5])
        got, _ = sink.result()
        assert got["w"] is not misfit and not sink.landed
        assert np.array_equal(got["w"], tensors["w"])


@pytest.mark.parametrize(
    ("document", "match"),
    [
        (b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}", "not valid JSON"),
        (b"\xff\x00\x00\x00\x00\x00\x00\x00{}", "does not fit"),
        (_document(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 4), "span 4"),
        (_document(b'{"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}', 8), "dtype"),
        (_document(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 8), "follow"),
    ],
)
def test_a_bad_header_is_refused_before_any_tensor_byte(document: bytes, match: str) -> None:
    with pytest.raises(SafetensorsError, match=match):
        decode(document)
    sink = DocumentSink(len(document), {})
    with pytest.raises(SafetensorsError, match=match):
        read(sink, document, [3])


def test_a_short_document_is_refused() -> None:
    with pytest.raises(SafetensorsError, match="shorter than its 8-byte header"):
        DocumentSink(7, {})
    document = bytes(encode({"w": np.ones(4, np.float32)}))
    sink = DocumentSink(len(document), {})
    sink.feed(document[:-1])
    with pytest.raises(SafetensorsError, match="ended after"):
        sink.result()
    with pytest.raises(SafetensorsError, match="more bytes"):
        sink.feed(document[-1:] + b"x")
