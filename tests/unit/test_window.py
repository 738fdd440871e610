"""ChunkWindow against a model: a dict holding exactly the chunks newer than newest - size."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcast import messages as m
from meshcast.effects import Chunk
from meshcast.window import ChunkWindow


def chunk(seq: int) -> Chunk:
    return Chunk(m.ChunkHead("c", seq, 1, 0, 0.0, b""), b"x")


@given(size=st.integers(1, 12), seqs=st.lists(st.integers(0, 60), max_size=80))
def test_the_window_holds_exactly_the_newest_size_chunks_it_was_given(size: int, seqs: list[int]) -> None:
    window, model, newest = ChunkWindow(size), {}, -1
    for seq in seqs:
        kept = window.put(chunk(seq))
        assert kept == (seq > newest - size)
        if kept:
            model[seq] = True
            newest = max(newest, seq)
            model = {s: v for s, v in model.items() if s > newest - size}
        assert list(window) == sorted(model)
        assert len(window) == len(model)
        assert window.newest == newest
        for s in range(0, 61):
            assert (s in window) == (s in model)
            got = window.get(s)
            assert (got is not None and got.head.seq == s) == (s in model)


def test_a_missing_chunk_is_a_key_error_and_a_window_needs_room() -> None:
    window = ChunkWindow(4)
    window.put(chunk(9))
    assert window[9].head.seq == 9
    with pytest.raises(KeyError):
        window[5]  # same slot as 9, not held
    with pytest.raises(ValueError, match="at least one chunk"):
        ChunkWindow(0)
