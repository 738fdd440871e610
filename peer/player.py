"""Hand the verified, in-order chunk stream to real players: over HTTP and to a file or stdout.

The peer calls :meth:`PlayerOutput.push` (synchronous, never blocks) with each verified chunk in
stream order and :meth:`PlayerOutput.gap` for each chunk that missed its deadline. A bounded
backlog of recent chunks lets a player that connects mid-stream start at once from the most
recent random-access chunk (a seed ``rap`` chunk carries PAT+PMT+keyframe). Each consumer reads
at its own pace from that backlog; a consumer that falls too far behind is cut loose rather than
let the peer buffer without bound: an HTTP client is disconnected, the file/stdout sink skips
ahead to a random-access chunk.

Bytes reach players exactly as pushed. A gap is not patched: the player sees a TS continuity
break and conceals it, as with any lossy broadcast input; holding output until the next keyframe
would instead freeze the picture for up to a GOP.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

__all__ = ["PlayerOutput"]

log = logging.getLogger(__name__)

#: Longest request head accepted, and how long a client may take to send it (slowloris guard).
_MAX_REQUEST = 8 * 1024
_REQUEST_TIMEOUT = 10.0
#: Kernel send buffer per HTTP client: bounds the bytes hidden from our lag accounting, and the
#: latency they add; loopback players drain it in microseconds.
_SNDBUF = 256 * 1024
_STREAM_PATHS = frozenset({"/", "/stream.ts"})


@dataclass(slots=True)
class _Entry:
    index: int  # position in the stream of pushed chunks (not the chunk seq: gaps are skipped)
    offset: int  # bytes pushed before this chunk
    payload: bytes
    rap: bool


@dataclass(eq=False, slots=True)
class _Reader:
    """One consumer's position in the stream."""

    name: str
    cursor: int  # index of the next entry to send
    wait_rap: bool  # skip entries until a random-access chunk
    sink: bool = False
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    dropped: bool = False


