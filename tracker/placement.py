"""Placement strategies: who becomes a newcomer's parent (and backup) in each sub-stream tree.

A strategy is a small object of pure decisions over the `Forest` snapshot (libtorrent's choker
style); the `TrackerNode` applies them. Three ship, so every claim is a side-by-side ratio:

- `tree` (ours): SplitStream-style interior-disjoint trees, shallowest first. A relaying
  newcomer takes the shallowest free slot in its home tree — or, if a shallower parent is full
  but has a non-relaying child, it takes that child's place and adopts it (push-down), so
  relays sit near the root and leaves hang below them. A peer takes at most `RELAY_FANOUT`
  relaying children per tree, fewer if its uplink is slow (`RELAY_WAIT_S`); its other slots
  are for leaves: with uplinks that send copies one after another, few relaying children per
  parent make a faster tree than a shallow one.
  Among equally shallow candidates the oldest 16 are considered and the nearest (network
  coordinates) wins: stable, close parents.
- `random`: random multi-tree — any member with a free slot, uniformly (SplitStream with random
  parent choice, no depth or distance awareness).
- `mesh`: no trees at all; peers pull everything through have-maps (CoolStreaming/DONet).
"""

from __future__ import annotations

import math
import random
from typing import ClassVar

from meshcast.messages import NO_PEER
from tracker.forest import Bucket, Forest, Member

CANDIDATES = 16


RELAY_FANOUT = 3
"""Most relaying children a peer takes in a tree (`tree` strategy; the seed is not capped): its
other slots go to leaves.

An uplink sends a chunk to its children one after another, relaying children first, and a child
forwards from its first byte (cut-through). So the first relaying child passes a chunk on almost
as early as its parent, and each later one waits another whole copy (a 25 kB chunk at 2.5 Mbit/s
is 80 ms). With every slot of the upper levels given to relays (up to 7), a tree level cost
~200 ms. This is the telephone model's lesson (few children early, the rest later), bought with
deeper trees, which cost under churn: a departure cuts off more descendants.

Simulated (steady: seeds 1–3; churn: seeds 1–2):
- steady 10k × 30 s, p95: 985–1,006 ms uncapped, 893–964 at 5, 811–842 at 3, 735–775 at 2;
- churn (5k × 300 s), continuity: 99.68 % uncapped, 99.65 % at 5, 99.39–99.55 % at 3,
  98.85–99.10 % at 2; churn p95: 964–991 ms uncapped, 1,024–1,070 at 3;
- heterogeneous capacity: unchanged. (Justin.tv-like at 50k lost continuity too, 94.0 → 92.7 %,
  but that was refused viewers still fed by their parents, since fixed: 99.92 % with the cap.)

Hence 3: steady p95 has room under 1 s on every seed, churn continuity stays above 99 %."""

RELAY_WAIT_S = 0.32
"""... and no more relaying children than the peer sends a chunk to within this time: a slow
uplink feeds fewer relays (none if one copy takes longer), so relays sort themselves by speed.

A 25 kB chunk takes 200 ms at 1 Mbit/s, 67 ms at 3 and 26 ms at 7.8: under a count alone, an
ADSL relay's third relaying child waited 400 ms longer than its first. 0.32 s keeps 3 at the
steady scenario's 2.5 and 4.5 Mbit/s with 100 ms chunks (identical results there and under
churn), gives ADSL 1, and keeps 2 where a copy takes 160 ms (2.5 Mbit/s, 200 ms chunks): a
chain of single relaying children was worse under churn. Simulated (pure, seed 1):
- heterogeneous (RI 1.2, 8 sub-streams) 5k × 30 s: p50 / p95 1,378 / 1,938 → 947 / 1,286 ms,
  continuity 99.43 → 99.97 %;
- one Justin.tv-like channel of 9k viewers, 90 s: p95 1,208 → 1,122 ms, continuity 99.18 →
  99.48 %, 2,996 → 2,958 refused;
- steady 2k × 30 s with 200 ms chunks: 854 / 1,251 → 798 / 1,149 ms, 99.963 → 99.974 %;
- churn 2k × 150 s with 200 ms chunks: 977 / 1,539 → 925 / 1,480 ms, 98.72 → 98.86 %; at
  0.24 s (one relaying child at 160 ms a copy) 1,034 / 1,693 ms and 97.78 %."""


def relay_cap(upload_kbps: float, bitrate_kbps: float, chunk_ms: float,
              fanout: int = RELAY_FANOUT) -> int:
    """Relaying children a peer may take per tree: `fanout`, less for an uplink that would take
    longer than `RELAY_WAIT_S` to send each of them a chunk."""
    if upload_kbps <= 0 or bitrate_kbps <= 0 or chunk_ms <= 0:
        return 0
    copy_s = bitrate_kbps * chunk_ms / (upload_kbps * 1000)  # one chunk, once
    return min(fanout, int(RELAY_WAIT_S / copy_s + 1e-9))


