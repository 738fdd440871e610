"""Tracker fronts: one tracker's QUIC spread over several processes, its state kept in one.

A tracker is one Python process holding its channels' state (`TrackerNode`), and a flash crowd
queues on that process's CPU: a join cost a real tracker process 4.7 ms here, 4.1 of it QUIC
(the handshake, receiving the `Join`, sending ~7.5 answers; `bench/tracker_fronts.py`), so one
process admits ~210 viewers a second. With `fronts=N` (`meshcast tracker --fronts N`), N front
processes bind the tracker's UDP port together (`SO_REUSEPORT`: Linux hands all datagrams from
one client address to the same socket) and do all of QUIC for their links: handshakes,
packets, heartbeats, per-address admission. The state process keeps only the node (1.25 ms a
join: ~800 a second): the same `NodeRunner` drives it over a `FrontEndpoint`, whose links
stand for QUIC links in the fronts.

Each front holds one local stream (a Unix socket) to the state process. Records on it are a
4-byte big-endian length and a msgpack array:

- front → state: ``[HELLO, index, port]`` once, then ``[OPENED, link, "host:port"]``,
  ``[DATA, link, bytes]`` (control-stream bytes, as `ControlData` carries them) and
  ``[CLOSED, link, reason]``;
- state → front: ``[SEND, link, bytes]``, ``[CLOSE, link, reason]`` and ``[BLOCK, 0, host]``
  (the address has spent its admission tokens: see below).

Both ends batch what they write in a turn of their event loop into one write.

Linux picks a front by a hash of the client's address over the sockets bound to the port, so
when a front goes away or comes back, some addresses move to another front, which then gets
datagrams for connections it does not hold. Every connection ID a front issues starts with
`TAG` and the front's index (`Connection(cid_tag=...)`), and a front passes a datagram for an
unknown tagged ID to its owner over a Unix datagram socket (`_Forwarder`); the owner answers
the client directly, from the same port.

A front that exits (or breaks the record format) takes its links with it: the node sees each
closed, and their viewers rejoin through the others. It is started again (`RESPAWN_AFTER`;
not a third time if it goes away within `MIN_LIFETIME` of that). A front whose state process
goes away exits. The sockets live in a directory only this user can enter.

The per-address limit (`meshcast.net.admission`) holds for all fronts together, though Linux
spreads one address's connections (by source port) over them. Each front applies it before any
handshake work, as a lone tracker does; the state process applies it again to the links the
fronts report, over all of them. A link over the limit there is closed at once, with the reason,
before the node hears of it, and every front is told the address has spent its tokens (BLOCK),
so they drop its next new connections before any handshake work until its bucket refills.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import socket
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import anyio.abc
import msgpack

from meshcast.errors import MeshcastError
from meshcast.net.admission import Admission
from meshcast.net.quic import ConnectError, ControlData, LinkClosed, QuicLink, StreamData, open_endpoint
from meshcast.runtime import tune_gc_for_serving

log = logging.getLogger("meshcast.front")

HELLO, OPENED, DATA, CLOSED, SEND, CLOSE, BLOCK = range(7)
_KINDS = {HELLO: (int, int), OPENED: (int, str), DATA: (int, bytes), CLOSED: (int, str),
          SEND: (int, bytes), CLOSE: (int, str), BLOCK: (int, str)}
_FROM_FRONT = frozenset((HELLO, OPENED, DATA, CLOSED))
_FROM_STATE = frozenset((SEND, CLOSE, BLOCK))
MAX_RECORD = 1 << 20
"""Largest record either end accepts (a DATA or SEND record carries at most `PIECE` bytes)."""
PIECE = 64 * 1024
START_TIMEOUT = 20.0
"""Seconds a front process has to start and report in before starting the tracker fails."""
_LEN = struct.Struct(">I")


class FrontProtocolError(Exception):
    """A malformed record on a front's local stream: the stream is closed."""


