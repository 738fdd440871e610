"""QUIC byte transport between native meshcast nodes, written against anyio (asyncio and trio).

It moves bytes and knows nothing of meshcast messages: the runtime driver frames control messages
and chunk streams on top of it.

Shape
-----
aioquic's sans-IO `QuicConnection` does all of QUIC; this module only pumps it. One UDP socket
per endpoint serves inbound and outbound connections: a receive task routes each datagram by its
destination connection ID (an unknown Initial creates a server connection) and pushes it into the
connection. One pump task per link waits for "something to send" or the connection's timer,
feeds queued application data into the connection, drains `datagrams_to_send()` fully and sends
the batch. Connection events come out of `QuicLink.receive()` as the four dataclasses below.

The socket is a plain non-blocking socket awaited with `anyio.wait_readable/wait_writable`
rather than an `anyio.create_udp_socket` object, because the latter's asyncio backend drops
datagrams beyond 100 queued ones (costly losses at loopback speeds), allows one sender at a time
and costs an await per datagram; here receives and sends are batched and synchronous until the
kernel says "would block".

Streams
-------
Control bytes travel on the first client-initiated bidirectional stream (id 0), each chunk on its
own unidirectional stream (a lost packet delays one chunk, not the next). QUIC lets only the
client open stream 0, so the client writes a one-byte preamble on it as the handshake completes
and the server strips it, holding its own control bytes until then; callers never see it.

Back-pressure
-------------
aioquic's stream send buffers grow without limit and it has no public measure of them. So each
link keeps its own queue of writes (control first, then chunk data in write order) and hands data
to the QuicConnection only while the connection holds less than one batch (`_BATCH`, or the
shaper's current budget) of not-yet-transmitted stream data. A stream's not-yet-transmitted bytes
are the bytes we wrote minus its sender's `highest_offset` (the highest offset aioquic has put in
a packet). Hence `unsent_bytes` = our queue + that small remainder: data waiting for congestion
control, flow control, the upload shaper or the peer's stream limit — not data in flight, and
lost data awaiting retransmission is not counted twice. A caller that sees it grow stops feeding
that link (and drops the link's late chunks) instead of buffering without bound.

Inbound, aioquic grants flow-control credit as soon as it hands data to us, so a reader that stops
calling `receive()` would buffer without bound: past `max_receive_buffer` bytes the link is closed
("receive buffer overflow"). Bytes that arrive for a stream while an earlier piece of it is still
unread are appended to that piece, so a reader that falls behind catches up with one event per
stream instead of one per datagram (order is kept within each stream, not across streams).

Upload shaping and delay
------------------------
With `upload_bps` (bits per second of UDP payload), a token bucket with a ~10 ms burst covers
every datagram the endpoint sends; links take turns one batch each, the link whose queued data
is oldest first (`_OldestFirst`): the upload is one FIFO over all links. A batch may overdraw the bucket (debt), so the long-run rate
is exact. The pump pulls datagrams from aioquic only when it may send them, so the queue builds in
the link's own queue, where `unsent_bytes` sees it. With `delay`, every datagram is then held
`delay(address)` seconds in a delay line (one-way delay injection, order kept per destination).

Heartbeats
----------
A tracker holds a link per viewer, and most say nothing for minutes: QUIC keep-alives (a PING each
way after a third of the idle time-out, each through aioquic) cost it ~400 µs of CPU a second per
link (`bench/tracker_idle.py`). So an endpoint opened with `heartbeats=True` offers links a long
QUIC idle time-out (`policy.QUIET_LINK_IDLE_S`; QUIC takes the smaller of both ends' offers, and a
client offers that long one to everyone, so links to other servers keep theirs), and such a link's
liveness comes from heartbeats instead: after a third of its endpoint's `idle_timeout` (1 s) its
client sends a heartbeat, one datagram outside QUIC: a zero byte (QUIC's fixed bit clear, which no
QUIC packet has), then the connection ID the other end routes the link by; the server sends one
straight back, with the client's: 15 µs of the server's CPU a link and second at 10,000 quiet
links, against ~400 µs. Either end closes the link ("Idle timeout", as QUIC says it) after its
endpoint's `idle_timeout` (3 s) without hearing anything from the other, so a vanished viewer or
tracker is noticed as fast as before; the server only while it keeps up with its socket
(`_BEHIND_S`), since a backlog there is its own silence. A heartbeat server reads its socket at
most every `_GATHER_S` (10 ms; its answers may wait that much longer) unless it has a backlog: its
receive task's wake-ups, not the heartbeats, were most of the cost (1,000 links: 7.2 % of a core
reading every 2 ms, 5.5 % every 10 ms), since quiet links send them one by one. A heartbeat is not
authenticated: a forger on the path can keep a dead link open until QUIC's own idle time-out, no
more; it needs the connection ID, which only the path sees.

Admission
---------
With `admission` (`meshcast.net.admission`), a new client's first datagram is dropped before any
handshake work when its source address has opened too many connections lately; the endpoint logs
each refused address at most once a minute.

Trust
-----
Clients do not verify the server's certificate (`ssl.CERT_NONE`): it is a throw-away identity made
at start-up (`meshcast.net.tls`). meshcast authenticates content end to end (seed-signed chunks,
tracker-signed tokens), so the transport provides confidentiality and congestion control only.

Lifecycle
---------
Every task belongs to the endpoint's task group. Leaving `open_endpoint` closes every link
(CONNECTION_CLOSE "endpoint closed") and the socket. Once a link is closed — by `close()`, by the
peer, by idle timeout or with its endpoint — `receive()` returns the events already queued, then
the same `LinkClosed` on every call (it never raises), and `send_*` calls are ignored. `close()`
discards chunk data not yet sent but delivers queued control bytes before CONNECTION_CLOSE (it
ends the control stream and waits, up to `_CLOSE_LINGER`, until that end is acknowledged), so a
goodbye message arrives before the peer's `LinkClosed(reason)`. A vanished peer surfaces as
`LinkClosed("Idle timeout")` within `idle_timeout` (plus up to a third of it if the link was
quiet: the keep-alive PING then restarts QUIC's idle timer once).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import anyio
import anyio.abc
import anyio.lowlevel
from aioquic.buffer import Buffer
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.tls import Group

from meshcast.net.admission import Admission
from meshcast.net.tls import self_signed_certificate
from meshcast.policy import LINK_IDLE_TIMEOUT_S, QUIET_LINK_IDLE_S, keepalive_s

__all__ = [
    "ALPN",
    "CONTROL_STREAM_ID",
    "ConnectError",
    "Connection",
    "ControlData",
    "LinkClosed",
    "LinkEvent",
    "QuicEndpoint",
    "QuicLink",
    "StreamData",
    "StreamReset",
    "open_endpoint",
]


class Connection(QuicConnection):
    """aioquic's connection, with X25519 as the only key exchange.

    aioquic's client offers a key share for each of P-256, P-384, X25519 and X448, and its
    server takes the first, P-256. Every meshcast end is aioquic, so both sides keep X25519
    alone: a client's hello costs 295 µs of CPU instead of 773, a server's handshake ~60 µs
    less (1,127 → 1,070 µs: a tracker admits viewers ~5 % faster; `bench/tracker_cpu.py`).
    aioquic has no setting for it; if a version renames the attribute, the default groups
    apply."""

    def __init__(self, *args: Any, cid_tag: bytes = b"", **kwargs: Any) -> None:
        """`cid_tag`: the first bytes of every connection ID this end issues (a tracker front's
        number, by which the others forward it what they get for it: `meshcast.net.front`)."""
        self._cid_tag = cid_tag
        super().__init__(*args, **kwargs)
        if cid_tag:
            first = self._host_cids[0]
            first.cid = self.host_cid = cid_tag + first.cid[len(cid_tag):]
            self._local_initial_source_connection_id = first.cid

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls._supported_groups = [Group.X25519]

    def _replenish_connection_ids(self) -> None:
        issued = len(self._host_cids)
        super()._replenish_connection_ids()
        tag = self._cid_tag
        for new in self._host_cids[issued:] if tag else ():
            new.cid = tag + new.cid[len(tag):]


ALPN = "meshcast/1"
CONTROL_STREAM_ID = 0
_PREAMBLE = b"\x01"  # first byte of the control stream, written by the client (see "Streams")
_CHUNK_ABORTED = 1  # application error code of RESET_STREAM
_CLOSE_LINGER = 2.0  # seconds close() waits for queued control bytes to be acknowledged
_CID_LENGTH = 8
_BATCH = 64 * 1024  # stream bytes handed to aioquic per pump round: ~50 datagrams per wakeup
_MIN_BUDGET = 1200  # one datagram: a link always makes progress on its turn
_RECV_BATCH = 128  # datagrams read per wakeup of the receive task
_HEARTBEAT = b"\x00"  # then the receiver's connection ID (see "Heartbeats"); QUIC sets bit 0x40
_GATHER_S = 0.01  # a heartbeat server reads its socket at most this often (see "Heartbeats")
_BEHIND_S = 0.5  # a server checks its heartbeats only if its socket had no backlog for this long
_SOCKET_BUFFER = 4 * 1024 * 1024
"""Socket send and receive buffers asked for (the kernel doubles it for its own accounting).
4 MB holds 3,640 datagrams of 1,200 bytes on loopback here."""

log = logging.getLogger("meshcast.net")


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlData:
    """Bytes received on the control stream; message boundaries are not preserved."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StreamData:
    """Bytes received on a unidirectional stream opened by the peer."""

    stream_id: int
    data: bytes
    end: bool
    """True on the stream's last piece (`data` may then be empty)."""


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted a stream it had opened; no more data will arrive on it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class LinkClosed:
    """The link is gone (closed by either side, idle timeout, or endpoint shutdown)."""

    reason: str


