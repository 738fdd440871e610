"""What every sans-IO node shares: the effect queue, timers, and the parent side of relaying.

`NodeBase` gives a node its output queue and a timer table; `RelayNode` adds everything a
parent does — admitting children that hold a tracker token, pushing each sub-stream to its
subscribers (relaying children first: they have descendants waiting), answering pulls from a
window of recent chunks, and exchanging have-maps. `SeedNode` and `PeerNode` are both
`RelayNode`s; only where the chunks come from differs.

Drivers call, always with the time: `handle(link, msg, now=)`, `link_opened(link, now=, ref=)`,
`open_failed(ref, now=, reason=)`, `link_closed(link, now=, reason=)`, `chunk_begin/
chunk_data/chunk_end(...)` (or `chunk_received(...)` for a chunk that arrived whole),
`chunk_dropped(link, seq, now=)`, `handle_timer(now=)`; then pull `drain()` and `next_timer()`
(or `next_due()`, the same as a plain float: inf for no timer).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, Final

from librt.vecs import append, pop, vec
from mypy_extensions import i64

from meshcast import messages as m
from meshcast.crypto import Crypto
from meshcast.effects import Chunk, Close, Effect, Link, Notice, Send, SendChunk
from meshcast.errors import LocalProtocolError, RemoteProtocolError
from meshcast.policy import STRETCH_HEADROOM, child_slots, handoff_slack
from meshcast.window import TOO_OLD, new_ring, ring_get, ring_has, ring_put, ring_seqs

_STALE: Final = -1.0
"""`NodeBase._first` when the earliest deadline must be looked for again."""
_NO_KEY: Final = "(no timer)"
"""`NodeBase._fast_keys` of a node that has no fast timer."""
HELLO_REFUSED: Final = "Hello refused"
"""How a relay's close reason starts when it refused the token a `Hello` showed."""
FORMER_KEY_S: Final = 600.0
"""After the tracker's key changes (a restarted tracker), tokens its predecessor signed stay
good this long (a token's lifetime): viewers not back at the new tracker yet still reach their
backups and the seed with them."""
SLOW_DROPS: Final = 3
"""Chunks dropped for one child (its queue was full) before the tracker hears it is slow."""
DETACH_GRACE_S: Final = 2.0
"""How long a child the tracker moved away from us (`Detach`) keeps its subscription and its
token here: its `Unsubscribe` may still be on the way, behind the tracker's `Assign` to it."""


