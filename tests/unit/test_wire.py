"""The wire codec under hypothesis, and nodes fed hostile input through the in-process harness.

Codec: every message type round-trips; anything else a remote can send — arbitrary bytes,
truncated, oversized or padded frames, wrong field types, unknown tags and versions, extra or
missing fields — is a `RemoteProtocolError` naming the problem, never another exception.

Nodes: a hostile link (garbage, forged or misdirected tokens, messages out of order, a chunk
whose size lies) is closed with a clear reason, and everyone else keeps playing.
"""

from __future__ import annotations

import struct
from dataclasses import fields, replace
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcast import messages as m
from meshcast import wire
from meshcast.crypto import Crypto, SigningKey
from meshcast.effects import ChunkBegin, ChunkBytes, ChunkEnd, Open, Send
from meshcast.errors import LocalProtocolError, RemoteProtocolError
from tests.unit.test_swarm import build, played, stream

V = m.PROTOCOL_VERSION

# -- strategies: one per field, in declaration order (the test below checks they cover SCHEMA) --

node_id = st.integers(-1, 2**48)
seq = st.integers(0, 2**48)
substream = st.integers(0, m.MAX_SUBSTREAMS - 1)
channel = st.text(max_size=m.MAX_CHANNEL)
address = st.text(max_size=m.MAX_ADDRESS)
reason = st.text(max_size=m.MAX_REASON)
kbps = st.integers(0, 10_000_000)
clock = st.floats(-1e12, 1e12, allow_nan=False)
sig = st.binary(min_size=m.SIG_LEN, max_size=m.SIG_LEN)
token_sig = st.integers(0, m.TOKEN_BATCH).map(  # a signature, then a salt and a batch's digests
    lambda n: m.SIG_LEN + (m.TOKEN_SALT + n * m.TOKEN_DIGEST if n else 0)).flatmap(
    lambda size: st.binary(min_size=size, max_size=size))
key = st.binary(min_size=m.KEY_LEN, max_size=m.KEY_LEN)
n_substreams = st.integers(1, m.MAX_SUBSTREAMS)
chunk_ms = st.integers(10, 10_000)
count = st.integers(0, 1 << 20)

peer_ref = st.builds(m.PeerRef, node_id, address)
token = st.builds(m.Token, node_id, node_id, channel, st.integers(-1, m.MAX_SUBSTREAMS - 1),
                  clock, token_sig)
seqs = st.lists(seq, max_size=64).map(tuple)
resume = st.builds(m.Resume, node_id, st.integers(-1, m.MAX_SUBSTREAMS - 1),
                   st.lists(peer_ref, max_size=m.MAX_SUBSTREAMS).map(tuple), st.none() | token,
                   count)

FIELDS: dict[type, tuple[st.SearchStrategy, ...]] = {
    m.PeerRef: (node_id, address),
    m.Token: (node_id, node_id, channel, st.integers(-1, m.MAX_SUBSTREAMS - 1), clock, token_sig),
    m.Resume: (node_id, st.integers(-1, m.MAX_SUBSTREAMS - 1),
               st.lists(peer_ref, max_size=m.MAX_SUBSTREAMS).map(tuple), st.none() | token, count),
    m.Announce: (channel, key, address, kbps, kbps, n_substreams, chunk_ms, sig, node_id,
                 st.binary(max_size=m.KEY_LEN), count),
    m.Join: (channel, address, kbps,
             st.lists(st.floats(-1e6, 1e6, allow_nan=False), max_size=8).map(tuple),
             st.none() | resume),
    m.Welcome: (node_id, channel, key, key, n_substreams, chunk_ms, kbps, st.text(max_size=8),
                node_id),
    m.Assign: (substream, peer_ref, st.none() | token, st.none() | peer_ref, st.none() | token,
               st.booleans()),
    m.Neighbours: (st.lists(peer_ref, max_size=64).map(tuple),
                   st.lists(token, max_size=64).map(tuple), node_id),
    m.Reject: (reason,),
    m.Leave: (reason,),
    m.ParentLost: (substream, node_id, node_id),
    m.Complaint: (node_id, reason, st.text(max_size=16)),
    m.Hello: (node_id, channel, st.none() | token),
    m.Subscribe: (substream, token, st.integers(-1, 2**48), st.booleans()),
    m.Unsubscribe: (substream,),
    m.Refuse: (substream, reason),
    m.Have: (seq, st.binary(max_size=m.MAX_BITMAP)),
    m.Request: (seqs,),
    m.Missing: (seqs,),
    m.ChunkHead: (channel, seq, st.integers(0, m.MAX_CHUNK), st.integers(0, 255), clock, sig),
    m.Revoke: (node_id, clock, reason),
    m.Detach: (node_id, substream, clock),
    m.Waiting: (reason,),
}
TOP = [cls for cls, (tag, _) in wire.SCHEMA.items() if tag]
message = st.one_of(*(st.builds(cls, *FIELDS[cls]) for cls in TOP))

