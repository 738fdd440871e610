"""TrackerNode placement and repair under random joins and departures (hypothesis, pure)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcast import messages as m
from meshcast.crypto import FORGED, SimCrypto, SimKey
from meshcast.effects import Close, Notice, Send
from meshcast.policy import STRETCH_HEADROOM, child_slots
from tracker.forest import Member
from tracker.node import (JOIN_HOLD_S, PLACE_SLICE, PLACE_TURN_S, REFRESH_SLICE, RESUME_QUIET_S,
                          RESUME_WAIT_S, RESUME_WINDOW_S, RETRY_S, TOKEN_LIFETIME, TrackerNode)
from tracker.placement import RELAY_FANOUT, relay_cap

K = 4
BITRATE = 2000


def new_tracker(strategy: str, seed_kbps: int) -> TrackerNode:
    t = TrackerNode(key=SimKey(), crypto=SimCrypto(), rng=random.Random(1), strategy=strategy)
    t.link_opened(1, now=0.0)
    t.handle(1, m.Announce("c", SimKey(9).public, "seed", seed_kbps, BITRATE, K, 200, b"\0" * 64),
             now=0.0)
    return t


def check_invariants(t: TrackerNode, waiting: set[tuple[int, int]] = frozenset()) -> None:
    """`waiting`: (member id, tree) of resumed members that may still wait for their parent
    there (unattached, their subtree cut off from the root: depth −1)."""
    forest = t.channels["c"].forest
    for member in forest.members.values():
        assert member.used == sum(len(c) for c in member.children)
        assert member.used + member.held <= member.slots, (
            "a parent got more children than its upload carries")
        assert (member.held > 0) == (member.id in forest.holding)
        for k in range(K):
            for cid in member.children[k]:
                child = forest.members[cid]
                assert child.parent[k] == member.id
                assert child.depth[k] == (member.depth[k] + 1 if member.depth[k] >= 0 else -1)
            if member.is_seed:
                continue
            if member.parent[k] == m.NO_PEER:
                assert (member.id, k) in waiting, "every member has a parent in each tree"
                assert member.depth[k] == -1
                continue
            assert member.parent[k] in forest.members
            # no cycles: walking up reaches the seed in exactly `depth` hops (or a member
            # still waiting for its parent: then the depth is -1)
            hops, cur = 0, member
            while not cur.is_seed and cur.parent[k] != m.NO_PEER:
                cur = forest.members[cur.parent[k]]
                hops += 1
                assert hops <= len(forest.members)
            assert hops == member.depth[k] if cur.is_seed else member.depth[k] == -1
    # The indexes placement searches hold exactly the members they stand for.
    cap = forest.relay_fanout
    for k in range(K):
        for index, wanted in ((forest.free[k], lambda mm: mm.used + mm.held < mm.slots),
                              (forest.leafy[k], lambda mm: False in mm.children[k].values()),
                              (forest.free_for_relays[k], lambda mm: mm.used + mm.held < mm.slots and (
                                  not cap or mm.is_seed
                                  or sum(mm.children[k].values()) < mm.relay_cap)),
                              (forest.leafy_for_relays[k],
                               lambda mm: False in mm.children[k].values() and (
                                   not cap or mm.is_seed
                                   or sum(mm.children[k].values()) < mm.relay_cap))):
            indexed = {pid: d for d, bucket in index.items() for pid in bucket}
            # (a bucket maps each id to its member: placement reads candidates from it)
            assert all(mm is forest.members[pid] for bucket in index.values()
                       for pid, mm in bucket.items())
            expected = {mm.id: mm.depth[k] for mm in forest.members.values()
                        if (mm.is_seed or mm.home == k) and mm.depth[k] >= 0 and wanted(mm)}
            assert indexed == expected
    # ... and the last resort's list of members with a free slot (in any tree).
    assert set(forest.spare) == {mm.id for mm in forest.members.values()
                                 if mm.used + mm.held < mm.slots}


ops = st.lists(st.tuples(st.sampled_from(["join", "join", "join", "leave"]),
                         st.sampled_from([0, 500, 1500, 2500, 4500, 9000]),
                         st.integers(0, 10_000)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=ops, strategy=st.sampled_from(["tree", "random"]))
def test_random_joins_and_departures_keep_the_forest_sound(ops, strategy):
    t = new_tracker(strategy, seed_kbps=6000)
    links = []
    next_link = 2
    for op, kbps, pick in ops:
        if op == "join":
            link = next_link
            next_link += 1
            t.link_opened(link, now=1.0)
            t.handle(link, m.Join("c", f"p{link}", kbps, (random.Random(pick).random(), 0.5)), now=1.0)
            to_it = [type(e.msg) for e in t.drain() if type(e) is Send and e.link == link]
            if link in t.links and t.links[link] is not None:
                links.append(link)
                assert to_it.count(m.Assign) >= (K if strategy == "tree" else 0)
            else:  # refused: not one token to show a parent, nor an id
                assert to_it == [m.Reject]
        elif links:
            link = links.pop(pick % len(links))
            t.link_closed(link, now=2.0)
        # a reject closes the link: keep only admitted ones
        links = [l for l in links if t.links.get(l) is not None]
        check_invariants(t)
    t.drain()


def test_a_viewer_refused_in_a_later_tree_gets_no_token_for_the_earlier_ones():
    # 3,140 kbps carries 5 slots (at 80 % and at 95 %): the first viewer (uploading nothing)
    # takes 4; the second fits in sub-stream 0, then finds no room in sub-stream 1.
    assert child_slots(3140, BITRATE, K) == child_slots(3140, BITRATE, K, STRETCH_HEADROOM) == 5
    t = new_tracker("tree", seed_kbps=3140)
    for link in (2, 3):
        t.link_opened(link, now=0.0)
        t.handle(link, m.Join("c", "", 0), now=0.0)
    sent = [(e.link, type(e.msg)) for e in t.drain() if type(e) is Send]
    assert [k for link, k in sent if link == 2].count(m.Assign) == K
    assert [k for link, k in sent if link == 3] == [m.Reject]  # (not even a Welcome)
    seed = t.channels["c"].forest.seed
    assert seed.used == K and len(t.channels["c"].forest.members) == 2
    check_invariants(t)


def test_relays_get_the_shallow_places_and_depth_is_logarithmic():
    t = new_tracker("tree", seed_kbps=20_000)
    rng = random.Random(3)
    for i in range(600):
        t.link_opened(100 + i, now=0.0)
        t.handle(100 + i, m.Join("c", f"p{i}", rng.choice([2500, 4500]), (rng.random(), rng.random())),
                 now=0.0)
    check_invariants(t)
    forest = t.channels["c"].forest
    n = len(forest.members) - 1
    fanout = child_slots(4500, BITRATE, K)
    assert max(max(mm.depth) for mm in forest.members.values()) <= math.ceil(math.log(n, 2)) - 3
    for k in range(K):
        relay_depths = [mm.depth[k] for mm in forest.members.values() if mm.home == k]
        leaf_depths = [mm.depth[k] for mm in forest.members.values()
                       if mm.home != k and not mm.is_seed]
        assert sum(relay_depths) / len(relay_depths) < sum(leaf_depths) / len(leaf_depths)
        # the seed's slots go to relays: leaves hang under peers
        assert all(forest.members[c].home == k for c in forest.seed.children[k])
        # ... and a peer passes the chunk on to at most RELAY_FANOUT relays (it has room for 7),
        # fewer if its uplink is slow: a 50 kB chunk takes 160 ms at 2.5 Mbit/s, 89 at 4.5.
        for upload, cap in ((4500, RELAY_FANOUT), (2500, 2)):
            assert relay_cap(upload, BITRATE, 200) == cap
            assert max(sum(mm.children[k].values()) for mm in forest.members.values()
                       if not mm.is_seed and mm.upload_kbps == upload) == cap
    assert fanout >= 4


def test_orphans_are_reassigned_at_once_when_a_relay_leaves():
    t = new_tracker("tree", seed_kbps=8000)
    for i in range(40):
        t.link_opened(100 + i, now=0.0)
        t.handle(100 + i, m.Join("c", f"p{i}", 4500), now=0.0)
    t.drain()
    forest = t.channels["c"].forest
    relay = max((mm for mm in forest.members.values() if not mm.is_seed), key=lambda mm: mm.used)
    orphans = {cid for k in range(K) for cid in relay.children[k]}
    assert orphans
    t.link_closed(relay.link, now=5.0)
    assigns = {forest.members[o].link: 0 for o in orphans}
    for eff in t.drain():
        if type(eff) is Send and type(eff.msg) is m.Assign and eff.link in assigns:
            assigns[eff.link] += 1
    assert all(n >= 1 for n in assigns.values())
    check_invariants(t)


def test_a_slow_uplink_takes_fewer_relaying_children():
    # One chunk, once: 25 kB (2 Mbit/s × 100 ms) takes 200 ms at 1 Mbit/s, 26 ms at 7.8.
    assert relay_cap(1000, 2000, 100) == 1
    assert relay_cap(7800, 2000, 100) == RELAY_FANOUT
    assert relay_cap(500, 1500, 200) == 0  # 600 ms a copy: leaves only
    assert relay_cap(0, 2000, 100) == 0


def test_stats_give_an_operator_the_audience_tree_shape_and_seed_load():
    t = new_tracker("tree", seed_kbps=3140)  # 5 slots: one viewer uploading nothing takes 4
    for link in (2, 3):
        t.link_opened(link, now=0.0)
        t.handle(link, m.Join("c", "", 0), now=0.0)
    c = t.stats()["channels"]["c"]
    assert (c["viewers"], c["cannot_relay"], c["relaying"], c["refused"]) == (1, 1, 0, 1)
    assert c["seed"] == {"children": K, "slots": 5} and c["max_depth"] == 1
    assert t.stats()["rejections"] == 1
    t.link_opened(4, now=0.0)
    t.handle(4, m.Join("premiere", "", 0), now=0.0)  # not live yet: held
    assert t.stats()["waiting"] == {"premiere": 1}


def forty_relays() -> TrackerNode:
    """A tree-mode channel of 40 viewers that can all relay, spread along a line."""
    t = new_tracker("tree", seed_kbps=8000)
    for i in range(40):
        t.link_opened(100 + i, now=0.0)
        t.handle(100 + i, m.Join("c", f"p{i}", 4500, (i / 40, 0.5)), now=0.0)
    t.drain()
    return t


def test_an_evicted_member_is_revoked_where_it_holds_tokens():
    t = forty_relays()
    forest = t.channels["c"].forest
    child = next(mm for mm in forest.members.values()
                 if not mm.is_seed and not forest.members[mm.parent[0]].is_seed)
    bad = forest.members[child.parent[0]]
    # (and the parents and backups the joins moved it away from: its tokens there are good yet)
    held = (*bad.parent, *bad.backup, *bad.former)
    holders = {forest.members[i].link for i in held if i != m.NO_PEER and i in forest.members}
    holders.add(forest.seed.link)
    before = t.stats()["channels"]["c"]
    t.handle(child.link, m.Complaint(bad.id, "forged chunk 7"), now=1.0)
    sent = [e for e in t.drain() if type(e) is Send]
    revoked = {e.link for e in sent if type(e.msg) is m.Revoke and e.msg.node_id == bad.id}
    assert revoked == holders
    assert all(e.msg.until >= 1.0 + 60 for e in sent if type(e.msg) is m.Revoke)
    assert any(e.link == bad.link and type(e.msg) is m.Reject for e in sent)
    after = t.stats()["channels"]["c"]
    assert after["viewers"] == before["viewers"] - 1 and after["evicted"] == 1
    assert t.stats()["evictions"] == 1
    check_invariants(t)


def _moved(t: TrackerNode) -> tuple[Member, int, Member, list[Send]]:
    """A relay moves off its parent in one tree at time 0.5: it reports the parent lost and
    its backup takes it. Returns the relay, the tree, the old parent and what the tracker sent."""
    forest = t.channels["c"].forest
    for bad in forest.members.values():
        k = bad.home
        if bad.is_seed or k < 0 or not bad.children[k]:
            continue
        old, backup = forest.members[bad.parent[k]], forest.members.get(bad.backup[k])
        if old.is_seed or backup is None or backup.free <= 0:
            continue
        t.handle(bad.link, m.ParentLost(k, old.id, backup.id), now=0.5)
        sent = [e for e in t.drain() if type(e) is Send]
        if bad.parent[k] == backup.id and old.id not in (*bad.parent, *bad.backup):
            return bad, k, old, sent
    raise AssertionError("no relay could be moved to its backup")


def _moved_then_reported(at: float) -> tuple[TrackerNode, int, int, list[Send]]:
    """`_moved`, then the relay's child reports it for a forged chunk at time `at`. Returns the
    tracker, the old parent's link, the relay's id and what the tracker sent for the report."""
    t = forty_relays()
    bad, k, old, _ = _moved(t)
    child = t.channels["c"].forest.members[next(iter(bad.children[k]))]
    t.handle(child.link, m.Complaint(bad.id, "forged chunk 9"), now=at)
    return t, old.link, bad.id, [e for e in t.drain() if type(e) is Send]


def test_a_member_moved_away_from_a_parent_has_its_token_there_spent():
    """The old parent hears the token it holds is spent (`Detach`), for every token issued
    up to the move; the new parent hears nothing."""
    t = forty_relays()
    bad, k, old, sent = _moved(t)
    detach = [(e.link, e.msg) for e in sent if type(e.msg) is m.Detach]
    assert (old.link, m.Detach(bad.id, k, 0.5 + TOKEN_LIFETIME)) in detach
    new = t.channels["c"].forest.members[bad.parent[k]]
    assert all(link != new.link for link, _ in detach)


def test_an_evicted_member_is_revoked_where_it_was_moved_away_from():
    """Its token for the parent it had before the move is good for `TOKEN_LIFETIME`: that
    parent is told too, until the token has expired."""
    _, old_link, bad, sent = _moved_then_reported(at=1.0)
    revoked = {e.link for e in sent if type(e.msg) is m.Revoke and e.msg.node_id == bad}
    assert old_link in revoked
    _, old_link, bad, sent = _moved_then_reported(at=0.5 + TOKEN_LIFETIME + 1)
    revoked = {e.link for e in sent if type(e.msg) is m.Revoke and e.msg.node_id == bad}
    assert revoked and old_link not in revoked  # its token there has expired



def test_a_parent_lost_again_at_once_is_handed_back_only_after_a_wait():
    # The seed refuses a child the tracker counts it room for (their counts differ for a while
    # after departures and handoffs); with no other place, handing it straight back each time
    # looped at network speed (forever, on a zero-latency network).
    t = new_tracker("tree", seed_kbps=3140)  # 5 slots; the viewer below takes one per tree
    t.link_opened(2, now=0.0)
    t.handle(2, m.Join("c", "", 0), now=0.0)
    t.drain()
    forest = t.channels["c"].forest
    viewer = next(mm for mm in forest.members.values() if not mm.is_seed)
    seed = forest.seed

    def assigns() -> list[int]:
        return [e.msg.parent.id for e in t.drain() if type(e) is Send and type(e.msg) is m.Assign]

    t.handle(2, m.ParentLost(0, seed.id), now=1.0)
    assert assigns() == [seed.id]  # the only place left: handed back once
    t.handle(2, m.ParentLost(0, seed.id), now=1.01)
    assert assigns() == [] and viewer.parent[0] == m.NO_PEER  # not again at once
    assert t.next_timer() == pytest.approx(1.01 + RETRY_S)
    t.handle_timer(now=1.01 + RETRY_S)
    assert assigns() == [seed.id] and viewer.parent[0] == seed.id
    assert t.timer_at("retry") is None
    check_invariants(t)


hold_ops = st.lists(st.tuples(st.sampled_from(["join", "join", "leave", "announce", "seed_gone", "wait"]),
                              st.integers(0, 1000)), min_size=1, max_size=40)


@settings(max_examples=100, deadline=None)
@given(ops=hold_ops)
def test_joins_wait_for_their_channel_to_go_live_then_are_placed_or_refused(ops):
    """A Join for a channel that is not live is held: placed when the seed announces the channel,
    refused after `JOIN_HOLD_S`, forgotten when its viewer goes; never held while it is live
    (with fewer than `PLACE_SLICE` held: more are placed a slice per turn)."""
    t = TrackerNode(key=SimKey(), crypto=SimCrypto(), rng=random.Random(1))
    now, next_link, seed_link = 0.0, 1, None
    joined: dict[int, float] = {}  # viewer link → when it sent its Join
    closed: set[int] = set()
    for op, x in ops:
        link, next_link = next_link, next_link + 1
        open_viewers = sorted(set(joined) - closed)
        if op == "join":
            t.link_opened(link, now=now)
            t.handle(link, m.Join("c", f"v{link}", 3000, ()), now=now)
            joined[link] = now
        elif op == "leave" and open_viewers:
            gone = open_viewers[x % len(open_viewers)]
            if x % 2:
                t.handle(gone, m.Leave("bye"), now=now)
            else:
                t.link_closed(gone, now=now)
            closed.add(gone)
        elif op == "announce" and seed_link is None:
            seed_link = link
            t.link_opened(link, now=now)
            t.handle(link, m.Announce("c", SimKey(9).public, "seed", 20_000, BITRATE, K, 200,
                                      b"\0" * 64), now=now)
        elif op == "seed_gone" and seed_link is not None:
            t.link_closed(seed_link, now=now)
            seed_link = None
        elif op == "wait":
            now += JOIN_HOLD_S * x / 800
            while (due := t.next_timer()) is not None and due <= now:
                t.handle_timer(now=due)
        for eff in t.drain():
            if isinstance(eff, Close):
                closed.add(eff.link)
        live = seed_link is not None
        held = {held_link for ch in t.waiting.values() for held_link in ch}
        assert t._waiting_on == {held_link: "c" for held_link in held}
        assert not (live and held), "a join held while its channel is live"
        for viewer, since in joined.items():
            if viewer in closed:
                assert viewer not in held and viewer not in t.links
            elif viewer in held:
                assert since > now - JOIN_HOLD_S, "held longer than JOIN_HOLD_S"
            else:
                assert t.links[viewer] is not None, "a viewer neither held, placed nor refused"


def test_a_premiere_audience_is_placed_a_slice_at_a_time_in_the_order_it_came():
    # 250 viewers wait for the broadcast. When it goes live the tracker places PLACE_SLICE of
    # them per turn (~0.13 s of a real process's CPU), answering other messages in between; a
    # viewer who comes meanwhile waits behind them.
    t = TrackerNode(key=SimKey(), crypto=SimCrypto(), rng=random.Random(1))
    audience = list(range(10, 260))
    for link in audience:
        t.link_opened(link, now=0.0)
        t.handle(link, m.Join("c", f"v{link}", 3000, ()), now=0.0)
    t.drain()
    welcomed: list[int] = []

    def welcomes() -> list[int]:
        new = [e.link for e in t.drain()
               if isinstance(e, Send) and isinstance(e.msg, m.Welcome) and e.link != 1]
        welcomed.extend(new)
        return new

    t.link_opened(1, now=1.0)
    t.handle(1, m.Announce("c", SimKey(9).public, "seed", 2_000_000, BITRATE, K, 200, b"\0" * 64),
             now=1.0)
    assert len(welcomes()) == PLACE_SLICE == 100
    turn = t.next_timer()
    assert turn == 1.0 + PLACE_TURN_S  # the next slice at the next turn, after what is queued
    t.link_opened(999, now=1.0)
    t.handle(999, m.Join("c", "late", 3000, ()), now=1.0)
    assert welcomes() == []  # behind those who came first
    t.handle_timer(now=turn)
    assert len(welcomes()) == 100
    t.handle_timer(now=t.next_timer())
    assert welcomes() == audience[200:] + [999]
    assert welcomed == audience + [999]
    assert t.waiting == {} and t.timer_at("place") is None
    check_invariants(t)


def test_a_big_audience_hears_of_a_restarted_seed_a_slice_at_a_time():
    # 2,500 members when the seed comes back as a new node: those it fed are placed again at
    # once, the others learn its contact (and a token for it) 2,000 per turn.
    t = new_tracker("tree", 20_000)
    for link in range(10, 2510):
        t.link_opened(link, now=0.0)
        t.handle(link, m.Join("c", f"v{link}", 3000, ()), now=0.0)
    t.link_closed(1, now=1.0)  # the seed goes
    t.drain()
    t.link_opened(2, now=2.0)
    t.handle(2, m.Announce("c", SimKey(9).public, "seed2", 20_000, BITRATE, K, 200, b"\0" * 64),
             now=2.0)
    seed = t.channels["c"].forest.seed

    def told() -> set[int]:
        return {e.link for e in t.drain() if isinstance(e, Send)
                and isinstance(e.msg, m.Neighbours) and e.msg.seed_id == seed.id}

    first = told()
    assert REFRESH_SLICE == 2000 < len(first) < 2500
    turn = t.next_timer()
    assert turn == 2.0 + PLACE_TURN_S
    t.handle_timer(now=turn)
    assert first | told() == set(range(10, 2510))
    assert t.timer_at("place") is None
    check_invariants(t)


def test_a_second_join_or_an_announce_from_a_held_viewer_is_a_protocol_error():
    for second in (m.Join("c", "v", 3000, ()),
                   m.Announce("c", SimKey(9).public, "seed", 20_000, BITRATE, K, 200, b"\0" * 64)):
        t = TrackerNode(key=SimKey(), crypto=SimCrypto(), rng=random.Random(1))
        t.link_opened(1, now=0.0)
        t.handle(1, m.Join("c", "v", 3000, ()), now=0.0)
        t.handle(1, second, now=0.0)
        effects = t.drain()
        assert any(isinstance(e, Close) and "second" in e.reason for e in effects)
        assert t.waiting == {} and t._waiting_on == {} and t.channels == {}


# -- a restarted tracker adopts the trees its nodes come back with ------------------------------

OLD_SEED = 7  # ids our predecessor gave out (outside this tracker's own block)
OLD_KEY = SimKey(2)  # our predecessor's


def restarted(seed_kbps: int = 20_000, children: int = 0) -> TrackerNode:
    """A tracker with a new key whose seed comes back from the old one, as `OLD_SEED`, feeding
    `children`."""
    t = TrackerNode(key=SimKey(3), crypto=SimCrypto(), rng=random.Random(1))
    t.link_opened(1, now=0.0)
    t.handle(1, m.Announce("c", SimKey(9).public, "seed", seed_kbps, BITRATE, K, 200, b"\0" * 64,
                           OLD_SEED, OLD_KEY.public, children), now=0.0)
    return t


def proof_of(node_id: int, key: SimKey = OLD_KEY) -> m.Token:
    """The seed token `key`'s tracker gave `node_id`: what proves its id."""
    return SimCrypto().issue_token(key, node_id, OLD_SEED, "c", m.NO_PEER, 600.0)


