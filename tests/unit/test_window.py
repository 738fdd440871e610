"""The chunk window's ring against a model: a dict holding exactly the chunks newer than
newest - size."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcast import messages as m
from meshcast.effects import Chunk
from meshcast.window import TOO_OLD, new_ring, ring_get, ring_has, ring_put, ring_seqs


def chunk(seq: int) -> Chunk:
    return Chunk(m.ChunkHead("c", seq, 1, 0, 0.0, b""), b"x")


@given(size=st.integers(1, 12), seqs=st.lists(st.integers(0, 60), max_size=80))
def test_the_window_holds_exactly_the_newest_size_chunks_it_was_given(size: int, seqs: list[int]) -> None:
    ring, newest, model, expected_newest = new_ring(size), -1, {}, -1
    for seq in seqs:
        got_newest = ring_put(ring, newest, chunk(seq))
        kept = seq > expected_newest - size
        assert (got_newest != TOO_OLD) == kept
        if kept:
            newest = got_newest
            model[seq] = True
            expected_newest = max(expected_newest, seq)
            model = {s: v for s, v in model.items() if s > expected_newest - size}
        assert newest == expected_newest
        assert list(ring_seqs(ring, newest)) == sorted(model)
        for s in range(-3, 61):
            assert ring_has(ring, s) == (s in model)
            got = ring_get(ring, s)
            assert (got is not None and got.head.seq == s) == (s in model)


def test_a_chunk_in_a_slot_is_not_another_s_and_a_window_needs_room() -> None:
    ring = new_ring(4)
    assert ring_put(ring, -1, chunk(9)) == 9
    assert ring_get(ring, 9).head.seq == 9
    assert ring_get(ring, 5) is None and not ring_has(ring, 13)  # the same slot as 9
    assert ring_put(ring, 9, chunk(5)) == TOO_OLD and ring_get(ring, 5) is None
    with pytest.raises(ValueError, match="at least one chunk"):
        new_ring(0)