def encode(kind: int, a: int, b: bytes | str | int) -> bytes:
    """One record, framed."""
    body = msgpack.packb((kind, a, b), use_bin_type=True)
    return _LEN.pack(len(body)) + body


class RecordReader:
    """Reassembles records from a byte stream and checks each one's shape. `accept`: the kinds
    the other end may send."""

    def __init__(self, accept: frozenset[int]) -> None:
        self._buf = bytearray()
        self._accept = accept

    def feed(self, data: bytes) -> Iterator[tuple[int, int, Any]]:
        """The whole records `data` completes, in order; `FrontProtocolError` where one is
        malformed (those before it are handed out first)."""
        buf = self._buf
        buf += data
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (size,) = _LEN.unpack_from(buf, pos)
                if size > MAX_RECORD:
                    raise FrontProtocolError(f"record of {size} bytes exceeds {MAX_RECORD}")
                if len(buf) - pos - 4 < size:
                    break
                body = bytes(buf[pos + 4:pos + 4 + size])
                pos += 4 + size
                yield self._check(body)
        finally:
            del buf[:pos]

    def _check(self, body: bytes) -> tuple[int, int, Any]:
        try:
            rec = msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise FrontProtocolError(f"undecodable record: {exc}") from None
        if type(rec) is not tuple or len(rec) != 3:
            raise FrontProtocolError(f"a record is [kind, int, value], got {rec!r:.60}")
        kind, a, b = rec
        if type(kind) is not int or kind not in self._accept:
            raise FrontProtocolError(f"unexpected record kind {kind!r:.20}")
        ta, tb = _KINDS[kind]
        if type(a) is not ta or type(b) is not tb or a < 0:
            raise FrontProtocolError(f"record kind {kind} wants [{ta.__name__}, {tb.__name__}], "
                                     f"got [{type(a).__name__}, {type(b).__name__}]")
        return kind, a, b


class _Writer:
    """A local stream's outbound side: records queued in a turn go in one write."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self._out: list[bytes] = []
        self._wake = anyio.Event()
        self.queued = 0

    def put(self, record: bytes) -> None:
        self._out.append(record)
        self.queued += len(record)
        self._wake.set()

    async def run(self) -> None:
        """Write until the stream breaks (its reader then sees the end and closes up)."""
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                out, self._out = self._out, []
                self.queued = 0
                await self.stream.send(b"".join(out))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


def _pieces(data: bytes) -> list[bytes]:
    return [data[i:i + PIECE] for i in range(0, len(data), PIECE)] or [b""]


# -- the state process's side ------------------------------------------------------------------


class LinkSink(Protocol):
    """Who takes a `FrontEndpoint`'s links and their events (`NodeRunner`)."""

    def link_arrived(self, qlink: Any) -> int: ...

    def link_event(self, link: int, event: ControlData | LinkClosed) -> None: ...


class FrontLink:
    """A link held by a front, as the state process's `NodeRunner` sees it (the part of
    `QuicLink` a tracker uses: control bytes and closing). Its events go to the endpoint's
    sink as their records come."""

    def __init__(self, front: _Front, number: int, remote: str) -> None:
        self._front = front
        self._number = number
        host, _, port = remote.rpartition(":")
        self.remote_address = (host, int(port) if port.isdigit() else 0)
        self._closed = False
        self.sink_id = -1
        """Its id at the sink (-1: not handed over yet)."""

    def send_control(self, data: bytes) -> None:
        if not self._closed and data:
            for piece in _pieces(data):
                self._front.writer.put(encode(SEND, self._number, piece))

    def close(self, reason: str = "") -> None:
        """Close it in the front (queued control bytes first, as `QuicLink.close`); the sink
        closed it, so it hears no more of it."""
        if not self._closed:
            self._closed = True
            self._front.writer.put(encode(CLOSE, self._number, reason))
            self._front.links.pop(self._number, None)

    @property
    def unsent_bytes(self) -> int:
        return self._front.writer.queued

    def open_stream(self) -> int:
        raise RuntimeError("a tracker's links carry no chunk streams")