def resume(t: TrackerNode, link: int, old_id: int, home: int, parents: list[tuple[int, str]],
           now: float = 1.0, kbps: int = 4500, proof: m.Token | None | bool = True,
           children: int = 0) -> list[tuple[int, int]]:
    """A viewer back at `t` on `link` (`proof`: True, a good one), feeding `children`; returns
    the (sub-stream, parent id) of its Assigns."""
    t.link_opened(link, now=now)
    t.handle(link, m.Join("c", f"v{old_id}", kbps, (), m.Resume(
        old_id, home, tuple(m.PeerRef(i, a) for i, a in parents),
        proof_of(old_id) if proof is True else proof or None, children)), now=now)
    return [(e.msg.substream, e.msg.parent.id) for e in t.drain()
            if type(e) is Send and e.link == link and type(e.msg) is m.Assign]


def member(t: TrackerNode, link: int) -> Member:
    entry = t.links[link]
    assert entry is not None
    return entry[1]


def test_nodes_back_from_a_former_tracker_keep_their_ids_and_parents():
    t = restarted()
    assert t.channels["c"].forest.seed.id == OLD_SEED
    assert any("taking over the trees" in n.text for n in t.drain() if type(n) is Notice)
    seed = [(OLD_SEED, "seed")] * K
    assert resume(t, 2, 100, 0, seed) == [(k, OLD_SEED) for k in range(K)]
    a = member(t, 2)
    assert a.id == 100 and a.home == 0
    # B relayed sub-stream 1 below A in tree 0: the same place again, and its old id.
    assert resume(t, 3, 101, 1, [(100, "v100")] + seed[1:]) == [(0, 100)] + [
        (k, OLD_SEED) for k in range(1, K)]
    b = member(t, 3)
    assert b.id == 101 and b.home == 1 and b.parent[0] == 100 and b.depth[0] == 2
    check_invariants(t)
    assert t.stats()["channels"]["c"]["resumed"] == 3  # the seed, A and B
    # A newcomer gets an id of this tracker's own: none of the resumed ones, even once its
    # count reaches theirs (a million joins later, past its own block).
    t.link_opened(4, now=1.0)
    t.handle(4, m.Join("c", "new", 4500), now=1.0)
    assert member(t, 4).id not in (OLD_SEED, 100, 101)
    t._next_id = 100
    t.link_opened(5, now=1.0)
    t.handle(5, m.Join("c", "newer", 4500), now=1.0)
    assert member(t, 5).id == 102