class NodeBase:
    """Effect queue and timers (named deadlines; the earliest is `next_timer()`).

    Nodes are slotted: a simulation holds 100k of them, and slot attributes are both smaller
    and faster to read than an instance dict. Due timers fire earliest first, and among equal
    deadlines in the order they were last set (as a (deadline, sequence) heap would pop them,
    without a heap's stale entries). A node has a handful of named timers: a dict of them,
    key → (deadline, when set), but for two the subclass names in `_fast_keys`. Those are
    moved at nearly every event of a busy node (a peer's "play" and "repair", at every chunk),
    and live in four plain fields, here beside the rest of what an event reads: setting one
    makes no dict entry and no float object, each a read from cold memory in a 100k run."""

    __slots__ = ("_out", "_at0", "_at1", "_first", "_set0", "_set1", "_sets", "_timers",
                 "_fast_keys")

    def __init__(self) -> None:
        self._out: list[Effect] = []
        self._at0 = self._at1 = math.inf
        """The deadlines of timers `_fast_keys[0]` and `[1]` (inf: not set)."""
        self._first = math.inf
        """The earliest deadline in `_timers` (inf: none; `_STALE`: to be found again). A
        driver asks for the earliest of all after every event it hands the node."""
        self._set0 = self._set1 = 0
        """When each was set, as a count of timers set (`_sets`): ties go to the first set."""
        self._sets = 0
        self._timers: dict[Hashable, tuple[float, int]] = {}
        """The other timers: key → (deadline, when set)."""
        self._fast_keys: tuple[Hashable, Hashable] = (_NO_KEY, _NO_KEY)

    def drain(self) -> list[Effect]:
        """Take the effects queued since the last call."""
        return self.swap_effects([])

    def swap_effects(self, empty: list[Effect]) -> list[Effect]:
        """`drain()`, the node queueing its next effects in `empty` (an empty list): a driver
        that clears the lists it takes and hands them back allocates none. (The simulator's
        100k nodes each held a list from their last event, freed cold at the next.) A node
        that finishes its effects on the way out (the tracker signs tokens) does it here."""
        out, self._out = self._out, empty
        return out

    def next_timer(self) -> float | None:
        first = self.next_due()
        return None if first == math.inf else first

    def next_due(self) -> float:
        """`next_timer()`, inf for none: a plain float, which a compiled build returns unboxed
        (the simulator asks after every event)."""
        first = self._first
        if first == _STALE:
            first = math.inf
            for when, _ in self._timers.values():  # (a loop a compiled build runs natively)
                if when < first:
                    first = when
            self._first = first
        # (Compares, not `min`: compiled, `min` of three floats boxes them.)
        if self._at0 < first:
            first = self._at0
        if self._at1 < first:
            first = self._at1
        return first

    def timer_at(self, key: Hashable) -> float | None:
        """Timer `key`'s deadline; None if it is not set."""
        i = self._fast_index(key)
        when = (self._at0 if i == 0 else self._at1 if i == 1
                else self._timers[key][0] if key in self._timers else math.inf)
        return None if when == math.inf else when

    def _fast_index(self, key: Hashable) -> int:
        """Which of `_fast_keys` `key` is (0 or 1); -1: a timer of the dict."""
        fast = self._fast_keys
        return 0 if key == fast[0] else 1 if key == fast[1] else -1

    def handle_timer(self, *, now: float) -> None:
        """Fire every timer due at `now` (including any a firing one sets for `now` or before)."""
        timers = self._timers
        while True:
            # The earliest; among equal deadlines the first set (a compiled build runs this
            # loop natively). -1, -2: the fast timers.
            key: Hashable = None
            slot, first, order = 0, math.inf, 0
            if self._at0 < first:
                slot, first, order = -1, self._at0, self._set0
            if self._at1 < first or (self._at1 == first and self._set1 < order):
                slot, first, order = -2, self._at1, self._set1
            for k, (when, n) in timers.items():
                if when < first or (when == first and n < order):
                    slot, key, first, order = 1, k, when, n
            if slot == 0 or first > now:
                return
            if slot == -1:
                self._at0 = math.inf
                key = self._fast_keys[0]
            elif slot == -2:
                self._at1 = math.inf
                key = self._fast_keys[1]
            else:
                del timers[key]
                self._first = _STALE
            self._on_timer(key, now)

    def _set_timer(self, key: Hashable, when: float) -> None:
        i = self._fast_index(key)
        if i >= 0:
            self._set_fast(i, when)
            return
        timers = self._timers
        old = math.nan  # (not set: NaN equals nothing)
        if key in timers:
            old = timers[key][0]
            if old == when:
                return  # unchanged: keeps its place
            del timers[key]
        self._sets += 1
        timers[key] = (when, self._sets)
        first = self._first
        if when <= first:
            self._first = when
        elif old == first:
            self._first = _STALE  # the earliest moved later (or `first` was already stale)

    def _set_fast(self, i: int, when: float) -> None:
        """Set timer `_fast_keys[i]` (i: 0 or 1) to `when` (< inf)."""
        old = self._at0 if i == 0 else self._at1
        if old == when:
            return  # unchanged: keeps its place
        self._sets += 1
        if i == 0:
            self._at0, self._set0 = when, self._sets
        else:
            self._at1, self._set1 = when, self._sets

    def _cancel_timer(self, key: Hashable) -> None:
        i = self._fast_index(key)
        if i >= 0:
            self._cancel_fast(i)
            return
        timers = self._timers
        if key in timers:  # (not `pop(key, None)`: a method call through Python when compiled)
            if timers[key][0] == self._first:
                self._first = _STALE
            del timers[key]

    def _cancel_fast(self, i: int) -> None:
        if i == 0:
            self._at0 = math.inf
        else:
            self._at1 = math.inf

    def _clear_timers(self) -> None:
        self._timers.clear()
        self._at0 = self._at1 = math.inf
        self._first = math.inf

    def _on_timer(self, key: Any, now: float) -> None:
        raise LocalProtocolError(f"{type(self).__name__} has no timer {key!r}")


