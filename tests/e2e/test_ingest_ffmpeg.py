"""Ingest against real tools: ffprobe decodes from every RAP chunk; file/stdin/UDP sources."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from seed.ingest import (
    IngestError,
    MediaChunk,
    TsChunker,
    open_source,
    read_source,
    synthetic_stream_command,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("ffmpeg", "ffprobe")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def ts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 s of H.264 (GOP 1 s) + AAC in MPEG-TS, made by ffmpeg as fast as it can."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: needed for real MPEG-TS tests")
    out = tmp_path_factory.mktemp("ts") / "e2e.ts"
    cmd = synthetic_stream_command(str(out), seconds=4, realtime=False, size="320x180")
    subprocess.run(cmd, check=True, timeout=60)
    return out


def expected_chunks(path: Path) -> list[MediaChunk]:
    c = TsChunker()
    return c.feed(path.read_bytes()) + c.flush()


def ffprobe_frames(path: Path) -> tuple[str, list[str]]:
    """Decode every frame; return ffprobe's error output and the video frames' picture types."""
    r = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "frame=media_type,pict_type", "-of", "csv",
         str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    video = [line.split(",")[2] for line in r.stdout.splitlines() if line.startswith("frame,video")]
    return r.stderr, video


def test_ffprobe_decodes_cleanly_from_every_rap_chunk(ts_file: Path, tmp_path: Path) -> None:
    chunks = expected_chunks(ts_file)
    raps = [i for i, c in enumerate(chunks) if c.rap]
    assert len(raps) >= 4
    for i in raps:
        tail = tmp_path / f"from{i}.ts"
        tail.write_bytes(b"".join(c.payload for c in chunks[i:]))
        errors, video = ffprobe_frames(tail)
        assert errors == "", f"chunk {i}: {errors}"
        assert video and video[0] == "I"
    # Control: joining at a non-RAP chunk is what the check is there to catch.
    tail = tmp_path / "mid.ts"
    tail.write_bytes(b"".join(c.payload for c in chunks[raps[1] + 1 :]))
    errors, _ = ffprobe_frames(tail)
    assert errors != ""


def test_hevc_keyframes_from_nal_units(tmp_path: Path) -> None:
    if "libx265" not in subprocess.run(
        ["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True
    ).stdout:
        pytest.skip("this ffmpeg has no libx265")
    ts = tmp_path / "hevc.ts"
    cmd = synthetic_stream_command(
        str(ts), seconds=2, realtime=False, size="320x180", video_codec="libx265"
    )
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)  # x265 logs on its own
    data = bytearray(ts.read_bytes())
    for off in range(0, len(data), 188):  # clear random_access_indicator: NALs must suffice
        if data[off + 1] & 0x1F == 0x01 and data[off + 2] == 0x00 and data[off + 3] & 0x20:
            data[off + 5] &= 0xBF if data[off + 4] else 0xFF
    c = TsChunker()
    chunks = c.feed(bytes(data)) + c.flush()
    raps = [i for i, x in enumerate(chunks) if x.rap]
    assert len(raps) == 2
    tail = tmp_path / "tail.ts"
    tail.write_bytes(b"".join(x.payload for x in chunks[raps[1] :]))
    errors, video = ffprobe_frames(tail)
    assert errors == "" and video[0] == "I"


@pytest.mark.anyio
async def test_live_ffmpeg_pipe_into_stdin_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cmd = synthetic_stream_command("-", seconds=2, realtime=False, size="320x180")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    try:
        monkeypatch.setattr(sys, "stdin", proc.stdout)
        with anyio.fail_after(20):
            async with open_source("-") as src:
                chunks = [c async for c in src]
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    assert [i for i, c in enumerate(chunks) if c.rap][:1] == [0]
    assert sum(c.rap for c in chunks) == 2
    out = tmp_path / "live.ts"
    out.write_bytes(b"".join(c.payload for c in chunks))
    errors, video = ffprobe_frames(out)
    assert errors == "" and len(video) == 60


@pytest.mark.anyio
async def test_file_source(ts_file: Path) -> None:
    with anyio.fail_after(10):
        got = [c async for c in read_source(str(ts_file))]
    assert got == expected_chunks(ts_file)


@pytest.mark.anyio
async def test_realtime_file_source_paces_by_media_time(ts_file: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.ts"
    short.write_bytes(ts_file.read_bytes()[: 188 * 150])  # about 0.8 s of media
    with anyio.fail_after(10):
        start = anyio.current_time()
        async with open_source(str(short), realtime=True) as src:
            got = [c async for c in src]
        elapsed = anyio.current_time() - start
    media = sum(c.media_ms for c in got[:-1]) / 1000  # the last chunk is released at its start
    assert media > 0.5
    assert elapsed >= media * 0.95


@pytest.mark.anyio
async def test_udp_source(ts_file: Path) -> None:
    data = ts_file.read_bytes()
    expected = TsChunker().feed(data)  # all but the tail the chunker holds until more arrives
    got: list[MediaChunk] = []
    with anyio.fail_after(10):
        async with open_source("udp://127.0.0.1:0") as src:
            assert src.local_address is not None
            host, port = src.local_address
            async with await anyio.create_connected_udp_socket(host, port) as tx:
                for off in range(0, len(data), 7 * 188):  # 7 TS packets per datagram, like ffmpeg
                    await tx.send(data[off : off + 7 * 188])
            async for chunk in src:
                got.append(chunk)
                if len(got) == len(expected):
                    break
    assert got == expected
    assert src.bytes_in >= sum(len(c.payload) for c in expected)


@pytest.mark.anyio
@pytest.mark.timeout(30)  # a blocking read would freeze the loop, and fail_after with it
async def test_stdin_pipe_does_not_block_event_loop(
    ts_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ts_file.read_bytes()
    r, w = os.pipe()
    monkeypatch.setattr(sys, "stdin", os.fdopen(r, "rb"))
    got: list[MediaChunk] = []

    async def consume() -> None:
        async with open_source("-") as src:
            got.extend([c async for c in src])

    def produce() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(data)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            # The reader now waits on an empty pipe; a blocking read would freeze the loop here.
            await anyio.wait_all_tasks_blocked()
            assert got == []
            await anyio.to_thread.run_sync(produce)
    sys.stdin.close()
    assert got == expected_chunks(ts_file)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("kind", ["pipe", "file"])
def test_stdin_in_subprocess(ts_file: Path, backend: str, kind: str) -> None:
    script = (
        "import anyio, hashlib, sys\n"
        "from seed.ingest import read_source\n"
        "async def main():\n"
        "    h, n = hashlib.sha256(), 0\n"
        "    async for c in read_source('-'):\n"
        "        h.update(c.payload); n += c.rap\n"
        "    print(h.hexdigest(), n)\n"
        f"anyio.run(main, backend={backend!r})\n"
    )
    data = ts_file.read_bytes()
    with open(ts_file, "rb") as f:
        stdin_args = {"input": data} if kind == "pipe" else {"stdin": f}
        r = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, cwd=REPO, timeout=30, **stdin_args
        )
    assert r.returncode == 0, r.stderr.decode()
    digest, raps = r.stdout.decode().split()
    assert digest == hashlib.sha256(data).hexdigest()
    assert int(raps) == sum(c.rap for c in expected_chunks(ts_file))


@pytest.mark.anyio
async def test_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(IngestError, match="not found"):
        async with open_source(str(tmp_path / "missing.ts")):
            pass
    for spec in ("udp://127.0.0.1", "udp://127.0.0.1:port", "udp://127.0.0.1:99999"):
        with pytest.raises(IngestError, match="udp://HOST:PORT"):
            open_source(spec)
    with pytest.raises(IngestError, match="stdin"):
        monkeypatch.setattr(sys, "stdin", None)
        async with open_source("-"):
            pass
    not_ts = tmp_path / "clip.mp4"
    not_ts.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(IngestError, match="MPEG-TS"):
        async with open_source(str(not_ts)) as src:
            async for _ in src:
                pass
