"""Media checks shared by the live tests: a synthetic MPEG-TS input made by ffmpeg, and the proof
that what a player got is the seed's input, byte for byte, from a random-access chunk on.

A player's output is the concatenation of the chunks it was handed. Without loss it is one run
of the input starting at a RAP chunk; with skipped chunks it is several runs, each a whole number
of the input's chunks (as the seed's own `TsChunker` cuts them). A corrupted byte ends a run
mid-chunk, so `runs()` fails on it.
"""

from __future__ import annotations

import bisect
import shutil
import subprocess
from pathlib import Path

import pytest

from seed.ingest import TsChunker, synthetic_stream_command

TOOLS = ("ffmpeg", "ffprobe")


def synthetic_ts(path: Path, seconds: float) -> Path:
    """`seconds` of 320x180 H.264 (GOP 1 s) + AAC in MPEG-TS, encoded as fast as ffmpeg can."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: needed for real MPEG-TS tests")
    cmd = synthetic_stream_command(str(path), seconds=seconds, realtime=False, size="320x180")
    subprocess.run(cmd, check=True, timeout=120)
    return path


def decode_errors(path: Path) -> str:
    """What ffmpeg says (at level error) when decoding `path` in full; "" if it decodes cleanly."""
    r = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"],
                       capture_output=True, text=True, timeout=60)
    return r.stderr.strip() or ("" if r.returncode == 0 else f"ffmpeg exited {r.returncode}")


class Chunks:
    """The input as the seed cuts it: chunk start offsets, which are RAPs, media time per chunk."""

    def __init__(self, src: bytes, chunk_ms: float = 200) -> None:
        chunker = TsChunker(chunk_ms=chunk_ms)
        chunks = chunker.feed(src) + chunker.flush()
        assert b"".join(c.payload for c in chunks) == src
        self.src = src
        self.starts: dict[int, bool] = {}
        self.media_ms: list[float] = []
        offset = 0
        for c in chunks:
            self.starts[offset] = c.rap
            self.media_ms.append(c.media_ms)
            offset += len(c.payload)
        self.ends = sorted(set(self.starts) - {0} | {len(src)})

    def tail_offset(self, seconds: float) -> int:
        """Offset of the chunk that starts the last `seconds` of the input."""
        starts, total = sorted(self.starts), 0.0
        for i in range(len(starts) - 1, -1, -1):
            total += self.media_ms[i]
            if total >= seconds * 1000:
                return starts[i]
        return 0


def runs(out: bytes, chunks: Chunks) -> list[tuple[int, int]]:
    """Split `out` into runs of the input: [(input offset, length)], each a whole number of
    chunks, in stream order, the first starting at a RAP chunk. Fails if any byte of `out` is not
    the input's at the place its run puts it (only the file's very end may cut a chunk short)."""
    src, starts = chunks.src, sorted(chunks.starts)
    assert out, "empty output"
    found: list[tuple[int, int]] = []
    pos = i = 0
    while pos < len(out):
        for j in range(i, len(starts)):  # the next run starts at some later chunk
            start = starts[j]
            same = _common_prefix(out, pos, src, start)
            if pos + same == len(out):  # the rest of the output (the file may end mid-chunk)
                end = start + same
                break
            # Whole chunks only: after a gap the next chunk may begin with the same bytes as
            # the skipped one, so the common prefix can overshoot a chunk end a little.
            k = bisect.bisect_right(chunks.ends, start + same) - 1
            end = chunks.ends[k] if k >= 0 else start
            if end > start:
                break
        else:
            raise AssertionError(f"output bytes from {pos} on are not a chunk of the input after "
                                 f"input byte {found[-1][0] + found[-1][1] if found else 0}: "
                                 f"corrupt data reached the player")
        found.append((start, end - start))
        pos += end - start
        i = bisect.bisect_left(starts, end)
    assert chunks.starts[found[0][0]], "the output does not start at a random-access chunk"
    return found


def assert_faithful(out: bytes, chunks: Chunks, *, max_runs: int = 1,
                    tail_s: float = 1.0) -> list[tuple[int, int]]:
    """`out` is the input from a RAP on, in at most `max_runs` runs, reaching the input's last
    `tail_s` seconds."""
    found = runs(out, chunks)
    assert len(found) <= max_runs, f"{len(found)} runs (gaps) in the output: {found}"
    last_start, last_len = found[-1]
    assert last_start + last_len >= chunks.tail_offset(tail_s), (
        f"output stops at input byte {last_start + last_len} of {len(chunks.src)}")
    return found


def _common_prefix(a: bytes, i: int, b: bytes, j: int) -> int:
    """Length of the common prefix of a[i:] and b[j:] (block-wise, then byte-wise)."""
    n = min(len(a) - i, len(b) - j)
    lo, step = 0, 4096
    while lo < n:
        k = min(step, n - lo)
        if a[i + lo:i + lo + k] == b[j + lo:j + lo + k]:
            lo += k
            continue
        while a[i + lo] == b[j + lo]:
            lo += 1
        return lo
    return n
