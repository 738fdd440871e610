"""A relay's window of recent chunks: a ring of slots, chunk `seq` in slot `seq % len(ring)`.

Every relay keeps one for pulls, catch-up and playback. A ring holds exactly the window — the
newest `len(ring)` sequence numbers; a chunk older than `newest - len(ring)` is neither kept nor
found — in a `vec` of pointers, where a dict of the same chunks took ~4× the memory (2.2 KB per
simulated peer at 30 chunks). The relay holds the ring and the newest sequence number in two of
its own fields (`RelayNode._ring`, `_ring_newest`), and these functions work on them: every
chunk a peer gets is looked up and stored, and an object of its own between the node and the
ring was one more read from cold memory per chunk in a large run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, cast

from librt.vecs import vec

from meshcast.effects import Chunk

TOO_OLD: Final = -2
"""What `ring_put` returns for a chunk older than the window (nothing kept)."""

Ring = vec[tuple | None]
"""A window's slots: each a `Chunk` or None. A `vec`, not a list: its length is in the
holder's field and its slots follow its header in one block, where a list is an object
pointing to another block of slots, a read from cold memory more for every chunk a peer gets.
(mypyc has no `vec` of a NamedTuple: the slots are tuples, cast back to `Chunk`.)"""


def new_ring(size: int) -> Ring:
    """An empty window of `size` chunks."""
    if size < 1:
        raise ValueError(f"a chunk window holds at least one chunk, not {size}")
    return vec[tuple | None]([None] * size)


def ring_put(ring: Ring, newest: int, chunk: Chunk) -> int:
    """Keep `chunk` in `ring`, whose newest sequence number is `newest` (-1: none yet): the
    newest after it, or `TOO_OLD` (and nothing kept) if it is older than the window."""
    seq, size = chunk[0].seq, len(ring)
    if seq <= newest - size:
        return TOO_OLD
    if seq > newest:
        # Chunks that fall out of the window now: clear the slots they still hold (the range
        # covers each slot at most once).
        floor = seq - size
        for old in range(max(newest - size + 1, floor - size + 1), floor + 1):
            i = old % size
            c = ring[i]
            if c is not None and cast(Chunk, c)[0].seq <= floor:
                ring[i] = None
        newest = seq
    ring[seq % size] = chunk
    return newest


def ring_get(ring: Ring, seq: int) -> Chunk | None:
    """Chunk `seq`, if the window holds it."""
    c = ring[seq % len(ring)]
    if c is None:
        return None
    chunk = cast(Chunk, c)
    return chunk if chunk[0].seq == seq else None


def ring_has(ring: Ring, seq: int) -> bool:
    return ring_get(ring, seq) is not None


def ring_seqs(ring: Ring, newest: int) -> Iterator[int]:
    """The sequence numbers the window holds, oldest first."""
    size = len(ring)
    for seq in range(max(0, newest - size + 1), newest + 1):
        if ring_get(ring, seq) is not None:
            yield seq
