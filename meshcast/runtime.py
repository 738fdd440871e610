"""The network driver: runs one sans-IO node over a QUIC endpoint on the real clock (anyio).

It only pumps. Bytes from a link become node calls (control frames → `handle`; a chunk stream
→ `chunk_begin`, `chunk_data` for each piece as it arrives, `chunk_end`); after every call the
node's effects are carried out at once and its timer re-armed. A chunk the node relays is thus
written to the children's streams piece by piece while it is still arriving (cut-through).

Back-pressure (aioquic has none of its own): before opening a chunk stream, the driver
estimates how long the node's upload queue is — the bytes all its links have not yet sent, at
the node's declared upload rate — and applies `meshcast.policy.drop_chunk`, the rule the
simulator applies to its uplink model: a push waits at most 2 s, a pull answer or catch-up 0.1 s
(`SendChunk.push`). A skipped chunk is reported to the node (`chunk_dropped`), which answers a
pull or catch-up with `Missing` and reports a persistently slow child to the tracker. So a slow
child costs its own late chunks, never unbounded memory in its parent.

Every task belongs to the runner's task group; cancelling it closes every link.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from meshcast import effects as fx
from meshcast import messages as m
from meshcast import wire
from meshcast.errors import RemoteProtocolError
from meshcast.policy import drop_chunk
from meshcast.net.quic import (
    ConnectError,
    ControlData,
    LinkClosed,
    QuicEndpoint,
    QuicLink,
    StreamData,
    StreamReset,
)

log = logging.getLogger("meshcast.runtime")

UNSHAPED_RATE = 2_000_000 / 8
"""Bytes/s assumed for a node that declared no upload, to turn its queue into seconds."""


def tune_gc_for_serving() -> None:
    """Set this process's garbage collector up for serving many links (a tracker, a front).

    Such a process holds many long-lived objects (a QUIC connection is hundreds), and with
    Python's defaults (a collection every 700 allocations, a full one every ~100) collecting
    took ~1 ms of CPU per join at 1,000 viewers (`bench/tracker_fronts.py`). What start-up
    made is frozen out of collections, and young objects are collected every 50,000
    allocations; cycles still go, later."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def parse_address(address: str) -> tuple[str, int]:
    """"host:port" → (host, port); a clear `ValueError` otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


class _InStream:
    __slots__ = ("reader", "seq")

    def __init__(self) -> None:
        self.reader: wire.FrameReader | None = wire.FrameReader()
        self.seq = -1


class _LinkReader:
    """What a link's inbound bytes are in the middle of: control frames, chunk streams."""
    __slots__ = ("control", "streams")

    def __init__(self) -> None:
        self.control = wire.FrameReader()
        self.streams: dict[int, _InStream] = {}