# Values of every wire type: each field's check refuses all but its own kind.
any_value = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                      st.text(max_size=4), st.binary(max_size=4),
                      st.lists(st.integers(0, 3), max_size=2))

hostile = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw_of(msg: m.Message) -> list:
    """The decoded msgpack array of `msg`: [version, tag, field, ...]."""
    return msgpack.unpackb(wire.encode(msg), raw=False)


def refused(data: bytes) -> str:
    """Decode `data`, which must fail with `RemoteProtocolError`; returns its text."""
    with pytest.raises(RemoteProtocolError) as info:
        wire.decode(data)
    return str(info.value)


# -- round trips ------------------------------------------------------------------------------


def test_strategies_cover_every_message_type():
    assert set(FIELDS) == set(wire.SCHEMA)
    for cls, strategies in FIELDS.items():
        assert len(strategies) == len(fields(cls)) == len(wire.SCHEMA[cls][1]), cls


@hostile
@given(message)
def test_every_message_round_trips(msg):
    assert wire.decode(wire.encode(msg)) == msg
    framed = wire.frame(msg)
    assert struct.unpack(">I", framed[:4])[0] == len(framed) - 4
    assert wire.FrameReader().feed(framed) == [msg]


@hostile
@given(st.lists(message, min_size=1, max_size=3))
def test_frame_size_is_the_frame_s_length(msgs):
    for msg in msgs:
        assert wire.frame_size(msg) == len(wire.frame(msg))


# Values at every size boundary of msgpack's formats, in arrays short and long.
_edges = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
packable = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False)
    | st.sampled_from(_edges + [-x for x in _edges[:9]] + [-32, -33, -128, -129, -32768,
                                                         -32769, -(2**31), -(2**31) - 1,
                                                         -(2**63)])
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=40) | st.text(min_size=250, max_size=300)
    | st.binary(max_size=40) | st.binary(min_size=250, max_size=300)
    | st.sampled_from([c * n for c in ("x", b"x") for n in (31, 32, 255, 256, 65535, 65536)]
                     + ["é" * 15, "é" * 16, "é" * 127, "é" * 128])
    | st.sampled_from([15, 16, 65535, 65536]).map(lambda n: (None,) * n),
    lambda inner: st.lists(inner, max_size=20).map(tuple) | st.lists(inner, max_size=3),
    max_leaves=40)


@given(packable)
def test_packed_size_follows_msgpack_s_rules(v):
    assert wire.packed_size(v) == len(msgpack.packb(v, use_bin_type=True))


@given(st.lists(message, min_size=1, max_size=4), st.data())
def test_frame_reader_reassembles_frames_split_anywhere(msgs, data):
    stream_bytes = b"".join(wire.frame(x) for x in msgs)
    # Two cuts anywhere, then every cut position of the first frame.
    a = data.draw(st.integers(0, len(stream_bytes)))
    b = data.draw(st.integers(a, len(stream_bytes)))
    reader = wire.FrameReader()
    got = reader.feed(stream_bytes[:a]) + reader.feed(stream_bytes[a:b]) + reader.feed(stream_bytes[b:])
    assert got == msgs and reader.pending == 0
    first = wire.frame(msgs[0])
    step = 1 if len(first) <= 4096 else len(first) // 1024  # every byte, but bounded in time
    for cut in [*range(0, len(first), step), len(first) - 1, len(first)]:
        reader = wire.FrameReader()
        assert reader.feed(first[:cut]) + reader.feed(first[cut:]) == [msgs[0]]


