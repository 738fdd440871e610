"""The tracker's picture of one channel: K push trees over the same members, with indexes.

Each member has, per sub-stream k, a parent, a backup, children and a depth. Upload is counted
in slots (`meshcast.policy.child_slots`): a member never has more children, over all trees,
than it has slots. Indexes kept up to date on every change let placement find, in time
independent of the audience size, the shallowest members with a free slot (`free[k]`) and the
shallowest members that have a non-relaying child they could hand down (`leafy[k]`). Buckets
are insertion-ordered dicts (id → member: a search reads the candidate without looking its id
up), so the oldest (most stable) candidates come first.

A member "relays" sub-stream k when k is its home tree (SplitStream's interior-node-disjoint
trees): it is interior in one tree and a leaf in the others, so its loss costs each descendant
one sub-stream, not the stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from meshcast.messages import NO_PEER, PeerRef

NO_CHILDREN: Mapping[int, bool] = MappingProxyType({})
"""A member's children in a tree where it has none: shared, read-only (writing to it raises)."""


NO_LIMIT = 1 << 30
"""A member's `relay_cap` until something caps it."""


class Member:
    __slots__ = ("id", "link", "address", "ref", "upload_kbps", "slots", "used", "held", "coords",
                 "joined",
                 "home", "parent", "backup", "children", "depth", "is_seed", "relay_cap",
                 "neighbours", "former", "former_until")

    def __init__(self, id: int, link: int, address: str, upload_kbps: int, slots: int,
                 coords: tuple[float, ...], joined: float, substreams: int, is_seed: bool = False):
        self.id, self.link, self.address = id, link, address
        self.ref = PeerRef(id, address)
        """How children reach this member: one object shared by every Assign naming it."""
        self.upload_kbps, self.slots, self.used = upload_kbps, slots, 0
        self.held = 0
        """Slots kept for children it fed under a former tracker that are not back yet (the
        forest's `hold`): not free, though not `used` by a child here."""
        self.coords, self.joined, self.is_seed = coords, joined, is_seed
        self.home = NO_PEER
        self.parent = [NO_PEER] * substreams
        self.backup = [NO_PEER] * substreams
        self.children: list[Mapping[int, bool]] = [NO_CHILDREN] * substreams
        """Per tree: child id → whether that child relays this sub-stream (most members are
        leaves in most trees: they share one read-only empty mapping until they get a child)."""
        self.depth = [0 if is_seed else -1] * substreams
        self.relay_cap = NO_LIMIT
        """Relaying children it may take per tree where the forest caps them: at most the
        forest's `relay_fanout` (`add` sees to it), fewer for a slow uplink (the tracker sets it
        from the member's upload: `tracker.placement.relay_cap`)."""
        self.neighbours: tuple[int, ...] = ()
        """Members other than the seed it holds a pull token for (mesh neighbours)."""
        self.former: list[int] | tuple[()] = ()
        """Parents and backups it was moved away from: its tokens for them may be good until
        `former_until` (most members are never moved: they share the empty tuple)."""
        self.former_until = 0.0

    @property
    def free(self) -> int:
        return self.slots - self.used - self.held

    def relays(self, k: int) -> bool:
        return self.is_seed or (self.home == k and self.slots > 0)


Bucket = dict[int, Member]
"""Members at one depth of an index, by id, oldest first."""