class _Front:
    def __init__(self, index: int, stream: anyio.abc.ByteStream) -> None:
        self.index = index
        self.writer = _Writer(stream)
        self.links: dict[int, FrontLink] = {}
        self.pid = 0


class FrontEndpoint:
    """What the state process's `NodeRunner` runs over: the fronts' links, handed to it
    (`attach`) with their events as their records come, not queued for tasks to read: a queue
    and a task per link cost more than the node's work on a join.
    `fronts[i]`: front i while it is up. `admission`: the per-address limit over all fronts
    (None: none)."""

    def __init__(self, count: int, *, admission: Admission | None = None) -> None:
        self.fronts: list[_Front | None] = [None] * count
        self.admission = admission
        self._started = [anyio.Event() for _ in range(count)]
        self._lost: Callable[[int], None] = lambda index: None
        self._sink: LinkSink | None = None
        self._early: list[tuple[FrontLink, ControlData | LinkClosed | None]] = []
        """What came before `attach`: links (None) and their events, in order."""
        self.local_address: tuple[str, int] = ("", 0)
        self.closing = False

    def attach(self, sink: LinkSink) -> None:
        """Hand links and their events to `sink` from now on, and what came before."""
        self._sink = sink
        early, self._early = self._early, []
        for link, event in early:
            self._deliver(link, event)

    def _deliver(self, link: FrontLink, event: ControlData | LinkClosed | None) -> None:
        """A new link (`event` None) or one of its events, to the sink."""
        sink = self._sink
        if sink is None:
            self._early.append((link, event))
        elif event is None:
            link.sink_id = sink.link_arrived(link)
        elif link.sink_id >= 0:
            sink.link_event(link.sink_id, event)

    def stats(self) -> list[dict[str, Any]]:
        """Each front: up or not, its pid and its links (for `meshcast tracker --stats`)."""
        return [{"up": True, "pid": f.pid, "links": len(f.links)} if f else {"up": False}
                for f in self.fronts]

    async def connect(self, host: str, port: int, *, timeout: float = 5.0) -> QuicLink:
        raise ConnectError("a tracker with fronts does not open links")

    async def serve(self, stream: anyio.abc.ByteStream) -> None:
        """Carry one front's records until its stream ends or breaks; then close its links."""
        reader = RecordReader(_FROM_FRONT)
        front: _Front | None = None
        reason = "front process exited"
        try:
            async with anyio.create_task_group() as tg:
                try:
                    async for data in stream:
                        for kind, number, value in reader.feed(data):
                            if front is None:
                                front = self._hello(stream, kind, number, value)
                                tg.start_soon(front.writer.run)
                            else:
                                self._record(front, kind, number, value)
                except FrontProtocolError as exc:
                    reason = f"front process broke the protocol: {exc}"
                    log.error("front %s: %s; closing its links",
                              "?" if front is None else front.index, exc)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream,
                        OSError):
                    pass
                tg.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            reason = "tracker stopping"
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            if front is not None:
                if self.fronts[front.index] is front:
                    self.fronts[front.index] = None
                if reason != "tracker stopping" and not self.closing:
                    log.warning("front %d (pid %d) is gone (%s); its %d links close",
                                front.index, front.pid, reason, len(front.links))
                    self._lost(front.index)
                links = list(front.links.values())
                front.links.clear()
                for link in links:
                    link._closed = True
                    if reason != "tracker stopping":
                        self._deliver(link, LinkClosed(reason))

    def _hello(self, stream: anyio.abc.ByteStream, kind: int, index: int, port: int) -> _Front:
        if kind != HELLO or index >= len(self.fronts) or self.fronts[index] is not None:
            raise FrontProtocolError(f"a front starts with HELLO and a free index, not kind "
                                     f"{kind}, index {index}")
        front = self.fronts[index] = _Front(index, stream)
        if not self.local_address[1]:
            self.local_address = (self.local_address[0], port)
        self._started[index].set()
        return front

    def _record(self, front: _Front, kind: int, number: int, value: Any) -> None:
        if kind == DATA:
            link = front.links.get(number)
            if link is not None:
                self._deliver(link, ControlData(value))
        elif kind == OPENED:
            if number in front.links:
                raise FrontProtocolError(f"link {number} opened twice")
            host = value.rpartition(":")[0]
            if not self._admit(host):
                front.writer.put(encode(CLOSE, number, f"too many new connections from {host}"))
                return
            link = front.links[number] = FrontLink(front, number, value)
            self._deliver(link, None)
        elif kind == CLOSED:
            link = front.links.pop(number, None)
            if link is not None:
                link._closed = True
                self._deliver(link, LinkClosed(value))
        else:
            raise FrontProtocolError("HELLO twice")

    def _admit(self, host: str) -> bool:
        """Take a link from `host`, counted over all fronts? If not, tell every front its
        tokens are spent."""
        admission = self.admission
        if admission is None:
            return True
        now = anyio.current_time()
        if admission.admit(host, now):
            return True
        if admission.report(host, now):
            log.warning("%s (counted over all fronts)", admission.refusal(host))
        for front in self.fronts:
            if front is not None:
                front.writer.put(encode(BLOCK, 0, host))
        return False