def test_a_viewer_back_before_its_parent_waits_for_it_and_then_rejoins_it():
    t = restarted()
    seed = [(OLD_SEED, "seed")] * K
    # B comes back first: in tree 0 it waits for A (and goes on playing from it).
    assert resume(t, 3, 101, 1, [(100, "v100")] + seed[1:]) == [(k, OLD_SEED) for k in range(1, K)]
    b = member(t, 3)
    assert b.parent[0] == m.NO_PEER
    check_invariants(t, waiting={(101, 0)})
    assert resume(t, 2, 100, 0, seed, now=2.0) == [(k, OLD_SEED) for k in range(K)]
    assert [(e.msg.substream, e.msg.parent.id) for e in t.drain() if type(e) is Send
            and type(e.msg) is m.Assign] == []  # (B's Assign went out with A's arrival)
    assert b.parent[0] == 100 and b.depth[0] == 2
    check_invariants(t)


def test_a_parent_that_does_not_come_back_leaves_its_child_placed_anew():
    t = restarted()
    seed = [(OLD_SEED, "seed")] * K
    resume(t, 3, 101, 1, [(100, "v100")] + seed[1:])
    b = member(t, 3)
    assert t.next_timer() == pytest.approx(1.0 + RESUME_WAIT_S)
    t.handle_timer(now=1.0 + RESUME_WAIT_S)
    assert b.parent[0] == OLD_SEED  # the only member with room
    assert any(type(e) is Send and e.link == 3 and type(e.msg) is m.Assign for e in t.drain())
    assert t._adopting == {} and t.timer_at("adopt") is None
    check_invariants(t)