def test_chunk_stream_head_then_payload_split_anywhere():
    """As the runtime reads a chunk stream: one head frame, then raw payload bytes."""
    head = m.ChunkHead("ch", 7, 5, m.FLAG_RAP, 1.5, b"s" * m.SIG_LEN)
    data = wire.frame(head) + b"hello"
    for cut in range(len(data) + 1):
        reader = wire.FrameReader()
        got = reader.feed(data[:cut], most=1)
        if got:
            payload = reader.take_rest() + data[cut:]
        else:
            got = reader.feed(data[cut:], most=1)
            payload = reader.take_rest()
        assert (got, payload) == ([head], b"hello"), cut
        assert reader.pending == 0


# -- hostile bytes ------------------------------------------------------------------------------


@hostile
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_only_remote_protocol_error(data):
    try:
        msg = wire.decode(data)
    except RemoteProtocolError as exc:
        assert str(exc)
    else:
        assert type(msg) in TOP


@hostile
@given(st.binary(max_size=300))
def test_frame_reader_on_arbitrary_bytes_raises_only_remote_protocol_error(data):
    try:
        wire.FrameReader().feed(data)
    except RemoteProtocolError as exc:
        assert str(exc)


@hostile
@given(st.recursive(any_value, lambda inner: st.lists(inner, max_size=6), max_leaves=20))
def test_arbitrary_msgpack_values_raise_only_remote_protocol_error(value):
    refused(msgpack.packb([m.PROTOCOL_VERSION, 99, value], use_bin_type=True))
    for tag in range(1, len(TOP) + 1):
        try:
            wire.decode(msgpack.packb([m.PROTOCOL_VERSION, tag, value], use_bin_type=True))
        except RemoteProtocolError:
            pass


@hostile
@given(message, st.data())
def test_truncated_or_padded_message_is_refused(msg, data):
    encoded = wire.encode(msg)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    assert "undecodable" in refused(encoded[:cut])
    assert "undecodable" in refused(encoded + data.draw(st.binary(min_size=1, max_size=8)))


@hostile
@given(message, st.data())
def test_wrong_type_in_any_field_is_refused_and_named(msg, data):
    raw = raw_of(msg)
    names = wire._NAMES[type(msg)]
    i = data.draw(st.integers(0, len(names) - 1))
    bad = data.draw(any_value)
    raw[2 + i] = bad
    try:
        decoded = wire.decode(msgpack.packb(raw, use_bin_type=True))
    except RemoteProtocolError as exc:
        assert f"{type(msg).__name__}.{names[i]}" in str(exc)
    else:  # the value happened to be valid for that field (e.g. None for an optional one)
        assert type(decoded) is type(msg)


@hostile
@given(message, st.booleans())
def test_extra_or_missing_field_is_refused(msg, extra):
    raw = raw_of(msg)
    raw = raw + [0] if extra else raw[:-1]
    text = refused(msgpack.packb(raw, use_bin_type=True))
    assert f"{type(msg).__name__} as a list of {len(wire._NAMES[type(msg)])} fields" in text


@hostile
@given(message, st.integers(-2**63, 2**64 - 1).filter(lambda v: v != m.PROTOCOL_VERSION))
def test_unknown_protocol_version_is_refused(msg, version):
    raw = raw_of(msg)
    raw[0] = version
    assert f"unsupported protocol version {version!r}" in refused(msgpack.packb(raw))