class NodeRunner:
    """Drive `node` over `endpoint`. Effects the network cannot carry (Deliver, Skip, Notice)
    go to `on_effect`.

    A link's events come one of two ways. A `QuicEndpoint`'s links are read by a task each
    (`accept`, then `receive`). An endpoint with `attach` (a tracker's `FrontEndpoint`) hands
    them over itself as they come (`link_arrived`, `link_event`): its links are records on a
    local stream, and a task and a queue per link cost more than the node's work on them."""

    def __init__(self, node: Any, endpoint: QuicEndpoint, *,
                 on_effect: Callable[[fx.Effect], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 accept: bool = True) -> None:
        self.node = node
        self.endpoint = endpoint
        self.on_effect = on_effect or (lambda eff: None)
        self.clock = clock
        self.accept = accept
        self.links: dict[int, QuicLink] = {}
        self._readers: dict[int, _LinkReader] = {}
        self._next_link = 1
        self._out_streams: dict[tuple[int, int], int] = {}
        self._timer_changed = anyio.Event()
        self._armed: float | None = None
        """The node's timer the timer task waits for (None: none)."""
        self._tg: anyio.abc.TaskGroup | None = None
        self.bytes_out = 0

    # -- entry points ------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. `start()` is called on the node if it has one."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                attach = getattr(self.endpoint, "attach", None)
                if self.accept and attach is not None:
                    attach(self)
                elif self.accept:
                    tg.start_soon(self._accept_loop)
                tg.start_soon(self._timer_loop)
                if hasattr(self.node, "start"):
                    self.call(lambda now: self.node.start(now=now))
                task_status.started()
        finally:
            for link in self.links.values():
                link.close("shutting down")
            self.links.clear()

    def call(self, fn: Callable[[float], Any]) -> Any:
        """Call into the node with the current time, then carry out what it asks."""
        result = fn(self.clock())
        self._pump()
        return result

    # -- tasks -------------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        while True:
            try:
                qlink = await self.endpoint.accept()
            except (anyio.ClosedResourceError, anyio.EndOfStream):
                return
            link = self._add(qlink)
            self.call(lambda now: self.node.link_opened(link, now=now))

    async def _connect(self, address: str, ref: Any) -> None:
        try:
            host, port = parse_address(address)
            qlink = await self.endpoint.connect(host, port)
        except (ConnectError, ValueError, OSError) as exc:
            self.call(lambda now: self.node.open_failed(ref, now=now, reason=str(exc)))
            return
        link = self._add(qlink)
        self.call(lambda now: self.node.link_opened(link, now=now, ref=ref))

    def _add(self, qlink: QuicLink, *, read: bool = True) -> int:
        link = self._next_link
        self._next_link += 1
        self.links[link] = qlink
        self._readers[link] = _LinkReader()
        if read:
            assert self._tg is not None
            self._tg.start_soon(self._read_loop, link, qlink)
        return link

    # -- links handed over by the endpoint (`attach`) ----------------------------------------

    def link_arrived(self, qlink: Any) -> int:
        """A link the endpoint accepted; its events follow by `link_event`. Its id here."""
        link = self._add(qlink, read=False)
        self.call(lambda now: self.node.link_opened(link, now=now))
        return link

    def link_event(self, link: int,
                   event: ControlData | StreamData | StreamReset | LinkClosed) -> None:
        """One of link `link`'s events (ignored once the node closed it)."""
        reader = self._readers.get(link)
        if reader is not None:
            self._event(link, reader, event)

    async def _timer_loop(self) -> None:
        while True:
            changed = self._timer_changed = anyio.Event()
            when = self._armed = self.node.next_timer()
            if when is None:
                await changed.wait()
                continue
            delay = when - self.clock()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await changed.wait()
                continue
            self.call(lambda now: self.node.handle_timer(now=now))

    async def _read_loop(self, link: int, qlink: QuicLink) -> None:
        reader = self._readers.get(link)
        if reader is None:
            return  # closed by our node before this task started
        while True:
            event = await qlink.receive()
            if self.links.get(link) is not qlink:
                return  # closed by our node
            if not self._event(link, reader, event):
                return

    def _event(self, link: int, reader: _LinkReader,
               event: ControlData | StreamData | StreamReset | LinkClosed) -> bool:
        """Hand one of a link's events to the node; False once the link is gone."""
        node = self.node
        try:
            if type(event) is StreamData:
                self._stream_data(link, reader.streams, event)
            elif type(event) is ControlData:
                for msg in reader.control.feed(event.data):
                    self.call(lambda now: node.handle(link, msg, now=now))
                    if link not in self.links:
                        return False
            elif type(event) is StreamReset:
                st = reader.streams.pop(event.stream_id, None)
                if st is not None and st.seq >= 0:
                    self.call(lambda now: node.chunk_end(link, st.seq, now=now, aborted=True))
            elif type(event) is LinkClosed:
                del self.links[link]
                self._forget(link)
                reason = event.reason
                self.call(lambda now: node.link_closed(link, now=now, reason=reason))
                return False
        except RemoteProtocolError as exc:
            self.call(lambda now: node.protocol_error(link, exc, now=now))
            if link not in self.links:
                return False
        return True

    def _stream_data(self, link: int, streams: dict[int, _InStream], event: StreamData) -> None:
        node = self.node
        st = streams.get(event.stream_id)
        if st is None:
            st = streams[event.stream_id] = _InStream()
        data = event.data
        if st.reader is not None:
            msgs = st.reader.feed(data, most=1)
            if not msgs:
                if event.end:
                    raise RemoteProtocolError("chunk stream ended before its head")
                return
            head = msgs[0]
            if type(head) is not m.ChunkHead:
                raise RemoteProtocolError(f"a chunk stream must start with a ChunkHead, "
                                          f"not {type(head).__name__}")
            data = st.reader.take_rest()
            st.reader = None
            st.seq = head.seq
            self.call(lambda now: node.chunk_begin(link, head, now=now))
        if data:
            self.call(lambda now: node.chunk_data(link, st.seq, data, now=now))
        if event.end:
            del streams[event.stream_id]
            self.call(lambda now: node.chunk_end(link, st.seq, now=now))

    # -- effects -----------------------------------------------------------------------------

    def _pump(self) -> None:
        dropped: list[tuple[int, int, bool]] = []
        while True:
            effects = self.node.drain()
            if not effects and not dropped:
                break
            for eff in effects:
                self._apply(eff, dropped)
            for link, seq, push in dropped:
                self.node.chunk_dropped(link, seq, now=self.clock(), push=push)
            dropped = []
        # Wake the timer task only for a timer earlier than the one it waits for: most calls
        # set none or a later one, and a wake-up per call (per piece of chunk data a relay
        # gets) cost more than the node's work. A later one is found when the earlier fires.
        when = self.node.next_timer()
        armed = self._armed
        if when is not None and (armed is None or when < armed):
            self._timer_changed.set()

    def _apply(self, eff: fx.Effect, dropped: list[tuple[int, int, bool]]) -> None:
        """Carry out one effect; a chunk that back-pressure drops goes on `dropped` (link, seq,
        push), for the node to hear of once the effects are out."""
        if type(eff) is fx.ChunkBytes:
            self._chunk_bytes(eff.link, eff.seq, eff.data)
            return
        if type(eff) is fx.ChunkBegin:
            d = self._chunk_begin(eff.link, eff.head, eff.push)
            if d is not None:
                dropped.append(d)
            return
        if type(eff) is fx.ChunkEnd:
            self._chunk_end(eff.link, eff.seq, eff.ok)
            return
        if type(eff) is fx.SendChunk:
            head, payload = eff.chunk
            for link in eff.links:
                d = self._chunk_begin(link, head, eff.push)
                if d is None:
                    self._chunk_bytes(link, head.seq, payload)
                    self._chunk_end(link, head.seq, eff.ok)
                else:
                    dropped.append(d)
            return
        if type(eff) is fx.Send:
            qlink = self.links.get(eff.link)
            if qlink is not None:
                data = wire.frame(eff.msg)
                qlink.send_control(data)
                self.bytes_out += len(data)
            return
        if type(eff) is fx.Open:
            assert self._tg is not None
            self._tg.start_soon(self._connect, eff.address, eff.ref)
            return
        if type(eff) is fx.Close:
            qlink = self.links.pop(eff.link, None)
            self._forget(eff.link)
            if qlink is not None:
                # Chunk data is dropped; the node's last words (a Reject before the Close) still
                # reach the other side: QuicLink.close() delivers queued control bytes first.
                qlink.close(eff.reason)
            return
        self.on_effect(eff)

    def _chunk_begin(self, link: int, head: m.ChunkHead,
                     push: bool) -> tuple[int, int, bool] | None:
        """Open a chunk stream and write its head; (link, seq, push) if back-pressure drops it."""
        qlink = self.links.get(link)
        if qlink is None:
            return None
        if drop_chunk(self._backlog_s(), push):
            return (link, head.seq, push)
        sid = qlink.open_stream()
        self._out_streams[(link, head.seq)] = sid
        qlink.send_stream(sid, wire.frame(head))
        return None

    def _chunk_bytes(self, link: int, seq: int, data: bytes) -> None:
        sid = self._out_streams.get((link, seq))
        if sid is not None:
            self.links[link].send_stream(sid, data)
            self.bytes_out += len(data)

    def _chunk_end(self, link: int, seq: int, ok: bool) -> None:
        sid = self._out_streams.pop((link, seq), None)
        qlink = self.links.get(link)
        if sid is not None and qlink is not None:
            if ok:
                qlink.send_stream(sid, b"", end=True)
            else:
                qlink.reset_stream(sid)

    def _backlog_s(self) -> float:
        """Seconds of upload the node's links still have to send."""
        rate = getattr(self.node, "upload_kbps", 0) * 125 or UNSHAPED_RATE
        return sum(q.unsent_bytes for q in self.links.values()) / rate

    def _forget(self, link: int) -> None:
        self._readers.pop(link, None)
        for key in [k for k in self._out_streams if k[0] == link]:
            del self._out_streams[key]