def test_a_waiting_viewer_whose_parent_dies_is_placed_at_once():
    t = restarted()
    seed = [(OLD_SEED, "seed")] * K
    resume(t, 3, 101, 1, [(100, "v100")] + seed[1:])
    t.handle(3, m.ParentLost(0, 100, m.NO_PEER), now=1.5)
    assert member(t, 3).parent[0] == OLD_SEED
    assert [(e.msg.substream, e.msg.parent.id) for e in t.drain() if type(e) is Send
            and type(e.msg) is m.Assign] == [(0, OLD_SEED)]
    check_invariants(t)
    t.handle_timer(now=1.0 + RESUME_WAIT_S)  # its deadline changes nothing now
    assert t.drain() == [] and member(t, 3).parent[0] == OLD_SEED


def test_claims_still_coming_keep_the_window_open():
    # A tracker slow to get through a big returning audience: claims handled past
    # `RESUME_WINDOW_S` still count while others were honoured less than `RESUME_QUIET_S` ago.
    t = restarted()
    seed = [(OLD_SEED, "seed")] * K
    now, link = 1.0, 2
    while now < RESUME_WINDOW_S + 2 * RESUME_QUIET_S:
        resume(t, link, 100 + link, 0, seed, now=now)
        assert member(t, link).id == 100 + link  # honoured
        now, link = now + RESUME_QUIET_S - 1, link + 1
    resume(t, link, 100 + link, 0, seed, now=now + 2)  # quiet for longer: the window is shut
    assert member(t, link).id != 100 + link


