"""Cut a live MPEG-TS byte stream into media chunks that start where a player can join.

Two layers:

* :class:`TsChunker` — pure and incremental (no I/O, no clock): bytes in, :class:`MediaChunk` out.
  It follows the PAT/PMT to find the video and PCR PIDs, measures chunk length in *media* time
  (PCR, else video PTS) and cuts right before every video random-access point, so a joiner can
  start decoding at any ``rap`` chunk. The concatenation of all payloads is exactly the input
  (minus garbage dropped before the first TS sync) — the property everything downstream relies on.
* :func:`open_source` / :func:`read_source` — anyio input sources (file, stdin, UDP) that feed a
  chunker without blocking the event loop; they run on asyncio and trio.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import sys
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
from anyio.abc import SocketAttribute

__all__ = [
    "DEFAULT_CHUNK_MS",
    "DEFAULT_MAX_CHUNK_BYTES",
    "IngestError",
    "MediaChunk",
    "MediaSource",
    "TS_PACKET_SIZE",
    "TsChunker",
    "open_source",
    "read_source",
    "synthetic_stream_command",
]

log = logging.getLogger(__name__)

TS_PACKET_SIZE = 188
SYNC_BYTE = 0x47
DEFAULT_CHUNK_MS = 200.0
DEFAULT_MAX_CHUNK_BYTES = 1 << 20
#: Garbage tolerated before the first TS sync; beyond it the input is declared "not MPEG-TS".
DEFAULT_RESYNC_LIMIT = 256 * 1024
#: Consecutive sync bytes (188 apart) required to lock: one 0x47 in random data is 1 in 256.
_SYNC_CONFIRM = 3

_PCR_HZ = 27_000_000
_PCR_WRAP = (1 << 33) * 300  # 33-bit 90 kHz base, in 27 MHz ticks (~26.5 h)
#: A timestamp jump beyond this (or backwards) is a discontinuity (splice, encoder restart, wrap
#: glitch), not elapsed media time: the chunker cuts there and restarts its media clock.
_MAX_JUMP_TICKS = 10 * _PCR_HZ

_PAT_PID = 0x0000
_NULL_PID = 0x1FFF
#: CAT and the DVB/ATSC SI tables (NIT, SDT, EIT, TDT, ...) live on PIDs 0x01 and 0x10-0x1F.
_SI_PIDS = frozenset({0x0001, *range(0x0010, 0x0020)})
_H264, _HEVC = 0x1B, 0x24
#: MPEG-1/2 video, MPEG-4 part 2: video, but we only trust the TS random_access_indicator for them.
_OTHER_VIDEO = frozenset({0x01, 0x02, 0x10})
_H264_RAP_NALS = frozenset({5, 7})  # IDR slice, SPS
_HEVC_RAP_NALS = frozenset({*range(16, 22), 32, 33})  # IRAP slices (BLA/IDR/CRA), VPS, SPS


class IngestError(Exception):
    """The input cannot be ingested (missing file, bad spec, not MPEG-TS); the message says why."""


@dataclass(frozen=True, slots=True)
class MediaChunk:
    """One slice of the stream, cut on TS packet boundaries.

    ``rap``: the chunk starts with a random-access point (PAT/PMT + video keyframe when the muxer
    puts them together), so a player can start decoding here. ``media_ms``: media time the chunk
    spans (from PCR/PTS; 0.0 if the stream carries no timestamps). ``pcr`` (27 MHz ticks) and
    ``pts`` (90 kHz ticks): the first PCR / video PTS inside the chunk, if any.
    """

    payload: bytes
    rap: bool
    media_ms: float
    pcr: int | None = None
    pts: int | None = None


@dataclass(slots=True)
class _Packet:
    """What the chunker needs from one TS packet."""

    psi: bool = False  # PAT/PMT/SI: glued to the following RAP
    rap: bool = False
    pcr: int | None = None  # 27 MHz, on the PCR PID only
    pts: int | None = None  # 90 kHz, video PES only
    dts: int | None = None  # 90 kHz, video PES only; monotonic even with B-frames


class TsChunker:
    """Incremental MPEG-TS chunker: ``feed()`` bytes as they arrive, ``flush()`` at end of input.

    Cutting rules, in order of precedence:

    1. never let a chunk exceed ``max_bytes`` (cut earlier, even without timestamp progress);
    2. cut right before a video random-access point (TS ``random_access_indicator`` on the video
       PID, or an H.264 IDR/SPS / HEVC IRAP/VPS/SPS NAL at the start of a video PES), moving the
       PAT/PMT/SI packets that immediately precede it into the new chunk — ffmpeg emits
       ``SDT PAT PMT keyframe``, so the RAP chunk is self-describing for a joining decoder;
    3. cut before a timestamped packet once ``chunk_ms`` of media time has elapsed since the
       chunk started (PCR on the PMT's PCR PID; video PTS if the program has no PCR PID).

    Input may start mid-packet: bytes before the first position where ``_SYNC_CONFIRM`` sync
    bytes line up 188 apart are dropped (counted in :attr:`dropped`). After that lock nothing is
    ever dropped: a corrupt packet is carried through opaque, and a trailing partial packet ends
    up in the last chunk at :meth:`flush`, so the payloads concatenate to the input exactly.

    A chunk is emitted when the first non-PSI packet of the next one arrives (the cut decision
    needs it): the chunker holds back only the few PAT/PMT/SI packets in between.
    PSI sections are parsed only when they fit in one packet (true of real PAT/PMTs).
    """

    def __init__(
        self,
        *,
        chunk_ms: float = DEFAULT_CHUNK_MS,
        max_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        resync_limit: int = DEFAULT_RESYNC_LIMIT,
    ) -> None:
        if chunk_ms <= 0:
            raise ValueError("chunk_ms must be positive")
        if max_bytes < TS_PACKET_SIZE:
            raise ValueError(f"max_bytes must be at least one TS packet ({TS_PACKET_SIZE})")
        self.chunk_ticks = round(chunk_ms * _PCR_HZ / 1000)
        self.max_bytes = max_bytes
        self.resync_limit = resync_limit
        #: Bytes dropped before the first TS sync.
        self.dropped = 0
        self._locked = False
        self._buf = bytearray()  # unsynced bytes, or an incomplete packet once locked
        # Program state from PAT/PMT.
        self._pmt_pids: set[int] = set()
        self._video_pid: int | None = None
        self._video_type: int | None = None
        self._pcr_pid: int | None = None
        # Current chunk: ``_cur`` is committed; ``_pend`` is the PSI run since the last other
        # packet, which joins the next chunk if a RAP follows and the current one otherwise.
        self._cur = bytearray()
        self._pend = bytearray()
        self._cur_rap = False
        self._cur_start: int | None = None  # media time (27 MHz) the chunk starts at
        self._cur_pcr: int | None = None
        self._cur_pts: int | None = None
        self._last_t: int | None = None  # latest media timestamp seen

    # -- public -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[MediaChunk]:
        """Consume ``data``; return the chunks it completed (possibly none).

        Raises :class:`IngestError` if no TS sync is found within ``resync_limit`` bytes.
        """
        self._buf += data
        if not self._locked and not self._find_sync(final=False):
            return []
        out: list[MediaChunk] = []
        buf = self._buf
        n = len(buf) - len(buf) % TS_PACKET_SIZE
        for off in range(0, n, TS_PACKET_SIZE):
            self._packet(bytes(buf[off : off + TS_PACKET_SIZE]), out)
        del buf[:n]
        return out

    def flush(self) -> list[MediaChunk]:
        """End of input: return the last chunk(s), including any trailing partial packet.

        Raises :class:`IngestError` if bytes were fed but none looked like MPEG-TS.
        """
        out: list[MediaChunk] = []
        if not self._locked:
            if not self._buf and not self.dropped:
                return out
            if not self._find_sync(final=True):
                raise self._no_sync()
            out = self.feed(b"")
        # Whatever is pending is the tail of the stream, in input order.
        self._cur += self._pend
        self._pend.clear()
        if self._buf:  # a partial packet: kept so the payloads stay byte-exact
            if len(self._cur) + len(self._buf) > self.max_bytes:
                self._emit(out, end=self._last_t)
            self._cur += self._buf
            self._buf.clear()
        self._emit(out, end=self._last_t)
        return out

    # -- sync -------------------------------------------------------------------------------

    def _find_sync(self, *, final: bool) -> bool:
        """Drop bytes up to the first confirmed sync position; True once locked."""
        buf = self._buf
        need = (_SYNC_CONFIRM - 1) * TS_PACKET_SIZE + 1
        i = 0
        while True:
            i = buf.find(SYNC_BYTE, i)
            if i < 0:
                i = len(buf)
                break
            if len(buf) - i < need:
                if not final:
                    break  # wait for enough bytes to confirm
                # End of input: accept a position where every sync byte that remains lines
                # up, if at least one whole packet does.
                if len(buf) - i >= TS_PACKET_SIZE and all(
                    buf[j] == SYNC_BYTE for j in range(i, len(buf), TS_PACKET_SIZE)
                ):
                    self._locked = True
                    break
            elif all(buf[i + k * TS_PACKET_SIZE] == SYNC_BYTE for k in range(1, _SYNC_CONFIRM)):
                self._locked = True
                break
            i += 1
        self.dropped += i
        del buf[:i]
        if self._locked:
            if self.dropped:
                log.warning("ingest: dropped %d bytes before the first MPEG-TS sync", self.dropped)
            return True
        if self.dropped > self.resync_limit:
            raise self._no_sync()
        return False

    def _no_sync(self) -> IngestError:
        return IngestError(
            f"no MPEG-TS sync found in {self.dropped} bytes of input: "
            "is this an MPEG-TS stream (ffmpeg ... -f mpegts)?"
        )

    # -- chunking ---------------------------------------------------------------------------

    def _packet(self, pkt: bytes, out: list[MediaChunk]) -> None:
        info = self._parse(pkt)
        # Rule 1: size. Checked first so that no rule below can grow a chunk past the limit.
        if len(self._cur) + len(self._pend) + TS_PACKET_SIZE > self.max_bytes:
            self._cur += self._pend
            self._pend.clear()
            self._emit(out, end=self._last_t)
        if info.psi:
            self._pend += pkt
            return
        if self._pcr_pid is not None:
            t = info.pcr
        else:  # decode order is monotonic; PTS steps back around B-frames
            dts = info.dts if info.dts is not None else info.pts
            t = dts * 300 if dts is not None else None
        cut = info.rap
        if t is not None and self._cur_start is not None:
            elapsed = (t - self._cur_start) % _PCR_WRAP
            if elapsed > _MAX_JUMP_TICKS:  # discontinuity: end the chunk at what we last saw
                self._emit(out, end=self._last_t)
                self._cur_start = t
            elif elapsed >= self.chunk_ticks:
                cut = True
        if cut and self._cur:
            self._emit(out, end=t if t is not None else self._last_t)
        if not self._cur:
            self._cur_rap = info.rap
            if t is not None:
                self._cur_start = t
        self._cur += self._pend
        self._pend.clear()
        self._cur += pkt
        if self._cur_start is None and t is not None:
            self._cur_start = t
        if info.pcr is not None and self._cur_pcr is None:
            self._cur_pcr = info.pcr
        if info.pts is not None and self._cur_pts is None:
            self._cur_pts = info.pts
        if t is not None:
            self._last_t = t

    def _emit(self, out: list[MediaChunk], *, end: int | None) -> None:
        """Close the current chunk (if any) ending at media time ``end``."""
        if not self._cur:
            return
        start = self._cur_start
        media_ms = 0.0
        if start is not None and end is not None:
            ticks = (end - start) % _PCR_WRAP
            if ticks <= _MAX_JUMP_TICKS:
                media_ms = ticks * 1000 / _PCR_HZ
        out.append(
            MediaChunk(bytes(self._cur), self._cur_rap, media_ms, self._cur_pcr, self._cur_pts)
        )
        self._cur.clear()
        self._cur_rap = False
        # The next chunk starts where this one ended; a timestamp on its first packet refines it.
        self._cur_start = end
        self._cur_pcr = self._cur_pts = None

    # -- TS parsing -------------------------------------------------------------------------

    def _parse(self, pkt: bytes) -> _Packet:
        info = _Packet()
        if pkt[0] != SYNC_BYTE or pkt[1] & 0x80:  # lost sync / transport_error: opaque
            return info
        pid = ((pkt[1] & 0x1F) << 8) | pkt[2]
        pusi = bool(pkt[1] & 0x40)
        afc = (pkt[3] >> 4) & 0x3
        pos = 4
        rai = False
        if afc & 0x2:
            alen = pkt[4]
            if alen and 5 + alen <= TS_PACKET_SIZE:
                flags = pkt[5]
                rai = bool(flags & 0x40)
                if flags & 0x10 and alen >= 7:
                    b = pkt[6:12]
                    base = (b[0] << 25) | (b[1] << 17) | (b[2] << 9) | (b[3] << 1) | (b[4] >> 7)
                    ext = ((b[4] & 0x1) << 8) | b[5]
                    if pid == self._pcr_pid:
                        info.pcr = base * 300 + ext
            pos = 5 + alen
        payload = pkt[pos:] if afc & 0x1 and pos < TS_PACKET_SIZE else b""
        if pid == _PAT_PID or pid in self._pmt_pids or pid in _SI_PIDS:
            info.psi = True
            if pusi and payload:
                self._parse_psi(pid, payload)
        elif pid == self._video_pid:
            es = b""
            if pusi:
                info.pts, info.dts, es = _parse_pes(payload)
            info.rap = rai or (pusi and self._nal_rap(es))
        return info

    def _nal_rap(self, es: bytes) -> bool:
        """True if an H.264/HEVC keyframe NAL starts in this (first) packet of a video PES."""
        if self._video_type not in (_H264, _HEVC):
            return False
        i = es.find(b"\x00\x00\x01")
        while 0 <= i < len(es) - 3:
            header = es[i + 3]
            if self._video_type == _H264:
                if header & 0x1F in _H264_RAP_NALS:
                    return True
            elif (header >> 1) & 0x3F in _HEVC_RAP_NALS:
                return True
            i = es.find(b"\x00\x00\x01", i + 3)
        return False

    def _parse_psi(self, pid: int, payload: bytes) -> None:
        pointer = payload[0]
        sec = payload[1 + pointer :]
        if len(sec) < 3:
            return
        table_id = sec[0]
        length = ((sec[1] & 0x0F) << 8) | sec[2]
        if len(sec) < 3 + length or length < 9:  # spans packets or malformed: ignored
            return
        body = sec[8 : 3 + length - 4]  # after the 5-byte extended header, before the CRC
        if pid == _PAT_PID and table_id == 0x00:
            pmts = set()
            for j in range(0, len(body) - 3, 4):
                program = (body[j] << 8) | body[j + 1]
                if program:  # program 0 points at the NIT, not a PMT
                    pmts.add(((body[j + 2] & 0x1F) << 8) | body[j + 3])
            self._pmt_pids = pmts - {_PAT_PID, _NULL_PID} - _SI_PIDS
        elif pid in self._pmt_pids and table_id == 0x02 and len(body) >= 4:
            pcr_pid = ((body[0] & 0x1F) << 8) | body[1]
            j = 4 + (((body[2] & 0x0F) << 8) | body[3])
            video: tuple[int, int] | None = None
            while j + 5 <= len(body):
                stype = body[j]
                es_pid = ((body[j + 1] & 0x1F) << 8) | body[j + 2]
                if video is None and (stype in (_H264, _HEVC) or stype in _OTHER_VIDEO):
                    video = (es_pid, stype)
                j += 5 + (((body[j + 3] & 0x0F) << 8) | body[j + 4])
            if video is None and self._video_pid is not None:
                return  # a second, audio-only program: keep the first program's video
            self._pcr_pid = None if pcr_pid == _NULL_PID else pcr_pid
            self._video_pid, self._video_type = video if video else (None, None)


def _parse_pes(payload: bytes) -> tuple[int | None, int | None, bytes]:
    """PTS, DTS (90 kHz) and elementary-stream bytes of a PES packet's first TS payload."""
    if len(payload) < 9 or payload[:3] != b"\x00\x00\x01":
        return None, None, b""
    flags, hdr_len = payload[7] >> 6, payload[8]
    pts = _timestamp(payload[9:14]) if flags & 0b10 else None
    dts = _timestamp(payload[14:19]) if flags == 0b11 else None
    return pts, dts, payload[9 + hdr_len :]


def _timestamp(p: bytes) -> int | None:
    """A 33-bit PES timestamp from its 5-byte marker-bit encoding."""
    if len(p) < 5:
        return None
    return ((p[0] >> 1) & 0x7) << 30 | p[1] << 22 | (p[2] >> 1) << 15 | p[3] << 7 | p[4] >> 1


# -- input sources ----------------------------------------------------------------------------

_READ_SIZE = 64 * 1024
_UDP_RCVBUF = 4 << 20  # absorb keyframe bursts; the kernel caps it at net.core.rmem_max


class MediaSource:
    """An open input (file, stdin or UDP) yielding :class:`MediaChunk` objects.

    Use as ``async with open_source(spec) as src: async for chunk in src: ...``. Files and
    stdin end at EOF; a UDP source runs until cancelled. :attr:`local_address` is the bound
    ``(host, port)`` of a UDP source (useful with port 0); :attr:`bytes_in` counts input bytes.
    """

    def __init__(
        self,
        spec: str,
        *,
        chunk_ms: float = DEFAULT_CHUNK_MS,
        max_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        realtime: bool = False,
    ) -> None:
        self.spec = spec
        self.realtime = realtime
        self.local_address: tuple[str, int] | None = None
        self.bytes_in = 0
        self._chunker = TsChunker(chunk_ms=chunk_ms, max_bytes=max_bytes)
        self._ready: deque[MediaChunk] = deque()
        self._eof = False
        self._udp_addr = _parse_udp(spec) if spec.startswith("udp:") else None
        self._file: anyio.AsyncFile[bytes] | None = None
        self._fd: int | None = None  # stdin when it is a pipe/tty/socket: read when readable
        self._udp: anyio.abc.UDPSocket | None = None
        self._clock_origin: float | None = None
        self._media_ms = 0.0

    async def __aenter__(self) -> MediaSource:
        if self._udp_addr is not None:
            host, port = self._udp_addr
            try:
                self._udp = await anyio.create_udp_socket(local_host=host, local_port=port)
            except OSError as exc:
                raise IngestError(f"cannot listen on {self.spec}: {exc.strerror or exc}") from exc
            raw = self._udp.extra(SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RCVBUF)
            bound = self._udp.extra(SocketAttribute.local_address)
            assert not isinstance(bound, str)  # (a UDP socket's: host, port, and more for IPv6)
            self.local_address = (bound[0], bound[1])
        elif self.spec == "-":
            try:
                fd = sys.stdin.fileno()
            except (AttributeError, ValueError, OSError):
                raise IngestError("input '-' needs stdin, but this process has none") from None
            if stat.S_ISREG(os.fstat(fd).st_mode):  # `< file`: reads never wait, use a thread
                self._file = anyio.wrap_file(os.fdopen(os.dup(fd), "rb", buffering=0))
            else:
                self._fd = fd
        else:
            try:
                self._file = await anyio.open_file(self.spec, "rb")
            except FileNotFoundError:
                raise IngestError(f"input file not found: {self.spec}") from None
            except OSError as exc:
                raise IngestError(f"cannot open input {self.spec}: {exc.strerror or exc}") from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release the input (the stdin descriptor itself stays open)."""
        if self._udp is not None:
            await self._udp.aclose()
        if self._file is not None:
            await self._file.aclose()

    def __aiter__(self) -> MediaSource:
        return self

    async def __anext__(self) -> MediaChunk:
        while not self._ready:
            if self._eof:
                raise StopAsyncIteration
            data = await self._read()
            self.bytes_in += len(data)
            if data:
                self._ready.extend(self._chunker.feed(data))
            else:
                self._eof = True
                self._ready.extend(self._chunker.flush())
        chunk = self._ready.popleft()
        if self.realtime:
            await self._pace(chunk)
        return chunk

    async def _read(self) -> bytes:
        """Next input bytes; b"" at end of input."""
        if self._udp is not None:
            data, _ = await self._udp.receive()
            return data
        if self._file is not None:
            return await self._file.read(_READ_SIZE)
        if self._fd is None:
            raise RuntimeError("MediaSource used outside 'async with'")
        # Wait in the event loop, then read what is there: a read on a readable pipe returns
        # at once, so the loop never blocks and cancellation is immediate.
        await anyio.wait_readable(self._fd)
        try:
            return os.read(self._fd, _READ_SIZE)
        except BlockingIOError:  # stdin was non-blocking and someone else drained it
            return await self._read()

    async def _pace(self, chunk: MediaChunk) -> None:
        """Release chunks no faster than their media time (demo input from a file)."""
        now = anyio.current_time()
        if self._clock_origin is None:
            self._clock_origin = now
        due = self._clock_origin + self._media_ms / 1000
        self._media_ms += chunk.media_ms
        if due > now:
            await anyio.sleep(due - now)


def _parse_udp(spec: str) -> tuple[str, int]:
    """``udp://HOST:PORT`` → (host, port); an empty host (``udp://:1234``) binds all IPv4."""
    try:
        url = urlsplit(spec)
        port = url.port
    except ValueError:
        port = None
        url = None
    if url is None or url.scheme != "udp" or port is None or url.path not in ("", "/"):
        raise IngestError(f"cannot parse UDP input {spec!r}: expected udp://HOST:PORT")
    host = url.hostname or "0.0.0.0"
    return host, port


def open_source(
    spec: str,
    *,
    chunk_ms: float = DEFAULT_CHUNK_MS,
    max_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    realtime: bool = False,
) -> MediaSource:
    """Input named by ``spec``: a file path, ``-`` for stdin, or ``udp://HOST:PORT``.

    ``realtime`` paces output by media time (to replay a file as if live); by default chunks
    come as fast as the input does — a live input is already paced (e.g. ``ffmpeg -re``).
    """
    return MediaSource(spec, chunk_ms=chunk_ms, max_bytes=max_bytes, realtime=realtime)


async def read_source(
    spec: str,
    *,
    chunk_ms: float = DEFAULT_CHUNK_MS,
    max_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    realtime: bool = False,
) -> AsyncIterator[MediaChunk]:
    """Chunks from ``spec`` (see :func:`open_source`); a convenience async generator.

    Prefer ``open_source`` where the iteration may be abandoned midway: an async generator is
    only closed when garbage-collected unless the caller closes it.
    """
    async with open_source(spec, chunk_ms=chunk_ms, max_bytes=max_bytes, realtime=realtime) as src:
        async for chunk in src:
            yield chunk


def synthetic_stream_command(
    output: str = "-",
    *,
    seconds: float | None = None,
    realtime: bool = True,
    size: str = "640x360",
    fps: int = 30,
    gop: int = 30,
    video_codec: str = "libx264",
    low_delay: bool = True,
) -> list[str]:
    """ffmpeg argv for a synthetic live MPEG-TS stream (test card + tone, H.264/AAC).

    For demos and tests: ``realtime`` paces it like a camera (``-re``); without it ffmpeg runs
    as fast as it can. A keyframe every ``gop`` frames gives a RAP chunk every gop/fps seconds.
    ``low_delay`` (``-tune zerolatency``) drops B-frames and encoder look-ahead.
    """
    return [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
        *(["-re"] if realtime else []),
        "-f", "lavfi", "-i", f"testsrc=size={size}:rate={fps}", "-f", "lavfi", "-i", "sine",
        *(["-t", str(seconds)] if seconds is not None else []),
        "-c:v", video_codec, "-preset", "veryfast", "-g", str(gop),
        *(["-tune", "zerolatency"] if low_delay else []),
        "-c:a", "aac", "-f", "mpegts", output,
    ]  # fmt: skip