def _moved_key(node_id: int, substream: int) -> int:
    """One number for a (node, sub-stream) pair in `RelayNode.detached`. Sub-streams are
    below `MAX_SUBSTREAMS` (16); a pull token's -1 gets 31."""
    return node_id << 5 | substream & 31


def pair_index(pairs: vec[float], key: float) -> int:
    """Where `key` is among the keys of `pairs` (key, value, key, value, …); -1: not there.
    A scan: the node's small tables kept this way (`RelayNode._ids`, `PeerNode.gaps`) hold a
    few pairs, in one buffer, and their numbers are exact as floats (below 2**53)."""
    i = 0
    n = len(pairs)
    while i < n:
        if pairs[i] == key:
            return i
        i += 2
    return -1


NO_LINK: Final = -2
"""`RelayNode._sender` of a link that is not open (node ids are never negative; -1 is
`m.NO_PEER`, an open link whose remote has not said who it is)."""

NO_SUBSCRIBERS: tuple[()] = ()
"""The subscribers of a sub-stream nobody subscribed to: one shared empty tuple, not a list
per node and sub-stream (most peers relay none, or one, of their sub-streams)."""


class Conn:
    """One link as a relay sees it."""

    __slots__ = ("link", "node_id", "authorized", "subs", "relays", "have", "drops", "neighbour",
                 "ours")

    def __init__(self, link: Link) -> None:
        self.link = link
        self.node_id = m.NO_PEER
        self.authorized = False
        """The remote showed a valid token naming us (it may pull and subscribe)."""
        self.subs = 0
        """Bit k set: the remote subscribed to sub-stream k (its first seq wanted is in the
        node's subscriber list; most links, the tracker's and our parents', have none)."""
        self.relays = 0
        """Bit k set: the remote relays sub-stream k further (it is sent to first)."""
        self.have: tuple[int, int] | None = None
        """Latest have-map from the remote: (base, bits as int)."""
        self.drops = 0
        """Chunks dropped for the remote (its queue was full); reported once at `SLOW_DROPS`."""
        self.neighbour = False
        self.ours = False
        """We opened it, to a node the tracker sent us to (a parent, a backup, a neighbour):
        at most one such link per remote node."""


