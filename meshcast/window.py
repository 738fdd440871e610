"""ChunkWindow: the newest `size` chunks of a stream, kept in a ring indexed by sequence number.

Every relay keeps one for pulls, catch-up and playback. A ring holds exactly the window — a
chunk older than `newest - size` is neither kept nor found — in a list of `size` pointers,
where a dict of the same chunks took ~4× the memory (2.2 KB per simulated peer at 30 chunks).
"""

from __future__ import annotations

from collections.abc import Iterator

from meshcast.effects import Chunk


class ChunkWindow:
    """Chunks `newest - size + 1 .. newest` (those we have), by sequence number."""

    __slots__ = ("size", "newest", "_ring")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a chunk window holds at least one chunk, not {size}")
        self.size = size
        self.newest = -1
        """Highest sequence number ever stored (-1: none yet)."""
        self._ring: list[Chunk | None] = [None] * size

    def put(self, chunk: Chunk) -> bool:
        """Keep `chunk`; False (and nothing kept) if it is older than the window."""
        seq, size, newest = chunk[0].seq, self.size, self.newest
        if seq <= newest - size:
            return False
        ring = self._ring
        if seq > newest:
            # Chunks that fall out of the window now: clear the slots they still hold (the
            # range covers each slot at most once).
            floor = seq - size
            for old in range(max(newest - size + 1, floor - size + 1), floor + 1):
                i = old % size
                c = ring[i]
                if c is not None and c[0].seq <= floor:
                    ring[i] = None
            self.newest = seq
        ring[seq % size] = chunk
        return True

    def get(self, seq: int) -> Chunk | None:
        c = self._ring[seq % self.size]
        return c if c is not None and c[0].seq == seq else None

    def __contains__(self, seq: int) -> bool:
        c = self._ring[seq % self.size]
        return c is not None and c[0].seq == seq

    def __getitem__(self, seq: int) -> Chunk:
        c = self._ring[seq % self.size]
        if c is None or c[0].seq != seq:
            raise KeyError(seq)
        return c

    def __iter__(self) -> Iterator[int]:
        """Sequence numbers held, oldest first."""
        ring, size = self._ring, self.size
        for seq in range(max(0, self.newest - size + 1), self.newest + 1):
            c = ring[seq % size]
            if c is not None and c[0].seq == seq:
                yield seq

    def __len__(self) -> int:
        return sum(1 for _ in self)