LinkEvent = ControlData | StreamData | StreamReset | LinkClosed


class ConnectError(ConnectionError):
    """`QuicEndpoint.connect` could not establish a link; the message says why."""


# --- endpoint ---------------------------------------------------------------------------------


@asynccontextmanager
async def open_endpoint(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    upload_bps: float | None = None,
    delay: Callable[[tuple[str, int]], float] | None = None,
    idle_timeout: float = LINK_IDLE_TIMEOUT_S,
    max_receive_buffer: int = 32 * 1024 * 1024,
    admission: Admission | None = None,
    socket_receive_buffer: int = _SOCKET_BUFFER,
    heartbeats: bool = False,
    reuse_port: bool = False,
    cid_tag: bytes = b"",
    misdirected: Callable[[bytes, bytes, tuple], bool] | None = None,
) -> AsyncIterator[QuicEndpoint]:
    """Bind a UDP socket and run a QUIC endpoint on it until the block exits.

    `upload_bps` caps the endpoint's sending rate (bits per second of UDP payload, all links
    together); `delay(address)` is the one-way delay, in seconds, added to each datagram sent to
    `address`; `idle_timeout` bounds how long a silent (vanished) peer keeps its link;
    `heartbeats`: the links it accepts stay alive by heartbeats (a tracker's; see "Heartbeats");
    `max_receive_buffer` bounds the bytes a link buffers for a reader that stops reading;
    `admission` limits new inbound connections per source address (None: no limit);
    `socket_receive_buffer` sizes the UDP socket's receive buffer (bytes asked of the kernel);
    `reuse_port`: other processes may bind the same port (`SO_REUSEPORT`; a tracker's fronts,
    `meshcast.net.front`), each getting all of some client addresses' datagrams;
    `cid_tag`: the first bytes of the connection IDs its inbound links issue, and
    `misdirected(cid, datagram, address)`: called with each datagram for a connection ID it
    does not know; True: taken (passed to another process), else it goes on as usual (a new
    client's Initial opens a link, anything else is dropped).
    """
    (family, _, _, _, sockaddr), *_ = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        # Best effort, capped by the OS.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, socket_receive_buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        async with anyio.create_task_group() as tg:
            endpoint = QuicEndpoint(
                sock,
                tg,
                upload_bps=upload_bps,
                delay=delay,
                idle_timeout=idle_timeout,
                max_receive_buffer=max_receive_buffer,
                admission=admission,
                heartbeats=heartbeats,
                cid_tag=cid_tag,
                misdirected=misdirected,
            )
            tg.start_soon(endpoint._receive_loop)
            if heartbeats:
                tg.start_soon(endpoint._check_heartbeats)
            if endpoint._delay_line is not None:
                tg.start_soon(endpoint._delay_line.run, endpoint._send_one)
            try:
                yield endpoint
            finally:
                endpoint._shutdown()
                tg.cancel_scope.cancel()
    finally:
        sock.close()