class TreePlacement:
    """Ours: latency-aware, interior-disjoint trees with push-down and a relay fan-out cap."""

    name: ClassVar[str] = "tree"
    mode: ClassVar[str] = "tree"
    relay_fanout: ClassVar[int] = RELAY_FANOUT

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def _shallowest(self, forest: Forest, index: dict[int, Bucket], member: Member,
                    k: int, exclude: int = NO_PEER, skip_seed: bool = False) -> Member | None:
        """Nearest of the oldest few candidates at the smallest depth that can take `member`.
        (~12 calls a join, up to `CANDIDATES` each: the loop is written for speed.)"""
        coords = member.coords
        has_children = bool(member.children[k])
        for depth in sorted(index):
            best, best_d = None, math.inf
            seen = 0
            for pid, cand in index[depth].items():
                if cand is member or pid == exclude or (skip_seed and cand.is_seed):
                    continue
                if has_children and forest.is_descendant(cand, member, k):
                    continue
                d = math.dist(cand.coords, coords) if cand.coords and coords else 0.0
                if d < best_d:
                    best, best_d = cand, d
                seen += 1
                if seen >= CANDIDATES:
                    break
            if best is not None:
                return best
        return None

    def parent(self, forest: Forest, member: Member, k: int,
               avoid: int = NO_PEER) -> tuple[Member | None, Member | None]:
        """(parent, displaced): displaced is a non-relaying child that `member` takes over."""
        relays = member.relays(k) and member.slots > 0
        # The seed's slots are for relays: a leaf goes under a peer whenever one has room, so
        # the seed uploads a few copies per tree however large the audience (offload).
        free_index = forest.free_for_relays[k] if relays else forest.free[k]
        free = self._shallowest(forest, free_index, member, k, avoid, skip_seed=not relays)
        if free is None and not relays:
            free = self._shallowest(forest, forest.free[k], member, k, avoid)
        if relays:
            full = self._shallowest(forest, forest.leafy_for_relays[k], member, k, avoid)
            if full is not None and (free is None or full.depth[k] < free.depth[k]):
                for cid, child_relays in full.children[k].items():
                    if not child_relays and cid != member.id:
                        return full, forest.members[cid]
        if free is None:
            free = sample_free(forest, member, k, avoid, self.rng)  # borrow any spare slot
        return free, None

    def backup(self, forest: Forest, member: Member, k: int) -> Member | None:
        index = forest.free_for_relays[k] if member.relays(k) else forest.free[k]
        return self._shallowest(forest, index, member, k, exclude=member.parent[k])


class RandomPlacement(TreePlacement):
    """Baseline: a uniformly random member with a free slot (no depth, distance or push-down)."""

    name: ClassVar[str] = "random"
    relay_fanout: ClassVar[int] = 0

    def parent(self, forest: Forest, member: Member, k: int,
               avoid: int = NO_PEER) -> tuple[Member | None, Member | None]:
        return sample_free(forest, member, k, avoid, self.rng), None

    def backup(self, forest: Forest, member: Member, k: int) -> Member | None:
        return sample_free(forest, member, k, member.parent[k], self.rng)


class MeshPlacement(TreePlacement):
    """Baseline: no push trees; the tracker only hands out mesh neighbours."""

    name: ClassVar[str] = "mesh"
    mode: ClassVar[str] = "mesh"
    relay_fanout: ClassVar[int] = 0

    def parent(self, forest: Forest, member: Member, k: int,
               avoid: int = NO_PEER) -> tuple[Member | None, Member | None]:
        return None, None

    def backup(self, forest: Forest, member: Member, k: int) -> Member | None:
        return None


SAMPLES = 64


def sample_free(forest: Forest, member: Member, k: int, exclude: int,
                rng: random.Random) -> Member | None:
    """A uniformly random member attached to tree k with a free slot (not in member's subtree).

    Random probes first (O(1) each, independent of the audience size), then a full scan so that
    a free slot is never missed when capacity is scarce.
    """
    def ok(c: Member) -> bool:
        return (c is not member and c.free > 0 and c.depth[k] >= 0 and c.id != exclude
                and not (member.children[k] and forest.is_descendant(c, member, k)))

    ids, members = forest.ids, forest.members
    n = len(ids)
    for _ in range(min(SAMPLES, n)):
        cand = members[ids[rng.randrange(n)]]
        if ok(cand):
            return cand
    # The first that qualifies in `ids` from a random start, wrapping round; only members with
    # a free slot can, so only those are looked at.
    start = rng.randrange(n) if ids else 0
    pos = forest.position
    best, best_offset = None, n
    for cid in forest.spare:
        cand = members[cid]
        if ok(cand):
            offset = (pos(cid) - start) % n
            if offset < best_offset:
                best, best_offset = cand, offset
    return best


STRATEGIES = {cls.name: cls for cls in (TreePlacement, RandomPlacement, MeshPlacement)}


def make_strategy(name: str, rng: random.Random) -> TreePlacement:
    try:
        return STRATEGIES[name](rng)
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