class Forest:
    """K trees rooted at the seed. All mutation goes through `attach`/`detach`/`add`/`remove`.

    `relay_fanout` (0: none) caps the relaying children a peer may take in a tree, as does each
    member's own `relay_cap`; the seed is not capped. `free_for_relays` and `leafy_for_relays`
    are `free` and `leafy` without the members at their cap, so a relaying newcomer's search
    never wades through them."""

    def __init__(self, substreams: int, relay_fanout: int = 0) -> None:
        self.k = substreams
        self.relay_fanout = relay_fanout
        self.members: dict[int, Member] = {}
        self.seed: Member | None = None
        self.free: list[dict[int, Bucket]] = [{} for _ in range(substreams)]
        self.leafy: list[dict[int, Bucket]] = [{} for _ in range(substreams)]
        self.free_for_relays = self.free
        self.leafy_for_relays = self.leafy
        if relay_fanout:
            self.free_for_relays = [{} for _ in range(substreams)]
            self.leafy_for_relays = [{} for _ in range(substreams)]
        self._indexes = [
            (self.free[k], self.leafy[k], self.free_for_relays[k], self.leafy_for_relays[k])
            if relay_fanout else (self.free[k], self.leafy[k]) for k in range(substreams)]
        """Per tree, every index a member may be in (what `_unindex` clears)."""
        self.home_capacity = [0] * substreams
        self.ids: list[int] = []
        """Member ids in a list, for O(1) random sampling (swap-remove keeps it dense)."""
        self._pos: dict[int, int] = {}
        self.spare: dict[int, None] = {}
        """Ids of the members with a free slot, in any tree: a placement's last resort scans
        these, not the whole channel (few of them once it is full)."""
        self.holding: dict[int, None] = {}
        """Ids of the members keeping slots (`hold`)."""

    # -- membership ----------------------------------------------------------------------------

    def add(self, member: Member, home: int = NO_PEER) -> None:
        """`home`: the tree it relays in, if it already does (a member resumed from a former
        tracker's trees); otherwise the one with the least relay capacity."""
        if self.relay_fanout:
            member.relay_cap = min(member.relay_cap, self.relay_fanout)
        self.members[member.id] = member
        self._pos[member.id] = len(self.ids)
        self.ids.append(member.id)
        self._note_spare(member)
        if member.is_seed:
            self.seed = member
        elif member.slots > 0:
            # Home = the tree with the least relay capacity so far: keeps the K trees balanced.
            if not 0 <= home < self.k:
                home = min(range(self.k), key=lambda k: (self.home_capacity[k], k))
            member.home = home
            self.home_capacity[member.home] += member.slots
        self._index(member)

    def remove(self, member: Member) -> list[tuple[int, int]]:
        """Take a member out; return the (child, k) pairs left without a parent."""
        orphans = []
        for k in range(self.k):
            for child in list(member.children[k]):
                self.detach(self.members[child], k)
                orphans.append((child, k))
            if member.parent[k] != NO_PEER:
                self.detach(member, k)
        self._unindex(member)
        if member.home != NO_PEER:
            self.home_capacity[member.home] -= member.slots
        del self.members[member.id]
        self.spare.pop(member.id, None)
        self.holding.pop(member.id, None)
        i = self._pos.pop(member.id)
        last = self.ids.pop()
        if last != member.id:
            self.ids[i] = last
            self._pos[last] = i
        if member is self.seed:
            self.seed = None
        # Others may still name it as their backup: ids are never reused, so such a stale id
        # finds no member when it is looked up. Clearing them here took a scan of the whole
        # channel per departure.
        return orphans

    def set_slots(self, member: Member, slots: int) -> None:
        """Change a member's slot count (a stretched channel); only relays and the seed use it."""
        if not member.is_seed and member.home == NO_PEER:
            return
        self._unindex(member)
        if member.home != NO_PEER:
            self.home_capacity[member.home] += slots - member.slots
        member.slots = slots
        self._note_spare(member)
        self._index(member)

    def hold(self, member: Member, slots: int) -> None:
        """Keep up to `slots` of a member's free slots from placement (−: give them back)."""
        self._unindex(member)
        member.held = max(0, min(member.held + slots, member.slots - member.used))
        if member.held:
            self.holding[member.id] = None
        else:
            self.holding.pop(member.id, None)
        self._note_spare(member)
        self._index(member)

    # -- tree edits ----------------------------------------------------------------------------

    def attach(self, child: Member, k: int, parent: Member) -> None:
        if child.parent[k] != NO_PEER:
            self.detach(child, k)
        self._unindex(parent)
        child.parent[k] = parent.id
        kids = parent.children[k]
        if not isinstance(kids, dict):  # NO_CHILDREN: its first child in tree k
            kids = {}
            parent.children[k] = kids
        kids[child.id] = child.relays(k)
        parent.used += 1
        self._note_spare(parent)
        self._index(parent)
        d = parent.depth[k]
        self._set_depth(child, k, d + 1 if d >= 0 else -1)  # (-1: the parent is cut off too)

    def detach(self, child: Member, k: int) -> None:
        pid = child.parent[k]
        if pid == NO_PEER:
            return
        parent = self.members.get(pid)
        child.parent[k] = NO_PEER
        if parent is not None and child.id in parent.children[k]:
            self._unindex(parent)
            kids = parent.children[k]
            assert isinstance(kids, dict)  # it holds child
            del kids[child.id]
            if not kids:
                parent.children[k] = NO_CHILDREN
            parent.used -= 1
            self._note_spare(parent)
            self._index(parent)
        self._set_depth(child, k, -1)

    def _note_spare(self, m: Member) -> None:
        if m.free > 0:
            self.spare[m.id] = None
        else:
            self.spare.pop(m.id, None)

    def _set_depth(self, member: Member, k: int, depth: int) -> None:
        """Set a member's depth in tree k and its whole subtree's (−1: cut off from the root)."""
        stack = [(member, depth)]
        while stack:
            m, d = stack.pop()
            if m.depth[k] == d:
                continue
            self._unindex(m)
            m.depth[k] = d
            self._index(m)
            for cid in m.children[k]:
                stack.append((self.members[cid], d + 1 if d >= 0 else -1))

    def position(self, member_id: int) -> int:
        """Where a member's id is in `ids`."""
        return self._pos[member_id]

    def is_descendant(self, candidate: Member, ancestor: Member, k: int) -> bool:
        """Is `candidate` in `ancestor`'s subtree of tree k (itself included)?"""
        m: Member | None = candidate
        hops = 0
        while m is not None and hops <= len(self.members):
            if m is ancestor:
                return True
            m = self.members.get(m.parent[k]) if m.parent[k] != NO_PEER else None
            hops += 1
        return False

    # -- indexes -------------------------------------------------------------------------------

    def _trees_of(self, m: Member) -> range:
        """The trees whose indexes may hold `m`: all for the seed, else its home tree's, if any."""
        if m.is_seed:
            return range(self.k)
        home = m.home
        return range(home, home + 1) if home != NO_PEER else range(0)

    def _index(self, m: Member) -> None:
        for k in self._trees_of(m):
            d = m.depth[k]
            if d < 0:
                continue
            kids = m.children[k]
            free = m.free > 0
            leafy = False in kids.values()  # a child that does not relay (values are bools)
            if free:
                self.free[k].setdefault(d, {})[m.id] = m
            if leafy:
                self.leafy[k].setdefault(d, {})[m.id] = m
            if self.relay_fanout and (m.is_seed or sum(kids.values()) < m.relay_cap):
                if free:
                    self.free_for_relays[k].setdefault(d, {})[m.id] = m
                if leafy:
                    self.leafy_for_relays[k].setdefault(d, {})[m.id] = m

    def _unindex(self, m: Member) -> None:
        for k in self._trees_of(m):
            d = m.depth[k]
            for index in self._indexes[k]:
                bucket = index.get(d)
                if bucket is not None and m.id in bucket:
                    del bucket[m.id]
                    if not bucket:
                        del index[d]

    # -- measurements --------------------------------------------------------------------------

    def max_depth(self, member: Member) -> int:
        return max(member.depth) if member.depth else 0
