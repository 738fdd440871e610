"""A tracker whose QUIC runs in front processes (`meshcast.net.front`), on 127.0.0.1.

The state process holds the `TrackerNode`; two real front processes share its UDP port. Viewers
play the stream byte for byte through it; a front killed with SIGKILL takes only its own links,
whose viewers come back through the other front; a front that breaks the record format is cut
off with a clear reason while the other keeps serving. The record codec itself gets property
tests and adversarial inputs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
from functools import partial
from pathlib import Path

import anyio
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcast.net import front as fr
from meshcast.net.admission import Admission
from meshcast.net.quic import ConnectError, ControlData, LinkClosed, open_endpoint
from meshcast.service import run_tracker
from tests.media import assert_faithful, decode_errors
from tests.net.test_live import (  # noqa: F401 (media: a fixture)
    CHANNEL, Swarm, malformed_frame_closes, media, report)

pytestmark = [pytest.mark.anyio, pytest.mark.net]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The state process's event loop (`meshcast tracker --backend`); fronts run asyncio."""
    return request.param


# -- the record codec ---------------------------------------------------------------------------

records = st.one_of(
    st.tuples(st.just(fr.DATA), st.integers(0, 2**40), st.binary(max_size=300)),
    st.tuples(st.just(fr.OPENED), st.integers(0, 2**40), st.text(max_size=40)),
    st.tuples(st.just(fr.CLOSED), st.integers(0, 2**40), st.text(max_size=40)),
    st.tuples(st.just(fr.HELLO), st.integers(0, 65535), st.integers(0, 2**31)),
)


@given(st.lists(records, max_size=20), st.lists(st.integers(1, 50), min_size=1, max_size=10))
@settings(max_examples=200, deadline=None)
def test_records_come_back_whole_however_the_stream_is_cut(recs, cuts) -> None:
    data = b"".join(fr.encode(*r) for r in recs)
    reader = fr.RecordReader(fr._FROM_FRONT)
    got, pos, i = [], 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        got += reader.feed(data[pos:pos + step])
        pos, i = pos + step, i + 1
    assert got == [tuple(r) for r in recs]