class RelayNode(NodeBase):
    """The parent side of the protocol, shared by the seed and every peer."""

    __slots__ = ("crypto", "channel", "public_key", "substreams", "chunk_ms", "chunk_s",
                 "buffer_s", "mode", "conns", "_ids", "_pushing", "_push", "_subscribers",
                 "newest", "bytes_up", "window", "_ring", "_ring_newest", "upload_kbps", "id",
                 "tracker_key", "former_key", "bitrate_kbps", "tracker_link", "revoked",
                 "detached")

    def __init__(self, *, crypto: Crypto, upload_kbps: int, buffer_s: float = 10.0) -> None:
        super().__init__()
        # (First the fields a relayed chunk reads, in the order a compiled build lays them out
        # — that of first assignment — so that they share a few cache lines: in a large run
        # every chunk finds its node cold in memory.)
        self.crypto = crypto
        self.channel = ""
        self.public_key = b""
        self.substreams = 4
        self.chunk_ms = 200
        self.chunk_s = 0.2
        self.buffer_s = buffer_s
        self.mode = "tree"
        self.conns: dict[Link, Conn] = {}
        self._ids: vec[float] = vec[float]()
        """`conns` as (link, remote node id) pairs, all a chunk needs of its link (`_sender`):
        a few numbers in one buffer, where a dict lookup reads the dict, its entry, the key's
        int object and the `Conn`, each cold in a large run. Kept by `_add_conn`, `_pop_conn`
        and `_name_conn`, the only writers of `conns` and `Conn.node_id`."""
        self._pushing = 0
        """Bit k set: sub-stream k has subscribers (`_index_pushes`). Most chunks a peer gets
        are of sub-streams it relays to nobody: this field, read with the others, answers
        for them, not a read of `_push`'s buffer."""
        self._push: vec[i64] = vec[i64]([0])
        """`_subscribers` flat, as a chunk is pushed: item k (k < `substreams`) is where
        sub-stream k's children start, item `substreams` where the last one's end, and from
        `substreams + 1` on the children as (link, first seq) pairs (`_index_pushes`). Every
        chunk reads it: one buffer of numbers, not a tuple and a `Conn` per child."""
        self._subscribers: list[Sequence[tuple[Conn, int]]] = []
        """Per sub-stream: (child, first seq it wants), relaying children first."""
        self.newest = -1
        self.bytes_up = 0
        self.window = self._window()
        self._ring = new_ring(self.window)
        """The chunks kept for pulls, catch-up and playback: a ring (`meshcast.window`) whose
        newest sequence number is `_ring_newest`; `has`, `chunk` and `held` read it."""
        self._ring_newest = -1
        self.upload_kbps = upload_kbps
        self.id = m.NO_PEER
        self.tracker_key = b""
        self.former_key: tuple[bytes, float] | None = None
        """The tracker's key before it changed, and until when its tokens count
        (`FORMER_KEY_S`); None: it never changed."""
        self.bitrate_kbps = 0
        self.tracker_link: Link | None = None
        """Our link to the tracker, once open: the only link a `Revoke` (or any tracker
        message) is taken from."""
        self.revoked: dict[int, float] | None = None
        """Node id → until when the tracker revoked its tokens (`Revoke`); None until one is."""
        self.detached: array | None = None
        """Triples (`_moved_key(node id, sub-stream)`, until, grace end): the tracker moved that
        node away from us there (`Detach`), so its tokens for it expiring before `until` are
        spent once the grace period is over. None until the tracker moves a child away from us.
        Flat doubles, not a dict: ~100 bytes, not ~300, on each of a 100k-peer run's relays
        (the key is exact: below 2**53)."""

    # -- configuration, once the channel is known --------------------------------------------

    def _configure(self, channel: str, public_key: bytes, tracker_key: bytes, substreams: int,
                   chunk_ms: int, bitrate_kbps: int, mode: str = "tree") -> None:
        self.channel, self.public_key, self.tracker_key = channel, public_key, tracker_key
        self.substreams, self.chunk_ms, self.bitrate_kbps, self.mode = (
            substreams, chunk_ms, bitrate_kbps, mode)
        self._subscribers = [NO_SUBSCRIBERS] * substreams
        self._index_pushes()
        self.chunk_s = chunk_ms / 1000
        self.window = self._window()
        self._ring, self._ring_newest = new_ring(self.window), -1

    @property
    def slots(self) -> int:
        """Most children (per sub-stream) the tracker may give this node: the same rule as the
        tracker's, at the headroom of a stretched channel."""
        return child_slots(self.upload_kbps, self.bitrate_kbps, self.substreams, STRETCH_HEADROOM)

    def _window(self) -> int:
        """Chunks kept for pulls (`buffer_s` worth, at least 8): the `window` attribute, set
        whenever `chunk_ms` is (as is `chunk_s`), since the hot path reads both per chunk."""
        return max(8, int(self.buffer_s * 1000 / self.chunk_ms))

    # -- links ---------------------------------------------------------------------------------

    def link_opened(self, link: Link, *, now: float, ref: Any = None) -> None:
        self._add_conn(link)

    def _add_conn(self, link: Link) -> Conn:
        conn = self.conns[link] = Conn(link)
        self._ids = append(append(self._ids, float(link)), float(m.NO_PEER))
        return conn

    def _pop_conn(self, link: Link) -> Conn | None:
        conn = self.conns.pop(link, None)
        if conn is not None:
            ids = self._ids
            i = self._id_index(link)
            ids, _ = pop(ids, i)
            self._ids, _ = pop(ids, i)
        return conn

    def _name_conn(self, conn: Conn, node_id: int) -> None:
        """The remote of `conn` is node `node_id`."""
        conn.node_id = node_id
        self._ids[self._id_index(conn.link) + 1] = float(node_id)

    def _id_index(self, link: Link) -> int:
        """Where `link` is in `_ids` (-1: not open)."""
        return pair_index(self._ids, float(link))

    def _sender(self, link: Link) -> int:
        """The remote node id of open link `link`; `NO_LINK` if it is not open (or
        `m.NO_PEER` if it has not said who it is)."""
        i = self._id_index(link)
        return int(self._ids[i + 1]) if i >= 0 else NO_LINK

    def link_closed(self, link: Link, *, now: float, reason: str = "") -> None:
        conn = self._pop_conn(link)
        if conn is not None:
            self._drop_subscriber(conn)
            self._conn_lost(conn, now, reason)

    def _close(self, link: Link, reason: str, now: float) -> None:
        """Close a link ourselves (the driver will not report it again)."""
        conn = self._pop_conn(link)
        self._out.append(Close(link, reason))
        if conn is not None:
            self._drop_subscriber(conn)
            self._conn_lost(conn, now, reason)

    def _conn_lost(self, conn: Conn, now: float, reason: str) -> None:
        """Hook: a subclass reacts to a lost link (a parent gone, a neighbour gone)."""

    def _drop_subscriber(self, conn: Conn) -> None:
        for k in range(self.substreams):
            if conn.subs >> k & 1:
                self._drop_sub(conn, k)

    def protocol_error(self, link: Link, error: RemoteProtocolError, *, now: float) -> None:
        """The driver could not decode what `link` sent: close it with the reason, keep going."""
        self._out.append(Notice(f"closing link {link}: {error}"))
        self._close(link, f"protocol error: {error}", now)

    # -- control messages (parent side) --------------------------------------------------------

    def handle(self, link: Link, msg: m.Message, *, now: float) -> None:
        """A control message arrived on `link`."""
        conn = self.conns.get(link)
        if conn is None:
            return  # closed by us already; late message
        try:
            self._dispatch(conn, msg, now)
        except RemoteProtocolError as exc:
            self.protocol_error(link, exc, now=now)

    def _dispatch(self, conn: Conn, msg: m.Message, now: float) -> None:
        # isinstance, not `type(msg) is`: it narrows the type (for mypy and mypyc), and no
        # message class has subclasses.
        if isinstance(msg, m.Hello):
            self._on_hello(conn, msg, now)
        elif isinstance(msg, m.Subscribe):
            self._on_subscribe(conn, msg, now)
        elif isinstance(msg, m.Unsubscribe):
            self._drop_sub(conn, msg.substream)
        elif isinstance(msg, m.Request):
            self._on_request(conn, msg, now)
        elif isinstance(msg, m.Have):
            self._require_auth(conn, msg)
            self._on_have(conn, msg, now)
        elif isinstance(msg, m.Revoke) and conn.link == self.tracker_link:
            self._revoke(msg, now)
        elif isinstance(msg, m.Detach) and conn.link == self.tracker_link:
            self._detach(msg, now)
        else:
            self._dispatch_other(conn, msg, now)

    def _dispatch_other(self, conn: Conn, msg: m.Message, now: float) -> None:
        raise RemoteProtocolError(f"unexpected {type(msg).__name__}")

    def _require_auth(self, conn: Conn, msg: m.Message) -> None:
        if not conn.authorized:
            raise RemoteProtocolError(f"{type(msg).__name__} before an accepted Hello")

    def _check_token(self, token: m.Token, child: int, now: float, substream: int | None) -> str:
        """Why `token` does not let `child` take media from us ("" if it does)."""
        if token.parent != self.id or token.child != child:
            return f"token is for {token.child}→{token.parent}, not {child}→{self.id}"
        if token.channel != self.channel:
            return f"token is for channel {token.channel!r}"
        if substream is not None and token.substream != substream:
            return f"token is for sub-stream {token.substream}, not {substream}"
        if token.expires < now:
            return "token expired"
        if self.revoked is not None and self.revoked.get(child, -1.0) >= now:
            return "revoked by the tracker"
        if self.detached is not None and self._spent(child, token.substream, token.expires, now):
            return "token spent: the tracker moved it away from us"
        if not self.crypto.token_valid(self.tracker_key, token) and not (
                self.former_key is not None and now < self.former_key[1]
                and self.crypto.token_valid(self.former_key[0], token)):
            return "token signature invalid"
        return ""

    def _tracker_key_is(self, key: bytes, now: float) -> None:
        """The tracker (back, or a restarted one) signs with `key` from now on."""
        if self.tracker_key and key != self.tracker_key:
            self.former_key = (self.tracker_key, now + FORMER_KEY_S)
        self.tracker_key = key

    def _revoke(self, msg: m.Revoke, now: float) -> None:
        """The tracker evicted `msg.node_id`: close every link it has to us, and refuse the
        tokens it still holds (the tracker has given its place to someone else)."""
        revoked = self.revoked
        if revoked is None:
            revoked = self.revoked = {}
        elif len(revoked) >= 64:  # forget revocations whose tokens have all expired
            for node_id in [n for n, until in revoked.items() if until < now]:
                del revoked[node_id]
        revoked[msg.node_id] = max(msg.until, revoked.get(msg.node_id, msg.until))
        for conn in [c for c in self.conns.values() if c.node_id == msg.node_id]:
            self._close(conn.link, f"revoked by the tracker: {msg.reason}", now)

    def _detach(self, msg: m.Detach, now: float) -> None:
        """The tracker moved `msg.node_id` away from us in one sub-stream: after
        `DETACH_GRACE_S`, drop it there if it has not unsubscribed, and refuse the token it had.
        Until then both stand: its `Unsubscribe` may be on the way, or it may have switched to
        us as its backup just before the tracker's `Assign` reached it (as it would without
        this message: a refusal then would cost it a repair)."""
        detached = self.detached
        if detached is None:
            detached = self.detached = array("d")
        grace_end = now + DETACH_GRACE_S
        i = self._moved_index(msg.node_id, msg.substream)
        if i >= 0:
            detached[i + 1] = max(detached[i + 1], msg.until)
            detached[i + 2] = grace_end
        else:
            key = float(_moved_key(msg.node_id, msg.substream))
            for i in range(1, len(detached), 3):
                if detached[i] < now:  # a move whose tokens have all expired: reuse its place
                    detached[i - 1], detached[i], detached[i + 1] = key, msg.until, grace_end
                    break
            else:
                detached.extend((key, msg.until, grace_end))
        if self._subscribed(msg.node_id, msg.substream):
            self._set_timer(("detach", msg.node_id, msg.substream), grace_end)

    def _spent(self, node_id: int, k: int, expires: float, now: float) -> bool:
        """A token of `node_id`'s for sub-stream k expiring at `expires` was spent by a move,
        and the move's grace period is over."""
        moved = self._moved(node_id, k)
        return moved is not None and moved[0] > expires and now >= moved[1]

    def _moved(self, node_id: int, k: int) -> tuple[float, float] | None:
        """(until, grace end) of `node_id`'s move away from us in sub-stream k, if any: its
        tokens for it expiring before `until` are spent once the grace period is over."""
        i = self._moved_index(node_id, k)
        detached = self.detached
        return (detached[i + 1], detached[i + 2]) if i >= 0 and detached is not None else None

    def _moved_index(self, node_id: int, k: int) -> int:
        """Where `node_id`'s move away from us in sub-stream k is in `detached` (-1: none)."""
        detached = self.detached
        if detached is not None:
            key = float(_moved_key(node_id, k))
            for i in range(0, len(detached), 3):
                if detached[i] == key:
                    return i
        return -1

    def _on_hello(self, conn: Conn, msg: m.Hello, now: float) -> None:
        if msg.channel != self.channel:
            raise RemoteProtocolError(f"Hello for channel {msg.channel!r}, this is {self.channel!r}")
        self._name_conn(conn, msg.node_id)
        if msg.token is not None:
            why = self._check_token(msg.token, msg.node_id, now, None)
            if why:
                raise RemoteProtocolError(f"{HELLO_REFUSED}: {why}")
            conn.authorized = True
            if msg.token.substream == m.NO_PEER:
                conn.neighbour = True
                self._send_have(conn)

    def _on_subscribe(self, conn: Conn, msg: m.Subscribe, now: float) -> None:
        k = msg.substream
        if k >= self.substreams:
            raise RemoteProtocolError(f"Subscribe to sub-stream {k} of {self.substreams}")
        why = self._check_token(msg.token, conn.node_id, now, k)
        subscribed = conn.subs >> k & 1
        if not why and not subscribed and self._children() >= self.slots + handoff_slack(self.slots):
            why = f"no capacity ({self.slots} slots in use)"
        if why:
            self._out.append(Send(conn.link, m.Refuse(k, why)))
            return
        conn.authorized = True
        moved = self._moved(conn.node_id, k) if self.detached is not None else None
        if moved is not None:
            if moved[0] > msg.token.expires:  # a spent token, in the grace period
                self._set_timer(("detach", conn.node_id, k), moved[1])
            else:
                self._cancel_timer(("detach", conn.node_id, k))  # back, with a fresh token
        lst = self._subscribers[k]
        if not isinstance(lst, list):  # NO_SUBSCRIBERS: sub-stream k's first subscriber
            lst = []
            self._subscribers[k] = lst
        entry = (conn, msg.from_seq)
        if subscribed:
            lst[self._find(conn, k)] = entry
        elif msg.relays:
            # Relaying children first: their subtrees wait on them (see DESIGN §3, latency).
            conn.relays |= 1 << k
            i = 0
            while i < len(lst) and lst[i][0].relays >> k & 1:
                i += 1
            lst.insert(i, entry)
        else:
            lst.append(entry)
        conn.subs |= 1 << k
        self._index_pushes()
        if msg.from_seq >= 0:  # catch-up: send what we hold of this sub-stream from from_seq
            # ... from spare upload only, as a pull is answered: a burst queued ahead of every
            # other child's next push would delay them all, and a parent near its capacity takes
            # seconds to drain it (a 9k-viewer channel at 95 % lost a tenth of its chunks).
            for seq in self.held():  # oldest first
                if seq >= msg.from_seq and seq % self.substreams == k:
                    self._send_chunk([conn.link], seq, push=False)

    def _subscribed(self, node_id: int, k: int) -> list[Conn]:
        """`node_id`'s links to us subscribed to sub-stream k (one, nearly always; none if it
        unsubscribed)."""
        return [c for c in self.conns.values() if c.node_id == node_id and c.subs >> k & 1]

    def _drop_sub(self, conn: Conn, k: int) -> None:
        if conn.subs >> k & 1:
            conn.subs &= ~(1 << k)
            lst = self._subscribers[k]
            assert isinstance(lst, list)  # it has a subscriber: conn
            del lst[self._find(conn, k)]
            if not lst:
                self._subscribers[k] = NO_SUBSCRIBERS
            self._index_pushes()
        conn.relays &= ~(1 << k)

    def _index_pushes(self) -> None:
        """Lay `_subscribers` out flat in `_push` (after every change to them: rare, against
        a read per chunk)."""
        flat: list[int] = [0] * (self.substreams + 1)
        pushing = 0
        for k, lst in enumerate(self._subscribers):
            flat[k] = len(flat)
            if lst:
                pushing |= 1 << k
            for c, first in lst:
                flat.append(c.link)
                flat.append(first)
        flat[self.substreams] = len(flat)
        self._push = vec[i64](flat)
        self._pushing = pushing

    def _find(self, conn: Conn, k: int) -> int:
        """Where subscriber `conn` is in sub-stream k's list (it must be there)."""
        for i, (c, _) in enumerate(self._subscribers[k]):
            if c is conn:
                return i
        raise LocalProtocolError(f"link {conn.link} is not subscribed to sub-stream {k}")

    def _children(self) -> int:
        return sum(len(lst) for lst in self._subscribers)

    def _on_request(self, conn: Conn, msg: m.Request, now: float) -> None:
        self._require_auth(conn, msg)
        missing = []
        for seq in msg.seqs:
            if ring_has(self._ring, seq):
                self._send_chunk([conn.link], seq, push=False)
            else:
                missing.append(seq)
        if missing:
            self._out.append(Send(conn.link, m.Missing(tuple(missing))))

    def _on_have(self, conn: Conn, msg: m.Have, now: float) -> None:
        conn.have = (msg.base, int.from_bytes(msg.bitmap, "little"))

    def _send_have(self, conn: Conn) -> None:
        if self.newest < 0:
            return
        base = max(0, self.newest - 8 * m.MAX_BITMAP + 1, self.newest - self.window + 1)
        bits = 0
        for seq in self.held():
            if seq >= base:
                bits |= 1 << (seq - base)
        n = (self.newest - base) // 8 + 1
        self._out.append(Send(conn.link, m.Have(base, bits.to_bytes(n, "little"))))

    # -- chunks out ----------------------------------------------------------------------------

    def has(self, seq: int) -> bool:
        """Whether chunk `seq` is in our window."""
        return ring_has(self._ring, seq)

    def chunk(self, seq: int) -> Chunk | None:
        """Chunk `seq`, if it is in our window."""
        return ring_get(self._ring, seq)

    def held(self) -> Iterator[int]:
        """The sequence numbers in our window, oldest first."""
        return ring_seqs(self._ring, self._ring_newest)

    def _store(self, chunk: Chunk) -> None:
        newest = ring_put(self._ring, self._ring_newest, chunk)
        if newest != TOO_OLD:
            self._ring_newest = newest
            if chunk[0].seq > self.newest:
                self.newest = chunk[0].seq

    def _send_chunk(self, links: list[Link], seq: int, push: bool = True) -> None:
        """Send chunk `seq` from our window to each of `links`."""
        chunk = ring_get(self._ring, seq)
        if chunk is None:
            raise LocalProtocolError(f"chunk {seq} is not in the window")
        self._out.append(SendChunk(links, chunk, push))
        self.bytes_up += chunk.head.size * len(links)

    def _push_targets(self, seq: int, but: Link = -1) -> list[Link]:
        """Children that get chunk `seq` pushed (sub-stream subscribers, relaying ones first),
        except link `but` (links are never negative: -1 excepts none)."""
        targets: list[Link] = []
        k = seq % self.substreams
        if not self._pushing >> k & 1:
            return targets
        push = self._push
        i, end = push[k], push[k + 1]
        while i < end:
            link, first = push[i], push[i + 1]
            if first <= seq and link != but:
                targets.append(link)
            i += 2
        return targets

    def _start_haves(self, now: float) -> None:
        """Mesh mode: advertise have-maps to neighbours every other chunk period."""
        if self.mode == "mesh":
            self._set_timer("have", now + 2 * self.chunk_ms / 1000)

    def _on_timer(self, key: Any, now: float) -> None:
        if key == "have":
            for conn in self.conns.values():
                if conn.neighbour:
                    self._send_have(conn)
            self._start_haves(now)
        elif type(key) is tuple and key[0] == "detach":
            # Still subscribed with the token the tracker told us is spent: it stayed put.
            _, node_id, k = key
            for conn in self._subscribed(node_id, k):
                self._drop_sub(conn, k)
                self._out.append(Send(conn.link, m.Refuse(k, "moved away by the tracker")))
        else:
            super()._on_timer(key, now)

    def chunk_dropped(self, link: Link, seq: int, *, now: float, push: bool = True) -> None:
        """The driver dropped chunk `seq` for `link` (`SendChunk.push` as given): our upload queue
        was too long for it."""
        conn = self.conns.get(link)
        if conn is None:
            return
        if not push or not conn.subs >> seq % self.substreams & 1:
            # An answer to a pull (or a catch-up): say so at once, so the child asks elsewhere.
            self._out.append(Send(link, m.Missing((seq,))))
            return
        conn.drops += 1
        if conn.drops == SLOW_DROPS:
            self._report_slow(conn, now)

    def _report_slow(self, conn: Conn, now: float) -> None:
        """Hook: tell the tracker a child cannot keep up."""
