"""PeerNode: a viewer that receives, verifies, relays and plays one channel (sans-IO).

Receiving: one parent per sub-stream pushes chunks; each chunk's bytes are forwarded to our own
children as they arrive (cut-through) and the chunk is released to the player only after its
signature checks out. A relay whose data fails verification is cut off, reported to the
tracker, and its chunk aborted downstream (children discard it without blaming us).

Repair: a missing chunk is pulled — from the parents of the other sub-streams (they hold the
whole stream), from mesh neighbours whose have-maps list it, and from the seed last. A parent
that goes away, refuses us or stalls is replaced at once by the backup the tracker gave us;
the tracker hears about it and hands out a new backup.

Playback: from the first random-access chunk on, chunks go to the player in order; a chunk not
here by its deadline (first play time + its offset + `playout_delay`) is skipped.

In "mesh" mode (the CoolStreaming baseline) there are no parents: everything is pulled,
scheduled from neighbours' have-maps.
"""

from __future__ import annotations

import math
import random
from collections.abc import Set
from typing import Any, Final

from librt.vecs import append, pop, vec

from meshcast import messages as m
from meshcast.crypto import Crypto
from meshcast.effects import (Chunk, ChunkBegin, ChunkBytes, ChunkEnd, Deliver, Link, Notice, Open,
                              Send, SendChunk, Skip)
from meshcast.errors import RemoteProtocolError
from meshcast.node import HELLO_REFUSED, NO_LINK, Conn, RelayNode, pair_index
from meshcast.policy import MAX_BACKLOG_S
from meshcast.window import ring_get, ring_has

TRACKER: Final = "tracker"
ON_TIME_SLACK: Final = 1e-9
"""A chunk handed over this close after its deadline is on time (float rounding)."""
START_WAIT: Final = 1.0
"""Longest wait, after the first random-access chunk, for every sub-stream to deliver."""
BUFFER_MARGIN_S: Final = 2.5
"""A peer keeps at least its playout delay plus this much of the stream. While a lost chunk is
repaired, the chunks behind it wait to play; they must not leave the window first (a 4 s delay
in a 3 s window lost 9 % of a lossy run)."""
REPAIR_MARGIN: Final = 0.3
"""Pull a missing chunk when this share of the playout delay is left before its deadline.

Late, not early: a chunk still on its way is pulled twice over, and at 5k+ viewers an early
margin (0.6) let those duplicate pulls eat the headroom until the trees collapsed (simulated:
continuity 64% at 0.6, 99.97% at 0.3)."""
LATE_SLACK: Final = 0.2
"""Seconds past its usual arrival after which a chunk is treated as lost and pulled.

A sub-stream's path delivers each chunk about its latest delay (`PeerNode.subs`) after
the seed stamped it; a chunk that much later than that has a broken path upstream (a relay
above our parent died), and waiting for the deadline leaves too little time to pull it.
Simulated on the churn scenario (2k viewers, 80 % abrupt departures): continuity 97.5 % →
98.8 %; with 3 s link idle time-outs (`policy.LINK_IDLE_TIMEOUT_S`) 99.1 % → 99.87 %. It
also made an earlier rule redundant (pull what is still missing once every sub-stream is two
rounds past it: 99.86 % without it).
The price, in a steady 10k audience: ~1.5 % of chunks are pulled though merely late, and p95
latency rises ~9 % (889 → 971 ms over 30 s); 0.3 s of slack, or an envelope of the path's
lag instead of its last value, cost as much and repaired less."""

REJOIN_S: Final = 2.0
"""After losing the tracker, a viewer (still playing from its trees) tries it again after about
this long, doubling up to `REJOIN_MAX_S`, jittered: a restarted tracker is not hit by every
viewer at once."""
REJOIN_MAX_S: Final = 30.0
FIRST_CONTACT_TRIES: Final = 3
"""Tries of the tracker before a viewer that never reached it gives up ("tracker unreachable"),
`REJOIN_S` apart and doubling, jittered: ~20 s in all with QUIC's 5 s connect time-out. A
tracker swamped by a flash crowd drops new clients' first packets (`sim.driver`); they get in
on a later try instead of failing."""
PULL_WINDOW: Final = 4
"""Pulls in flight per source in tree mode."""
REQUEST_TIMEOUT: Final = 1.0
"""Seconds before an unanswered pull is asked of another source."""
MESH_OUTSTANDING: Final = 8
"""Pulls in flight per neighbour in mesh mode."""


_NO_RX: Final[dict[tuple[int, int], Any]] = {}
_NO_RECEIVING: Final[dict[int, int]] = {}
"""`PeerNode.rx` and `receiving` of a node no chunk has streamed into: shared, never written."""
_NONE_FROM_SEED: Final[dict[int, None]] = {}
"""`PeerNode._from_seed` of a node the seed has sent nothing: shared, never written."""
_NO_REQUESTS: Final[dict[int, tuple[Link, float, set[Link]]]] = {}
"""`PeerNode.requested` of a peer with no pull in flight: shared, never written."""
_PLAY: Final = 0
_REPAIR: Final = 1
"""The "play" and "repair" timers: `NodeBase._fast_keys` 0 and 1."""
_NO_PARENT: Final = -2.0
"""A sub-stream's parent in `PeerNode.subs` when it has none: no node's id, and not the
`NO_PEER` of a link whose remote has not said who it is."""


class Slot:
    """A parent (or backup) for one sub-stream, and the token that lets us use it: None once
    it has been used (`_subscribe`). A subscription outlives its token's check, and a lost
    one ends the slot (we switch to the backup), so it is never shown again: 100k peers
    would keep 40 MB of spent tokens."""

    __slots__ = ("ref", "token")

    def __init__(self, ref: m.PeerRef, token: m.Token | None) -> None:
        self.ref = ref
        self.token: m.Token | None = token


class Rx:
    """A chunk being received on one link."""

    __slots__ = ("head", "parts", "got", "targets", "sender")

    def __init__(self, head: m.ChunkHead, targets: list[Link], sender: int) -> None:
        self.head, self.targets, self.sender = head, targets, sender
        self.parts: list[bytes] = []
        self.got = 0