def _framed(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("raw, message", [
    (_framed([fr.SEND, 1, b"x"]), "unexpected record kind 4"),       # the state's kind, from a front
    (_framed([fr.DATA, 1, "text"]), "wants [int, bytes]"),
    (_framed([fr.DATA, -1, b"x"]), "wants [int, bytes]"),
    (_framed([fr.DATA, 1]), "a record is [kind, int, value]"),
    (_framed({"kind": 2}), "a record is [kind, int, value]"),
    (_framed(["2", 1, b"x"]), "unexpected record kind"),
    (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "undecodable record"),
    (struct.pack(">I", fr.MAX_RECORD + 1), "exceeds"),
])
def test_a_malformed_record_is_a_clear_error(raw: bytes, message: str) -> None:
    with pytest.raises(fr.FrontProtocolError, match=message.replace("[", r"\[")):
        list(fr.RecordReader(fr._FROM_FRONT).feed(raw))


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_garbage_raises_only_the_protocol_error(raw: bytes) -> None:
    try:
        list(fr.RecordReader(fr._FROM_FRONT).feed(raw))
    except fr.FrontProtocolError:
        pass


# -- real fronts ----------------------------------------------------------------------------------


async def _swarm(tg, tmp_path: Path, source: Path, peers: int) -> Swarm:
    from meshcast.service import run_seed
    tracker = await tg.start(partial(run_tracker, seed=1, fronts=2))
    sw = Swarm(tg, tracker, None, tmp_path)  # type: ignore[arg-type]
    sw.seed = await tg.start(partial(run_seed, tracker=tracker.address, channel=CHANNEL,
                                     input=str(source), key=str(tmp_path / "key.pem"),
                                     realtime=True, upload_kbps=1500, bitrate_kbps=600))
    for _ in range(peers):
        await sw.add_peer()
    return sw


async def test_viewers_play_byte_for_byte_through_tracker_fronts(tmp_path: Path, media) -> None:
    source, chunks = media
    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:
            sw = await _swarm(tg, tmp_path, source, peers=4)
            fronts = sw.tracker.fronts
            assert fronts is not None and len(fronts.fronts) == 2
            assert all(f.pid not in (0, os.getpid()) for f in fronts.fronts)
            # A stranger's malformed control frame: the state process's runner closes that link
            # with the protocol error, through its front.
            reason = await malformed_frame_closes(sw.tracker.address)
            assert reason.startswith("protocol error: undecodable message"), reason
            await sw.played_to_the_end(sw.peers)
            report(sw.peers)
            # Every viewer and the seed hold a link through one of the fronts.
            assert sum(len(f.links) for f in fronts.fronts) == len(sw.peers) + 1
            tg.cancel_scope.cancel()
    for p, out in zip(sw.peers, sw.outputs):
        assert p.node.skipped == 0 and p.node.forged == 0
        assert_faithful(out.read_bytes(), chunks, tail_s=0)
        assert decode_errors(out) == ""


async def test_a_killed_front_takes_only_its_links_and_is_started_again(tmp_path: Path,
                                                                        media) -> None:
    source, _ = media
    with anyio.fail_after(50):
        async with anyio.create_task_group() as tg:
            sw = await _swarm(tg, tmp_path, source, peers=5)
            fronts = sw.tracker.fronts
            assert fronts is not None
            while CHANNEL not in sw.tracker.node.channels:
                await anyio.sleep(0.05)
            members = sw.tracker.node.channels[CHANNEL].forest.members
            while not all(p.node.id in members for p in sw.peers):
                await anyio.sleep(0.05)
            victim = max(fronts.fronts, key=lambda f: len(f.links) if f else -1)
            other = next(f for f in fronts.fronts if f is not victim)
            assert victim is not None and other is not None
            kept, lost = len(other.links), len(victim.links)
            os.kill(victim.pid, signal.SIGKILL)
            while victim.links:  # the state sees exactly its links close...
                await anyio.sleep(0.02)
            # ... a new front takes its place (Linux then moves some client addresses from one
            # front to the other: their datagrams are forwarded to the front holding them) ...
            while fronts.fronts[victim.index] is None:
                await anyio.sleep(0.05)
            assert fronts.fronts[victim.index].pid != victim.pid
            # ... and its viewers come back, while none of the other front's links closed.
            while sum(len(f.links) for f in fronts.fronts if f) < kept + lost:
                assert fronts.fronts[other.index] is other and len(other.links) >= kept
                await anyio.sleep(0.05)
            await sw.played_to_the_end(sw.peers)
            report(sw.peers)
            assert len(other.links) >= kept
            assert all(p.node.id in members for p in sw.peers)
            tg.cancel_scope.cancel()


async def test_links_survive_a_new_front_joining_the_port(tmp_path: Path) -> None:
    """Front 0 alone holds 16 clients' links; front 1 then binds the same port, and Linux moves
    about half of the client addresses to it. Their datagrams reach front 1, which forwards
    them to front 0 (the connection IDs say whose they are): every link still works both ways."""
    state = str(tmp_path / "state.sock")
    fwd = [fr._Forwarder(state, i, 2) for i in range(2)]
    clients = 16
    with anyio.fail_after(20):
        async with (open_endpoint(cid_tag=bytes((fr.TAG, 0)), misdirected=fwd[0].misdirected,
                                  reuse_port=True) as ep0,
                    anyio.create_task_group() as tg):
            tg.start_soon(fwd[0].run, ep0)
            async with contextlib.AsyncExitStack() as stack:
                links = []
                for _ in range(clients):
                    client = await stack.enter_async_context(open_endpoint())
                    links.append(await client.connect(*ep0.local_address))
                servers = [await ep0.accept() for _ in range(clients)]
                assert all(s._conn.host_cid[:2] == bytes((fr.TAG, 0)) for s in servers)
                async with open_endpoint(*ep0.local_address, cid_tag=bytes((fr.TAG, 1)),
                                         misdirected=fwd[1].misdirected, reuse_port=True) as ep1:
                    tg.start_soon(fwd[1].run, ep1)
                    for i, link in enumerate(links):
                        link.send_control(b"ping %d" % i)
                    by_port = {s.remote_address[1]: s for s in servers}
                    for link in links:
                        server = by_port[link._endpoint.local_address[1]]
                        got = await server.receive()
                        assert isinstance(got, ControlData), got
                        server.send_control(b"pong " + got.data)
                    for i, link in enumerate(links):
                        got = await link.receive()
                        assert isinstance(got, ControlData) and got.data == b"pong ping %d" % i
                    assert fwd[1].forwarded > 0 and fwd[0].forwarded == 0
            tg.cancel_scope.cancel()
    for f in fwd:
        f.sock.close()


class Sink:
    """Takes a `FrontEndpoint`'s links and their events, as `NodeRunner` does, and keeps them."""

    def __init__(self) -> None:
        self.links: dict[int, fr.FrontLink] = {}
        self.events: dict[int, list] = {}
        self._changed = anyio.Event()

    def link_arrived(self, qlink: fr.FrontLink) -> int:
        n = len(self.links) + 1
        self.links[n], self.events[n] = qlink, []
        self._changed.set()
        return n

    def link_event(self, link: int, event) -> None:
        self.events[link].append(event)
        self._changed.set()

    def by_host(self, host: str) -> int:
        return next(n for n, q in self.links.items() if q.remote_address[0] == host)

    async def until(self, ready) -> None:
        while not ready():
            self._changed = anyio.Event()
            await self._changed.wait()


async def test_a_front_breaking_the_record_format_is_cut_off(tmp_path: Path) -> None:
    """A front's stream that carries a malformed record: its links close with the reason,
    another front's links stay; the endpoint keeps serving."""
    endpoint = fr.FrontEndpoint(2)
    sink = Sink()
    path = str(tmp_path / "s.sock")
    listener = await anyio.create_unix_listener(path)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            async def serve_next() -> None:
                tg.start_soon(endpoint.serve, await listener.accept())

            good = await anyio.connect_unix(path)
            await serve_next()
            bad = await anyio.connect_unix(path)
            await serve_next()
            await good.send(fr.encode(fr.HELLO, 0, 4433))
            await bad.send(fr.encode(fr.HELLO, 1, 4433))
            await good.send(fr.encode(fr.OPENED, 1, "10.0.0.1:5000"))
            await bad.send(fr.encode(fr.OPENED, 1, "10.0.0.2:5000"))
            while len(endpoint._early) < 2:  # links that come before a sink wait for it
                await anyio.sleep(0.01)
            endpoint.attach(sink)
            assert len(sink.links) == 2
            a, b = sink.by_host("10.0.0.1"), sink.by_host("10.0.0.2")
            await bad.send(fr.encode(fr.DATA, 1, b"hi") + _framed(["x", 1, b""]))
            await sink.until(lambda: len(sink.events[b]) == 2)
            data, closed = sink.events[b]
            assert data == ControlData(b"hi")
            assert isinstance(closed, LinkClosed)
            assert closed.reason.startswith("front process broke the protocol: unexpected record")
            # The good front still carries data both ways.
            await good.send(fr.encode(fr.DATA, 1, b"still here"))
            await sink.until(lambda: sink.events[a])
            assert sink.events[a] == [ControlData(b"still here")]
            sink.links[a].send_control(b"answer")
            reader = fr.RecordReader(fr._FROM_STATE)
            got = []
            while not got:
                got = list(reader.feed(await good.receive()))
            assert got == [(fr.SEND, 1, b"answer")]
            tg.cancel_scope.cancel()
    await listener.aclose()


async def test_the_per_address_limit_holds_over_all_fronts_together(tmp_path: Path) -> None:
    """Two fronts each report links from one address (Linux spreads its source ports over
    them): the state process takes `burst` of them in all, closes the others with the reason
    before the node sees them, and tells both fronts the address is spent."""
    endpoint = fr.FrontEndpoint(2, admission=Admission(rate=0.001, burst=3))
    sink = Sink()
    endpoint.attach(sink)
    path = str(tmp_path / "s.sock")
    listener = await anyio.create_unix_listener(path)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            fronts = []
            for index in range(2):
                stream = await anyio.connect_unix(path)
                tg.start_soon(endpoint.serve, await listener.accept())
                await stream.send(fr.encode(fr.HELLO, index, 4433))
                fronts.append(stream)
            for n in range(1, 5):
                for index, stream in enumerate(fronts):
                    await stream.send(fr.encode(fr.OPENED, n, f"10.0.0.9:{5000 + 10 * n + index}"))
            await fronts[0].send(fr.encode(fr.OPENED, 9, "10.0.0.10:5000"))  # someone else
            await sink.until(lambda: len(sink.links) == 4)
            assert sorted(q.remote_address[0] for q in sink.links.values()) == (
                ["10.0.0.10"] + ["10.0.0.9"] * 3)
            readers = [fr.RecordReader(fr._FROM_STATE) for _ in fronts]
            got: list[list[tuple]] = [[], []]
            want_closes = 8 - 3
            while sum(1 for g in got for r in g if r[0] == fr.CLOSE) < want_closes or not all(
                    any(r[0] == fr.BLOCK for r in g) for g in got):
                with anyio.fail_after(5):
                    for i, stream in enumerate(fronts):
                        with anyio.move_on_after(0.05):
                            got[i] += readers[i].feed(await stream.receive())
            closes = [r for g in got for r in g if r[0] == fr.CLOSE]
            assert len(closes) == want_closes
            assert {r[2] for r in closes} == {"too many new connections from 10.0.0.9"}
            assert all((fr.BLOCK, 0, "10.0.0.9") in g for g in got)
            assert sum(len(f.links) for f in endpoint.fronts if f) == 4
            tg.cancel_scope.cancel()
    await listener.aclose()


async def test_real_fronts_admit_one_address_burst_connections_in_all(tmp_path: Path) -> None:
    """16 clients from 127.0.0.1, each on its own port, so Linux spreads them over both fronts,
    each of which would take 4 on its own: the tracker holds 4 links in all; the others are
    closed with the reason, or dropped by a front before any handshake once it was told."""
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tracker = await tg.start(partial(run_tracker, seed=1, fronts=2, per_ip=(0.01, 4)))
            fronts = tracker.fronts
            assert fronts is not None
            outcomes: list[str] = []
            host, port = tracker.address.rsplit(":", 1)

            async def one_client() -> None:
                async with open_endpoint() as client:
                    try:
                        link = await client.connect(host, int(port), timeout=2.0)
                    except ConnectError:
                        outcomes.append("dropped")
                        return
                    with anyio.move_on_after(1.5):  # (well inside the links' 3 s idle time-out)
                        event = await link.receive()
                        assert isinstance(event, LinkClosed), event
                        outcomes.append(event.reason)
                        return
                    outcomes.append("open")

            async with anyio.create_task_group() as clients:
                for _ in range(16):
                    clients.start_soon(one_client)
            assert outcomes.count("open") == 4, outcomes
            closed = [o for o in outcomes if o not in ("open", "dropped")]
            assert closed and set(closed) == {"too many new connections from 127.0.0.1"}, outcomes
            assert len(outcomes) == 16
            tg.cancel_scope.cancel()


async def test_a_front_that_cannot_start_is_a_clear_error_at_once() -> None:
    """The port is taken by a socket that does not share it: the first front cannot bind, and
    starting the tracker fails with that, not after `START_TIMEOUT`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        with anyio.fail_after(fr.START_TIMEOUT / 2):
            with pytest.raises(BaseException) as caught:
                async with fr.run_fronts(2, "127.0.0.1", port, per_ip=None,
                                         socket_receive_buffer=1 << 20):
                    pass
    errors = caught.value.exceptions if isinstance(caught.value, BaseExceptionGroup) else [caught.value]
    assert [str(e) for e in errors] == ["tracker front 0 exited with status 1 (its messages are above)"]