def test_a_tracker_that_kept_its_key_takes_its_trees_back_even_after_a_seed_restart():
    # `meshcast tracker --key`: the restarted tracker has its old key and a new id block. The
    # seed restarted too (a new id, no old key to pass on): the viewers' tokens, signed by
    # that same key, still prove their ids.
    key = SimKey(2)
    t = TrackerNode(key=key, crypto=SimCrypto(), rng=random.Random(1), id_block=77)
    assert t._id_base == 1 + (77 << 20)
    t.link_opened(1, now=0.0)
    t.handle(1, m.Announce("c", SimKey(9).public, "seed", 20_000, BITRATE, K, 200, b"\0" * 64),
             now=0.0)
    seed = t.channels["c"].forest.seed
    assert seed.id != OLD_SEED and t.channels["c"].former_key == b""
    resume(t, 2, 100, 0, [(OLD_SEED, "seed")] * K)
    a = member(t, 2)
    assert a.id == 100
    for k in range(K):  # its link to the old seed is gone: it says so, and is placed anew
        t.handle(2, m.ParentLost(k, OLD_SEED, m.NO_PEER), now=1.5)
    assert a.parent == [seed.id] * K
    resume(t, 3, 101, 1, [(100, "v100")] + [(seed.id, "seed")] * (K - 1), now=2.0,
           proof=proof_of(101, key))
    b = member(t, 3)
    assert b.id == 101 and b.parent == [100] + [seed.id] * (K - 1)
    # A token of another key proves nothing.
    resume(t, 4, 102, 2, [(100, "v100")] * K, now=2.0, proof=proof_of(102, SimKey(4)))
    assert member(t, 4).id != 102
    check_invariants(t)