@pytest.mark.parametrize("tag", [0, len(TOP) + 1, 255, -1, "Hello", None, 1.0, True])
def test_unknown_tag_is_refused(tag):
    assert "message tag: expected a known message type" in refused(
        msgpack.packb([m.PROTOCOL_VERSION, tag, "x"]))


@pytest.mark.parametrize("data, problem", [
    (b"", "undecodable"),
    (b"\xc1", "undecodable"),  # a byte msgpack never uses
    (msgpack.packb({"version": 1}), "expected a list [version, tag"),
    (msgpack.packb([1]), "expected a list [version, tag"),
    (msgpack.packb("hello"), "expected a list [version, tag"),
    (msgpack.packb([True, 6, "x"]), "unsupported protocol version True"),
    (msgpack.packb([V, 6, b"\xff"], use_bin_type=True), "Reject.reason"),
    (msgpack.packb([V, 6, "x" * (m.MAX_REASON + 1)]), "Reject.reason: expected a string of at most"),
    (msgpack.packb([V, 14, 0, b"\0" * (m.MAX_BITMAP + 1)], use_bin_type=True), "Have.bitmap"),
    (msgpack.packb([V, 15, [1] * 65]), "Request.seqs: expected a list of at most 64"),
    (msgpack.packb([V, 15, [1, -1]]), "Request.seqs[1]: expected an integer"),
    (msgpack.packb([V, 17, "ch", 0, m.MAX_CHUNK + 1, 0, 0.0, b"s" * 64], use_bin_type=True),
     "ChunkHead.size: expected an integer in [0, 4194304]"),
    (msgpack.packb([V, 17, "ch", 0, 10, 0, float("nan"), b"s" * 64], use_bin_type=True),
     "ChunkHead.ts: expected a number"),
    (msgpack.packb([V, 4, 0, [1, "a"], [1, 2, "c", 0, 1.0, b"short"], None, None, False],
                   use_bin_type=True), "Assign.token.sig: expected 64 bytes, or those, a salt of 8"),
    (msgpack.packb([V, 10, 1, "c", [1, 2]]), "Hello.token: expected Token as a list of 6 fields"),
    (msgpack.packb([V, 10, 1, "c", [1, 2, "c", 0, 1.0, b"s" * (m.SIG_LEN + 17)]],
                   use_bin_type=True),
     "Hello.token.sig: expected 64 bytes, or those, a salt of 8 and 1 to 16 digests of 16"),
    (msgpack.packb([V, 6, "\udcff".encode("utf-8", "surrogatepass")], use_bin_type=False),
     "undecodable"),  # invalid UTF-8 in a str
])
def test_malformed_messages_name_the_problem(data, problem):
    assert problem in refused(data)


def test_oversized_message_and_frame_are_refused_before_parsing():
    assert "exceeds the 65536-byte limit" in refused(b"\x91" + b"\0" * wire.MAX_FRAME)
    reader = wire.FrameReader()
    with pytest.raises(RemoteProtocolError, match="frame of 65537 bytes exceeds"):
        reader.feed(struct.pack(">I", wire.MAX_FRAME + 1))  # refused from its length alone


# -- encoding our own mistakes ----------------------------------------------------------------


TOKEN = m.Token(1, 2, "ch", 0, 10.0, b"s" * m.SIG_LEN)