RESPAWN_AFTER = 0.5
"""Seconds before a front that went away is started again."""
MIN_LIFETIME = 10.0
"""A front started again that goes away sooner than this after is not started a third time
(it would likely fail the same way); the others carry on."""


@asynccontextmanager
async def run_fronts(count: int, host: str, port: int, *, per_ip: tuple[float, int] | None,
                     socket_receive_buffer: int) -> AsyncIterator[FrontEndpoint]:
    """Start `count` front processes serving QUIC on `host:port` (port 0: the first one picks
    a free port, the others join it); yield the endpoint the node runs over. A front that
    goes away is started again (`RESPAWN_AFTER`, `MIN_LIFETIME`). Leaving the block stops
    them."""
    if not 1 <= count <= 255:
        raise ValueError(f"fronts must be 1 to 255, not {count}")
    endpoint = FrontEndpoint(count, admission=Admission(*per_ip) if per_ip else None)
    endpoint.local_address = (host, port)
    procs: list[anyio.abc.Process | None] = [None] * count
    restarted = [-math.inf] * count
    with tempfile.TemporaryDirectory(prefix="meshcast-fronts-") as tmp:
        path = os.path.join(tmp, "state.sock")
        listener = await anyio.create_unix_listener(path)
        try:
            async with anyio.create_task_group() as tg:

                async def accept_fronts() -> None:
                    while True:
                        tg.start_soon(endpoint.serve, await listener.accept())

                async def start(index: int) -> None:
                    endpoint._started[index] = started = anyio.Event()
                    argv = [sys.executable, "-m", "meshcast.net.front", "--state", path,
                            "--listen", f"{host}:{endpoint.local_address[1]}",
                            "--index", str(index), "--count", str(count),
                            "--receive-buffer", str(socket_receive_buffer)]
                    if per_ip:
                        argv += ["--per-ip-rate", str(per_ip[0]), "--per-ip-burst", str(per_ip[1])]
                    proc = procs[index] = await anyio.open_process(argv, stdin=None, stdout=None,
                                                                   stderr=None)
                    with anyio.move_on_after(START_TIMEOUT):
                        async with anyio.create_task_group() as race:  # it starts, or exits
                            async def exits() -> None:
                                await proc.wait()
                                race.cancel_scope.cancel()

                            race.start_soon(exits)
                            await started.wait()
                            race.cancel_scope.cancel()
                    front = endpoint.fronts[index]
                    if front is not None and started.is_set():
                        front.pid = proc.pid
                        return
                    what = (f"exited with status {proc.returncode}" if proc.returncode is not None
                            else f"did not start within {START_TIMEOUT:g} s")
                    raise MeshcastError(f"tracker front {index} {what} (its messages are above)")

                async def restart(index: int) -> None:
                    lived = anyio.current_time() - restarted[index]
                    if lived < MIN_LIFETIME:
                        log.error("front %d went away %.1f s after it was started again: not "
                                  "starting it again", index, lived)
                        return
                    await anyio.sleep(RESPAWN_AFTER)
                    restarted[index] = anyio.current_time()
                    old = procs[index]
                    if old is not None:
                        with anyio.move_on_after(5):
                            await old.wait()
                    try:
                        await start(index)
                    except MeshcastError as exc:
                        log.error("%s", exc)
                    else:
                        log.warning("front %d started again (pid %s)", index,
                                    getattr(procs[index], "pid", "?"))

                def lost(index: int) -> None:
                    tg.start_soon(restart, index)

                endpoint._lost = lost
                tg.start_soon(accept_fronts)
                for index in range(count):
                    await start(index)  # the first binds the port; the others join it
                log.info("%d front processes serve QUIC on %s:%d (pids %s)", count, host,
                         endpoint.local_address[1], " ".join(str(p.pid) for p in procs if p))
                try:
                    yield endpoint
                finally:
                    endpoint.closing = True
                    # Close the streams before cancelling their readers: a Unix stream's read
                    # cancelled while the socket is readable makes anyio (4.16, asyncio) log
                    # an InvalidStateError.
                    with anyio.CancelScope(shield=True):
                        for front in endpoint.fronts:
                            if front is not None:
                                await front.writer.stream.aclose()
                    tg.cancel_scope.cancel()
        finally:
            # Their streams are closed: fronts close their links and exit on their own.
            with anyio.CancelScope(shield=True):
                await listener.aclose()
                live = [p for p in procs if p is not None]
                for signal in ("wait", "terminate", "kill"):
                    for proc in live:
                        if proc.returncode is None and signal != "wait":
                            getattr(proc, signal)()
                    with anyio.move_on_after(2):
                        for proc in live:
                            await proc.wait()
                for proc in live:
                    await proc.aclose()