def join(t: TrackerNode, link: int, name: str, now: float = 1.0) -> list[tuple[int, int]]:
    """A newcomer on `link`; returns the (sub-stream, parent id) of its Assigns."""
    t.link_opened(link, now=now)
    t.handle(link, m.Join("c", name, 4500), now=now)
    return [(e.msg.substream, e.msg.parent.id) for e in t.drain()
            if type(e) is Send and e.link == link and type(e.msg) is m.Assign]


def test_a_resumed_node_keeps_slots_for_the_children_it_feeds_until_they_are_back():
    # The seed comes back feeding all but one of its slots' worth of children (not back yet),
    # and A comes back feeding one child. Newcomers get the free slots, not those: given away,
    # they are refused by the parent ("no capacity"), a move each.
    slots = restarted(seed_kbps=5000).channels["c"].forest.seed.slots
    assert slots > K + 1
    t = restarted(seed_kbps=5000, children=slots - 1)
    t.drain()
    seed_member = t.channels["c"].forest.seed
    assert seed_member.held == slots - 1 and seed_member.free == 1
    assert t.stats()["channels"]["c"]["kept_slots"] == slots - 1
    seed = [(OLD_SEED, "seed")] * K
    # A, the seed's child in every tree, takes a kept slot in each.
    assert resume(t, 2, 100, 0, seed, children=1) == [(k, OLD_SEED) for k in range(K)]
    a = member(t, 2)
    assert seed_member.held == slots - 1 - K and a.held == 1
    check_invariants(t)
    # A newcomer: the seed's one free slot, then A's free ones, never A's kept one.
    got = join(t, 3, "new")
    assert sorted(p for _, p in got).count(OLD_SEED) <= 1 and a.held == 1
    check_invariants(t)
    # B, A's child, is back: the slot kept for it.
    assert resume(t, 4, 101, 1, [(100, "v100")] + seed[1:], now=2.0)[0] == (0, 100)
    assert a.held == 0
    check_invariants(t)
    # The seed's children that never come back: their slots are free at the end of the wait.
    t.handle_timer(now=RESUME_WAIT_S + 0.5)
    assert seed_member.held == 0 and t.channels["c"].forest.holding == {}
    assert t.stats()["channels"]["c"]["kept_slots"] == 0
    check_invariants(t)