@pytest.mark.parametrize("msg", [
    m.Reject(reason=5),  # type: ignore[arg-type]
    m.Reject(reason="x" * (m.MAX_REASON + 1)),
    m.Reject(reason="\udcff"),  # not encodable as UTF-8
    m.Unsubscribe(substream=m.MAX_SUBSTREAMS),
    m.Have(0, bytearray(b"\1")),  # type: ignore[arg-type]
    m.Have(-1, b"\1"),
    m.Request(seqs=tuple(range(65))),
    m.ChunkHead("ch", 0, -1, 0, 0.0, b"s" * m.SIG_LEN),
    m.ChunkHead("ch", 0, 1, 0, float("nan"), b"s" * m.SIG_LEN),
    m.Hello(1, "ch", replace(TOKEN, sig=b"short")),
    m.Hello(1, "ch", replace(TOKEN, sig=TOKEN.sig + b"d" * (m.TOKEN_SALT + m.TOKEN_DIGEST + 1))),
    m.Hello(1, "ch", replace(TOKEN, sig=TOKEN.sig + b"d" * m.TOKEN_SALT)),  # a salt, no digest
    m.Hello(1, "ch", replace(TOKEN, sig=TOKEN.sig + b"d" * (
        m.TOKEN_SALT + m.TOKEN_DIGEST * (m.TOKEN_BATCH + 1)))),
    m.Assign(0, m.PeerRef(1, "a"), TOKEN, backup=TOKEN),  # type: ignore[arg-type]
    m.Subscribe(0, TOKEN, relays=1),  # type: ignore[arg-type]
    m.Join("ch", "a", 1, coords=(object(),)),  # type: ignore[arg-type]
    m.PeerRef(1, "a"),  # nested only: not a message of its own
    TOKEN,
    "Hello",
])
def test_encoding_an_invalid_message_is_a_local_protocol_error(msg: Any):
    with pytest.raises(LocalProtocolError):
        wire.encode(msg)
    with pytest.raises(LocalProtocolError):
        wire.frame(msg)


# -- hostile links to live nodes (in-process harness) ------------------------------------------


class Intruder:
    """A node that opens a link and sends what the test tells it, through the real codec."""

    def __init__(self, w) -> None:
        self.w = w
        self.out: list = []
        self.link: int | None = None
        self.remote_link: int | None = None
        self.closed: list[str] = []
        self.received: list = []

    def connect(self, address: str) -> None:
        self.out.append(Open(address, "target"))
        self.w.run()
        assert self.link is not None

    def send(self, *effects) -> None:
        self.out.extend(effects)
        self.w.run()

    def send_garbage(self, node, data: bytes) -> None:
        """Send undecodable control bytes: `node`'s driver reports them as `NodeRunner` does."""
        with pytest.raises(RemoteProtocolError) as info:
            wire.FrameReader().feed(struct.pack(">I", len(data)) + data)
        node.protocol_error(self.remote_link, info.value, now=self.w.now)
        self.w.run()

    # the node interface the harness drives
    def drain(self) -> list:
        out, self.out = self.out, []
        return out

    def next_timer(self) -> None:
        return None

    def link_opened(self, link: int, *, now: float, ref: Any = None) -> None:
        if ref == "target":  # not a link someone opened to us
            self.link = link
            self.remote_link = self.w.peer_of[link][1]

    def link_closed(self, link: int, *, now: float, reason: str = "") -> None:
        self.closed.append(reason)

    def handle(self, link: int, msg: m.Message, *, now: float) -> None:
        self.received.append(msg)

    def chunk_begin(self, link: int, head: m.ChunkHead, *, now: float) -> None:
        self.received.append(head)

    def chunk_data(self, link: int, seq: int, data: bytes, *, now: float) -> None:
        pass

    def chunk_end(self, link: int, seq: int, *, now: float, aborted: bool = False) -> None:
        pass


@pytest.fixture
def swarm():
    """A playing swarm of 8 peers, and an intruder wired into it."""
    w, tracker, seed, peers = build(8)
    stream(w, seed, 10)
    intruder = w.add("evil", Intruder(w))
    return w, tracker, seed, peers, intruder


def keeps_playing(w, seed, peers, chunks: int = 15) -> None:
    """Every honest peer plays every new chunk, in order, to the end."""
    before = seed.next_seq
    stream(w, seed, chunks)
    w.advance(w.now + 2)
    for p in peers:
        seqs = played(w, p)
        assert seqs == list(range(seqs[0], before + chunks)), (p.id, seqs[-5:])
        assert p.skipped == 0


def relay_of(peers):
    return max(peers, key=lambda p: p._children())