class QuicEndpoint:
    """One UDP socket carrying any number of QUIC links, inbound and outbound."""

    local_address: tuple[str, int]

    def __init__(
        self,
        sock: socket.socket,
        tg: anyio.abc.TaskGroup,
        *,
        upload_bps: float | None,
        delay: Callable[[tuple[str, int]], float] | None,
        idle_timeout: float,
        max_receive_buffer: int,
        admission: Admission | None = None,
        heartbeats: bool = False,
        cid_tag: bytes = b"",
        misdirected: Callable[[bytes, bytes, tuple], bool] | None = None,
    ) -> None:
        self.local_address = sock.getsockname()[:2]
        self.cid_tag = cid_tag
        self._misdirected = misdirected
        self.admission = admission
        self.idle_timeout = idle_timeout
        self.heartbeats = heartbeats
        self._behind_at = -math.inf  # when the receive task last left datagrams in the socket
        self.max_receive_buffer = max_receive_buffer
        self._sock = sock
        self._tg = tg
        if upload_bps is not None and upload_bps <= 0:
            raise ValueError(f"upload_bps must be positive, not {upload_bps}")
        self._shaper = _TokenBucket(upload_bps / 8) if upload_bps else None
        self._delay_line = _DelayLine(delay) if delay else None
        self._send_lock = anyio.Lock()  # one task at a time may wait for the socket to drain
        self._routes: dict[bytes, QuicLink] = {}
        self._links: set[QuicLink] = set()
        self._accepted_in, self._accepted_out = anyio.create_memory_object_stream[QuicLink](math.inf)
        self._closing = False
        certificate, key = self_signed_certificate()
        self._server_config = self._configuration(is_client=False)
        self._server_config.certificate = certificate
        self._server_config.private_key = key

    def _configuration(self, *, is_client: bool) -> QuicConfiguration:
        return QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            # QUIC takes the smaller offer: a client offers the longest, and a server sets its
            # links' own (see "Heartbeats").
            idle_timeout=(max(self.idle_timeout, QUIET_LINK_IDLE_S) if is_client
                          else QUIET_LINK_IDLE_S if self.heartbeats else self.idle_timeout),
            connection_id_length=_CID_LENGTH,
            verify_mode=ssl.CERT_NONE,  # content is authenticated end to end; see module doc
        )

    async def connect(self, host: str, port: int, *, timeout: float = 5.0) -> QuicLink:
        """Open a link to the endpoint at `host:port`; returns once the handshake is complete.

        Raises `ConnectError` on timeout or a failed handshake.
        """
        if self._closing:
            raise anyio.ClosedResourceError("endpoint is closed")
        infos = await anyio.getaddrinfo(host, port, family=self._sock.family, type=socket.SOCK_DGRAM)
        address = infos[0][4]
        conn = Connection(configuration=self._configuration(is_client=True))
        link = self._add_link(conn, address, is_client=True, cids=[conn.host_cid])
        conn.connect(address, now=anyio.current_time())
        link._wake()
        try:
            with anyio.move_on_after(timeout):
                await link._settled.wait()
        except BaseException:
            link._abort("connect cancelled")
            raise
        if link._established:
            return link
        if link._closed is None:
            link._abort("connect timed out")
            raise ConnectError(f"no QUIC answer from {host}:{port} within {timeout} s")
        raise ConnectError(f"QUIC handshake with {host}:{port} failed: {link._closed.reason}")

    async def accept(self) -> QuicLink:
        """Return the next inbound link whose handshake has completed.

        Raises `anyio.ClosedResourceError` once the endpoint is closed.
        """
        return await self._accepted_out.receive()

    # -- plumbing --

    def _add_link(
        self, conn: QuicConnection, address: tuple, *, is_client: bool, cids: list[bytes]
    ) -> QuicLink:
        link = QuicLink(self, conn, address, is_client=is_client)
        for cid in cids:
            self._route(cid, link)
        self._links.add(link)
        self._tg.start_soon(link._pump)
        return link

    def _route(self, cid: bytes, link: QuicLink) -> None:
        self._routes[cid] = link
        link._cids.add(cid)

    def _unroute(self, link: QuicLink) -> None:
        for cid in link._cids:
            if self._routes.get(cid) is link:
                del self._routes[cid]
        link._cids.clear()

    async def _receive_loop(self) -> None:
        sock = self._sock
        while True:
            await anyio.wait_readable(sock)
            now = anyio.current_time()
            touched: dict[QuicLink, None] = {}
            drained = False
            for _ in range(_RECV_BATCH):
                try:
                    data, address = sock.recvfrom(65536)
                except BlockingIOError:
                    drained = True
                    break
                except (ConnectionRefusedError, ConnectionResetError):
                    continue  # ICMP errors: QUIC's own timers will notice the silence
                self._datagram(data, address, now, touched, self._misdirected)
            else:
                self._behind_at = now  # more to read: the socket has a backlog
            # Wake pumps once per batch so ACKs for many datagrams go out together.
            for link in touched:
                link._wake()
            if self.heartbeats and drained:
                # Thousands of heartbeats a second, each alone: a wake-up of this task costs
                # more than the few it would read, so let them gather (see "Heartbeats"); not
                # with a backlog, or the gathering would cap what the socket can take.
                await anyio.sleep(_GATHER_S)

    def _datagram(self, data: bytes, address: tuple, now: float, touched: dict[QuicLink, None],
                  misdirected: Callable[[bytes, bytes, tuple], bool] | None) -> None:
        if data[:1] == _HEARTBEAT:
            self._heartbeat(data, address, now, misdirected)
            return
        link = self._link_for(data, address, now, misdirected)
        if link is not None:
            link._datagram_received(data, address, now)
            touched[link] = None

    def inject(self, data: bytes, address: tuple) -> None:
        """Take a datagram from `address` as if this socket had received it (one another
        process forwarded: `misdirected`); it is not passed on again."""
        touched: dict[QuicLink, None] = {}
        self._datagram(data, address, anyio.current_time(), touched, None)
        for link in touched:
            link._wake()

    def _heartbeat(self, data: bytes, address: tuple, now: float,
                   misdirected: Callable[[bytes, bytes, tuple], bool] | None) -> None:
        link = self._routes.get(data[1:])
        if link is None and misdirected is not None:
            misdirected(data[1:], data, address)
            return
        if link is None or not link._heartbeats:
            return
        link._heard = now
        if not link._is_client:
            link._beat(address)  # the echo: we are alive too

    async def _check_heartbeats(self) -> None:
        """Close the accepted links whose client has been silent too long (see "Heartbeats")."""
        while True:
            await anyio.sleep(keepalive_s(self.idle_timeout) / 2)
            now = anyio.current_time()
            if now - self._behind_at < _BEHIND_S:
                continue  # behind with the socket: the silence may be in its queue
            for link in [link for link in self._links
                         if link._heartbeats and not link._is_client and link._silent(now)]:
                link._abort("Idle timeout")

    def _link_for(self, data: bytes, address: tuple, now: float,
                  misdirected: Callable[[bytes, bytes, tuple], bool] | None) -> QuicLink | None:
        """Route a datagram to its link, creating a server link for a new client's Initial."""
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=_CID_LENGTH)
        except ValueError:
            return None
        link = self._routes.get(header.destination_cid)
        if link is not None or self._closing:
            return link
        if misdirected is not None and misdirected(header.destination_cid, data, address):
            return None
        # RFC 9000 §14.1: a client's first datagram is padded to at least 1200 bytes.
        if header.packet_type is not QuicPacketType.INITIAL or len(data) < 1200:
            return None
        if header.version not in self._server_config.supported_versions:
            self._send_now(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=self._server_config.supported_versions,
                ),
                address,
            )
            return None
        admission = self.admission
        if admission is not None and not admission.admit(address[0], now):
            # Before any handshake work: the client's connect times out (or its retransmitted
            # Initial gets in once its address has a token again).
            if admission.report(address[0], now):
                log.warning("%s", admission.refusal(address[0]))
            return None
        conn = Connection(
            configuration=self._server_config,
            original_destination_connection_id=header.destination_cid,
            cid_tag=self.cid_tag,
        )
        # The client keeps addressing the CID it chose until it hears our own.
        return self._add_link(conn, address, is_client=False, cids=[header.destination_cid, conn.host_cid])

    async def _send_datagrams(self, datagrams: list[tuple[bytes, tuple]], now: float) -> None:
        if self._delay_line is not None:
            for data, address in datagrams:
                self._delay_line.push(now, data, address)
            return
        for data, address in datagrams:
            await self._send_one(data, address)

    async def _send_one(self, data: bytes, address: tuple) -> None:
        if self._send_now(data, address):
            return
        # The kernel's send buffer is full: wait for room rather than lose the datagram.
        async with self._send_lock:
            while not self._send_now(data, address):
                await anyio.wait_writable(self._sock)

    def _send_now(self, data: bytes, address: tuple) -> bool:
        """Try to send without blocking; False if the socket would block."""
        try:
            self._sock.sendto(data, address)
        except BlockingIOError:
            return False
        except OSError:
            pass  # e.g. an ICMP error reported late: UDP is best effort, QUIC recovers
        return True

    def _shutdown(self) -> None:
        """Close every link at once, sending each CONNECTION_CLOSE directly (no shaping, no delay)."""
        self._closing = True
        now = anyio.current_time()
        for link in list(self._links):
            link._conn.close(reason_phrase="endpoint closed")
            for data, address in link._conn.datagrams_to_send(now):
                self._send_now(data, address)
            link._abort("endpoint closed")
        self._accepted_in.close()
        self._accepted_out.close()