@pytest.mark.parametrize("children, slots", [(8, 8), (9, 9), (12, 9)])
def test_a_node_back_with_more_children_than_slots_gets_slots_for_them(children, slots):
    # 5,000 kbps carries 8 slots at 80 % of upload, 9 at 95 %: a seed feeding 9 was in a
    # channel the old tracker had stretched. The new one counts it 9 slots, kept for those
    # children, rather than move the one its slot count leaves out (and every stretched
    # relay's likewise); never more than a stretched channel would allow.
    assert (child_slots(5000, BITRATE, K), child_slots(5000, BITRATE, K, STRETCH_HEADROOM)) == (8, 9)
    t = restarted(seed_kbps=5000, children=children)
    seed = t.channels["c"].forest.seed
    assert (seed.slots, seed.held) == (slots, slots)
    assert not t.stats()["channels"]["c"]["stretched"]  # (the others are as they were)
    check_invariants(t)


def test_a_newcomer_waits_for_slots_kept_for_children_coming_back():
    # The seed comes back with every slot kept: a newcomer is told to wait (no id, no token),
    # and is placed once a member with room is back.
    t = restarted(seed_kbps=5000, children=1000)  # (more than its slots: all of them)
    t.drain()
    forest = t.channels["c"].forest
    assert forest.seed.free == 0 and forest.seed.held == forest.seed.slots
    t.link_opened(2, now=1.0)
    t.handle(2, m.Join("c", "new", 4500), now=1.0)
    sent = [e.msg for e in t.drain() if type(e) is Send and e.link == 2]
    assert [type(msg) for msg in sent] == [m.Waiting] and "waiting for a slot" in sent[0].reason
    assert t.links[2] is None and 2 in t.waiting["c"]
    # A, one of the seed's children, is back: its own slots make room for the newcomer.
    seed = [(OLD_SEED, "seed")] * K
    t.link_opened(3, now=2.0)
    t.handle(3, m.Join("c", "v100", 4500, (), m.Resume(
        100, 0, tuple(m.PeerRef(i, a) for i, a in seed), proof_of(100))), now=2.0)
    sent = [type(e.msg) for e in t.drain() if type(e) is Send and e.link == 2]
    assert sent[0] is m.Welcome and sent.count(m.Assign) == K
    assert -1 not in member(t, 2).depth and "c" not in t.waiting  # (it may adopt A: push-down)
    assert not t.rejections
    check_invariants(t)


def test_a_member_with_nowhere_else_to_go_takes_a_kept_slot():
    # B is back under the seed in three trees, and waits for A in the fourth; A is lost. With
    # every free slot kept, B is given one (one only) rather than be evicted.
    t = restarted(seed_kbps=5000, children=1000)
    forest = t.channels["c"].forest
    resume(t, 2, 101, 1, [(100, "v100")] + [(OLD_SEED, "seed")] * (K - 1))
    b = member(t, 2)
    kept = forest.seed.held
    assert b.parent[0] == m.NO_PEER and forest.seed.free == 0 and kept > 1
    t.handle(2, m.ParentLost(0, 100, m.NO_PEER), now=1.5)
    assert b.parent[0] == OLD_SEED and forest.seed.held == kept - 1 and not t.evictions
    check_invariants(t)


@pytest.mark.parametrize("case", ["late", "own id", "taken id", "no proof", "another key's proof",
                                  "another id's proof", "expired proof", "other address",
                                  "no room"])