def test_garbage_on_a_peer_link_closes_that_link_only(swarm):
    w, tracker, seed, peers, intruder = swarm
    victim = relay_of(peers)
    intruder.connect(victim.address)
    links_before = set(victim.conns)
    intruder.send_garbage(victim, b"\x93\x07\x01\x02")  # [7, 1, 2]
    assert intruder.closed == [f"protocol error: unsupported protocol version 7 (this node speaks {V})"]
    assert set(victim.conns) == links_before - {intruder.remote_link}
    keeps_playing(w, seed, peers)


@pytest.mark.parametrize("case, why", [
    ("forged signature", "token signature invalid"),
    ("other parent", "token is for 999→"),
    ("expired", "token expired"),
    ("other channel", "token is for channel 'other'"),
])
def test_hello_with_a_bad_token_is_cut_off_with_the_reason(swarm, case, why):
    w, tracker, seed, peers, intruder = swarm
    victim, other = peers[0], peers[1]
    intruder.connect(victim.address)
    signer, parent, chan, expires = {
        "forged signature": (SigningKey(), victim.id, "ch", 1e9),
        "other parent": (tracker.key, other.id, "ch", 1e9),
        "expired": (tracker.key, victim.id, "ch", w.now - 1),
        "other channel": (tracker.key, victim.id, "other", 1e9),
    }[case]
    token = Crypto().issue_token(signer, 999, parent, chan, m.NO_PEER, expires)
    intruder.send(Send(intruder.link, m.Hello(999, "ch", token)))
    assert len(intruder.closed) == 1
    assert intruder.closed[0].startswith("protocol error: Hello refused: ")
    assert why in intruder.closed[0]
    keeps_playing(w, seed, peers)


def test_subscribe_with_a_forged_token_gets_no_media(swarm):
    w, tracker, seed, peers, intruder = swarm
    victim = relay_of(peers)
    intruder.connect(victim.address)
    forged = Crypto().issue_token(SigningKey(), 999, victim.id, "ch", 0, 1e9)
    intruder.send(Send(intruder.link, m.Hello(999, "ch")),
                  Send(intruder.link, m.Subscribe(0, forged, 0)))
    refusals = [x for x in intruder.received if type(x) is m.Refuse]
    assert [r.reason for r in refusals] == ["token signature invalid"]
    keeps_playing(w, seed, peers)
    assert not any(type(x) is m.ChunkHead for x in intruder.received)
    # Without a token it may not pull either.
    intruder.send(Send(intruder.link, m.Request((seed.next_seq - 1,))))
    assert intruder.closed == ["protocol error: Request before an accepted Hello"]


@pytest.mark.parametrize("target", ["relay", "seed"])
@pytest.mark.parametrize("kind", ["Revoke", "Detach"])
def test_a_revoke_or_detach_not_from_the_tracker_is_a_protocol_error_and_cuts_nobody_off(
        swarm, target, kind):
    w, tracker, seed, peers, intruder = swarm
    victim = relay_of(peers) if target == "relay" else seed
    child, k = next((p, k) for p in peers if p is not victim for k, s in enumerate(p.primary)
                    if s is not None and s.ref.id == victim.id)
    detached = list(victim.detached or [])  # (the tracker's own, from the joins' moves)
    intruder.connect(victim.address)
    msg = (m.Revoke(child.id, 1e9, "evicted: forged chunk 1") if kind == "Revoke"
           else m.Detach(child.id, k, 1e9))
    intruder.send(Send(intruder.link, msg))
    assert intruder.closed == [f"protocol error: unexpected {kind} from a peer"]
    assert victim.revoked is None and list(victim.detached or []) == detached
    assert any(c.node_id == child.id and c.subs >> k & 1 for c in victim.conns.values())
    keeps_playing(w, seed, peers)


def test_have_before_hello_closes_the_link(swarm):
    w, tracker, seed, peers, intruder = swarm
    intruder.connect(peers[2].address)
    intruder.send(Send(intruder.link, m.Have(0, b"\xff")))
    assert intruder.closed == ["protocol error: Have before an accepted Hello"]
    keeps_playing(w, seed, peers)


