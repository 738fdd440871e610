"""TsChunker on real ffmpeg MPEG-TS: byte exactness, RAP cuts, media-time cuts, resync, limits."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seed.ingest import (
    TS_PACKET_SIZE,
    IngestError,
    MediaChunk,
    TsChunker,
    synthetic_stream_command,
)

FPS, GOP, SECONDS = 30, 30, 4


def make_ts(factory: pytest.TempPathFactory, *, low_delay: bool) -> bytes:
    """4 s of H.264 (keyframe every 30 frames = 1 s) + AAC in MPEG-TS, made by ffmpeg."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed: needed to generate a real MPEG-TS test stream")
    out = factory.mktemp("ts") / "unit.ts"
    cmd = synthetic_stream_command(
        str(out), seconds=SECONDS, realtime=False, size="320x180", fps=FPS, gop=GOP,
        low_delay=low_delay,
    )  # fmt: skip
    subprocess.run(cmd, check=True, timeout=60)
    return out.read_bytes()


@pytest.fixture(scope="session")
def ts_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_ts(tmp_path_factory, low_delay=True)


@pytest.fixture(scope="session")
def bframes_ts_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Like ``ts_bytes`` with B-frames: video PTS is not monotonic (DTS is)."""
    return make_ts(tmp_path_factory, low_delay=False)


def chunk_all(data: bytes, pieces: list[int] | None = None, **kw: object) -> list[MediaChunk]:
    """Feed ``data`` split at the given offsets, then flush."""
    c = TsChunker(**kw)  # type: ignore[arg-type]
    cuts = sorted(set(pieces or [])) + [len(data)]
    out, prev = [], 0
    for cut in cuts:
        out += c.feed(data[prev:cut])
        prev = cut
    return out + c.flush()


def pid(packet: bytes) -> int:
    return ((packet[1] & 0x1F) << 8) | packet[2]


def packets(payload: bytes) -> list[bytes]:
    return [payload[i : i + TS_PACKET_SIZE] for i in range(0, len(payload), TS_PACKET_SIZE)]


def test_concatenation_is_byte_exact_and_cuts_on_packet_boundaries(ts_bytes: bytes) -> None:
    chunks = chunk_all(ts_bytes)
    assert len(chunks) > 10
    assert b"".join(c.payload for c in chunks) == ts_bytes
    assert all(len(c.payload) % TS_PACKET_SIZE == 0 for c in chunks)
    assert all(c.payload[0] == 0x47 for c in chunks)


def test_rap_chunks_once_per_gop_and_self_describing(ts_bytes: bytes) -> None:
    chunks = chunk_all(ts_bytes)
    raps = [c for c in chunks if c.rap]
    assert chunks[0].rap
    assert len(raps) == SECONDS  # one keyframe per second with -g 30 at 30 fps
    gaps = [(b.pcr - a.pcr) / 27_000 for a, b in zip(raps, raps[1:])]
    assert all(abs(g - 1000) < 50 for g in gaps), gaps
    for c in raps:
        # PAT (PID 0) and PMT come before the keyframe packet (ffmpeg's video PID is 0x100).
        pids = [pid(p) for p in packets(c.payload)]
        assert pids.index(0) < pids.index(0x1000) < pids.index(0x100), pids[:5]
        assert c.pts is not None


def test_chunk_media_duration_near_target(ts_bytes: bytes) -> None:
    for target in (200, 500):
        chunks = chunk_all(ts_bytes, chunk_ms=target)
        durations = [c.media_ms for c in chunks[:-1]]
        assert all(d <= target + 1 for d in durations)
        assert sum(durations) / len(durations) > target * 0.8
        # Total media time covered is the stream's (minus the last chunk's tail).
        assert abs(sum(c.media_ms for c in chunks) - SECONDS * 1000) < 400


def test_garbage_prefix_is_dropped_until_sync(ts_bytes: bytes) -> None:
    garbage = bytes([0x47, 1, 2, 3, 4]) * 100 + b"\x00" * 33  # decoy 0x47s, not 188 apart
    c = TsChunker()
    chunks = c.feed(garbage + ts_bytes[50:]) + c.flush()  # also starts mid-packet
    body = b"".join(x.payload for x in chunks)
    assert c.dropped == len(garbage) + (TS_PACKET_SIZE - 50)
    assert body == ts_bytes[TS_PACKET_SIZE:]


def test_max_size_cuts_even_without_timestamp_progress(ts_bytes: bytes) -> None:
    limit = 10 * TS_PACKET_SIZE + 17  # not a multiple: chunks still end on packet boundaries
    chunks = chunk_all(ts_bytes, max_bytes=limit)
    assert b"".join(c.payload for c in chunks) == ts_bytes
    assert max(len(c.payload) for c in chunks) == 10 * TS_PACKET_SIZE
    # A PID-only stream with no PCR/PTS at all (null packets) is still cut at max size.
    null = bytes([0x47, 0x1F, 0xFF, 0x10]) + b"\xff" * 184
    chunks = chunk_all(null * 100, max_bytes=8 * TS_PACKET_SIZE)
    assert [len(c.payload) for c in chunks] == [8 * TS_PACKET_SIZE] * 12 + [4 * TS_PACKET_SIZE]
    assert not any(c.rap for c in chunks)


@pytest.mark.parametrize("stream", ["ts_bytes", "bframes_ts_bytes"])
def test_video_timestamps_are_the_clock_when_program_has_no_pcr(
    stream: str, request: pytest.FixtureRequest
) -> None:
    # Rewrite the PMT's PCR_PID to 0x1FFF ("no PCR"); the chunker does not check CRCs.
    data = bytearray(request.getfixturevalue(stream))
    pmt_pid = 0x1000  # ffmpeg's default
    for off in range(0, len(data), TS_PACKET_SIZE):
        p = data[off : off + TS_PACKET_SIZE]
        if pid(p) == pmt_pid and p[1] & 0x40:
            assert (p[3] >> 4) == 1 and p[4] == 0  # payload only, pointer_field 0
            data[off + 13] = (p[13] & 0xE0) | 0x1F
            data[off + 14] = 0xFF
    chunks = chunk_all(bytes(data))
    assert all(c.pcr is None for c in chunks)
    assert sum(c.rap for c in chunks) == SECONDS
    durations = [c.media_ms for c in chunks[:-1]]
    assert all(150 <= d <= 240 for d in durations), durations


def test_audio_random_access_flags_do_not_make_raps(ts_bytes: bytes) -> None:
    # ffmpeg sets random_access_indicator on every AAC PES; only video keyframes count.
    audio_rai = sum(
        1 for p in packets(ts_bytes) if pid(p) == 0x101 and p[3] & 0x20 and p[4] and p[5] & 0x40
    )
    assert audio_rai > 2 * SECONDS
    assert sum(c.rap for c in chunk_all(ts_bytes)) == SECONDS


def test_keyframes_found_from_h264_nals_without_random_access_flags(ts_bytes: bytes) -> None:
    # Muxers need not set random_access_indicator: clear it and rely on the IDR/SPS NALs.
    data = bytearray(ts_bytes)
    cleared = 0
    for off in range(0, len(data), TS_PACKET_SIZE):
        if pid(data[off : off + 4]) == 0x100 and data[off + 3] & 0x20 and data[off + 4]:
            cleared += data[off + 5] >> 6 & 1
            data[off + 5] &= ~0x40 & 0xFF
    assert cleared == SECONDS
    def shape(chunks: list[MediaChunk]) -> list[tuple[int, bool, float]]:
        return [(len(c.payload), c.rap, c.media_ms) for c in chunks]

    assert shape(chunk_all(bytes(data))) == shape(chunk_all(ts_bytes))


def test_not_mpegts_raises_clear_error() -> None:
    c = TsChunker(resync_limit=4096)
    with pytest.raises(IngestError, match="no MPEG-TS sync"):
        c.feed(b"\x00\x01" * 5000)
    c = TsChunker()
    assert c.feed(b"RIFF....WAVEfmt ") == []
    with pytest.raises(IngestError, match="MPEG-TS"):
        c.flush()
    assert TsChunker().flush() == []  # empty input is not an error


def test_trailing_partial_packet_is_kept(ts_bytes: bytes) -> None:
    data = ts_bytes[: 20 * TS_PACKET_SIZE + 100]
    assert b"".join(c.payload for c in chunk_all(data)) == data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_feed_split_invariance(ts_bytes: bytes, data: st.DataObject) -> None:
    # A short garbage prefix and a cut-off end exercise resync and the partial tail too.
    prefix = data.draw(st.binary(max_size=400), label="prefix")
    end = data.draw(st.integers(len(ts_bytes) // 2, len(ts_bytes)), label="end")
    stream = prefix + ts_bytes[:end]
    splits = data.draw(st.lists(st.integers(0, len(stream)), max_size=30), label="splits")
    whole = TsChunker()
    expected = whole.feed(stream) + whole.flush()
    assert chunk_all(stream, splits) == expected
    assert b"".join(c.payload for c in expected) == stream[whole.dropped :]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_and_arbitrary_input_never_crashes(ts_bytes: bytes, data: st.DataObject) -> None:
    if data.draw(st.booleans(), label="arbitrary"):
        stream = data.draw(st.binary(max_size=3000), label="bytes")
    else:  # real TS with bytes overwritten: PSI/PES/adaptation parsing sees nonsense
        stream = bytearray(ts_bytes[: 60 * TS_PACKET_SIZE])
        edits = st.tuples(st.integers(0, len(stream) - 1), st.integers(0, 255))
        for pos, value in data.draw(st.lists(edits, max_size=80), label="edits"):
            stream[pos] = value
        stream = bytes(stream)
    limit = data.draw(st.integers(TS_PACKET_SIZE, 8 * TS_PACKET_SIZE), label="max_bytes")
    c = TsChunker(max_bytes=limit, chunk_ms=data.draw(st.floats(1, 1000), label="chunk_ms"))
    try:
        chunks = c.feed(stream) + c.flush()
    except IngestError:
        return
    assert b"".join(x.payload for x in chunks) == stream[c.dropped :]
    assert all(0 < len(x.payload) <= limit for x in chunks)