# -- a front process -----------------------------------------------------------------------------

TAG = 0xFC
"""First byte of the connection IDs a front issues; the second is its index."""


def _forward_path(state_path: str, index: int) -> str:
    return os.path.join(os.path.dirname(state_path), f"front-{index}.sock")


class _Forwarder:
    """Passes datagrams for another front's connections to it (a Unix datagram socket each).

    Linux picks a front for a client address by a hash over the fronts' sockets; when a front
    goes away or comes back, the hash moves some addresses to another front, which then gets
    datagrams for connections it does not hold. Their connection IDs say whose they are."""

    def __init__(self, state_path: str, index: int, count: int) -> None:
        self.state_path, self.index, self.count = state_path, index, count
        path = _forward_path(state_path, index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a previous front of this index
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(path)
        self.forwarded = 0

    def misdirected(self, cid: bytes, data: bytes, address: tuple) -> bool:
        if len(cid) < 2 or cid[0] != TAG or cid[1] >= self.count or cid[1] == self.index:
            return False
        host = address[0].encode()
        header = bytes((len(host),)) + host + address[1].to_bytes(2, "big")
        with contextlib.suppress(OSError):  # gone, or its queue is full: as UDP, dropped
            self.sock.sendto(header + data, _forward_path(self.state_path, cid[1]))
            self.forwarded += 1
        return True

    async def run(self, ep: Any) -> None:
        sock = self.sock
        while True:
            await anyio.wait_readable(sock)
            while True:
                try:
                    packet = sock.recv(65536)
                except BlockingIOError:
                    break
                n = packet[0]
                host = packet[1:1 + n].decode()
                port = int.from_bytes(packet[1 + n:3 + n], "big")
                ep.inject(packet[3 + n:], (host, port))


async def front_main(state_path: str, host: str, port: int, index: int, count: int, *,
                     admission: Admission | None, socket_receive_buffer: int) -> None:
    """Serve QUIC on host:port (shared) as front `index` of `count` and carry its links to
    the state process at `state_path` until that stream ends."""
    stream = await anyio.connect_unix(state_path)
    writer = _Writer(stream)
    links: dict[int, QuicLink] = {}
    forwarder = _Forwarder(state_path, index, count)
    try:
        async with open_endpoint(host, port, admission=admission, heartbeats=True,
                                 reuse_port=True, cid_tag=bytes((TAG, index)),
                                 misdirected=forwarder.misdirected,
                                 socket_receive_buffer=socket_receive_buffer) as ep:
            writer.put(encode(HELLO, index, ep.local_address[1]))
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer.run)
                tg.start_soon(forwarder.run, ep)
                tg.start_soon(_accept_links, ep, writer, links, tg)
                reader = RecordReader(_FROM_STATE)
                try:
                    async for data in stream:
                        for kind, number, value in reader.feed(data):
                            if kind == SEND:
                                qlink = links.get(number)
                                if qlink is not None:
                                    qlink.send_control(value)
                            elif kind == BLOCK:
                                if admission is not None:
                                    admission.exhaust(value, anyio.current_time())
                            else:  # CLOSE
                                qlink = links.pop(number, None)
                                if qlink is not None:
                                    qlink.close(value)
                except (anyio.BrokenResourceError, anyio.EndOfStream, OSError):
                    pass
                except FrontProtocolError as exc:
                    log.error("front: the state process broke the protocol: %s", exc)
                tg.cancel_scope.cancel()
            for qlink in links.values():
                qlink.close("tracker stopping")
    finally:
        forwarder.sock.close()


