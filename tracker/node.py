"""TrackerNode: admits seeds and viewers, builds and repairs each channel's push trees (sans-IO).

The "Usher": for every channel it owns the forest of K sub-stream trees. On `Join` it places
the newcomer under one parent per sub-stream (the pluggable strategy decides which) with a
backup ready, and hands out tokens it signed so that parents accept only the children the
tracker gave them. On a departure (graceful `Leave`, a closed link, or an eviction) it re-homes
the orphans at once — to the backup each orphan has already switched to when that has room.
It never oversubscribes: when no member and not the seed has a free slot, the channel is first
stretched (parents may then use `STRETCH_HEADROOM` of their upload instead of `HEADROOM`), and
only when that is used up too does a newcomer get a `Reject` that says so. A `Join` for a channel
that is not live yet is held (`Waiting`) and placed when its seed announces it. A restarted
tracker takes over the trees its nodes come back with (`Resume`, each id proven by a token of the
old tracker's, whose key the seed passes on): old ids and parents where they fit, so a restart
moves nobody; each parent's slots are kept for the children it says it feeds until they are
back, and a newcomer that finds no other room waits for one.
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Any

from meshcast import messages as m
from meshcast.crypto import Crypto
from meshcast.effects import Close, Effect, Link, Notice, Send
from meshcast.errors import RemoteProtocolError
from meshcast.node import NodeBase
from meshcast.policy import HEADROOM as HEADROOM_FACTOR
from meshcast.policy import STRETCH_HEADROOM, child_slots
from tracker.forest import Forest, Member
from tracker.placement import CANDIDATES, TreePlacement, make_strategy, relay_cap

TOKEN_LIFETIME = 600.0
"""Seconds a token stays valid (a backup token must still be good when the backup is needed)."""
MESH_NEIGHBOURS = 6
JOIN_HOLD_S = 300.0
"""Default for how long the tracker holds a viewer's `Join` for a channel that is not live (its
seed has not announced it yet, or is reconnecting) before rejecting it: viewers who arrive
before the broadcast starts are placed the moment it does, with no retry storm at go-live."""
MAX_WAITING = 100_000
"""Joins held at once, over all channels: beyond, a `Join` for a channel that is not live is
rejected at once (each held join keeps its link and its message)."""
RETRY_S = 1.0
"""How long a member waits before the tracker hands it back, once more, a parent it keeps
losing (see `_on_parent_lost`)."""
RESUME_WINDOW_S = 60.0
"""For this long after a tracker starts, nodes coming back from a predecessor's trees (a `Join`
with a `Resume`, an `Announce` with a `resume_id`) get their old id and their old parents back,
where those have room: the trees that carried the stream while no tracker ran are adopted, not
rebuilt, so nobody moves. Later, such a claim counts for nothing (a newcomer's join) — unless
claims are still being honoured (`RESUME_QUIET_S`)."""
RESUME_QUIET_S = 30.0
"""... the window stays open until this long after the last claim honoured: a tracker that
takes longer than `RESUME_WINDOW_S` to get through its returning audience (a big one: ~0.4 ms of
CPU each: bench/tracker_churn.py --restart) does not place anew those it reaches last."""
RESUME_WAIT_S = 45.0
"""How long a resumed viewer's place in a tree waits for its parent there to come back too;
then it is placed as a newcomer would be (a move). Waiting costs nothing: the viewer plays from
that parent meanwhile, and reports it (`ParentLost`) if it dies. So it is the longest a live
parent may take: a viewer retries a lost tracker at most 30 s apart, ±50 %. For as long, a
resumed parent's slots are kept for the children it feeds that are not back yet."""
PLACE_SLICE = 100
"""Held joins placed per turn when a channel goes live (a premiere's audience, a restarted
tracker's). Each takes ~1.3 ms of a real tracker process's CPU (deciding, one signature for
its tokens, ~8 messages: bench/tracker_fronts.py), so a slice is ~0.13 s, and between slices
the tracker answers everything else, heartbeats among it: a 10k audience placed in one go would
keep the process busy ~13 s, past links' 3 s idle time-out."""
PLACE_TURN_S = 0.001
"""The next slice is due this much later (a timer due at once would fire in the same call)."""
REFRESH_SLICE = 2000
"""Members told of a restarted seed per turn (`Neighbours`, one token each: ~0.07 ms, so a
turn is ~0.1 s too)."""
_ID_BLOCK = 1 << 20
"""The ids a tracker gives out start at a block of this size chosen by its key."""


class Channel:
    __slots__ = ("name", "public_key", "bitrate_kbps", "substreams", "chunk_ms", "forest",
                 "seed_link", "banned", "headroom", "refused", "evicted", "resumed",
                 "former_key", "renew_at", "renewing", "renew_per_tick", "refresh")

    def __init__(self, name: str, public_key: bytes, bitrate_kbps: int, substreams: int,
                 chunk_ms: int, relay_fanout: int = 0) -> None:
        self.name, self.public_key = name, public_key
        self.bitrate_kbps, self.substreams, self.chunk_ms = bitrate_kbps, substreams, chunk_ms
        self.forest = Forest(substreams, relay_fanout)
        self.seed_link: Link | None = None
        self.banned: set[str] = set()
        self.headroom = HEADROOM_FACTOR
        """Share of each member's upload its slots use: `STRETCH_HEADROOM` once it ran out."""
        self.refused = 0
        """Viewers turned away for lack of upload capacity."""
        self.evicted = 0
        """Members sent away: reported for forged chunks, or no room left after a departure."""
        self.resumed = 0
        """Nodes back from a former tracker's trees that got their old id (and place) back."""
        self.former_key = b""
        """The key of the tracker the seed came back from: a viewer's claim to an id there needs
        a token it signed for that id (b"": none can be proven)."""
        self.renew_at = math.inf
        """When the next sweep renewing its members' tokens starts (`TrackerNode._renew`)."""
        self.refresh: list[int] = []
        """Members still to be told of a restarted seed, the last first (`_refresh_slice`)."""
        self.renewing: list[int] = []
        """Members the current sweep has still to renew, the next one last."""
        self.renew_per_tick = 0

    def slots(self, upload_kbps: int) -> int:
        return child_slots(upload_kbps, self.bitrate_kbps, self.substreams, self.headroom)


class TrackerNode(NodeBase):
    """The topology owner. One instance serves many channels."""

    def __init__(self, *, key: Any, crypto: Crypto, rng: random.Random,
                 strategy: str = "tree", hold_s: float = JOIN_HOLD_S,
                 id_block: int | None = None) -> None:
        """`hold_s`: how long a `Join` for a channel that is not live is held (0: refused at
        once). `id_block`: which block of ids it gives out (default: one its key picks); a
        tracker that keeps its key across restarts needs another one each time."""
        super().__init__()
        self.key = key
        self.crypto = crypto
        self.rng = rng
        self.strategy: TreePlacement = make_strategy(strategy, rng)
        self.channels: dict[str, Channel] = {}
        self.links: dict[Link, tuple[Channel, Member] | None] = {}
        if id_block is None:
            id_block = int.from_bytes(key.public[-3:], "big")
        self._next_id = self._id_base = 1 + (id_block % (1 << 24) << 20)
        """Ids start from where this tracker's key (or `id_block`) says: a restarted tracker
        gives out ids its predecessor did not, so the ids it hands back to resumed nodes (its
        predecessor's) never clash with its own, and a viewer it places anew keeps its links to
        the old trees (named by old ids) while it moves."""
        self._born: float | None = None
        """When the first node reached this tracker."""
        self._resume_until = 0.0
        """Resume claims count until then: `RESUME_WINDOW_S` after `_born`, or `RESUME_QUIET_S`
        after the last one honoured, whichever is later."""
        self._foreign_ids = False
        """Some member has an id this tracker did not give out (a resumed one)."""
        self._adopting: dict[tuple[str, int, int], list[tuple[int, str]]] = {}
        """(channel, parent id, sub-stream) → resumed members (id, the parent's address they
        gave) whose place in that tree waits for that parent to come back."""
        self._adopt_until: deque[tuple[float, str, int, bool]] = deque()
        """(when, channel, member id, whether it waits for parents): when a resumed member stops
        waiting for its parents, and the slots it kept for its children go back."""
        self.evictions = 0
        self.rejections = 0
        self._joining: Member | None = None
        """The viewer being placed by `_on_join`: its Assigns wait in `_held` until it has a
        parent in every tree, so a refused viewer never holds a token."""
        self._unholding = False
        """Set while held joins are taken again (`_place_held`: not re-entered)."""
        self._rehold = False
        """... and it is the newcomers waiting for slots: one that waits on is not told again."""
        self._placing: dict[str, None] = {}
        """Channels that went live with more held joins than a slice (`PLACE_SLICE`): the rest
        are placed at the next turn ("place" timer); a join meanwhile waits behind them."""
        self._held: list[Send] = []
        self.rejoins = 0
        """Held joins taken again (`_place_held`): a join's work each, that no message of its
        own brought (the simulator charges it; it may reset the count)."""
        self._unsigned = False
        """Some token issued since the last `drain` (unsigned until then)."""
        self._handed_back: dict[tuple[int, int], float] = {}
        """(member id, sub-stream) → when the tracker last gave a member back the parent it
        had just reported lost, for want of any other."""
        self._retry: deque[tuple[float, str, int, int]] = deque()
        """Placements put off by `RETRY_S`: (when, channel, member id, sub-stream), in order."""
        self.hold_s = hold_s
        self.waiting: dict[str, dict[Link, m.Join]] = {}
        """Channel → the joins held until it goes live, by link, in arrival order."""
        self._waiting_on: dict[Link, str] = {}
        """Link → the channel its held join waits for."""
        self._hold_until: deque[tuple[float, Link]] = deque()
        """(when, link): each held join's deadline, in order (stale once the join left)."""

    # -- links ---------------------------------------------------------------------------------

    def link_opened(self, link: Link, *, now: float, ref: Any = None) -> None:
        self.links[link] = None
        if self._born is None:
            self._born = now
            self._resume_until = now + RESUME_WINDOW_S

    def link_closed(self, link: Link, *, now: float, reason: str = "") -> None:
        entry = self.links.pop(link, None)
        if entry is not None:
            self._remove(entry[0], entry[1], now)
            self._place_held(entry[0], now)  # (its slots, kept ones included, are free)
        elif link in self._waiting_on:
            self._unhold(link)

    def protocol_error(self, link: Link, error: RemoteProtocolError, *, now: float) -> None:
        self._out.append(Notice(f"closing link {link}: {error}"))
        self._drop_link(link, f"protocol error: {error}", now)

    def _drop_link(self, link: Link, reason: str, now: float) -> None:
        self._out.append(Close(link, reason))
        self.link_closed(link, now=now)

    # -- messages ------------------------------------------------------------------------------

    def handle(self, link: Link, msg: m.Message, *, now: float) -> None:
        if link not in self.links:
            return
        entry = self.links[link]
        try:
            if isinstance(msg, m.Announce):
                self._on_announce(link, msg, now)
            elif isinstance(msg, m.Join):
                self._on_join(link, msg, now)
            elif isinstance(msg, m.Leave):  # a held viewer may give up waiting, too
                self._drop_link(link, "bye", now)
            elif entry is None:
                raise RemoteProtocolError(f"{type(msg).__name__} before Join or Announce")
            elif isinstance(msg, m.ParentLost):
                self._on_parent_lost(entry[0], entry[1], msg, now)
            elif isinstance(msg, m.Complaint):
                self._on_complaint(entry[0], entry[1], msg, now)
            else:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} at the tracker")
        except RemoteProtocolError as exc:
            self.protocol_error(link, exc, now=now)

    def _new_id(self) -> int:
        nid = self._next_id
        while self._foreign_ids and any(nid in ch.forest.members for ch in self.channels.values()):
            nid += 1  # a resumed node has it (past our first block: a million ids later)
        self._next_id = nid + 1
        return nid

    def _resuming(self, now: float) -> bool:
        return self._born is not None and now < self._resume_until

    def _claimable(self, ch: Channel, claimed: int, now: float) -> bool:
        """May `claimed` (a node's id at our predecessor) be given back to it?"""
        return (claimed >= 1 and self._resuming(now) and claimed not in ch.forest.members
                and not self._id_base <= claimed < self._id_base + _ID_BLOCK)

    def _proven(self, ch: Channel, resume: m.Resume, now: float) -> bool:
        """Does the viewer hold a token our predecessor signed for the id it claims? Its key
        is the one the seed passed on, or our own if we kept it (`meshcast tracker --key`):
        then a viewer proves its id even when the seed restarted too."""
        proof = resume.proof
        if not (proof is not None and proof.child == resume.node_id
                and proof.channel == ch.name and proof.expires >= now):
            return False
        own = self.key.public
        return ((ch.former_key != b"" and self.crypto.token_valid(ch.former_key, proof))
                or (ch.former_key != own and self.crypto.token_valid(own, proof)))

    def _resumed(self, ch: Channel, claimed: int, now: float) -> int:
        self._foreign_ids = True
        self._resume_until = max(self._resume_until, now + RESUME_QUIET_S)
        ch.resumed += 1
        if ch.resumed == 1:
            self._out.append(Notice(f"channel {ch.name!r}: taking over the trees its nodes come "
                                    f"back with (a tracker restart)"))
        return claimed

    def _welcome(self, ch: Channel, member: Member) -> m.Welcome:
        return m.Welcome(member.id, ch.name, ch.public_key, self.key.public, ch.substreams,
                         ch.chunk_ms, ch.bitrate_kbps, self.strategy.mode,
                         ch.forest.seed.id if ch.forest.seed else m.NO_PEER)

    def _on_announce(self, link: Link, msg: m.Announce, now: float) -> None:
        if self.links[link] is not None or link in self._waiting_on:
            raise RemoteProtocolError("second Announce (or Join) on one link")
        if not self.crypto.announce_valid(msg.public_key, msg.channel, msg.address, msg.proof):
            raise RemoteProtocolError("Announce proof does not match the channel key")
        ch = self.channels.get(msg.channel)
        if ch is not None and ch.public_key != msg.public_key:
            self._out.append(Send(link, m.Reject(f"channel {msg.channel!r} belongs to another key")))
            self._drop_link(link, "channel taken", now)
            return
        slots = child_slots(msg.upload_kbps, msg.bitrate_kbps, msg.substreams)
        if slots < msg.substreams:
            need = math.ceil(msg.bitrate_kbps / HEADROOM_FACTOR)
            self._reject(link, f"seed upload {msg.upload_kbps} kbps cannot carry one copy of a "
                               f"{msg.bitrate_kbps} kbps stream: give it at least {need} kbps", now)
            return
        if ch is None:
            ch = self.channels[msg.channel] = Channel(msg.channel, msg.public_key, msg.bitrate_kbps,
                                                      msg.substreams, msg.chunk_ms,
                                                      self.strategy.relay_fanout)
            ch.renew_at = now + TOKEN_LIFETIME / 2
            renew = self.timer_at("renew")
            if renew is None or ch.renew_at < renew:
                self._set_timer("renew", ch.renew_at)
        elif ch.seed_link is not None and ch.seed_link in self.links:
            self._drop_link(ch.seed_link, "replaced by a new seed connection", now)
        ch.bitrate_kbps, ch.chunk_ms = msg.bitrate_kbps, msg.chunk_ms
        # A seed proves who it is with the channel key: its old id back, and with it the key
        # its viewers' claims are checked against.
        resumed = self._claimable(ch, msg.resume_id, now)
        if resumed:
            ch.former_key = msg.resume_key
        seed = Member(self._resumed(ch, msg.resume_id, now) if resumed else self._new_id(), link,
                      msg.address, msg.upload_kbps, ch.slots(msg.upload_kbps), (), now,
                      ch.substreams, is_seed=True)
        ch.forest.add(seed)
        ch.seed_link = link
        self.links[link] = (ch, seed)
        self._out.append(Send(link, self._welcome(ch, seed)))
        if resumed:
            self._hold_for_children(ch, seed, msg.resume_children, False, now)
        self._adopt_children(ch, seed, now)
        # Members from before a seed restart: those it orphaned hang off nothing: place them
        # again, now. The new seed is everyone's last-resort source (it is a new node): the
        # others hear of it a slice at a time, the tracker answering others in between.
        ch.refresh = []
        for member in list(ch.forest.members.values()):
            if member is seed:
                continue
            if m.NO_PEER in member.parent:
                self._send_neighbours(ch, member, now, peers=[])
                for k in range(ch.substreams):
                    if member.parent[k] == m.NO_PEER:
                        self._place(ch, member, k, now)
            else:
                ch.refresh.append(member.id)
        ch.refresh.reverse()  # in the order they joined
        self._refresh_slice(ch, now)
        # Viewers who came before the broadcast: in the order they came. After a restart those
        # coming back are among them, and a newcomer may have to wait on for their kept slots.
        self._place_held(ch, now, everyone=True)
        self._place_held(ch, now)

    def _on_join(self, link: Link, msg: m.Join, now: float) -> None:
        if self.links[link] is not None or link in self._waiting_on:
            raise RemoteProtocolError("second Join on one link")
        ch = self.channels.get(msg.channel)
        if ch is None or ch.forest.seed is None:
            self._hold(link, msg, now)
            return
        if ch.name in self._placing:  # behind those who came first, in the order they came
            self._hold(link, msg, now, notify=False)
            return
        if msg.address and msg.address in ch.banned:
            self._reject(link, "evicted from this channel", now)
            return
        resume = msg.resume
        if (resume is not None and self.strategy.mode == "tree"
                and self._claimable(ch, resume.node_id, now) and self._proven(ch, resume, now)):
            self._on_resume(link, ch, msg, resume, now)
            return
        wait = self.hold_s > 0 and bool(ch.forest.holding)
        if wait and not self._room_for_newcomer(ch):
            self._wait_for_slots(link, msg, now)
            return
        member = self._admit(link, ch, msg, self._new_id(), now, welcome=False)
        # All or nothing: the newcomer's Welcome and Assigns (and their tokens) go out only once
        # every tree has room for it. Moves of other members (push-down) are real either way
        # and go now.
        self._joining, held = member, self._held
        try:
            for k in range(ch.substreams if self.strategy.mode == "tree" else 0):
                if not self._place(ch, member, k, now):
                    self._joining = None  # from here on, moves are other members' and real
                    held.clear()
                    self.links[link] = None
                    self._remove(ch, member, now)  # re-homes anyone it adopted in earlier trees
                    if wait:
                        self._wait_for_slots(link, msg, now)
                        return
                    ch.refused += 1
                    self._reject(link, "channel full: no upload capacity left for a new viewer", now)
                    return
        finally:
            self._joining = None
        self._out.append(Send(link, self._welcome(ch, member)))
        self._out.extend(held)
        held.clear()
        self._send_neighbours(ch, member, now)

    def _wait_for_slots(self, link: Link, msg: m.Join, now: float) -> None:
        self._hold(link, msg, now, f"channel {msg.channel!r} is full until its viewers are back "
                                   f"from a tracker restart: waiting for a slot",
                   notify=not self._rehold)

    def _room_for_newcomer(self, ch: Channel) -> bool:
        """While slots are kept for children coming back (`_hold_for_children`): do the others
        add up to one per tree? If not (or if placement finds no room in some tree), a newcomer
        waits for its slots (`_place_held`) rather than take kept ones, whose owners are
        then refused ("no capacity"): at 800 viewers that overloaded the seed, its old
        children and the newcomers together."""
        forest = ch.forest
        if not forest.holding:
            return True
        free = 0
        for mid in forest.spare:
            free += forest.members[mid].free
            if free >= ch.substreams:
                return True
        return False

    def _refresh_slice(self, ch: Channel, now: float) -> None:
        """Tell the next `REFRESH_SLICE` members of `ch.refresh` their new seed; the rest
        at the next turn."""
        members, refresh = ch.forest.members, ch.refresh
        for _ in range(min(REFRESH_SLICE, len(refresh))):
            member = members.get(refresh.pop())
            if member is not None:
                self._send_neighbours(ch, member, now, peers=[])
        if refresh:
            self._set_timer("place", now + PLACE_TURN_S)

    def _place_held(self, ch: Channel, now: float, everyone: bool = False) -> None:
        """Take the joins held for `ch` again, in the order they came: `everyone`'s (the
        channel went live; `PLACE_SLICE` a turn), or the newcomers waiting for slots
        (`_room_for_newcomer`) while there is room, once everyone's are placed. Not re-entered
        (placing one may move others), nor while a newcomer is being placed."""
        if (self._unholding or self._joining is not None
                or (not everyone and ch.name in self._placing)):
            return
        self._placing.pop(ch.name, None)
        self._unholding, self._rehold = True, not everyone
        try:
            for n, (held, join) in enumerate(list(self.waiting.get(ch.name, {}).items())):
                if not (everyone or self._room_for_newcomer(ch)):
                    return
                if everyone and n == PLACE_SLICE:  # the rest at the next turn
                    self._placing[ch.name] = None
                    self._set_timer("place", now + PLACE_TURN_S)
                    return
                if held in self._waiting_on:
                    self._unhold(held)
                    self.rejoins += 1
                    self._on_join(held, join, now)
                    if not everyone and held in self._waiting_on:
                        return  # it waits on: no room after all
        finally:
            self._unholding = self._rehold = False

    def _admit(self, link: Link, ch: Channel, msg: m.Join, node_id: int, now: float,
               home: int = m.NO_PEER, welcome: bool = True) -> Member:
        """Make the viewer joining on `link` a member, as `node_id` (`home`: see
        `Forest.add`), and welcome it (unless not `welcome`); it has no parent yet."""
        slots = ch.slots(msg.upload_kbps) if msg.address else 0
        member = Member(node_id, link, msg.address, msg.upload_kbps, slots, tuple(msg.coords), now,
                        ch.substreams)
        member.relay_cap = relay_cap(msg.upload_kbps, ch.bitrate_kbps, ch.chunk_ms)
        ch.forest.add(member, home)
        self.links[link] = (ch, member)
        if welcome:
            self._out.append(Send(link, self._welcome(ch, member)))
        return member

    def _on_resume(self, link: Link, ch: Channel, msg: m.Join, resume: m.Resume, now: float) -> None:
        """A viewer back from our predecessor's trees, its id proven: that id, its home tree
        and its parents where they are members with room; a parent not back yet is waited for
        (`RESUME_WAIT_S`), as the viewer still plays from it; no parent, or one that cannot
        take it: placed anew."""
        member = self._admit(link, ch, msg, self._resumed(ch, resume.node_id, now), now, resume.home)
        forest = ch.forest
        waits = False
        for k in range(ch.substreams):
            ref = resume.parents[k] if k < len(resume.parents) else m.NO_REF
            parent = forest.members.get(ref.id)
            if parent is None and ref.id != m.NO_PEER:
                self._adopting.setdefault((ch.name, ref.id, k), []).append((member.id, ref.address))
                waits = True
            elif not (parent is not None and self._adopt(ch, parent, member, k, ref.address, now)
                      or self._place(ch, member, k, now)):
                self._evict_for_capacity(ch, member, now)
                return
        self._hold_for_children(ch, member, resume.children, waits, now)
        self._adopt_children(ch, member, now)
        self._send_neighbours(ch, member, now)
        self._place_held(ch, now)

    def _hold_for_children(self, ch: Channel, member: Member, children: int, waits: bool,
                           now: float) -> None:
        """A resumed `member` feeds `children` (its word): keep that many of its slots from
        newcomers until those children are back (`_adopt`) or `RESUME_WAIT_S` has passed. Given
        away, they are refused by the member ("no capacity"), and each refusal is one more
        move. `waits`: it also waits for parents of its own.

        A node that feeds more children than our slots allow it (our predecessor had stretched
        the channel, `_stretch`, which we cannot tell from a hand-off's slack) gets slots for
        them, up to what a stretched channel allows it, rather than have the extra children
        moved off every such relay at once (3k viewers at resource index 1.2: 86 % on time at
        the worst second, 100 % so)."""
        if children > member.slots > 0:
            most = child_slots(member.upload_kbps, ch.bitrate_kbps, ch.substreams, STRETCH_HEADROOM)
            ch.forest.set_slots(member, max(member.slots, min(children, most)))
        if children > 0:
            ch.forest.hold(member, children)
        if waits or member.held:
            self._later(self._adopt_until, "adopt",
                        (now + RESUME_WAIT_S, ch.name, member.id, waits))

    def _adopt(self, ch: Channel, parent: Member, child: Member, k: int, address: str,
               now: float) -> bool:
        """Put `child` back under `parent` in tree k, as it was in our predecessor's trees, if
        `parent` is the node it named and has room for it there; tell `child` (True). As in
        placement, a slot may be one borrowed outside the parent's home tree; a slot the parent
        kept for its children is this child's."""
        forest = ch.forest
        if parent.held:
            forest.hold(parent, -1)
        if (parent.address != address or parent.free <= 0
                or (child.relays(k) and not parent.is_seed
                    and sum(parent.children[k].values()) >= parent.relay_cap)
                or forest.is_descendant(parent, child, k)):
            return False
        forest.attach(child, k, parent)
        self._assign(ch, child, k, now)
        return True

    def _adopt_children(self, ch: Channel, member: Member, now: float) -> None:
        """`member` is back: the resumed members that named it as a parent rejoin it there."""
        if not self._adopting:
            return
        for k in range(ch.substreams):
            for child_id, address in self._adopting.pop((ch.name, member.id, k), ()):
                child = ch.forest.members.get(child_id)
                if child is None or child.parent[k] != m.NO_PEER:
                    continue
                if not (self._adopt(ch, member, child, k, address, now)
                        or self._place(ch, child, k, now)):
                    self._evict_for_capacity(ch, child, now)

    def _stop_waiting(self, now: float) -> None:
        """Resumed members whose parents did not come back in time: placed as newcomers; the
        slots they kept for children who did not come back: free."""
        for _, name, member_id, waits in self._due(self._adopt_until, "adopt", now):
            ch = self.channels.get(name)
            if ch is None:
                continue
            member = ch.forest.members.get(member_id)
            if member is not None and member.held:
                ch.forest.hold(member, -member.held)
            if member is not None and waits:
                for k in range(ch.substreams):
                    if member.parent[k] == m.NO_PEER and not self._place(ch, member, k, now):
                        self._evict_for_capacity(ch, member, now)
                        break
            self._place_held(ch, now)
        if not self._adopt_until:
            self._adopting.clear()  # whoever still waits there was placed: stale entries

    def _hold(self, link: Link, msg: m.Join, now: float, why: str = "",
              notify: bool = True) -> None:
        """Keep the join of a viewer whose channel is not live until it is (`_on_announce`), or
        that must wait for a slot (`why`), for up to `hold_s` (`notify`: tell it so)."""
        if self.hold_s <= 0:
            self._reject(link, f"no live channel {msg.channel!r} on this tracker", now)
            return
        if len(self._waiting_on) >= MAX_WAITING:
            self._reject(link, f"channel {msg.channel!r} is not live, and too many viewers are "
                               f"waiting for channels on this tracker: try again later", now)
            return
        self.waiting.setdefault(msg.channel, {})[link] = msg
        self._waiting_on[link] = msg.channel
        self._later(self._hold_until, "hold", (now + self.hold_s, link))
        if notify:
            self._out.append(Send(link, m.Waiting(
                why or f"channel {msg.channel!r} is not live yet: waiting for its broadcast to "
                       f"start")))

    def _unhold(self, link: Link) -> None:
        name = self._waiting_on.pop(link)
        held = self.waiting[name]
        del held[link]
        if not held:
            del self.waiting[name]

    def _expire_holds(self, now: float) -> None:
        for _, link in self._due(self._hold_until, "hold", now):
            name = self._waiting_on.get(link)
            if name is not None:
                self._unhold(link)
                self._reject(link, f"channel {name!r} did not go live within {self.hold_s:g} s", now)

    def _later(self, queue: deque[Any], key: str, entry: tuple[Any, ...]) -> None:
        """Queue `entry`, due at its first field (never before those queued), and keep timer
        `key` set for the first entry of `queue`."""
        queue.append(entry)
        if len(queue) == 1:
            self._set_timer(key, entry[0])

    def _due(self, queue: deque[Any], key: str, now: float) -> list[Any]:
        """Take the entries of `queue` due by `now` off it; timer `key` wakes for the next."""
        due = []
        while queue and queue[0][0] <= now:
            due.append(queue.popleft())
        if queue:
            self._set_timer(key, queue[0][0])
        return due

    def _reject(self, link: Link, reason: str, now: float) -> None:
        self.rejections += 1
        self._out.append(Send(link, m.Reject(reason)))
        self._drop_link(link, reason, now)

    # -- placement and repair -------------------------------------------------------------------

    def _token(self, ch: Channel, child: Member, parent: Member, k: int, expires: float) -> m.Token:
        """Unsigned: `drain` signs it, with the other tokens for the same viewer."""
        self._unsigned = True
        return m.Token(child.id, parent.id, ch.name, k, expires, b"")

    def swap_effects(self, empty: list[Effect]) -> list[Effect]:
        """The effects queued since the last call (`drain`), their tokens signed: one signature
        for all of those going to one link (up to `TOKEN_BATCH`; `Crypto.issue_tokens`). A
        join's ~10 tokens (parents and backups in every tree, the seed) and a renewal's ~5 cost
        one Ed25519 signature, not one each; tokens of a join refused meanwhile, none."""
        out = super().swap_effects(empty)
        if not self._unsigned:
            return out
        self._unsigned = False
        carriers: list[Send] = []  # the sends whose message holds tokens
        by_link: dict[Link, list[m.Token]] = {}
        for eff in out:
            if type(eff) is Send:
                msg = eff.msg
                if type(msg) is m.Assign:
                    tokens = [t for t in (msg.token, msg.backup_token) if t is not None]
                elif type(msg) is m.Neighbours:
                    tokens = list(msg.tokens)
                else:
                    continue
                if tokens:
                    carriers.append(eff)
                    by_link.setdefault(eff.link, []).extend(tokens)
        signed: dict[int, m.Token] = {}
        for tokens in by_link.values():
            for i in range(0, len(tokens), m.TOKEN_BATCH):
                part = tokens[i:i + m.TOKEN_BATCH]
                for unsigned, done in zip(part, self.crypto.issue_tokens(self.key, part)):
                    signed[id(unsigned)] = done
        for eff in carriers:
            msg = eff.msg
            if type(msg) is m.Assign:
                token, backup = msg.token, msg.backup_token
                eff.msg = m.Assign(msg.substream, msg.parent,
                                   None if token is None else signed[id(token)], msg.backup,
                                   None if backup is None else signed[id(backup)], msg.relays)
            else:
                assert type(msg) is m.Neighbours
                eff.msg = m.Neighbours(msg.peers, tuple(signed[id(t)] for t in msg.tokens),
                                       msg.seed_id)
        return out

    def _moved_off(self, ch: Channel, member: Member, holder: int, k: int, now: float) -> None:
        """`member` no longer uses `holder` (a parent or backup) in tree k, but its token for
        it stays good until it expires: tell `holder` it is spent (`Detach`), and remember
        `holder`, so that an eviction revokes there too."""
        if holder == m.NO_PEER:
            return
        node = ch.forest.members.get(holder)
        if node is not None:
            self._out.append(Send(node.link, m.Detach(member.id, k, now + TOKEN_LIFETIME)))
        former = member.former
        if member.former_until <= now or not isinstance(former, list):
            former = member.former = []  # (the tokens of any earlier ones have expired)
        if holder not in former:
            former.append(holder)
        member.former_until = now + TOKEN_LIFETIME  # its token was issued by now

    def _detach(self, ch: Channel, member: Member, k: int, now: float) -> None:
        self._moved_off(ch, member, member.parent[k], k, now)
        ch.forest.detach(member, k)

    def _place(self, ch: Channel, member: Member, k: int, now: float, avoid: int = m.NO_PEER) -> bool:
        """Give `member` a parent (and backup) in tree k; tell it. False: no capacity anywhere."""
        forest = ch.forest
        parent, displaced = self.strategy.parent(forest, member, k, avoid)
        if (parent is None and forest.holding and member is not self._joining
                and self._give_up_kept_slot(forest, member, k)):
            parent, displaced = self.strategy.parent(forest, member, k, avoid)
        if parent is None and ch.headroom < STRETCH_HEADROOM:
            self._stretch(ch)
            parent, displaced = self.strategy.parent(forest, member, k, avoid)
        if parent is None:
            return False
        if displaced is not None:
            self._detach(ch, displaced, k, now)
        forest.attach(member, k, parent)
        self._assign(ch, member, k, now)
        if displaced is not None and not self._place(ch, displaced, k, now):
            self._evict_for_capacity(ch, displaced, now)
        return True

    def _give_up_kept_slot(self, forest: Forest, member: Member, k: int) -> bool:
        """Slots kept for children coming back are a preference, not a reservation: a member
        with nowhere else to go in tree k (moved, or its parent lost) gets one rather than be
        evicted; a newcomer waits instead. One slot, of the shallowest of the first few
        members keeping some that are in tree k: giving up every kept slot at once let the
        placements that followed fill them all, and their owners refused their own children."""
        best = None
        for seen, mid in enumerate(forest.holding):
            cand = forest.members[mid]
            if (cand is not member and cand.depth[k] >= 0
                    and not (member.children[k] and forest.is_descendant(cand, member, k))
                    and (best is None or cand.depth[k] < best.depth[k])):
                best = cand
            if seen + 1 >= CANDIDATES:
                break
        if best is None:
            return False
        forest.hold(best, -1)
        return True

    def _stretch(self, ch: Channel) -> None:
        """Out of slots: let every relay use `STRETCH_HEADROOM` of its upload from now on."""
        ch.headroom = STRETCH_HEADROOM
        for member in ch.forest.members.values():
            if member.address:
                ch.forest.set_slots(member, ch.slots(member.upload_kbps))
        self._out.append(Notice(f"channel {ch.name!r} is out of slots at {HEADROOM_FACTOR:.0%} of "
                                f"upload: parents now carry up to {STRETCH_HEADROOM:.0%}"))

    def _assign(self, ch: Channel, member: Member, k: int, now: float) -> None:
        forest = ch.forest
        parent = forest.members[member.parent[k]]
        backup = self.strategy.backup(forest, member, k)
        old = member.backup[k]
        member.backup[k] = backup.id if backup is not None else m.NO_PEER
        if old != member.backup[k] and old != parent.id:
            self._moved_off(ch, member, old, k, now)
        self._send_assign(ch, member, k, parent, backup, now)

    def _send_assign(self, ch: Channel, member: Member, k: int, parent: Member,
                     backup: Member | None, now: float, renewal: bool = False) -> None:
        """`renewal`: no parent token (the member subscribed long ago and dropped it)."""
        expires = now + TOKEN_LIFETIME
        msg = m.Assign(k, parent.ref,
                       None if renewal else self._token(ch, member, parent, k, expires),
                       backup.ref if backup else None,
                       self._token(ch, member, backup, k, expires) if backup else None,
                       member.relays(k))
        (self._held if member is self._joining else self._out).append(Send(member.link, msg))

    def _send_neighbours(self, ch: Channel, member: Member, now: float,
                         peers: list[Member] | None = None) -> None:
        """Tree mode: the seed, as the last-resort source for pulls. Mesh mode: random members,
        and the seed. With `peers`: those (fresh tokens for them), and the seed."""
        forest = ch.forest
        chosen = peers is None
        peers = [] if peers is None else peers
        if self.strategy.mode == "mesh" and chosen:
            ids = forest.ids
            for _ in range(4 * MESH_NEIGHBOURS):
                if len(peers) >= MESH_NEIGHBOURS or len(ids) <= 1:
                    break
                cand = forest.members[ids[self.rng.randrange(len(ids))]]
                if cand is not member and cand not in peers and cand.address and not cand.is_seed:
                    peers.append(cand)
        if forest.seed is not None:
            peers.append(forest.seed)
        if chosen:
            member.neighbours = tuple(p.id for p in peers if not p.is_seed)
        expires = now + TOKEN_LIFETIME
        msg = m.Neighbours(tuple(p.ref for p in peers),
                           tuple(self._token(ch, member, p, m.NO_PEER, expires) for p in peers),
                           forest.seed.id if forest.seed is not None else m.NO_PEER)
        self._out.append(Send(member.link, msg))

    def _remove(self, ch: Channel, member: Member, now: float) -> None:
        if member.id not in ch.forest.members:
            return
        if member.is_seed:
            ch.seed_link = None
        orphans = ch.forest.remove(member)
        for child_id, k in orphans:
            child = ch.forest.members.get(child_id)
            if child is None:
                continue
            backup = ch.forest.members.get(child.backup[k])
            # The orphan switches to its backup on its own; confirm that if the backup has room.
            if backup is not None and backup.free > 0 and not ch.forest.is_descendant(backup, child, k):
                ch.forest.attach(child, k, backup)
                self._assign(ch, child, k, now)
            elif ch.forest.seed is not None and not self._place(ch, child, k, now):
                self._evict_for_capacity(ch, child, now)

    def _evict(self, ch: Channel, member: Member, reason: str, now: float) -> None:
        """Send `member` away. Everyone it holds a token for is told to drop it too (`Revoke`):
        its parents, backups and pull sources, and those it was moved away from whose tokens
        have not expired. A member that ignored its `Reject` would otherwise keep their upload,
        which the tracker now counts as free."""
        ch.evicted += 1
        ids = {*member.parent, *member.backup, *member.neighbours}
        if member.former_until > now:
            ids.update(member.former)
        if ch.forest.seed is not None:
            ids.add(ch.forest.seed.id)
        revoke = m.Revoke(member.id, now + TOKEN_LIFETIME, reason)
        for node_id in sorted(ids):
            holder = ch.forest.members.get(node_id)
            if holder is not None and holder is not member:
                self._out.append(Send(holder.link, revoke))
        self._out.append(Send(member.link, m.Reject(reason)))
        self._drop_link(member.link, reason, now)

    def _evict_for_capacity(self, ch: Channel, member: Member, now: float) -> None:
        self._evict(ch, member, "channel full after a departure: rejoin later", now)

    def _on_parent_lost(self, ch: Channel, member: Member, msg: m.ParentLost, now: float) -> None:
        k = msg.substream
        if k >= ch.substreams or member.is_seed:
            raise RemoteProtocolError(f"ParentLost for sub-stream {k}")
        forest = ch.forest
        if member.parent[k] == m.NO_PEER and self._adopting:
            waiting = self._adopting.get((ch.name, msg.parent, k), [])
            if any(child_id == member.id for child_id, _ in waiting):
                # Resumed, it waited for that parent to come back; it died meanwhile.
                waiting[:] = [entry for entry in waiting if entry[0] != member.id]
                if not self._place(ch, member, k, now):
                    self._evict_for_capacity(ch, member, now)
                return
        if member.parent[k] != msg.parent:
            return  # stale: the tracker moved it already
        target = forest.members.get(msg.switched_to)
        if target is not None and target.free > 0 and not forest.is_descendant(target, member, k):
            self._detach(ch, member, k, now)
            forest.attach(member, k, target)
            self._assign(ch, member, k, now)  # fresh backup
            return
        self._detach(ch, member, k, now)
        # The old parent refused or failed this member: do not hand it straight back — unless
        # it is the only place left (say, the seed, when the rest of the tree hangs below us).
        if self._place(ch, member, k, now, avoid=msg.parent):
            return
        key = (member.id, k)
        if self._handed_back.get(key, -math.inf) > now - RETRY_S:
            # It lost that parent again at once: the parent's count of its children (which
            # refuses) and ours (which has room) differ, as they do for a while after abrupt
            # departures and handoffs. Handing it back again would loop at network speed.
            self._later(self._retry, "retry", (now + RETRY_S, ch.name, member.id, k))
            return
        self._hand_back(ch, member, k, now)

    def _hand_back(self, ch: Channel, member: Member, k: int, now: float) -> None:
        """Place `member` in tree k wherever there is room, its lost parent included, and
        remember when; no room anywhere: it has to go."""
        if not self._place(ch, member, k, now):
            self._evict_for_capacity(ch, member, now)
            return
        handed = self._handed_back
        handed[(member.id, k)] = now
        if len(handed) > 1024:  # forget the hand-backs too old to matter
            for old in [kk for kk, t in handed.items() if t <= now - RETRY_S]:
                del handed[old]

    def _renew(self, now: float) -> None:
        """Re-issue members' tokens before they expire, in sweeps: one starts every
        `TOKEN_LIFETIME` / 2 per channel and renews every member's within `TOKEN_LIFETIME` / 4,
        a slice every `TOKEN_LIFETIME` / 1200 (0.5 s), so no token a member holds is older than
        3/4 of its lifetime: its backup's and its seed's stay good however long its session.
        Small slices keep the tracker responsive: a member's ~5 tokens (backups and seed:
        `_renew_member`) take one Ed25519 signature (~30 µs) and their messages, so 100k
        members take ~25 ms a slice (bench/tracker_churn.py: 70 µs a member)."""
        tick = TOKEN_LIFETIME / 1200
        wake = math.inf
        for ch in self.channels.values():
            if not ch.renewing and now >= ch.renew_at:
                ch.renewing = [mid for mid, mm in ch.forest.members.items() if not mm.is_seed]
                ch.renewing.reverse()  # the longest-standing last, to go first
                ch.renew_per_tick = max(1, math.ceil(len(ch.renewing) / 300))
                ch.renew_at = now + TOKEN_LIFETIME / 2
            members, renewing = ch.forest.members, ch.renewing
            for _ in range(min(ch.renew_per_tick, len(renewing))):
                member = members.get(renewing.pop())
                if member is not None:
                    self._renew_member(ch, member, now)
            wake = min(wake, now + tick if renewing else ch.renew_at)
        if wake < math.inf:
            self._set_timer("renew", wake)

    def _renew_member(self, ch: Channel, member: Member, now: float) -> None:
        """Fresh tokens for `member`'s backups (unchanged, as its parents) and neighbours."""
        members = ch.forest.members
        for k in range(ch.substreams):
            parent = members.get(member.parent[k])
            if parent is not None:
                self._send_assign(ch, member, k, parent, members.get(member.backup[k]), now,
                                  renewal=True)
        self._send_neighbours(ch, member, now,
                              peers=[members[i] for i in member.neighbours if i in members])

    def _on_timer(self, key: Any, now: float) -> None:
        if key == "hold":
            self._expire_holds(now)
            return
        if key == "renew":
            self._renew(now)
            return
        if key == "adopt":
            self._stop_waiting(now)
            return
        if key == "place":
            for live in self.channels.values():
                if live.refresh and live.forest.seed is not None:
                    self._refresh_slice(live, now)
            for name in list(self._placing):
                ch = self.channels.get(name)
                if ch is None or ch.forest.seed is None:  # not live any more: they wait on
                    del self._placing[name]
                    continue
                self._place_held(ch, now, everyone=True)
                self._place_held(ch, now)
            return
        if key != "retry":
            super()._on_timer(key, now)
            return
        for _, name, member_id, k in self._due(self._retry, "retry", now):
            ch = self.channels.get(name)
            if ch is None:
                continue
            member = ch.forest.members.get(member_id)
            if member is None or member.parent[k] != m.NO_PEER:
                continue  # gone, or placed meanwhile (its subtree's parent came back)
            self._hand_back(ch, member, k, now)

    def _on_complaint(self, ch: Channel, member: Member, msg: m.Complaint, now: float) -> None:
        offender = ch.forest.members.get(msg.offender)
        if offender is None or offender.is_seed:
            return
        if msg.kind == "slow":
            self._out.append(Notice(f"peer {member.id} reports child {offender.id} too slow"))
            return
        # Only a member's own parents can have sent it media: other accusations are ignored.
        if msg.offender not in member.parent and msg.offender not in member.backup:
            return
        self.evictions += 1
        self._out.append(Notice(f"evicting peer {offender.id} ({offender.address}): "
                                f"{msg.reason} (reported by {member.id})"))
        if offender.address:
            ch.banned.add(offender.address)
        self._evict(ch, offender, f"evicted: {msg.reason}", now)

    # -- measurements --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """What an operator watches (`meshcast tracker --stats`): per channel, its audience, the
        shape of its trees and the seed's load, and after a restart the nodes taken over and the
        slots still kept for children not back yet; viewers waiting for channels to go live (or
        for a slot).
        O(members): for a once-a-second report."""
        channels: dict[str, Any] = {}
        for name, ch in self.channels.items():
            forest, seed = ch.forest, ch.forest.seed
            viewers = [mm for mm in forest.members.values() if not mm.is_seed]
            depths = [d for mm in viewers for d in mm.depth if d >= 0]
            channels[name] = {
                "viewers": len(viewers),
                "relaying": sum(1 for mm in viewers if mm.used > 0),
                "cannot_relay": sum(1 for mm in viewers if not mm.address),  # no address or upload
                "max_depth": max(depths, default=0),
                "mean_depth": round(sum(depths) / len(depths), 2) if depths else 0.0,
                "seed": {"children": seed.used, "slots": seed.slots} if seed else None,
                "free_slots": sum(mm.free for mm in viewers),
                "stretched": ch.headroom != HEADROOM_FACTOR,
                "refused": ch.refused,
                "evicted": ch.evicted,
                "resumed": ch.resumed,
                "kept_slots": sum(forest.members[mid].held for mid in forest.holding),
            }
        waiting = {name: len(held) for name, held in self.waiting.items()}
        return {"channels": channels, "waiting": waiting, "rejections": self.rejections,
                "evictions": self.evictions}

    def depth_of(self, channel: str, node_id: int) -> int:
        ch = self.channels.get(channel)
        member = ch.forest.members.get(node_id) if ch else None
        return max(member.depth) if member else -1