# --- link -------------------------------------------------------------------------------------


class QuicLink:
    """One QUIC connection: a control byte stream plus unidirectional chunk streams.

    A link has a single reader: call `receive()` from one task at a time.
    """

    remote_address: tuple[str, int]

    def __init__(self, endpoint: QuicEndpoint, conn: QuicConnection, address: tuple, *, is_client: bool) -> None:
        self.remote_address = address[:2]
        self._address = address
        self._endpoint = endpoint
        self._conn = conn
        self._is_client = is_client
        self._cids: set[bytes] = set()
        self._scope = anyio.CancelScope()
        self._wakeup = anyio.Event()
        self._settled = anyio.Event()  # handshake completed or failed
        self._established = False
        self._closed: LinkClosed | None = None
        self._close_reason: str | None = None  # close() was called: CONNECTION_CLOSE is pending
        self._close_by = math.inf  # ... and is sent by then at the latest
        self._terminated = False  # the QuicConnection is finished; the pump exits
        self._last_sent = anyio.current_time()
        self._keepalive = math.inf  # quiet this long → QUIC PING (set once the time-out is known)
        self._heartbeats = False  # alive by heartbeats (see "Heartbeats"), once established
        self._heard = self._last_sent  # ... and when we last heard the other end
        # inbound: [stream_id or None for control, data, end] pieces, and other events
        self._events: deque[list | StreamReset | LinkClosed] = deque()
        self._open_pieces: dict[int | None, list] = {}  # stream -> its unread piece, to append to
        self._readable = anyio.Event()
        self._inbound = 0
        # outbound: our own queue (see "Back-pressure")
        self._control_open = is_client  # server: not until the client's preamble arrived
        self._control_out = bytearray()
        self._control_fin = False  # FIN written on the control stream (only when closing)
        self._chunks: deque[list] = deque()  # [stream_id, memoryview, end, stream's age]
        self._stream_age: dict[int, int] = {}  # open stream → its place in the endpoint FIFO
        self._queued = 0
        self._written: dict[int, int] = {}  # stream -> bytes handed to aioquic, until fully sent
        self._fin_written: set[int] = set()
        self._open: set[int] = set()  # streams from open_stream() not yet ended or reset
        self._stopped: set[int] = set()  # open streams the peer refused (STOP_SENDING)
        self._next_stream_id = 2 if is_client else 3  # local unidirectional streams

    # -- public API --

    async def receive(self) -> LinkEvent:
        """Return the next event; after the link closed, its `LinkClosed` on every call."""
        await anyio.lowlevel.checkpoint()
        while not self._events:
            if self._closed is not None:
                return self._closed
            self._readable = anyio.Event()
            await self._readable.wait()
        event = self._events.popleft()
        if not isinstance(event, list):
            return event
        stream_id, data, end = event
        if self._open_pieces.get(stream_id) is event:
            del self._open_pieces[stream_id]
        self._inbound -= len(data)
        data = bytes(data)
        if stream_id is None:
            return ControlData(data)
        return StreamData(stream_id, data, end)

    def send_control(self, data: bytes) -> None:
        """Queue bytes on the control stream (ordered, reliable); returns at once."""
        if self._closed is None and data:
            self._control_out += data
            self._queued += len(data)
            self._wake()

    def open_stream(self) -> int:
        """Allocate a new unidirectional stream; it reaches the peer with its first data."""
        stream_id = self._next_stream_id
        self._next_stream_id += 4
        self._open.add(stream_id)
        self._stream_age[stream_id] = next(_ENQUEUED)
        return stream_id

    def send_stream(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """Queue bytes on a stream from `open_stream()`; `end` finishes it. Returns at once."""
        if stream_id not in self._open:
            raise ValueError(f"stream {stream_id} is not open for sending on this link")
        if end:
            self._open.discard(stream_id)
        if stream_id in self._stopped or self._closed is not None or not (data or end):
            if end:
                self._stopped.discard(stream_id)
                self._stream_age.pop(stream_id, None)
        else:
            # Every piece carries its stream's age, so a relay's copies leave one after another
            # (the first child's whole chunk, then the next), not interleaved piece by piece.
            age = self._stream_age.pop(stream_id, None) if end else self._stream_age.get(stream_id)
            if age is None:  # the stream was forgotten (refused, finished under us)
                age = next(_ENQUEUED)
            self._chunks.append([stream_id, memoryview(bytes(data)), end, age])
            self._queued += len(data)
            self._wake()

    def reset_stream(self, stream_id: int) -> None:
        """Abort a stream: drop what is queued, and the peer gets `StreamReset`."""
        if not self._is_local_stream(stream_id):
            raise ValueError(f"stream {stream_id} is not a sending stream of this link")
        self._open.discard(stream_id)
        self._stopped.discard(stream_id)
        if self._closed is None:
            self._forget_stream(stream_id)
            self._conn.reset_stream(stream_id, _CHUNK_ABORTED)  # no-op once all data was acknowledged
            self._wake()

    def close(self, reason: str = "") -> None:
        """Close the link; the peer sees the control bytes already queued, then `LinkClosed(reason)`.

        Chunk data not yet sent is discarded. Queued control bytes are delivered first (the
        transport waits up to `_CLOSE_LINGER` for their acknowledgement), so "send a goodbye
        message, then close" works. Our own `receive()` returns `LinkClosed(reason)` at once.
        """
        if self._closed is None:
            self._set_closed(reason)
            self._close_reason = reason
            self._close_by = anyio.current_time() + _CLOSE_LINGER
            self._wake()

    def _silent(self, now: float) -> bool:
        """A heartbeat link's other end has said nothing for the endpoint's idle time-out."""
        return now - self._heard > self._endpoint.idle_timeout

    def _beat(self, address: tuple) -> None:
        """Send a heartbeat to the other end (see "Heartbeats")."""
        self._endpoint._send_now(_HEARTBEAT + self._conn._peer_cid.cid, address)

    @property
    def idle_timeout(self) -> float:
        """Seconds of QUIC silence that close this link: the smaller of both ends' offers once
        the handshake is done (this end's before)."""
        conn = self._conn
        local = conn._configuration.idle_timeout
        remote = conn._remote_max_idle_timeout  # aioquic keeps the other end's offer only here
        return local if remote is None else min(local, remote)

    @property
    def unsent_bytes(self) -> int:
        """Bytes handed to `send_*` that have not yet been put on the wire (see module doc)."""
        return self._queued + self._held()

    # -- inbound --

    def _datagram_received(self, data: bytes, address: tuple, now: float) -> None:
        self._heard = now
        self._conn.receive_datagram(data, address, now)
        self._process_events()

    def _process_events(self) -> None:
        while (event := self._conn.next_event()) is not None:
            if isinstance(event, qe.StreamDataReceived):
                self._stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, qe.StreamReset):
                self._open_pieces.pop(event.stream_id, None)
                self._push(StreamReset(event.stream_id))
            elif isinstance(event, qe.HandshakeCompleted):
                self._established = True
                self._settled.set()
                idle = self.idle_timeout
                self._keepalive = keepalive_s(idle)
                self._heard = self._last_sent = anyio.current_time()
                self._heartbeats = idle >= QUIET_LINK_IDLE_S
                if self._is_client:
                    self._conn.send_stream_data(CONTROL_STREAM_ID, _PREAMBLE)
                    self._written[CONTROL_STREAM_ID] = len(_PREAMBLE)
                elif not self._endpoint._closing:
                    self._endpoint._accepted_in.send_nowait(self)
            elif isinstance(event, qe.ConnectionIdIssued):
                self._endpoint._route(event.connection_id, self)
            elif isinstance(event, qe.ConnectionIdRetired):
                if self._endpoint._routes.get(event.connection_id) is self:
                    del self._endpoint._routes[event.connection_id]
                self._cids.discard(event.connection_id)
            elif isinstance(event, qe.ConnectionTerminated):
                code = event.error_code
                self._finish(event.reason_phrase or (f"QUIC error {code:#x}" if code else ""))
            elif isinstance(event, qe.StopSendingReceived):
                # The peer refused a stream (aioquic resets it): later writes to it are dropped.
                self._stopped.add(event.stream_id)
                self._forget_stream(event.stream_id)

    def _stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if stream_id == CONTROL_STREAM_ID:
            if not self._control_open and data:
                if data[:1] != _PREAMBLE:
                    self.close("bad control stream preamble")
                    return
                data = data[1:]
                self._control_open = True
                self._wake()  # control bytes may have been waiting for this
            if data:
                self._push_data(None, data, False)
        elif stream_id % 4 == 5 - self._next_stream_id % 4:  # a unidirectional stream of the peer's
            self._push_data(stream_id, data, end)
        else:
            self.close(f"unexpected stream {stream_id}")

    def _push_data(self, stream_id: int | None, data: bytes, end: bool) -> None:
        if self._closed is not None:
            return
        piece = self._open_pieces.get(stream_id)
        if piece is None:
            piece = [stream_id, data, end]
            self._events.append(piece)
        else:
            if isinstance(piece[1], bytes):
                piece[1] = bytearray(piece[1])
            piece[1] += data
            piece[2] = end
        if end:
            self._open_pieces.pop(stream_id, None)
        else:
            self._open_pieces[stream_id] = piece
        self._inbound += len(data)
        self._readable.set()
        if self._inbound > self._endpoint.max_receive_buffer:
            self.close("receive buffer overflow")

    def _push(self, event: StreamReset | LinkClosed) -> None:
        self._events.append(event)
        self._readable.set()

    # -- outbound --

    def _wake(self) -> None:
        self._wakeup.set()

    async def _pump(self) -> None:
        """Serve this link's timers and sends until its connection is finished."""
        conn = self._conn
        beat = math.inf  # a client's next heartbeat
        every = keepalive_s(self._endpoint.idle_timeout)  # ... and how often
        with self._scope:
            while not self._terminated:
                timer = conn.get_timer()
                if self._heartbeats and self._is_client and beat == math.inf:
                    beat = anyio.current_time() + every
                deadline = min(math.inf if timer is None else timer, self._last_sent + self._keepalive,
                               beat, self._close_by)
                if not self._wakeup.is_set():
                    with anyio.CancelScope(deadline=deadline):
                        await self._wakeup.wait()
                self._wakeup = anyio.Event()
                now = anyio.current_time()
                if timer is not None and now >= timer:
                    conn.handle_timer(now)
                    self._process_events()
                    if self._terminated:
                        break
                if now >= beat:
                    if self._silent(now):
                        self._abort("Idle timeout")  # no echo, nothing at all: the server is gone
                        break
                    self._beat(self._address)
                    beat = now + every
                quiet = now >= self._last_sent + self._keepalive
                if self._established and self._closed is None and quiet:
                    conn.send_ping(0)  # keeps a quiet link alive; a dead peer won't ACK it
                if self._close_reason is not None and (now >= self._close_by or self._control_flushed()):
                    conn.close(reason_phrase=self._close_reason)
                    self._close_reason, self._close_by = None, math.inf
                await self._transmit()
        self._endpoint._links.discard(self)

    async def _transmit(self) -> None:
        """Send batches until aioquic has nothing more to send now (cwnd, flow control, no data)."""
        shaper = self._endpoint._shaper
        while shaper is not None:
            async with shaper.turn.hold(self._age()):
                # Keep the turn while this link holds the oldest queued data.
                while sent := await self._send_batch(await shaper.ready()):
                    shaper.spend(sent)
                    if shaper.turn.older_waiting(self._age()):
                        break
                else:
                    return
            await anyio.lowlevel.checkpoint()
        while await self._send_batch(_BATCH):
            await anyio.lowlevel.checkpoint()  # let the receive task deliver ACKs

    def _age(self) -> int:
        """Position of this link's oldest queued chunk data in the endpoint's FIFO (-1: only
        control data, ACKs or retransmissions, which go first)."""
        return self._chunks[0][3] if self._chunks else -1

    async def _send_batch(self, budget: int) -> int:
        self._feed(budget)
        now = anyio.current_time()
        datagrams = self._conn.datagrams_to_send(now)
        if not datagrams:
            return 0
        self._last_sent = now
        await self._endpoint._send_datagrams(datagrams, now)
        return sum(len(data) for data, _ in datagrams)

    def _feed(self, budget: int) -> None:
        """Hand queued data to aioquic until it holds `budget` bytes not yet transmitted."""
        if self._terminated:
            return
        held = self._held()
        closing = self._close_reason is not None
        if self._control_open and not self._control_fin and (self._control_out or closing) and held < budget:
            data = bytes(self._control_out)  # control is small and urgent: all of it
            self._control_out.clear()
            self._hand(CONTROL_STREAM_ID, data, closing)  # closing: FIN tells us when all is acked
            self._control_fin = closing
            held += len(data)
        while self._chunks and held < budget:
            item = self._chunks[0]
            stream_id, view, end, _ = item
            n = min(len(view), budget - held)
            if not self._hand(stream_id, view[:n] if n < len(view) else view, end and n == len(view)):
                continue  # the stream was finished under us: its items are gone
            if n < len(view):
                item[1] = view[n:]
            else:
                self._chunks.popleft()
            held += n

    def _hand(self, stream_id: int, data: bytes | memoryview, end: bool) -> bool:
        """Give data to aioquic; False if it refused because the stream is already finished."""
        try:
            # (aioquic annotates bytes; it takes any buffer, and a memoryview copies nothing)
            self._conn.send_stream_data(stream_id, cast(bytes, data), end_stream=end)
        except ValueError:
            # aioquic already finished this stream (reset, or refused by the peer as the link
            # shuts down): its queued data has nowhere to go.
            if stream_id == CONTROL_STREAM_ID:
                self._queued -= len(data)  # already taken off the control queue
            else:
                self._forget_stream(stream_id)
            return False
        self._queued -= len(data)
        self._written[stream_id] = self._written.get(stream_id, 0) + len(data)
        if end:
            self._fin_written.add(stream_id)
        return True

    def _forget_stream(self, stream_id: int) -> None:
        """Drop a stream's queued data and its accounting."""
        self._stream_age.pop(stream_id, None)
        self._queued -= sum(len(item[1]) for item in self._chunks if item[0] == stream_id)
        self._chunks = deque(item for item in self._chunks if item[0] != stream_id)
        self._written.pop(stream_id, None)
        self._fin_written.discard(stream_id)

    def _held(self) -> int:
        """Stream bytes handed to aioquic that it has not yet put in any packet."""
        streams = self._conn._streams  # aioquic exposes no back-pressure; see module doc
        held = 0
        for stream_id, written in list(self._written.items()):
            stream = streams.get(stream_id)
            sent = written if stream is None else stream.sender.highest_offset
            if sent >= written and stream_id in self._fin_written:
                del self._written[stream_id]  # finished: forget it
                self._fin_written.discard(stream_id)
            else:
                held += written - sent
        return held

    # -- closing --

    def _set_closed(self, reason: str) -> None:
        """Surface `LinkClosed(reason)` to the reader and drop the chunk data still queued."""
        if self._closed is None:
            self._closed = LinkClosed(reason)
            self._push(self._closed)
            self._queued -= sum(len(item[1]) for item in self._chunks)
            self._chunks.clear()
            self._settled.set()

    def _control_flushed(self) -> bool:
        """Is every control byte we wrote acknowledged (so CONNECTION_CLOSE cannot overtake it)?"""
        if not self._control_open:
            return True  # server before the client's preamble: nothing can have been sent
        if not self._control_fin:
            return False
        stream = self._conn._streams.get(CONTROL_STREAM_ID)
        return stream is None or stream.sender.is_finished  # FIN and all data acknowledged

    def _finish(self, reason: str) -> None:
        """The connection is over: unroute it, drop what is queued and let the pump end."""
        self._terminated = True
        self._endpoint._unroute(self)
        self._set_closed(reason)
        self._control_out.clear()
        self._queued = 0
        self._written.clear()
        self._fin_written.clear()
        self._wake()

    def _abort(self, reason: str) -> None:
        self._finish(reason)
        self._scope.cancel()

    def _is_local_stream(self, stream_id: int) -> bool:
        """Was `stream_id` allocated by `open_stream()`?"""
        return stream_id % 4 == self._next_stream_id % 4 and stream_id < self._next_stream_id