def test_a_claim_the_tracker_cannot_honour_is_a_plain_join(case):
    # Too late, an id this tracker gives out itself or one already taken, or no token of our
    # predecessor's for that id: a new id (a plain join). A parent at another address than the
    # one named, or without room: placed as a newcomer is.
    t = restarted()
    seed = [(OLD_SEED, "seed")] * K
    assert child_slots(700, BITRATE, K) == 1
    resume(t, 2, 100, 0, seed, kbps=700 if case == "no room" else 4500)
    if case == "no room":
        resume(t, 3, 101, 1, [(100, "v100")] + seed[1:])
    claim, parent, now = {
        "late": (102, (100, "v100"), RESUME_WINDOW_S + 1.0),
        "own id": (t._next_id + 5, (100, "v100"), 1.0),
        "taken id": (100, (100, "v100"), 1.0),
        "other address": (102, (OLD_SEED, "elsewhere"), 1.0),  # (a leaf goes under A)
        "no room": (102, (100, "v100"), 1.0),  # A's one slot is B's
    }.get(case, (102, (100, "v100"), 1.0))
    proof = {"no proof": None, "another key's proof": proof_of(102, SimKey(4)),
             "another id's proof": proof_of(100),
             "expired proof": SimCrypto().issue_token(OLD_KEY, 102, OLD_SEED, "c", -1, 0.5),
             }.get(case, True)
    got = dict(resume(t, 4, claim, 2, [parent] + seed[1:], now=now, proof=proof))
    c = member(t, 4)
    if case in ("other address", "no room"):
        assert c.id == claim and got[0] == c.parent[0] != parent[0]
    else:
        assert c.id != claim and t._id_base <= c.id < t._next_id  # one of its own
    check_invariants(t)


resume_ops = st.lists(st.tuples(st.sampled_from(["resume", "resume", "resume", "join", "leave",
                                                 "lost", "wait"]),
                                st.integers(0, 30), st.integers(-1, K - 1),
                                st.lists(st.integers(0, 30), min_size=K, max_size=K),
                                st.sampled_from([0, 1500, 4500, 9000]), st.integers(0, 12)),
                      min_size=1, max_size=50)


@settings(max_examples=100, deadline=None)
@given(ops=resume_ops, seed_children=st.integers(0, 40))
def test_any_resume_claims_keep_the_forest_sound(ops, seed_children):
    """Whatever nodes claim (ids, homes, parents, children, in any order, lying or not), with
    newcomers among them: no member over its slots, no cycle, ids unique, and nobody
    unattached, nor any slot kept, nor any newcomer waiting, past its wait."""
    t = restarted(seed_kbps=8000, children=seed_children)
    now, next_link, links, newcomers = 1.0, 2, [], []
    joined_at: dict[int, float] = {OLD_SEED: 0.0}
    for op, claim, home, parents, kbps, children in ops:
        if op == "resume":
            link, next_link = next_link, next_link + 1
            old = [OLD_SEED] + list(range(100, 131))  # a small pool: claims collide
            refs = [(old[p], "seed" if old[p] == OLD_SEED else f"v{old[p]}") for p in parents]
            t.link_opened(link, now=now)
            proof = proof_of(old[claim]) if kbps != 1500 else proof_of(old[(claim + 1) % 31])
            t.handle(link, m.Join("c", f"v{old[claim]}", kbps, (), m.Resume(
                old[claim], home, tuple(m.PeerRef(i, a) for i, a in refs), proof, children)),
                now=now)
            if t.links.get(link) is not None:
                links.append(link)
                joined_at[member(t, link).id] = now
        elif op == "join":  # a newcomer: placed, or waiting for slots kept for others
            link, next_link = next_link, next_link + 1
            t.link_opened(link, now=now)
            t.handle(link, m.Join("c", f"new{link}", kbps), now=now)
            newcomers.append(link)
        elif op == "leave" and links:
            t.link_closed(links.pop(claim % len(links)), now=now)
        elif op == "lost" and links:
            mm = member(t, links[claim % len(links)])
            t.handle(mm.link, m.ParentLost(max(home, 0), mm.parent[max(home, 0)], m.NO_PEER),
                     now=now)
        elif op == "wait":
            now += claim / 10
            while (due := t.next_timer()) is not None and due <= now:
                t.handle_timer(now=due)
        t.drain()
        for link in newcomers:
            if t.links.get(link) is not None and link not in links:
                links.append(link)
                joined_at[member(t, link).id] = now
        newcomers = [link for link in newcomers if link in t._waiting_on]
        links = [link for link in links if t.links.get(link) is not None]
        forest = t.channels["c"].forest
        waiting = {(mid, k) for mid, mm in forest.members.items() if not mm.is_seed
                   for k in range(K) if mm.parent[k] == m.NO_PEER
                   and joined_at[mid] + RESUME_WAIT_S > now}
        check_invariants(t, waiting)
        assert all(joined_at[mid] + RESUME_WAIT_S > now for mid in forest.holding)
        # A newcomer waits only while slots are kept for others: no longer than the last wait.
        assert not newcomers or t._adopt_until
        assert len({member(t, link).id for link in links}) == len(links)


def test_the_simulators_tokens_name_the_key_that_issued_them():
    # As with real keys: a token of one tracker does not pass for another's (a restarted
    # tracker has a new key), and a forged one passes for none.
    crypto = SimCrypto()
    token = crypto.issue_token(SimKey(1), 5, 6, "c", 0, 10.0)
    assert crypto.token_valid(SimKey(1).public, token)
    assert not crypto.token_valid(SimKey(2).public, token)
    forged = m.Token(5, 6, "c", 0, 10.0, FORGED)
    assert not any(crypto.token_valid(SimKey(i).public, forged) for i in range(3))