@pytest.mark.parametrize("sent, problem", [
    (20, "chunk {seq} longer than its declared 10 bytes"),
    (5, "chunk {seq} ended after 5 of 10 bytes"),
])
def test_chunk_whose_size_lies_closes_the_link(swarm, sent, problem):
    w, tracker, seed, peers, intruder = swarm
    victim = relay_of(peers)
    intruder.connect(victim.address)
    seq = seed.next_seq  # the chunk the swarm waits for next: relayed at once (cut-through)
    head = m.ChunkHead("ch", seq, 10, 0, w.now, b"s" * m.SIG_LEN)
    intruder.send(ChunkBegin(intruder.link, head), ChunkBytes(intruder.link, seq, b"x" * sent),
                  ChunkEnd(intruder.link, seq, True))
    assert intruder.closed == ["protocol error: " + problem.format(seq=seq)]
    keeps_playing(w, seed, peers)


def test_forged_chunk_from_a_stranger_never_reaches_the_player(swarm):
    w, tracker, seed, peers, intruder = swarm
    victim = peers[3]
    intruder.connect(victim.address)
    nxt = seed.next_seq
    payload = b"forged media"
    head = Crypto().sign_chunk(SigningKey(), "ch", nxt, m.FLAG_RAP, w.now, payload)
    intruder.send(ChunkBegin(intruder.link, head), ChunkBytes(intruder.link, nxt, payload),
                  ChunkEnd(intruder.link, nxt, True))
    assert victim.forged == 1
    assert intruder.closed == [f"forged chunk {nxt}"]
    keeps_playing(w, seed, peers)
    assert all(d.payload != payload for d in w.delivered[victim])


@pytest.mark.parametrize("msgs, problem", [
    ([m.Have(0, b"\1")], "Have before Join or Announce"),
    ([m.Join("ch", "", 0), m.Have(0, b"\1")], "unexpected Have at the tracker"),
    ([m.ParentLost(0, 1)], "ParentLost before Join or Announce"),
    ([m.Complaint(1, "x")], "Complaint before Join or Announce"),
    ([m.Join("ch", "", 0), m.Join("ch", "", 0)], "second Join on one link"),
    ([m.Announce("ch", b"k" * 32, "a", 5000, 2000, 4, 200, b"p" * 64)],
     "Announce proof does not match the channel key"),
])
def test_tracker_closes_a_link_that_breaks_the_protocol(swarm, msgs, problem):
    w, tracker, seed, peers, intruder = swarm
    intruder.connect("tracker")
    intruder.send(*(Send(intruder.link, x) for x in msgs))
    assert intruder.closed == [f"protocol error: {problem}"]
    keeps_playing(w, seed, peers)


def test_garbage_to_the_tracker_closes_that_link_only(swarm):
    w, tracker, seed, peers, intruder = swarm
    intruder.connect("tracker")
    intruder.send(Send(intruder.link, m.Join("ch", "", 0)))
    assert any(type(x) is m.Welcome for x in intruder.received)
    intruder.send_garbage(tracker, msgpack.packb([V, 8, 0, "one", 2]))
    assert intruder.closed == [f"protocol error: ParentLost.parent: expected an integer in "
                               f"[-1, {2**48}], got 'one'"]
    assert len(tracker.channels["ch"].forest.members) == len(peers) + 1  # the seed, the peers
    keeps_playing(w, seed, peers)


def test_complaint_about_a_non_parent_evicts_nobody(swarm):
    w, tracker, seed, peers, intruder = swarm
    intruder.connect("tracker")
    intruder.send(Send(intruder.link, m.Join("ch", "", 0)))
    mine = {ref.id for a in intruder.received if type(a) is m.Assign
            for ref in (a.parent, a.backup) if ref is not None}
    innocent = next(p for p in peers if p.id not in mine)
    intruder.send(Send(intruder.link, m.Complaint(innocent.id, "forged chunk 1")))
    assert tracker.evictions == 0 and not innocent.rejected
    assert not intruder.closed
    keeps_playing(w, seed, peers)