# --- shaping and delay ------------------------------------------------------------------------


_ENQUEUED = itertools.count()
"""Global order in which chunk data was queued, over all links of the process."""


class _OldestFirst:
    """The shaper's turn lock: granted to the waiting link whose queued data is oldest.

    Over all links of an endpoint this makes the upload a FIFO of chunk data (control, ACKs and
    retransmissions first), so the copies a relay writes first — to the children that relay
    further — leave first, as the simulator's uplink model assumes (`sim.network`). Fair
    round-robin would instead finish every child's copy at about the same, late, time.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[list[Any]] = []  # heap of [key, tiebreak, event, granted]
        self._order = itertools.count()

    @asynccontextmanager
    async def hold(self, key: int) -> AsyncIterator[None]:
        if self._held:
            entry: list[Any] = [key, next(self._order), anyio.Event(), False]
            heapq.heappush(self._waiters, entry)
            try:
                await entry[2].wait()
            except BaseException:
                if entry[3]:
                    self._release()  # granted as we were cancelled: pass it on
                else:
                    entry[2] = None  # skipped when popped
                raise
        else:
            self._held = True
        try:
            yield
        finally:
            self._release()

    def older_waiting(self, key: int) -> bool:
        """Does a waiter hold data older than `key`? (The holder should then pass the turn.)"""
        waiters = self._waiters
        while waiters and waiters[0][2] is None:
            heapq.heappop(waiters)
        return bool(waiters) and waiters[0][0] < key

    def _release(self) -> None:
        while self._waiters:
            entry = heapq.heappop(self._waiters)
            if entry[2] is not None:
                entry[3] = True
                entry[2].set()
                return
        self._held = False


class _TokenBucket:
    """Upload cap for a whole endpoint: `rate` bytes/s with a burst of ~10 ms (at least 4 datagrams).

    Links take turns under `turn` (oldest queued data first). A turn waits until the bucket is out of debt, then
    may send one batch of up to the available tokens (at least one datagram); the batch's actual
    size is then spent, possibly into debt, so the long-run rate is exact.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(rate * 0.01, 4 * _MIN_BUDGET)
        self.turn = _OldestFirst()
        self._tokens = self.burst
        self._stamp = anyio.current_time()

    def _refill(self) -> None:
        now = anyio.current_time()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def ready(self) -> int:
        """Wait until out of debt; return the byte budget of this turn."""
        self._refill()
        if self._tokens < 0:
            await anyio.sleep(-self._tokens / self.rate)
            self._refill()
        return max(int(self._tokens), _MIN_BUDGET)

    def spend(self, size: int) -> None:
        self._tokens -= size


class _DelayLine:
    """Holds each datagram `delay(address)` seconds before sending; FIFO per destination."""

    def __init__(self, delay: Callable[[tuple[str, int]], float]) -> None:
        self._delay = delay
        self._heap: list[tuple[float, int, bytes, tuple]] = []
        self._seq = itertools.count()
        self._last: dict[tuple, float] = {}  # latest release time per destination
        self._wakeup = anyio.Event()

    def push(self, now: float, data: bytes, address: tuple) -> None:
        # Never release before an earlier datagram to the same place: a varying delay must not reorder.
        at = max(now + self._delay(address[:2]), self._last.get(address, -math.inf))
        self._last[address] = at
        heapq.heappush(self._heap, (at, next(self._seq), data, address))
        self._wakeup.set()

    async def run(self, send: Callable) -> None:
        heap = self._heap
        while True:
            with anyio.CancelScope(deadline=heap[0][0] if heap else math.inf):
                await self._wakeup.wait()
            self._wakeup = anyio.Event()
            now = anyio.current_time()
            while heap and heap[0][0] <= now:
                _, _, data, address = heapq.heappop(heap)
                await send(data, address)