async def _accept_links(ep: Any, writer: _Writer, links: dict[int, QuicLink],
                        tg: anyio.abc.TaskGroup) -> None:
    number = 0
    while True:
        qlink = await ep.accept()
        number += 1
        links[number] = qlink
        host, port = qlink.remote_address
        writer.put(encode(OPENED, number, f"{host}:{port}"))
        tg.start_soon(_carry, number, qlink, writer, links)


async def _carry(number: int, qlink: QuicLink, writer: _Writer, links: dict[int, QuicLink]) -> None:
    """One link's inbound events to the state process."""
    while True:
        event = await qlink.receive()
        if links.get(number) is not qlink:
            return  # closed by the state process
        if type(event) is ControlData:
            for piece in _pieces(event.data):
                writer.put(encode(DATA, number, piece))
        elif type(event) is LinkClosed:
            del links[number]
            writer.put(encode(CLOSED, number, event.reason))
            return
        elif type(event) is StreamData:
            del links[number]
            qlink.close("protocol error: a tracker takes no chunk streams")
            writer.put(encode(CLOSED, number, "sent a chunk stream to the tracker"))
            return


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m meshcast.net.front",
                                 description="A tracker front process (started by `meshcast "
                                             "tracker --fronts N`; not run by hand).")
    ap.add_argument("--state", required=True, help="the state process's Unix socket")
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--receive-buffer", type=int, default=4 << 20)
    ap.add_argument("--per-ip-rate", type=float)
    ap.add_argument("--per-ip-burst", type=int)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s[%(process)d]: %(message)s")
    tune_gc_for_serving()
    host, _, port = args.listen.rpartition(":")
    admission = (Admission(args.per_ip_rate, args.per_ip_burst)
                 if args.per_ip_rate is not None and args.per_ip_burst is not None else None)
    try:
        anyio.run(lambda: front_main(args.state, host.strip("[]"), int(port), args.index, args.count,
                                     admission=admission,
                                     socket_receive_buffer=args.receive_buffer))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port taken, the state process gone before we connected
        sys.exit(f"meshcast tracker front {args.index}: {exc.strerror or exc} ({args.listen})")


if __name__ == "__main__":
    main()