class PlayerOutput:
    """In-order chunk stream → HTTP players (``serve_http``) and file/stdout (``write_to``).

    ``push``/``gap``/``end`` are plain calls from the event-loop thread (the peer's driver).
    ``backlog_chunks``/``backlog_bytes`` bound the replay buffer (32 chunks is ~6 s at 200 ms);
    ``max_lag_bytes`` is how far a consumer may fall behind the newest byte before it is dropped
    (HTTP) or skipped ahead (sink).
    """

    def __init__(
        self,
        *,
        backlog_chunks: int = 32,
        backlog_bytes: int = 16 << 20,
        max_lag_bytes: int = 4 << 20,
        max_clients: int = 32,
    ) -> None:
        self.backlog_chunks = backlog_chunks
        self.backlog_bytes = backlog_bytes
        self.max_lag_bytes = max_lag_bytes
        self.max_clients = max_clients
        #: Counters for logs and metrics.
        self.chunks = 0
        self.bytes = 0
        self.gaps = 0
        self.dropped_clients = 0
        self._backlog: deque[_Entry] = deque()
        self._backlog_size = 0
        self._last_seq: int | None = None
        self._ended = False
        self._readers: set[_Reader] = set()
        self._wakeup: anyio.Event | None = None  # created lazily: push() needs no event loop

    # -- producer side ----------------------------------------------------------------------

    def push(self, seq: int, payload: bytes, rap: bool) -> None:
        """Append the verified chunk ``seq``; seqs must increase (skipped ones count as gaps)."""
        self._advance(seq)
        self._backlog.append(_Entry(self.chunks, self.bytes, payload, rap))
        self.chunks += 1
        self.bytes += len(payload)
        self._backlog_size += len(payload)
        while len(self._backlog) > 1 and (
            len(self._backlog) > self.backlog_chunks or self._backlog_size > self.backlog_bytes
        ):
            self._backlog_size -= len(self._backlog.popleft().payload)
        for reader in list(self._readers):
            self._check_lag(reader)
        self._notify()

    def gap(self, seq: int) -> None:
        """Chunk ``seq`` will never come (missed its deadline); players bridge the break."""
        self._advance(seq)
        self.gaps += 1

    def end(self) -> None:
        """End of stream: consumers get what remains, then their connection/file is closed."""
        self._ended = True
        self._notify()

    @property
    def http_clients(self) -> int:
        """HTTP players being served right now."""
        return sum(1 for r in self._readers if not r.sink)

    async def wait_clients(self, n: int = 1) -> None:
        """Return once at least ``n`` HTTP players are connected (for supervisors and tests)."""
        while self.http_clients < n:
            await self._wait()

    # -- consumers --------------------------------------------------------------------------

    async def serve_http(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``GET /`` and ``GET /stream.ts`` until cancelled; reports the bound port."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        async with listener:
            actual = listener.extra(SocketAttribute.local_port)
            log.info("player: serving http://%s:%d/stream.ts", host, actual)
            task_status.started(actual)
            await listener.serve(self._handle_http)

    async def write_to(
        self, target: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the stream from its first random-access chunk on to a path or ``-`` (stdout).

        Each chunk is written and flushed in a worker thread, so a slow disk or pipe never
        blocks the event loop. Returns at :meth:`end`, or when a stdout reader goes away.
        """
        to_stdout = target == "-"
        if to_stdout:
            f: BinaryIO = sys.stdout.buffer
        else:
            f = await anyio.to_thread.run_sync(open, target, "wb")
        task_status.started()

        async def send(payload: bytes) -> None:
            # A pipe can block forever (the reader paused): don't let that hold up cancellation.
            await anyio.to_thread.run_sync(_write_flush, f, payload, abandon_on_cancel=to_stdout)

        cursor, wait_rap = self._join_point(latest=False)
        reader = _Reader(f"sink {target}", cursor, wait_rap, sink=True)
        try:
            await self._pump(reader, send)
        except BrokenPipeError:
            log.info("player: %s closed by its reader", target)
        finally:
            if not to_stdout:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(f.close)

    # -- internals --------------------------------------------------------------------------

    def _advance(self, seq: int) -> None:
        if self._last_seq is not None:
            if seq <= self._last_seq:
                raise ValueError(f"chunk {seq} after {self._last_seq}: not in stream order")
            self.gaps += seq - self._last_seq - 1
        self._last_seq = seq

    def _notify(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def _wait(self) -> None:
        if self._wakeup is None:
            self._wakeup = anyio.Event()
        await self._wakeup.wait()

    def _join_point(self, *, latest: bool) -> tuple[int, bool]:
        """Where a new consumer starts: the latest (or earliest) RAP chunk in the backlog."""
        raps = [e.index for e in self._backlog if e.rap]
        if raps:
            return (raps[-1] if latest else raps[0]), False
        return self.chunks, True  # none buffered: wait for the next one

    def _check_lag(self, reader: _Reader) -> None:
        """Cut loose a consumer that is too far behind (or behind the backlog)."""
        if reader.wait_rap or reader.dropped:
            return
        base = self._backlog[0].index
        if reader.cursor >= self.chunks:
            return
        if reader.cursor >= base:
            lag = self.bytes - self._backlog[reader.cursor - base].offset
            if lag <= self.max_lag_bytes:
                return
        else:
            lag = self.bytes - self._backlog[0].offset  # and more: part of it is gone
        if reader.sink:
            old = reader.cursor
            reader.cursor, reader.wait_rap = self._join_point(latest=True)
            if reader.cursor <= old:
                reader.cursor, reader.wait_rap = self.chunks, True
            log.warning("player: %s fell %d bytes behind; skipping to a keyframe", reader.name, lag)
        else:
            reader.dropped = True
            self.dropped_clients += 1
            reader.scope.cancel()
            log.warning(
                "player: dropping %s: %d bytes behind (limit %d)",
                reader.name, lag, self.max_lag_bytes,
            )  # fmt: skip

    def _next_entry(self, reader: _Reader) -> _Entry | None:
        base = self._backlog[0].index if self._backlog else self.chunks
        reader.cursor = max(reader.cursor, base)
        while reader.cursor < self.chunks:
            entry = self._backlog[reader.cursor - base]
            if entry.rap or not reader.wait_rap:
                reader.wait_rap = False
                return entry
            reader.cursor += 1
        return None

    async def _pump(self, reader: _Reader, send: Callable[[bytes], Awaitable[object]]) -> None:
        """Send the stream to one consumer until the end, or until it is dropped."""
        self._readers.add(reader)
        self._notify()
        try:
            with reader.scope:
                while True:
                    entry = self._next_entry(reader)
                    if entry is None:
                        if self._ended:
                            return
                        await self._wait()
                        continue
                    await send(entry.payload)
                    if reader.cursor == entry.index:  # unless a lag skip moved it meanwhile
                        reader.cursor += 1
        finally:
            self._readers.discard(reader)
            self._notify()

    async def _handle_http(self, stream: SocketStream) -> None:
        peer = stream.extra(SocketAttribute.remote_address)
        name = f"http client {peer[0]}:{peer[1]}"
        try:
            async with stream:
                await self._serve_request(stream, name)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            log.info("player: %s went away", name)
        except Exception:  # one broken client must not take the server down
            log.exception("player: error serving %s", name)

    async def _serve_request(self, stream: SocketStream, name: str) -> None:
        try:
            with anyio.fail_after(_REQUEST_TIMEOUT):
                head = await _read_head(stream)
        except TimeoutError:
            return
        except ValueError:
            await _reply(stream, 431, "Request Header Fields Too Large")
            return
        try:
            method, target, version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if not version.startswith("HTTP/"):
                raise ValueError(version)
        except ValueError:
            await _reply(stream, 400, "Bad Request")
            return
        path = target.split("?", 1)[0]
        if method != "GET":
            await _reply(stream, 405, "Method Not Allowed", "Allow: GET\r\n")
        elif path not in _STREAM_PATHS:
            await _reply(stream, 404, "Not Found")
        elif self.http_clients >= self.max_clients:
            await _reply(stream, 503, "Service Unavailable")
        else:
            stream.extra(SocketAttribute.raw_socket).setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF
            )
            await stream.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\n"
                b"Cache-Control: no-cache, no-store\r\nConnection: close\r\n\r\n"
            )
            cursor, wait_rap = self._join_point(latest=True)
            reader = _Reader(name, cursor, wait_rap)
            log.info("player: %s joined", name)
            await self._pump(reader, stream.send)
            if reader.dropped:
                await anyio.aclose_forcefully(stream)  # don't wait to flush a stalled client


async def _read_head(stream: SocketStream) -> bytes:
    """The request line and headers (bounded); the body, if any, is ignored."""
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > _MAX_REQUEST:
            raise ValueError("request head too large")
        head += await stream.receive(4096)
    return head


async def _reply(stream: SocketStream, code: int, reason: str, extra: str = "") -> None:
    body = f"{code} {reason}\n".encode()
    await stream.send(
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n".encode()
        + body
    )


def _write_flush(f: BinaryIO, payload: bytes) -> None:
    f.write(payload)
    f.flush()