class PeerNode(RelayNode):
    """A viewer peer (and relay)."""

    __slots__ = ("primary", "subs", "seed_id", "rx", "receiving", "gaps",
                 "requested", "_from_seed", "play_next", "play_s0", "play_t0",
                 "playout_delay", "delivered", "late", "latency_sum", "bytes_from_seed",
                 "bytes_from_peers", "skipped", "rng", "tracker", "address", "coords",
                 "pinned_key", "rejected", "leaving", "_rejoin_delay", "_contact", "joined_at",
                 "backup", "relays", "opening", "neighbours", "blocked", "_start_rap", "forged",
                 "first_play", "_recheck_links")

    def __init__(self, *, channel: str, crypto: Crypto, rng: random.Random, tracker: str,
                 address: str = "", upload_kbps: int = 0, coords: tuple[float, ...] = (),
                 public_key: bytes | None = None, playout_delay: float = 0.5,
                 buffer_s: float = 5.0) -> None:
        super().__init__(crypto=crypto, upload_kbps=upload_kbps,
                         buffer_s=max(buffer_s, playout_delay + BUFFER_MARGIN_S))
        self._fast_keys = ("play", "repair")  # (`_PLAY`, `_REPAIR`: set at nearly every chunk)
        self.channel = channel
        # (First the fields an arriving chunk reads: see `RelayNode.__init__`.)
        self.primary: list[Slot | None] = []
        self.subs: vec[float] = vec[float]()
        """Per sub-stream k, five numbers: [5k] its parent's node id, `_NO_PARENT` for none
        (`primary[k].ref.id`, kept by `_set_primary`); [5k + 1] the newest seq it has
        delivered (-1: none yet); [5k + 2] when its parent last delivered (or was set);
        [5k + 3] its path's latest delay (`_accept`), NaN until it has delivered; and [5k + 4]
        the open link its parent's chunks came over, -1 until one did (`_chunk_sender`). An
        arriving chunk reads and writes its sub-stream's five, side by side in one buffer, cold
        in memory in a large run (they were in two buffers; before, four and three objects).
        Ids, seqs and links are exact as floats (below 2**53)."""
        self.seed_id = m.NO_PEER
        self.rx: dict[tuple[Link, int], Rx | None] = _NO_RX
        self.receiving: dict[int, Link] = _NO_RECEIVING
        """Chunks streaming in (`chunk_begin` … `chunk_end`), by (link, seq) and by seq: the
        shared empty `_NO_RX` and `_NO_RECEIVING` until the first (the simulator's whole chunks
        never stream), so a node's check reads a dict all nodes read, not one of its own."""
        self.gaps: vec[float] = vec[float]()
        """Chunks missing, and when to pull each (unless its deadline comes first: `_due`), as
        (seq, when) pairs in the order noted (`_set_gap`, `_drop_gap`). Nearly every chunk
        reads it and most add or remove one (a sub-stream's chunk is later than another's);
        it holds 0–2 most of the time: a few numbers in one buffer, where a dict was two
        blocks and an int and a float object per gap (seqs are exact as floats)."""
        self.requested: dict[int, tuple[Link, float, set[Link]]] = _NO_REQUESTS
        """Pulls in flight: seq → (link asked, when, links not to ask again). The shared empty
        `_NO_REQUESTS` while there are none (`_request`, `_unrequest`): every chunk looks its
        seq up here, and a peer's own empty dict was one more read from cold memory."""
        self._from_seed: dict[int, None] = _NONE_FROM_SEED
        """Chunks that came from the seed, until played: the shared empty `_NONE_FROM_SEED`
        until the first (most viewers are never the seed's children)."""
        self.play_next: int | None = None
        self.play_s0 = 0
        self.play_t0 = 0.0
        self.playout_delay = playout_delay
        # What the player got, for the operator and the simulator's per-peer metrics (which
        # read them once, at the end, rather than counting each chunk again).
        self.delivered = 0
        self.late = 0
        """Chunks handed to the player after their deadline (counted in `delivered` too)."""
        self.latency_sum = 0.0
        """Sum of the delivered chunks' latencies (seconds)."""
        self.bytes_from_seed = 0
        self.bytes_from_peers = 0
        """Bytes of the delivered chunks, by where they came from."""
        self.skipped = 0
        self.rng = rng
        self.tracker = tracker
        self.address = address
        self.coords = coords
        self.pinned_key = public_key
        self.rejected = ""
        self.leaving = False
        self._rejoin_delay = 0.0
        """The wait before the last try of the tracker since we lost it (0: never lost it)."""
        self._contact = 0
        """Failed first contacts with the tracker; -1 once it answered."""
        self.joined_at: float | None = None
        self.backup: list[Slot | None] = []
        self.relays = 0
        """Bit k set: the tracker has us relay sub-stream k (we tell our parent so)."""
        self.opening: dict[int, m.Token | None] = {}
        self.neighbours: dict[int, tuple[m.PeerRef, m.Token]] = {}
        # Sets that are nearly always empty are dicts (→ None): 64 bytes empty, not 216.
        self.blocked: dict[int, None] = {}
        self._start_rap: tuple[int, float, float] | None = None
        self.forged = 0
        self.first_play: float | None = None
        self._recheck_links = False
        """A link we opened may have lost its purpose since `_close_unused` last looked (a
        parent, backup, neighbour or the seed changed, or such a link opened): most of its
        looks, every few seconds on every peer, then skip a walk over all links."""

    @property
    def stall_timeout(self) -> float:
        """Silence from a parent that means it is gone: longer than a parent may legitimately
        queue a chunk (`MAX_BACKLOG_S`) plus two of its sub-stream's chunk intervals."""
        return MAX_BACKLOG_S + 2 * self.substreams * self.chunk_s

    def start(self, *, now: float) -> None:
        self.joined_at = now
        self._out.append(Open(self.tracker, TRACKER))

    def leave(self, *, now: float) -> None:
        """Graceful departure: tell the tracker, close every link."""
        self.leaving = True
        if self.tracker_link is not None:
            self._out.append(Send(self.tracker_link, m.Leave("viewer left")))
        self._quit("leaving", now)

    def _quit(self, reason: str, now: float) -> None:
        """Out of the swarm (leaving, or refused by the tracker): close every link and forget
        every parent, so that no link still opening subscribes to one (`link_opened`); and stop
        every timer (a refused viewer's stall checks woke it every 1.8 s for nothing)."""
        self.primary = [None] * len(self.primary)
        for k in range(len(self.primary)):
            self.subs[5 * k] = _NO_PARENT
            self.subs[5 * k + 4] = -1.0
        self.backup = [None] * len(self.backup)
        self._clear_timers()
        for link in list(self.conns):
            self._close(link, reason, now)

    # -- links ---------------------------------------------------------------------------------

    def link_opened(self, link: Link, *, now: float, ref: Any = None) -> None:
        super().link_opened(link, now=now, ref=ref)
        conn = self.conns[link]
        if ref != TRACKER and (self.leaving or self.rejected):
            # Opened before we quit: a parent would count us as its child until we close it.
            if ref is not None:
                self._opened(ref)
            self._close(link, "leaving" if self.leaving else "rejected by the tracker", now)
            return
        if ref == TRACKER:
            self._contact = -1
            # (Also back after losing the tracker: we keep our links and subscriptions and say
            # where we sit (`_resume`); a restarted tracker puts us back there where it can, and
            # its Assigns move us, as any move does, where it cannot.)
            self.tracker_link = link
            self._out.append(Send(link, m.Join(self.channel, self.address, self.upload_kbps,
                                               self.coords, self._resume())))
        elif ref is not None:
            node_id = ref
            token = self._opened(node_id)
            self._name_conn(conn, node_id)
            conn.authorized = True  # the tracker sent us here: we trust what it vouched for
            conn.ours = True
            self._recheck_links = True
            self._out.append(Send(link, m.Hello(self.id, self.channel, token)))
            for k, slot in enumerate(self.primary):
                if slot is not None and slot.ref.id == node_id:
                    self._subscribe(link, k, slot)
            if node_id in self.neighbours:
                conn.neighbour = True
                self._send_have(conn)
            if node_id == self.seed_id and len(self.gaps):
                self._repair(now)

    def _resume(self) -> m.Resume | None:
        """Where we sit in the trees, for a tracker we come back to (None: we never had a
        place, or the mesh has no trees)."""
        if self.id == m.NO_PEER or self.mode != "tree":
            return None
        home = next((k for k in range(self.substreams) if self.relays >> k & 1), m.NO_PEER)
        # A token the tracker gave us proves our id: the seed's (renewed), else a backup's.
        contact = self.neighbours.get(self.seed_id)
        proof = contact[1] if contact is not None else next(
            (slot.token for slot in self.backup if slot is not None and slot.token is not None), None)
        return m.Resume(self.id, home, tuple(m.NO_REF if slot is None else slot.ref
                                             for slot in self.primary), proof, self._children())

    def open_failed(self, ref: Any, *, now: float, reason: str = "") -> None:
        if ref == TRACKER:
            if self._contact < 0 and not self.leaving:  # a rejoin: keep trying
                self._rejoin_later(now)
                return
            self._contact += 1
            if self._contact < FIRST_CONTACT_TRIES and not self.leaving:
                self._rejoin_later(now, first=self._contact == 1)
                self._out.append(Notice(f"tracker not answering ({reason}); trying again in about "
                                        f"{self._rejoin_delay:g} s ({self._contact} of "
                                        f"{FIRST_CONTACT_TRIES} tries failed)"))
                return
            self.rejected = f"tracker unreachable: {reason} ({self._contact} tries)"
            self._out.append(Notice(self.rejected))
            return
        self._opened(ref)
        self._peer_gone(ref, now, f"cannot connect: {reason}")

    def _opened(self, node_id: int) -> m.Token | None:
        """A link to `node_id` is open, or failed to: forget we were opening it."""
        token = self.opening.pop(node_id, None)
        if not self.opening:
            self.opening = {}  # an emptied dict keeps its grown table: 64 bytes, not ~230
        return token

    def _conn_lost(self, conn: Conn, now: float, reason: str) -> None:
        if self.leaving:
            return
        if conn.link == self.tracker_link:
            self.tracker_link = None
            if not self.rejected:
                self._out.append(Notice(f"lost the tracker ({reason}); still playing, rejoining"))
                self._rejoin_later(now, first=True)
            return
        ours = conn.ours
        if ours and conn.node_id == self.seed_id and HELLO_REFUSED in reason:
            # It refused our token (a restarted seed is a new node; an old token expired): no
            # pulls from it until the tracker sends its contact again, or every pull would open
            # a link to it anew, at network speed. A link lost otherwise (a network blip, an
            # idle time-out) leaves the contact be: the token is still good.
            self.neighbours.pop(conn.node_id, None)
            self._recheck_links = True
        for key in [key for key in self.rx if key[0] == conn.link]:
            rx = self.rx.pop(key)
            if rx is not None:
                self.receiving.pop(key[1], None)
                self._end_targets(rx.targets, key[1], False)
        if ours or self._link_to(conn.node_id) is None:
            # Not while our own link to it is up: the remote closed only the link it opened to
            # us (we are no longer its parent, `_close_unused`), it did not go away.
            self._peer_gone(conn.node_id, now, reason)

    def _peer_gone(self, node_id: int, now: float, reason: str) -> None:
        for k, slot in enumerate(self.primary):
            if slot is not None and slot.ref.id == node_id:
                self._switch(k, now, reason)
        for k, slot in enumerate(self.backup):
            if slot is not None and slot.ref.id == node_id:
                self.backup[k] = None
                self._recheck_links = True

    def _pop_conn(self, link: Link) -> Conn | None:
        self._uncache_link(link)
        return super()._pop_conn(link)

    def _name_conn(self, conn: Conn, node_id: int) -> None:
        self._uncache_link(conn.link)
        super()._name_conn(conn, node_id)

    def _uncache_link(self, link: Link) -> None:
        """`link` closes, or says who it is: no sub-stream's parent link in `subs` is it."""
        subs = self.subs
        for i in range(4, len(subs), 5):
            if subs[i] == float(link):
                subs[i] = -1.0

    def _link_to(self, node_id: int) -> Link | None:
        """Our link to `node_id` (one we opened), if it is up. A scan of our ~10 links, on
        control events only: cheaper than an index kept per peer (~300 bytes)."""
        for conn in self.conns.values():
            if conn.ours and conn.node_id == node_id:
                return conn.link
        return None

    def _connect(self, ref: m.PeerRef, token: m.Token | None) -> Link | None:
        """The link to `ref` if we have one; otherwise start opening it (returns None)."""
        link = self._link_to(ref.id)
        if link is None and ref.id not in self.opening:
            self.opening[ref.id] = token
            self._out.append(Open(ref.address, ref.id))
        return link

    # -- control messages ----------------------------------------------------------------------

    def _dispatch_other(self, conn: Conn, msg: m.Message, now: float) -> None:
        if conn.link == self.tracker_link:
            if isinstance(msg, m.Welcome):
                self._on_welcome(msg, now)
            elif isinstance(msg, m.Assign):
                self._on_assign(msg, now)
            elif isinstance(msg, m.Neighbours):
                self._on_neighbours(msg, now)
            elif isinstance(msg, m.Waiting):
                self._out.append(Notice(f"tracker: {msg.reason}"))
            elif isinstance(msg, m.Reject):
                # Refused or evicted: leave the swarm entirely, so no parent keeps counting us.
                self.rejected = msg.reason
                self._out.append(Notice(f"tracker: {msg.reason}"))
                self._quit(f"rejected by the tracker: {msg.reason}", now)
            else:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} from the tracker")
        elif isinstance(msg, m.Refuse):
            self._on_refuse(conn, msg, now)
        elif isinstance(msg, m.Missing):
            for seq in msg.seqs:
                req = self.requested.get(seq)
                if req is not None and req[0] == conn.link:
                    self._unrequest(seq)
                    self._pull([seq], now, exclude=req[2] | {conn.link})
                    if seq not in self.requested and self._gap_index(seq) >= 0:
                        # Nobody else to ask. A source refuses pulls while its queue is long,
                        # which recurs with every chunk it pushes: ask again at a random point
                        # of that cycle, not in step with it (a peer once asked the seed 40
                        # times, each just after the seed's next burst).
                        self._set_gap(seq, now + self.rng.uniform(0.0, self.chunk_s))
            self._schedule_repair(now)
        else:
            raise RemoteProtocolError(f"unexpected {type(msg).__name__} from a peer")

    def _on_welcome(self, msg: m.Welcome, now: float) -> None:
        if self.pinned_key is not None and msg.public_key != self.pinned_key:
            self.rejected = "the tracker's channel key differs from the pinned key"
            self._out.append(Notice(self.rejected))
            self._close(self.tracker_link, "channel key mismatch", now)  # type: ignore[arg-type]
            return
        rejoined = self.id != m.NO_PEER and (
            msg.channel, msg.public_key, msg.substreams, msg.chunk_ms, msg.bitrate_kbps, msg.mode
        ) == (self.channel, self.public_key, self.substreams, self.chunk_ms, self.bitrate_kbps,
              self.mode)
        self.id, self.seed_id = msg.node_id, msg.seed_id
        self._recheck_links = True
        if rejoined:  # the same stream from a (restarted) tracker: keep everything, go on playing
            self._tracker_key_is(msg.tracker_key, now)
            return
        self._configure(msg.channel, msg.public_key, msg.tracker_key, msg.substreams, msg.chunk_ms,
                        msg.bitrate_kbps, msg.mode)
        k = msg.substreams
        self.primary, self.backup = [None] * k, [None] * k
        self.relays = 0
        # Per-sub-stream numbers as a `vec`: unboxed like an `array` (and smaller), and a
        # compiled build (mypyc) reads and writes its items natively, not through Python.
        # (Built apart: mypyc 2.4 cannot make a `vec` of a repeated list literal.)
        subs: list[float] = [_NO_PARENT, -1.0, now, math.nan, -1.0] * k
        self.subs = vec[float](subs)
        if self.mode == "tree":
            self._set_timer("stall", now + self.stall_timeout)
        else:
            self._start_haves(now)

    def _on_assign(self, msg: m.Assign, now: float) -> None:
        k = msg.substream
        if k >= self.substreams:
            raise RemoteProtocolError(f"Assign for sub-stream {k} of {self.substreams}")
        old = self.primary[k]
        same = old is not None and old.ref.id == msg.parent.id
        if msg.token is None and not same:
            return  # a renewal for a parent we have left (our ParentLost is on its way)
        self.relays = self.relays | 1 << k if msg.relays else self.relays & ~(1 << k)
        self.backup[k] = Slot(msg.backup, msg.backup_token) if msg.backup and msg.backup_token else None
        self._recheck_links = True
        if old is not None and same:
            if old.token is not None and msg.token is not None:  # not subscribed yet: fresher
                old.token = msg.token
            return
        old_link = self._link_to(old.ref.id) if old is not None else None
        if old_link is not None:
            self._out.append(Send(old_link, m.Unsubscribe(k)))
        slot = Slot(msg.parent, msg.token)
        self._set_primary(k, slot)
        self.subs[5 * k + 2] = now
        if msg.parent.id in self.blocked:
            self._switch(k, now, "assigned a parent that sent forged data")
            return
        link = self._connect(msg.parent, msg.token)
        if link is not None:
            self._subscribe(link, k, slot)

    def _on_neighbours(self, msg: m.Neighbours, now: float) -> None:
        if msg.seed_id != self.seed_id and msg.seed_id != m.NO_PEER:  # the seed restarted
            self.neighbours.pop(self.seed_id, None)
            self.seed_id = msg.seed_id
            self._recheck_links = True
        for ref, token in zip(msg.peers, msg.tokens):
            if ref.id in self.blocked:
                continue
            self.neighbours[ref.id] = (ref, token)
            if token.parent == ref.id and self.mode == "mesh":
                link = self._connect(ref, token)
                if link is not None:
                    self.conns[link].neighbour = True
        # In tree mode the seed is the only one: the last resort for pulls, connected on demand.

    def _subscribe(self, link: Link, k: int, slot: Slot) -> None:
        token = slot.token
        if token is None:
            return  # subscribed already
        slot.token = None
        newest = int(self.subs[5 * k + 1])
        from_seq = newest + self.substreams if newest >= 0 else -1
        self._out.append(Send(link, m.Subscribe(k, token, from_seq, bool(self.relays >> k & 1))))

    def _on_refuse(self, conn: Conn, msg: m.Refuse, now: float) -> None:
        slot = self.primary[msg.substream] if msg.substream < self.substreams else None
        if slot is not None and slot.ref.id == conn.node_id:
            self._switch(msg.substream, now, f"refused: {msg.reason}")

    def _set_primary(self, k: int, slot: Slot | None) -> None:
        """Sub-stream k's parent is now `slot`'s (None: none)."""
        self.primary[k] = slot
        self.subs[5 * k] = float(slot.ref.id) if slot is not None else _NO_PARENT
        self.subs[5 * k + 4] = -1.0
        self._recheck_links = True

    def _switch(self, k: int, now: float, reason: str) -> None:
        """Parent of sub-stream k is gone: move to the backup now, then tell the tracker."""
        old = self.primary[k]
        if old is None:
            return
        backup = self.backup[k]
        self.backup[k] = None
        self._recheck_links = True
        self.subs[5 * k + 2] = now
        if backup is not None and backup.ref.id != old.ref.id and backup.ref.id not in self.blocked:
            self._set_primary(k, backup)
            link = self._connect(backup.ref, backup.token)
            if link is not None:
                self._subscribe(link, k, backup)
            switched = backup.ref.id
        else:
            self._set_primary(k, None)
            switched = m.NO_PEER
        if self.tracker_link is not None:
            self._out.append(Send(self.tracker_link, m.ParentLost(k, old.ref.id, switched)))

    # -- chunks in -----------------------------------------------------------------------------

    def chunk_begin(self, link: Link, head: m.ChunkHead, *, now: float) -> None:
        """A chunk stream opened on `link` and its head arrived."""
        sender = self._chunk_sender(link, head, now)
        if sender == NO_LINK:
            return
        seq = head.seq
        targets = self._relay_targets(sender, link, head, now)
        if targets is None:
            self._own_rx()[(link, seq)] = None  # duplicate or too late: swallow its bytes
            return
        self._own_rx()[(link, seq)] = Rx(head, targets, sender)
        self.receiving[seq] = link
        out = self._out
        for t in targets:
            out.append(ChunkBegin(t, head))

    def _own_rx(self) -> dict[tuple[Link, int], Rx | None]:
        """`rx` (and `receiving`), this node's own from the first chunk streamed in."""
        if self.rx is _NO_RX:
            self.rx, self.receiving = {}, {}
        return self.rx

    def chunk_data(self, link: Link, seq: int, data: bytes, *, now: float) -> None:
        """Payload bytes of chunk `seq` arrived on `link`: keep them and pass them on at once."""
        rx = self.rx.get((link, seq))
        if rx is None:
            return
        rx.parts.append(data)
        rx.got += len(data)
        if rx.got > rx.head.size:
            self.protocol_error(link, RemoteProtocolError(
                f"chunk {seq} longer than its declared {rx.head.size} bytes"), now=now)
            return
        out = self._out
        for t in rx.targets:
            out.append(ChunkBytes(t, seq, data))
        self.bytes_up += len(data) * len(rx.targets)

    def chunk_end(self, link: Link, seq: int, *, now: float, aborted: bool = False) -> None:
        """Chunk `seq` finished on `link` (or was aborted by the sender: upstream data was bad)."""
        key = (link, seq)
        if key not in self.rx:
            return
        rx = self.rx.pop(key)
        if rx is None:
            return
        del self.receiving[seq]
        payload = rx.parts[0] if len(rx.parts) == 1 else b"".join(rx.parts)
        self._complete(link, Chunk(rx.head, payload), rx.targets, rx.sender, aborted, now,
                       False)

    def chunk_received(self, link: Link, chunk: Chunk, *, now: float, aborted: bool = False) -> None:
        """A whole chunk arrived on `link` at once: `chunk_begin`, `chunk_data` and `chunk_end`
        back to back, except that the children get one `SendChunk` (the simulator's fast path)."""
        head, payload = chunk
        sender = self._chunk_sender(link, head, now)
        if sender == NO_LINK:
            return
        targets = self._relay_targets(sender, link, head, now)
        if targets is None:
            return
        if len(payload) > head.size:
            self.protocol_error(link, RemoteProtocolError(
                f"chunk {head.seq} longer than its declared {head.size} bytes"), now=now)
            return
        self.bytes_up += len(payload) * len(targets)
        self._complete(link, chunk, targets, sender, aborted, now, True)

    def _chunk_sender(self, link: Link, head: m.ChunkHead, now: float) -> int:
        """The link's remote node id if a chunk may start on it; `NO_LINK` if it may not (a bad
        head is a protocol error)."""
        # Nearly every chunk comes from its sub-stream's parent, over the link `subs` notes
        # (then its id is the parent's): no walk of the links' buffer, another cold read.
        k = 5 * (head.seq % self.substreams)
        subs = self.subs
        if k < len(subs) and subs[k + 4] == float(link):
            sender = int(subs[k])
        else:
            sender = self._sender(link)
            if sender == NO_LINK:
                return NO_LINK
            if k < len(subs) and subs[k] == float(sender):
                subs[k + 4] = float(link)
        if (head.channel != self.channel or head.size > m.MAX_CHUNK
                or (self.rx and (link, head.seq) in self.rx)):  # (rx: streamed chunks only)
            self.protocol_error(link, RemoteProtocolError(
                f"bad chunk head for {head.channel!r}/{head.seq}"), now=now)
            return NO_LINK
        return sender

    def _relay_targets(self, sender: int, link: Link, head: m.ChunkHead,
                       now: float) -> list[Link] | None:
        """The children a new chunk goes on to; None if we have it, are receiving it or it is
        too late (its bytes are ignored)."""
        seq = head.seq
        if (ring_has(self._ring, seq) or seq in self.receiving
                or (self.play_next is not None and seq < self.play_next)):
            return None
        k = seq % self.substreams
        subs = self.subs
        if 5 * k < len(subs) and subs[5 * k] == float(sender):
            subs[5 * k + 2] = now
        return self._push_targets(seq, but=link)

    def _complete(self, link: Link, chunk: Chunk, targets: list[Link], sender: int,
                  aborted: bool, now: float, whole: bool) -> None:
        """All of a chunk is here (or the sender aborted it): finish it for the children, then
        verify, keep and play it. `whole`: the children get it whole, in one `SendChunk`."""
        head, payload = chunk
        seq = head.seq
        end = chunk if whole else None
        if aborted:
            self._end_targets(targets, seq, False, end)
            self._note_gap(seq, now)
            return
        if len(payload) != head.size:
            self._end_targets(targets, seq, False, end)
            self.protocol_error(link, RemoteProtocolError(
                f"chunk {seq} ended after {len(payload)} of {head.size} bytes"), now=now)
            return
        if not self.crypto.verify_chunk(self.public_key, head, payload):
            self._end_targets(targets, seq, False, end)
            self._forged(link, sender, seq, now)
            return
        self._end_targets(targets, seq, True, end)
        self._accept(chunk, sender, now)

    def _end_targets(self, targets: list[Link], seq: int, ok: bool,
                     chunk: Chunk | None = None) -> None:
        """End chunk `seq`'s streams to `targets` (`ChunkEnd`), or send it whole if `chunk`
        (the effect keeps `targets`: nobody changes it afterwards)."""
        if chunk is None:
            out = self._out
            for t in targets:
                out.append(ChunkEnd(t, seq, ok))
        elif targets:
            self._out.append(SendChunk(targets, chunk, True, ok))

    def _forged(self, link: Link, who: int, seq: int, now: float) -> None:
        self.forged += 1
        self.blocked[who] = None
        self.neighbours.pop(who, None)
        self._recheck_links = True
        self._out.append(Notice(f"chunk {seq} from node {who} failed verification: cutting it off"))
        if self.tracker_link is not None:
            self._out.append(Send(self.tracker_link, m.Complaint(who, f"forged chunk {seq}")))
        self._close(link, f"forged chunk {seq}", now)
        self._note_gap(seq, now)

    def _accept(self, chunk: Chunk, sender: int, now: float) -> None:
        head = chunk.head
        seq = head.seq
        K = self.substreams
        k = seq % K
        if sender == self.seed_id:
            if self._from_seed is _NONE_FROM_SEED:
                self._from_seed = {}
            self._from_seed[seq] = None
        subs = self.subs
        previous: int = self.newest
        previous_k = int(subs[5 * k + 1])
        self._store(chunk)
        ring, window = self._ring, self.window
        if len(self.gaps):
            self._drop_gap(seq)
        if self.requested is not _NO_REQUESTS:
            self._unrequest(seq)
        if seq > previous_k:
            subs[5 * k + 1] = float(seq)
            if previous_k >= 0:
                # A parent pushes its sub-stream in order: what it skipped is lost, pull it now.
                s = max(previous_k + K, seq - window)
                while s < seq:  # (not a range: its step is not a constant, which compiles slowly)
                    if not ring_has(ring, s):
                        self._set_gap(s, now)
                    s += K
        if self.play_next is None or subs[5 * k] == float(sender):
            subs[5 * k + 3] = now - head.ts  # how late sub-stream k's own path delivers
        if previous >= 0 and seq > previous + 1:
            # Other sub-streams' chunks may just be slower: pull them once they are later than
            # their path usually delivers (or near their deadline: `_due`).
            chunk_s = self.chunk_s
            for s in range(max(previous + 1, seq - window), seq):
                if not ring_has(ring, s) and self._gap_index(s) < 0:
                    lag = subs[5 * (s % K) + 3]
                    self._set_gap(s, math.inf if math.isnan(lag)
                                  else head.ts + (s - seq) * chunk_s + lag + LATE_SLACK)
        if self.play_next is None:
            if head.rap and self._start_rap is None:
                self._start_rap = (seq, now, now - head.ts)
                self._set_timer("start", now + START_WAIT)
            self._try_start(now)
        self._release(now)
        self._schedule_repair(now)

    def _try_start(self, now: float) -> None:
        """Start playback at the first random-access chunk once every sub-stream has delivered
        something (or `START_WAIT` has passed), with deadlines that allow for the slowest
        sub-stream's path rather than the luck of whichever arrived first.

        Sub-stream k's path (its latest delay: arrival − seed timestamp) is slower or faster
        than the random-access chunk's: a difference of two such figures is independent of any
        offset between our clock and the seed's.
        """
        if self._start_rap is None or self.play_next is not None:
            return
        r, t_r, lat_r = self._start_rap
        subs = self.subs
        lats = [subs[i] for i in range(3, len(subs), 5)]
        if now < t_r + START_WAIT and any(math.isnan(lat) for lat in lats):
            return
        spread = max(lat for lat in lats if not math.isnan(lat)) - lat_r
        self.play_next, self.play_s0 = r, r
        self.play_t0 = max(now, t_r + spread)
        self.first_play = now
        self._start_rap = None  # done with (playback never restarts)
        self._cancel_timer("start")

    def _note_gap(self, seq: int, now: float) -> None:
        if not ring_has(self._ring, seq):
            self._set_gap(seq, now)
            self._schedule_repair(now)

    # -- playback ------------------------------------------------------------------------------

    def deadline(self, seq: int) -> float:
        return self.play_t0 + (seq - self.play_s0) * self.chunk_s + self.playout_delay

    def _release(self, now: float) -> None:
        play_next = self.play_next
        if play_next is None:
            return
        seq: int = play_next  # (an int, not an Optional: compiled, its arithmetic is native)
        out, ring, from_seed_set = self._out, self._ring, self._from_seed
        while True:
            entry = ring_get(ring, seq)
            if entry is not None:
                head, payload = entry
                from_seed = seq in from_seed_set
                if from_seed:
                    del from_seed_set[seq]
                    self.bytes_from_seed += head.size
                else:
                    self.bytes_from_peers += head.size
                latency = now - head.ts
                on_time = now <= self.deadline(seq) + ON_TIME_SLACK
                out.append(Deliver(head, payload, latency, from_seed, on_time))
                self.delivered += 1
                self.latency_sum += latency
                if not on_time:
                    self.late += 1
            elif seq > self.newest:
                break
            elif now >= self.deadline(seq):
                out.append(Skip(seq))
                self.skipped += 1
                from_seed_set.pop(seq, None)
                self._drop_gap(seq)
                self._unrequest(seq)
            else:
                self._set_fast(_PLAY, self.deadline(seq))
                break
            seq += 1
        self.play_next = seq

    # -- repair --------------------------------------------------------------------------------

    def _due(self, seq: int, explicit: float) -> float:
        """When a missing chunk must be pulled: when known lost, or `repair_margin` before its
        playback deadline, whichever is first."""
        if self.play_next is None:
            return explicit
        return min(explicit, self.deadline(seq) - self.playout_delay * REPAIR_MARGIN)

    def _gap_index(self, seq: int) -> int:
        """Where chunk `seq` is in `gaps` (-1: not missing)."""
        return pair_index(self.gaps, float(seq))

    def _set_gap(self, seq: int, when: float) -> None:
        """Note chunk `seq` missing, to pull at `when` (a gap noted already keeps its place)."""
        i = self._gap_index(seq)
        if i >= 0:
            self.gaps[i + 1] = when
        else:
            self.gaps = append(append(self.gaps, float(seq)), when)

    def _drop_gap(self, seq: int) -> None:
        i = self._gap_index(seq)
        if i >= 0:
            gaps, _ = pop(self.gaps, i)
            self.gaps, _ = pop(gaps, i)

    def _schedule_repair(self, now: float) -> None:
        gaps = self.gaps
        if self.mode != "tree":
            return
        if not len(gaps):
            # Nothing left to repair: a timer left set would wake us for nothing (nine in ten
            # repair wakes of a steady run); pulls in flight have their own "timeout".
            self._cancel_fast(_REPAIR)
            return
        # Deadlines grow with seq, so the earliest due time is the earliest explicit one or the
        # lowest seq's deadline-based one.
        requested, receiving = self.requested, self.receiving
        explicit, first = math.inf, -1  # (-1: none; an int, not an Optional, is native compiled)
        for i in range(0, len(gaps), 2):
            seq = int(gaps[i])
            t = gaps[i + 1]
            if seq not in requested and seq not in receiving:
                if t < explicit:
                    explicit = t
                if first < 0 or seq < first:
                    first = seq
        if first < 0:
            return
        due = self._due(first, explicit)
        if due < math.inf:
            self._set_fast(_REPAIR, max(due, now + 0.05))

    def _repair(self, now: float) -> None:
        due = []
        gaps = self.gaps
        for seq, explicit in [(int(gaps[i]), gaps[i + 1]) for i in range(0, len(gaps), 2)]:
            if (self.play_next is not None and seq < self.play_next) or self.has(seq):
                self._drop_gap(seq)
            elif (self._due(seq, explicit) <= now and seq not in self.requested
                  and seq not in self.receiving):
                due.append(seq)
        for seq, (link, sent, _) in list(self.requested.items()):
            if sent + REQUEST_TIMEOUT <= now:
                self._unrequest(seq)
                if not self.has(seq) and seq not in self.receiving:
                    due.append(seq)
        if due and self.play_next is not None:
            self._pull(sorted(due), now)
        self._arm_request_timeout()
        self._schedule_repair(now)

    def _sources(self, seq: int, exclude: Set[Link]) -> list[Link]:
        """Where to pull `seq` from, best first."""
        k = seq % self.substreams
        # Our parents in the other trees (they have the whole stream; the seed is asked last).
        others = ({s.ref.id for j, s in enumerate(self.primary) if s is not None and j != k}
                  if self.mode == "tree" else ())
        have, other = [], []
        for conn in self.conns.values():
            if conn.link in exclude or conn.link == self.tracker_link or not conn.node_id >= 0:
                continue
            if conn.node_id in self.blocked:
                continue
            if conn.have is not None:
                base, bits = conn.have
                if seq >= base and (bits >> (seq - base)) & 1:
                    have.append(conn.link)
                    continue
            if conn.node_id in others and conn.node_id != self.seed_id:
                other.append(conn.link)
        self.rng.shuffle(have)
        self.rng.shuffle(other)
        return have + other

    def _pull(self, seqs: list[int], now: float, exclude: Set[Link] = frozenset()) -> None:
        batches: dict[Link, list[int]] = {}
        busy = self._busy()
        seed_wanted = []
        for seq in seqs:
            if self.has(seq) or seq in self.requested:
                continue
            # The least busy source, so that repair load spreads instead of piling on one.
            sources = [s for s in self._sources(seq, exclude) if busy.get(s, 0) < PULL_WINDOW]
            if sources:
                link = min(sources, key=lambda s: busy.get(s, 0))
                busy[link] = busy.get(link, 0) + 1
                batches.setdefault(link, []).append(seq)
                self._request(seq, link, now, set(exclude) | {link})
            else:
                seed_wanted.append(seq)
        if seed_wanted and self.seed_id in self.neighbours and self.seed_id not in self.blocked:
            ref, token = self.neighbours[self.seed_id]
            seed_link = self._connect(ref, token)
            if seed_link is not None and seed_link not in exclude:
                for seq in seed_wanted:
                    batches.setdefault(seed_link, []).append(seq)
                    self._request(seq, seed_link, now, set(exclude) | {seed_link})
        self._send_requests(batches)

    def _request(self, seq: int, link: Link, now: float, asked: set[Link]) -> None:
        """Note chunk `seq` pulled over `link` at `now` (`asked`: links not to ask again)."""
        if self.requested is _NO_REQUESTS:
            self.requested = {}
        self.requested[seq] = (link, now, asked)

    def _unrequest(self, seq: int) -> None:
        """Chunk `seq` is no longer pulled (if it was); none left: back to `_NO_REQUESTS`."""
        requested = self.requested
        if seq in requested:
            del requested[seq]
            if not requested:
                self.requested = _NO_REQUESTS

    def _busy(self) -> dict[Link, int]:
        """Pulls in flight per source."""
        busy: dict[Link, int] = {}
        for link, _, _ in self.requested.values():
            busy[link] = busy.get(link, 0) + 1
        return busy

    def _send_requests(self, batches: dict[Link, list[int]]) -> None:
        """One `Request` per source (split at the wire's 64-seq limit); arm the time-out."""
        for link, lst in batches.items():
            for i in range(0, len(lst), 64):
                self._out.append(Send(link, m.Request(tuple(lst[i:i + 64]))))
        self._arm_request_timeout()

    def _arm_request_timeout(self) -> None:
        if self.requested:
            self._set_timer("timeout", min(r[1] for r in self.requested.values()) + REQUEST_TIMEOUT)

    # -- mesh mode: have-map driven pulls ---------------------------------------------------------

    def _on_have(self, conn: Conn, msg: m.Have, now: float) -> None:
        super()._on_have(conn, msg, now)
        if self.mode == "mesh":
            self._mesh_schedule(now)

    def _mesh_schedule(self, now: float) -> None:
        """CoolStreaming-style: ask for each wanted chunk a neighbour that has it, least busy first."""
        known = max((c.have[0] + c.have[1].bit_length() - 1 for c in self.conns.values()
                     if c.have is not None and c.have[1]), default=-1)
        if known < 0:
            return
        if self.play_next is None:
            lo = max(0, known - 2 * self.substreams, self.newest + 1 if self.newest >= 0 else 0)
        else:
            lo = self.play_next
        busy = self._busy()
        # The neighbours that could still take a request, in link order (ties go to the first).
        sources = [c for c in self.conns.values() if c.have is not None
                   and c.node_id not in self.blocked and busy.get(c.link, 0) < MESH_OUTSTANDING]
        batches: dict[Link, list[int]] = {}
        for seq in range(lo, known + 1):
            if not sources:
                break  # every neighbour has its fill of requests: the rest waits for answers
            if self.has(seq) or seq in self.requested or seq in self.receiving:
                continue
            best: Conn | None = None
            best_busy = MESH_OUTSTANDING
            for conn in sources:
                base, bits = conn.have  # type: ignore[misc]  # (None filtered out above)
                if seq >= base and (bits >> (seq - base)) & 1:
                    b = busy.get(conn.link, 0)
                    if b < best_busy:
                        best, best_busy = conn, b
            if best is not None:
                busy[best.link] = best_busy + 1
                batches.setdefault(best.link, []).append(seq)
                self._request(seq, best.link, now, {best.link})
                if best_busy + 1 >= MESH_OUTSTANDING:
                    sources.remove(best)
        self._send_requests(batches)

    # -- timers --------------------------------------------------------------------------------

    def _rejoin_later(self, now: float, first: bool = False) -> None:
        """Try the tracker again: `REJOIN_S` after losing it, doubling per failed try up to
        `REJOIN_MAX_S`, each ±50 % at random."""
        delay = REJOIN_S if first else min(REJOIN_MAX_S, 2 * self._rejoin_delay)
        self._rejoin_delay = delay
        self._set_timer("rejoin", now + delay * self.rng.uniform(0.5, 1.5))

    def _on_timer(self, key: Any, now: float) -> None:
        if not isinstance(key, str):  # (then compiled, the comparisons below are str ones)
            super()._on_timer(key, now)
        elif key == "play":
            self._release(now)
            self._schedule_repair(now)
        elif key == "rejoin":
            if self.tracker_link is None and not self.rejected and not self.leaving:
                self._out.append(Open(self.tracker, TRACKER))
        elif key == "start":
            self._try_start(now)
            self._release(now)
        elif key == "repair" or key == "timeout":
            self._repair(now)
            if self.mode == "mesh":
                self._mesh_schedule(now)
        elif key == "stall":
            self._check_stalls(now)
            self._close_unused(now)
            self._set_timer("stall", now + self.stall_timeout / 2)
        elif key == "have":
            super()._on_timer(key, now)
            self._mesh_schedule(now)
        else:
            super()._on_timer(key, now)

    def _close_unused(self, now: float) -> None:
        """Close the links we opened to peers that are no longer a parent or backup of ours
        (a parent the tracker moved us away from), once nothing is in flight on them.

        Each end frees its side; in the runtime an idle QUIC link would otherwise exchange
        keep-alive PINGs for the rest of the session. The seed and mesh neighbours stay."""
        # (Loops, not set and list comprehensions: every peer does this every few seconds,
        # and nearly always finds nothing to close.)
        if not self._recheck_links:
            return
        unused: list[Conn] = []
        seed_id, neighbours = self.seed_id, self.neighbours
        for conn in self.conns.values():
            node_id = conn.node_id
            if (conn.ours and node_id != seed_id and node_id not in neighbours
                    and not self._is_parent(node_id)):
                unused.append(conn)
        if not unused:
            self._recheck_links = False
            return
        busy: set[Link] = set()
        for r in self.requested.values():
            busy.add(r[0])
        for key in self.rx:
            busy.add(key[0])
        for conn in unused:
            if conn.link not in busy:
                self._close(conn.link, "no longer a parent", now)

    def _is_parent(self, node_id: int) -> bool:
        """`node_id` is a parent or a backup of ours, for some sub-stream."""
        for slot in self.primary:
            if slot is not None and slot.ref.id == node_id:
                return True
        for slot in self.backup:
            if slot is not None and slot.ref.id == node_id:
                return True
        return False

    def _check_stalls(self, now: float) -> None:
        """A parent that stopped sending while the stream went on is as good as gone.

        "Went on" is judged by sequence numbers, not time: other sub-streams delivered chunks
        at least three rounds newer. When the source pauses or ends, nobody is blamed.
        """
        newest, K = self.newest, self.substreams
        for k, slot in enumerate(self.primary):
            subs = self.subs
            if (slot is not None and now - subs[5 * k + 2] >= self.stall_timeout
                    and newest - int(subs[5 * k + 1]) >= 3 * K):
                link = self._link_to(slot.ref.id)
                if link is not None:
                    self._out.append(Send(link, m.Unsubscribe(k)))
                self._switch(k, now, "stalled")

    def _report_slow(self, conn: Conn, now: float) -> None:
        if self.tracker_link is not None:
            self._out.append(Send(self.tracker_link, m.Complaint(conn.node_id, "cannot keep up", "slow")))

    # -- for operators -------------------------------------------------------------------------

    @property
    def offload(self) -> float:
        total = self.bytes_from_seed + self.bytes_from_peers
        return self.bytes_from_peers / total if total else 0.0
