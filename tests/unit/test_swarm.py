"""Tracker, seed and peers wired in-process: placement, relaying, repair, eviction (pure, timed by the test)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshcast import effects as fx
from meshcast.messages import (NO_PEER, Assign, Detach, Hello, PeerRef, Reject, Subscribe, Token,
                               Unsubscribe)
from meshcast.crypto import Crypto, SigningKey
from meshcast.node import FORMER_KEY_S, NO_LINK
from meshcast.policy import HEADROOM, STRETCH_HEADROOM, child_slots
import peer.node as peer_node
from peer.node import _NO_PARENT, LATE_SLACK, PeerNode
from seed.node import SeedNode, live_first_seq
from tests.harness import Wiring
from tracker import node as tracker_node
from tracker.node import JOIN_HOLD_S, TOKEN_LIFETIME, TrackerNode

CHUNK_MS = 200
BITRATE = 2000


def payload(seq: int, size: int = 3000) -> bytes:
    return bytes((seq * 7 + i) % 251 for i in range(size))


def build(n_peers: int, *, seed_kbps: int = 4000, peer_kbps: int = 3000, strategy: str = "tree",
          rng_seed: int = 1, whole: bool = False, seed_first: bool = True,
          tracker_key: SigningKey | None = None,
          ) -> tuple[Wiring, TrackerNode, SeedNode, list[PeerNode]]:
    """A tracker, a seed and `n_peers` viewers joined one after another. `seed_first=False`:
    the viewers come before the broadcast (the seed is added but not started)."""
    crypto = Crypto()
    w = Wiring(whole=whole)
    tracker = w.add("tracker", TrackerNode(key=tracker_key or SigningKey(), crypto=crypto,
                                           rng=random.Random(rng_seed), strategy=strategy))
    seed = w.add("seed", SeedNode(channel="ch", key=SigningKey(), crypto=crypto, tracker="tracker",
                                  address="seed", upload_kbps=seed_kbps, bitrate_kbps=BITRATE,
                                  chunk_ms=CHUNK_MS))
    if seed_first:
        w.start(seed)
    peers = []
    for i in range(n_peers):
        p = w.add(f"p{i}", PeerNode(channel="ch", crypto=crypto, rng=random.Random(i),
                                    tracker="tracker", address=f"p{i}", upload_kbps=peer_kbps))
        w.start(p)
        peers.append(p)
    return w, tracker, seed, peers


def stream(w: Wiring, seed: SeedNode, chunks: int, *, gop: int = 5) -> None:
    for _ in range(chunks):
        seq = seed.next_seq
        seed.ingest(payload(seq), rap=seq % gop == 0, now=w.now)
        w.run()
        w.advance(w.now + CHUNK_MS / 1000)


def played(w: Wiring, peer: PeerNode) -> list[int]:
    return [d.head.seq for d in w.delivered[peer]]


def test_every_peer_plays_every_chunk_in_order_from_a_rap():
    w, tracker, seed, peers = build(12)
    stream(w, seed, 40)
    for p in peers:
        seqs = played(w, p)
        assert seqs == list(range(seqs[0], 40)), seqs
        assert w.delivered[p][0].head.rap
        assert p.skipped == 0
        assert [d.payload for d in w.delivered[p]] == [payload(s) for s in seqs]


@pytest.mark.parametrize("whole", [True, False])
def test_a_pushed_chunk_leaves_each_node_in_one_effect_for_all_its_children(whole):
    # (Whole chunks relayed, as in the simulator; or streamed, where the seed still sends
    # whole ones.) One `SendChunk` per node and pushed chunk, naming each child once.
    w, tracker, seed, peers = build(12, whole=whole)
    stream(w, seed, 20)
    pushes = [(node, eff) for node, eff in w.chunk_sends if eff.push]
    per_chunk = Counter((id(node), eff.chunk.head.seq) for node, eff in pushes)
    assert pushes and set(per_chunk.values()) == {1}
    assert all(len(set(eff.links)) == len(eff.links) > 0 for _, eff in pushes)
    assert max(len(eff.links) for _, eff in pushes) > 1  # (a node with several children)
    relays = {id(node) for node, _ in pushes} - {id(seed)}
    assert relays if whole else not relays  # streamed, relays forward bytes as they come


def test_no_parent_gets_more_children_than_its_upload_carries():
    w, tracker, seed, peers = build(30, seed_kbps=2500, peer_kbps=3000)
    forest = tracker.channels["ch"].forest
    for member in forest.members.values():
        assert member.used <= member.slots
        assert sum(len(c) for c in member.children) == member.used
    for p in peers:
        assert p._children() <= child_slots(p.upload_kbps, BITRATE, 4)
    # Peers carry most of the stream: the seed serves only its few slots.
    stream(w, seed, 20)
    total_peer = sum(p.bytes_from_peers for p in peers)
    total_seed = sum(p.bytes_from_seed for p in peers)
    assert total_peer / (total_peer + total_seed) > 0.8


def test_newcomer_is_rejected_with_a_reason_when_capacity_runs_out():
    # The seed carries exactly one copy (4 slots of 500 kbps); viewers upload nothing.
    w, tracker, seed, peers = build(3, seed_kbps=2500, peer_kbps=0)
    assert peers[0].rejected == ""
    assert all("channel full" in p.rejected for p in peers[1:])
    assert tracker.rejections == 2
    stream(w, seed, 10)
    assert played(w, peers[0])[-1] == 9  # the admitted viewer is not hurt by the others


@pytest.mark.parametrize("how", ["leave", "reject"])
def test_a_viewer_that_quits_while_a_link_opens_does_not_subscribe_over_it(how):
    # A refused newcomer gets no Assign at all (`test_tracker`), but a Reject can still follow
    # Assigns (an eviction, or no room left after a departure) while links to parents open.
    w, tracker, seed, peers = build(1, seed_kbps=8000, peer_kbps=0)
    late = w.add("late", PeerNode(channel="ch", crypto=Crypto(), rng=random.Random(9),
                                  tracker="tracker", address=""))
    late.start(now=w.now)
    opening = []  # hold back the late viewer's links to its parents: they are "still opening"
    while effects := [(n, e) for n in (tracker, seed, late) for e in n.drain()]:
        for node, eff in effects:
            if node is late and isinstance(eff, fx.Open) and eff.ref != "tracker":
                opening.append(eff)
            else:
                w._apply(node, eff)
    assert opening and seed._children() == 4
    if how == "leave":
        late.leave(now=w.now)
    else:
        late.handle(late.tracker_link, Reject("channel full after a departure"), now=w.now)
        assert late.rejected
    w.run()
    for eff in opening:
        w._apply(late, eff)
    w.run()
    assert seed._children() == 4 and not late.conns
    assert late.next_timer() is None  # nothing left to wake it for
    if how == "leave":
        assert tracker.channels["ch"].forest.seed.used == 4


def test_a_full_channel_is_stretched_before_anyone_is_refused():
    # 2,200 kbps carries 3 slots at HEADROOM (3.5) but 4 at STRETCH_HEADROOM (4.2): at 80 % the
    # channel fills up after 6 viewers; at 95 % each viewer brings the 4 slots it uses.
    assert child_slots(2200, BITRATE, 4) == 3 and child_slots(2200, BITRATE, 4, STRETCH_HEADROOM) == 4
    w, tracker, seed, peers = build(12, seed_kbps=4000, peer_kbps=2200)
    assert tracker.rejections == 0 and not any(p.rejected for p in peers)
    assert any("out of slots" in n for n in w.notices)
    forest = tracker.channels["ch"].forest
    assert all(m.used <= m.slots for m in forest.members.values())
    for p in peers:
        assert p._children() <= child_slots(p.upload_kbps, BITRATE, 4, STRETCH_HEADROOM)
    stream(w, seed, 20)
    assert all(played(w, p)[-1] == 19 for p in peers)


def test_seed_too_small_for_one_copy_is_told_how_much_it_needs():
    w, tracker, seed, peers = build(1, seed_kbps=1000)
    assert f"at least {math.ceil(BITRATE / HEADROOM)} kbps" in seed.rejected
    assert not peers[0].rejected and peers[0].id == NO_PEER  # held: the channel is not live
    assert "'ch' is not live yet" in w.notices[-1]


def test_viewers_who_come_before_the_broadcast_are_placed_when_it_starts():
    w, tracker, seed, peers = build(6, seed_first=False)
    assert not any(p.rejected for p in peers) and all(p.id == NO_PEER for p in peers)
    assert sum("'ch' is not live yet: waiting for its broadcast" in n for n in w.notices) == 6
    assert len(tracker.waiting["ch"]) == 6
    w.start(seed)
    assert tracker.waiting == {} and tracker._waiting_on == {}
    forest = tracker.channels["ch"].forest
    assert all(p.id in forest.members and -1 not in forest.members[p.id].depth for p in peers)
    # Placed in the order they came: the first comers got the seed's slots.
    assert [p.id for p in peers] == sorted(p.id for p in peers)
    stream(w, seed, 20)
    for p in peers:
        assert played(w, p) == list(range(20))


def test_a_held_join_is_refused_once_the_tracker_held_it_long_enough():
    w, tracker, seed, peers = build(2, seed_first=False)
    w.advance(10.0)
    late = w.add("late", PeerNode(channel="ch", crypto=Crypto(), rng=random.Random(9),
                                  tracker="tracker", address="late", upload_kbps=3000))
    w.start(late)
    w.advance(JOIN_HOLD_S - 1)
    assert not any(p.rejected for p in peers + [late])
    w.advance(JOIN_HOLD_S + 1)  # the first two waited JOIN_HOLD_S; the late one not yet
    for p in peers:
        assert p.rejected == f"channel 'ch' did not go live within {JOIN_HOLD_S:g} s"
        assert not p.conns  # they closed the tracker link too
    assert not late.rejected and list(tracker._waiting_on.values()) == ["ch"]
    w.start(seed)
    assert late.id >= 0 and set(tracker.channels["ch"].forest.members) == {seed.id, late.id}
    w.advance(JOIN_HOLD_S + 11)  # its deadline passes: it is a member now, and stays one
    assert not late.rejected and late.id in tracker.channels["ch"].forest.members
    assert tracker.timer_at("hold") is None  # no held join left to time out


def test_a_viewer_that_gives_up_waiting_is_forgotten():
    w, tracker, seed, peers = build(3, seed_first=False)
    peers[0].leave(now=w.now)
    w.run()
    assert len(tracker.waiting["ch"]) == 2
    w.kill(peers[1])
    assert list(tracker.waiting["ch"].values())[0].address == "p2"
    w.start(seed)
    assert set(tracker.channels["ch"].forest.members) == {seed.id, peers[2].id}


def test_held_joins_are_bounded(monkeypatch):
    monkeypatch.setattr(tracker_node, "MAX_WAITING", 2)
    w, tracker, seed, peers = build(3, seed_first=False)
    assert [bool(p.rejected) for p in peers] == [False, False, True]
    assert "too many viewers are waiting" in peers[2].rejected
    w.start(seed)
    assert all(p.id >= 0 for p in peers[:2])


@pytest.mark.parametrize("outage_chunks", [10, 1000])
def test_a_restarted_seed_is_played_on_after_the_outage(outage_chunks):
    # The broadcaster's seed dies and comes back (same key) `outage_chunks` chunk periods
    # later, numbering its chunks from the wall clock (`live_first_seq`). A viewer who arrives
    # during the outage waits for it; everyone plays the new chunks and skips only the outage.
    w, tracker, seed, peers = build(6)
    stream(w, seed, 20)
    w.kill(seed)
    late = w.add("late", PeerNode(channel="ch", crypto=Crypto(), rng=random.Random(9),
                                  tracker="tracker", address="late", upload_kbps=3000))
    w.start(late)
    assert late.id == NO_PEER and len(tracker.waiting["ch"]) == 1
    w.advance(w.now + outage_chunks * CHUNK_MS / 1000)
    # The old seed started at t = 0 with seq 0 = live_first_seq(0): the same timeline.
    first = live_first_seq(w.now, CHUNK_MS)
    assert 20 + outage_chunks - 1 <= first <= 20 + outage_chunks
    seed2 = w.add("seed", SeedNode(channel="ch", key=seed.key, crypto=Crypto(), tracker="tracker",
                                   address="seed", upload_kbps=4000, bitrate_kbps=BITRATE,
                                   chunk_ms=CHUNK_MS, first_seq=first))
    w.start(seed2)
    stream(w, seed2, 30)
    assert tracker.waiting == {} and not any(p.rejected for p in peers + [late])
    for p in peers + [late]:  # the new seed (a new node) is everyone's last-resort source
        assert p.seed_id == seed2.id and p.neighbours[seed2.id][1].parent == seed2.id
    for p in peers:
        assert played(w, p) == list(range(20)) + list(range(first, first + 30))
    assert played(w, late) == list(range(first, first + 30))


def test_tokens_are_renewed_for_sessions_longer_than_their_lifetime(monkeypatch):
    monkeypatch.setattr(tracker_node, "TOKEN_LIFETIME", 20.0)  # a broadcast of three lifetimes
    w, tracker, seed, peers = build(8, seed_kbps=8000, peer_kbps=6000)  # room for backups
    stream(w, seed, 300)  # 60 s
    for p in peers:
        assert all(s.token.expires > w.now + 5 for s in p.backup if s is not None)
        assert p.neighbours[p.seed_id][1].expires > w.now + 5  # the seed, the last resort
    # A relay dies: its children switch to their backups, whose tokens are still good.
    relay = max(peers, key=lambda p: p._children())
    orphans = {(p, k): p.backup[k].ref.id for p in peers for k, s in enumerate(p.primary)
               if s is not None and s.ref.id == relay.id and p.backup[k] is not None}
    assert orphans
    w.kill(relay)
    stream(w, seed, 20)
    for (p, k), backup in orphans.items():
        assert p.primary[k] is not None and p.primary[k].ref.id == backup
    for p in peers:
        if p is not relay:
            assert played(w, p)[-1] == seed.next_seq - 1


def test_a_renewal_naming_a_parent_we_have_left_is_ignored():
    # The tracker renews tokens (an Assign without a parent token) while our ParentLost is on
    # its way: that Assign names the parent we left. It must change nothing (nor be an error).
    w, tracker, seed, peers = build(8, seed_kbps=8000, peer_kbps=6000)
    stream(w, seed, 10)
    p, k = next((p, k) for p in peers for k in range(4) if p.backup[k] is not None)
    primary, backup = p.primary[k], p.backup[k]
    p.drain()
    p.handle(p.tracker_link, Assign(k, PeerRef(999, "gone"), None, backup.ref, backup.token),
             now=w.now)
    assert (p.primary[k], p.backup[k]) == (primary, backup) and p.tracker_link is not None
    assert p.drain() == []
    # One naming our parent takes the fresh backup token and leaves the subscription be.
    fresh = Token(p.id, backup.ref.id, "ch", k, w.now + 1, b"\0" * 64)
    p.handle(p.tracker_link, Assign(k, primary.ref, None, backup.ref, fresh, bool(p.relays >> k & 1)),
             now=w.now)
    assert p.primary[k] is primary and p.backup[k].token == fresh and p.drain() == []


def test_a_seed_that_refuses_our_token_is_not_asked_again_and_again(monkeypatch):
    # With the tracker gone, nobody renews tokens: after their lifetime, a viewer that needs a
    # chunk only the seed may have opens a link to it with an expired token, and is refused.
    # It must not open another at once (that loop ran at network speed; here it would not
    # settle).
    monkeypatch.setattr(tracker_node, "TOKEN_LIFETIME", 20.0)
    w, tracker, seed, peers = build(12)
    w.kill(tracker)
    stream(w, seed, 110)  # 22 s
    viewer = next(p for p in peers if p._link_to(p.seed_id) is None)
    assert viewer.neighbours[viewer.seed_id][1].expires < w.now
    viewer._note_gap(seed.next_seq + 1, w.now)  # lost, it thinks: nobody has it, the seed last
    w.advance(w.now + 1.0)
    assert sum("Hello refused: token expired" in n for n in w.notices) == 1
    assert viewer.seed_id not in viewer.neighbours  # until the tracker sends a fresh token
    stream(w, seed, 10)
    assert sum("Hello refused: token expired" in n for n in w.notices) == 1
    assert played(w, viewer)[-1] == seed.next_seq - 1


def test_a_blip_on_the_link_to_the_seed_leaves_the_seed_our_last_resort():
    # A network blip (an idle time-out) closes a viewer's link to the seed. Its token there is
    # still good, so the seed stays its last-resort source: a pull that needs it (re)opens a
    # link and is let in.
    w, tracker, seed, peers = build(12)
    stream(w, seed, 20)
    viewer = next(p for p in peers if p._link_to(p.seed_id) is not None)
    link = viewer._link_to(viewer.seed_id)
    _, seed_end = w.peer_of.pop(link)
    del w.peer_of[seed_end]
    seed.link_closed(seed_end, now=w.now, reason="Idle timeout")
    viewer.link_closed(link, now=w.now, reason="Idle timeout")
    w.run()
    assert viewer.seed_id in viewer.neighbours
    viewer._note_gap(seed.next_seq + 1, w.now)  # lost, it thinks: nobody has it, the seed last
    w.advance(w.now + 1.0)
    assert viewer._link_to(viewer.seed_id) is not None
    assert not any("Hello refused" in n for n in w.notices)
    stream(w, seed, 10)
    assert played(w, viewer)[-1] == seed.next_seq - 1


def test_viewers_play_through_a_tracker_restart_and_rejoin_it(monkeypatch):
    # The tracker dies; the trees it built go on carrying the stream. A new tracker (a new key,
    # ids of its own) comes up at the same address: the seed announces the channel again,
    # every viewer rejoins it, and the new tracker adopts the trees they come back with: the
    # same ids, the same parents, nobody moves, nothing skipped. It renews their tokens from
    # then on.
    monkeypatch.setattr(tracker_node, "TOKEN_LIFETIME", 20.0)
    w, tracker, seed, peers = build(8, seed_kbps=8000, peer_kbps=6000)
    stream(w, seed, 20)
    before = {p: (p.id, [s.ref.id for s in p.primary]) for p in peers}
    w.kill(tracker)
    assert sum("still playing, rejoining" in n for n in w.notices) == len(peers)
    stream(w, seed, 10)  # 2 s without a tracker
    assert all(played(w, p)[-1] == seed.next_seq - 1 for p in peers)
    new = w.add("tracker", TrackerNode(key=SigningKey(), crypto=Crypto(), rng=random.Random(5)))
    while seed.tracker_key != new.key.public:
        stream(w, seed, 1)
    # The seed is back first: the new tracker keeps a slot for each child it feeds until that
    # child is back, so no newcomer takes it.
    back = new.channels["ch"].forest.seed
    assert back.held > 0 and back.used + back.held == seed._children()
    stream(w, seed, 100)  # 20 s: every viewer comes back (jittered back-off)
    forest = new.channels["ch"].forest
    assert back.held == 0 and back.used == seed._children()
    assert seed.id in forest.members and seed.tracker_key == new.key.public
    for p in peers:
        assert not p.rejected and p.id in forest.members and -1 not in forest.members[p.id].depth
        assert p.tracker_key == new.key.public and p.seed_id == seed.id
        assert played(w, p)[-1] == seed.next_seq - 1
        assert p.skipped == 0
        assert (p.id, [s.ref.id for s in p.primary]) == before[p]
        assert forest.members[p.id].parent == before[p][1]
    # The new tracker repairs the trees: a relay dies, its children go on.
    stream(w, seed, 150)  # past a token lifetime under the new tracker
    relay = max(peers, key=lambda p: p._children())
    w.kill(relay)
    stream(w, seed, 20)
    for p in peers:
        if p is not relay:
            assert played(w, p)[-1] == seed.next_seq - 1


def test_a_restarted_trackers_predecessor_still_vouches_for_a_while(monkeypatch):
    # The seed is back at a new tracker (a new key); a viewer that is not back yet shows it a
    # token the old tracker signed: good for `FORMER_KEY_S`, as long as no newer key replaced
    # the old one's place; a token of any other key never.
    monkeypatch.setattr(tracker_node, "TOKEN_LIFETIME", 10 * FORMER_KEY_S)  # outlives the grace
    w, tracker, seed, peers = build(2)
    stream(w, seed, 5)
    viewer = peers[0]
    old_token = viewer.neighbours[seed.id][1]
    w.kill(tracker)
    new = w.add("tracker", TrackerNode(key=SigningKey(), crypto=Crypto(), rng=random.Random(5)))
    stream(w, seed, 20)  # 4 s: the seed is back (it retries every 2 s)
    assert seed.tracker_key == new.key.public

    def hello(link: int, token: Token, now: float) -> list:
        seed.link_opened(link, now=now)
        seed.handle(link, Hello(viewer.id, "ch", token), now=now)
        return [e.reason for e in seed.drain() if type(e) is fx.Close]

    assert hello(9001, old_token, w.now) == []
    stranger = Crypto().issue_token(SigningKey(), viewer.id, seed.id, "ch", NO_PEER, w.now + 60)
    assert hello(9002, stranger, w.now) == ["protocol error: Hello refused: token signature invalid"]
    late = w.now + FORMER_KEY_S + 1
    assert hello(9003, old_token, late) == ["protocol error: Hello refused: token signature invalid"]


def test_a_viewer_waiting_for_the_broadcast_outlasts_a_tracker_restart():
    # Held (the channel is not live) when the tracker goes: its first tries fail, it is not
    # refused for that ("tracker unreachable" is for a first contact), and it is placed once
    # the new tracker is up and the seed announces the channel.
    w, tracker, seed, peers = build(2, seed_first=False)
    w.kill(tracker)
    w.advance(w.now + 10)
    assert not any(p.rejected for p in peers)
    new = w.add("tracker", TrackerNode(key=SigningKey(), crypto=Crypto(), rng=random.Random(5)))
    w.advance(w.now + 60)  # every viewer's next try, backed off to at most 45 s
    assert len(new.waiting["ch"]) == 2
    w.start(seed)
    stream(w, seed, 10)
    assert all(played(w, p) == list(range(10)) for p in peers)


def test_a_viewer_tries_a_tracker_it_never_reached_three_times_then_gives_up():
    # A swamped tracker drops new clients' first packets: a first contact that fails is tried
    # again, REJOIN_S later and doubling (jittered), and only the last failure refuses the viewer.
    crypto = Crypto()
    w = Wiring()
    p = w.add("p0", PeerNode(channel="ch", crypto=crypto, rng=random.Random(1), tracker="tracker",
                             address="p0", upload_kbps=3000))
    w.start(p)
    tries = [w.now]
    for _ in range(2):
        assert not p.rejected
        at = p.timer_at("rejoin")
        w.advance(at)
        tries.append(at)
    assert p.rejected == "tracker unreachable: no such node (3 tries)"
    assert p.next_timer() is None  # nothing more: it gave up
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert 1.0 <= gaps[0] <= 3.0 and 2.0 <= gaps[1] <= 6.0, gaps
    assert w.notices[:2] == ["tracker not answering (no such node); trying again in about 2 s "
                           "(1 of 3 tries failed)",
                           "tracker not answering (no such node); trying again in about 4 s "
                           "(2 of 3 tries failed)"]


def test_a_viewer_placed_on_its_second_try_at_the_tracker():
    w, tracker, seed, peers = build(0)
    late = w.add("late", PeerNode(channel="ch", crypto=Crypto(), rng=random.Random(9),
                                  tracker="nowhere", address="late", upload_kbps=3000))
    w.start(late)  # its first try fails ...
    assert not late.rejected and late.id == NO_PEER
    late.tracker = "tracker"  # (... the tracker answers the next one)
    w.advance(late.timer_at("rejoin"))
    stream(w, seed, 10)
    assert late.id != NO_PEER and played(w, late)
    w.kill(tracker)  # once it has reached the tracker, it never gives up on it
    w.advance(w.now + 200)
    assert not late.rejected


def test_a_viewer_tries_a_vanished_tracker_less_and_less_often():
    w, tracker, seed, peers = build(2)
    w.kill(tracker)
    p = peers[0]
    tries = [w.now]
    for _ in range(8):
        due = p.next_timer()
        while due is not None and p.timer_at("rejoin") is None:
            w.advance(due)
            due = p.next_timer()
        at = p.timer_at("rejoin")
        w.advance(at)
        tries.append(at)
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert not p.rejected  # still playing what it can; the CLI does not exit
    assert 1 <= gaps[0] <= 3 and 2 <= gaps[1] <= 6, gaps  # 2 s at first, then doubling ...
    assert all(15 <= g <= 45 for g in gaps[-2:]), gaps  # ... up to 30 s (each ±50 %)


def test_trees_stay_shallow_and_relays_sit_near_the_root():
    w, tracker, seed, peers = build(60, seed_kbps=8000, peer_kbps=3000)
    forest = tracker.channels["ch"].forest
    depths = [max(m.depth) for m in forest.members.values() if not m.is_seed]
    assert max(depths) <= 5
    for m in forest.members.values():
        for k in range(4):
            for cid, relays in m.children[k].items():
                assert forest.members[cid].depth[k] == m.depth[k] + 1


def test_a_closed_parent_link_is_never_taken_for_the_parent_s():
    """A peer notes the link each parent's chunks come over, to skip a walk of its links per
    chunk. Once the link's remote names itself again, a chunk on it is that remote's; once the
    link closes, a chunk on it is refused, whatever happens to the parent."""
    w, tracker, seed, peers = build(8)
    stream(w, seed, 12)
    peer, k = next((p, k) for p in peers for k in range(4) if p.subs[5 * k + 4] >= 0)
    link = int(peer.subs[5 * k + 4])
    seq = seed.newest - (seed.newest - k) % 4  # the newest chunk of sub-stream k
    head = seed.chunk(seq).head
    assert peer._chunk_sender(link, head, w.now) == peer.subs[5 * k] == peer.primary[k].ref.id
    peer._name_conn(peer.conns[link], 999)  # its remote says it is another node (a `Hello`)
    assert peer._chunk_sender(link, head, w.now) == 999
    peer._pop_conn(link)  # closed, and nothing else done about it yet
    assert peer._chunk_sender(link, head, w.now) == NO_LINK


def test_killed_relay_descendants_keep_playing_via_backup_and_pull():
    w, tracker, seed, peers = build(20, seed_kbps=4000, peer_kbps=3000)
    stream(w, seed, 15)
    relay = max(peers, key=lambda p: p._children())
    assert relay._children() > 0
    children = [(p, k) for p in peers for k in range(4) if p.subs[5 * k] == relay.id]
    assert children
    w.kill(relay)
    stream(w, seed, 25)
    w.advance(w.now + 3)
    for p in peers:
        if p is relay:
            continue
        seqs = played(w, p)
        assert seqs == list(range(seqs[0], seqs[-1] + 1))
        assert seqs[-1] == 39
        # The parent ids a chunk's check reads follow the parents through the switches.
        assert list(p.subs)[::5] == [s.ref.id if s is not None else _NO_PARENT
                                        for s in p.primary]
    assert all(p.subs[5 * k] != relay.id for p, k in children)
    assert relay.id not in tracker.channels["ch"].forest.members
    peers[0].leave(now=w.now)
    assert list(peers[0].subs)[::5] == [_NO_PARENT] * 4


def test_a_spent_token_is_let_go_and_a_backup_keeps_its_own():
    """A parent's token is shown once, in the Subscribe; the peer then drops it (100k peers
    would keep 40 MB of them). A backup's token is kept for the switch, which still works."""
    w, tracker, seed, peers = build(20, seed_kbps=4000, peer_kbps=3000)
    stream(w, seed, 15)
    assert all(s is not None and s.token is None for p in peers for s in p.primary)
    backups = [s for p in peers for s in p.backup if s is not None]
    assert backups and all(s.token is not None for s in backups)
    relay = max(peers, key=lambda p: p._children())
    children = {c.node_id for subs in relay._subscribers for c, _ in subs}
    w.kill(relay)
    stream(w, seed, 10)
    switched = [p for p in peers if p.id in children]
    assert switched and all(played(w, p)[-1] == 24 and p.skipped == 0 for p in switched)
    assert all(s is None or s.token is None for p in switched for s in p.primary)


def test_chunks_of_a_silent_relay_are_pulled_once_later_than_their_path_usually_delivers():
    """A relay that vanishes without its links closing (before the idle time-out): its children
    pull each chunk it should have pushed `LATE_SLACK` after that sub-stream's usual arrival, not
    only near the playback deadline (2 s away here)."""
    w, tracker, seed, peers = build(12, seed_kbps=4000, peer_kbps=3000)
    for p in peers:
        p.playout_delay = 2.0
    stream(w, seed, 30)
    relay = max(peers, key=lambda p: p._children())
    orphaned = [(p, k) for k, subs in enumerate(relay._subscribers) for c, _ in subs
                for p in peers if p.id == c.node_id]
    assert orphaned
    w.dead.add(relay)  # silent: nothing more from it, no link closed
    first = seed.next_seq
    stream(w, seed, 12)
    for child, k in orphaned:
        late = [d for d in w.delivered[child] if d.head.seq >= first and d.head.seq % 4 == k]
        assert len(late) >= 2
        # A gap shows when a later chunk arrives (one interval on, two if that one was late
        # too); a deadline-driven pull would wait until 2.0 − REPAIR_MARGIN × 2.0 = 1.4 s.
        assert max(d.latency for d in late) <= LATE_SLACK + 2 * CHUNK_MS / 1000 + 0.05


def test_a_repair_timer_does_not_outlive_the_gaps_it_was_set_for():
    """A relay falls silent: its children see gaps and pull them. Once a peer has no gap left
    it must not keep a "repair" wake-up (in a simulation nine in ten repair wakes were left
    over like this, each one for nothing)."""
    w, tracker, seed, peers = build(12, seed_kbps=4000, peer_kbps=3000)
    stream(w, seed, 30)
    relay = max(peers, key=lambda p: p._children())
    orphaned = [(p, k) for k, subs in enumerate(relay._subscribers) for c, _ in subs
                for p in peers if p.id == c.node_id]
    w.dead.add(relay)
    first = seed.next_seq
    for _ in range(20):
        stream(w, seed, 1)
        for p in peers:
            if not len(p.gaps):
                assert p.timer_at("repair") is None, f"peer {p.id}"
    # The gaps were real, and repaired: the orphans played what the relay no longer pushed.
    assert orphaned
    for child, k in orphaned:
        assert any(d.head.seq >= first and d.head.seq % 4 == k for d in w.delivered[child])


def test_a_catch_up_takes_only_spare_upload():
    """A child that (re)subscribes asks for what it missed (`Subscribe.from_seq`). Its parent
    sends that as it answers pulls: with half a second of upload queued it drops the catch-up
    and says Missing (the child repairs elsewhere), while its pushes to everyone still go out.
    A burst queued ahead of every child's next push would make them all late."""
    w, tracker, seed, peers = build(12, seed_kbps=4000, peer_kbps=3000)
    stream(w, seed, 20)
    child, k, parent = next((p, k, q) for p in peers for k, slot in enumerate(p.primary)
                            for q in peers if slot is not None and slot.ref.id == q.id)
    w.backlog[parent] = 0.5
    from_seq = int(child.subs[5 * k + 1]) - 2 * 4
    token = tracker.crypto.issue_token(tracker.key, child.id, parent.id, child.channel, k, w.now + 60)
    child._out.append(fx.Send(child._link_to(parent.id),
                              Subscribe(k, token, from_seq, bool(child.relays >> k & 1))))
    w.run()
    assert [(seq, push) for node, seq, push in w.dropped if node is parent] == [
        (from_seq, False), (from_seq + 4, False), (int(child.subs[5 * k + 1]), False)]
    assert all(c.drops == 0 for c in parent.conns.values())  # nobody is blamed for it
    first = seed.next_seq
    stream(w, seed, 8)
    assert all(played(w, p)[-1] == first + 7 for p in peers)


def test_links_to_former_parents_are_closed_and_nobody_misses_a_chunk():
    """The tracker moves leaves to make room for relays near the root (push-down). A peer then
    closes its link to the parent it lost, on its next stall check, and keeps links only to
    its parents, its backups and the seed."""
    w, tracker, seed, peers = build(20)
    stream(w, seed, 30)
    assert [r for _, r in w.closed if r == "no longer a parent"]  # push-downs happened
    for p in peers:
        wanted = {s.ref.id for s in p.primary + p.backup if s is not None} | {p.seed_id}
        assert {c.node_id for c in p.conns.values() if c.ours} <= wanted
        assert p.skipped == 0
        seqs = played(w, p)
        assert seqs == list(range(seqs[0], 30))


def test_a_parent_closing_the_link_it_opened_to_us_is_not_taken_for_gone():
    """Our parent b also opened a link to us (to pull, say) and closes it once unused: our own
    link to b is up, so b stays our parent (no switch to the backup, nothing skipped)."""
    w, tracker, seed, peers = build(12)
    stream(w, seed, 10)
    by_id = {p.id: p for p in peers}
    a, k, slot, b = next(
        (p, k, s, by_id[s.ref.id]) for p in peers for k, s in enumerate(p.primary)
        if s is not None and s.ref.id in by_id
        and p.id not in {t.ref.id for t in by_id[s.ref.id].primary + by_id[s.ref.id].backup if t})
    w._apply(b, fx.Open(a.address, a.id))
    w.run()
    assert b._link_to(a.id) is not None
    stream(w, seed, 25)  # b checks its links every stall_timeout / 2 (1.8 s here)
    assert (b, "no longer a parent") in w.closed and b._link_to(a.id) is None
    assert a.primary[k] is slot
    assert a.skipped == 0


def test_forging_relay_is_cut_off_reported_and_evicted():
    w, tracker, seed, peers = build(20, seed_kbps=4000, peer_kbps=3000)
    stream(w, seed, 10)
    bad = max(peers, key=lambda p: p._children())
    w.tamper[bad] = lambda data: bytes([data[0] ^ 0xFF]) + data[1:]
    stream(w, seed, 20)
    w.advance(w.now + 3)
    assert tracker.evictions >= 1
    assert bad.rejected.startswith("evicted")
    for p in peers:
        if p is bad:
            continue
        for d in w.delivered[p]:
            assert d.payload == payload(d.head.seq)  # nothing corrupt reached a player
        seqs = played(w, p)
        assert seqs[-1] == 29
    assert any("failed verification" in n for n in w.notices)


def test_an_evicted_forger_that_ignores_its_reject_gets_nothing_more_from_anyone():
    # It takes no Reject, so it stays subscribed to its parents: the tracker's Revoke must make
    # them (and its backups, and the seed it may pull from) cut it off and refuse its tokens.
    w, tracker, seed, peers = build(20, seed_kbps=4000, peer_kbps=3000)
    stream(w, seed, 10)
    bad = max(peers, key=lambda p: p._children())
    nodes = {n.id: n for n in [seed, *peers]}
    holders = {nodes[s.ref.id] for s in [*bad.primary, *bad.backup] if s is not None} | {seed}
    w.tamper[bad] = lambda data: bytes([data[0] ^ 0xFF]) + data[1:]
    w.deaf[bad] = (Reject,)
    stream(w, seed, 20)
    w.advance(w.now + 3)
    assert tracker.evictions >= 1 and not bad.rejected  # evicted, and it never heard
    assert bad.id not in tracker.channels["ch"].forest.members
    for node in holders:
        assert node.revoked and bad.id in node.revoked
        assert all(c.node_id != bad.id for c in node.conns.values())
    assert any("revoked by the tracker: evicted" in reason for _, reason in w.closed)
    had = len(played(w, bad)) + len(w.skipped[bad])
    stream(w, seed, 20)  # it keeps asking its backups and the seed, with tokens now revoked
    w.advance(w.now + 5)
    assert len(played(w, bad)) + len(w.skipped[bad]) - had <= 2, "it is still being fed"
    assert not any(c.node_id == bad.id for n in holders for c in n.conns.values())
    for p in peers:
        if p is not bad:
            assert played(w, p)[-1] == seed.next_seq - 1


class Squatter(PeerNode):
    """A peer that keeps every link it opened, and whatever it subscribed to on them."""

    __slots__ = ()

    def _close_unused(self, now: float) -> None:
        pass


def test_a_viewer_that_stays_where_it_was_moved_away_from_is_dropped_there():
    """The tracker moves a viewer to its backup; it does not unsubscribe from its old parent
    (an honest peer does). The old parent drops it once the grace period is over, and refuses
    the spent token; a fresh one (the tracker moved it back) is taken."""
    w, tracker, seed, peers = build(20, seed_kbps=4000, peer_kbps=3000)
    stream(w, seed, 15)
    nodes = {p.id: p for p in peers}
    squatter, k, parent = next(
        (p, k, nodes[s.ref.id]) for p in peers for k, s in enumerate(p.primary)
        if s is not None and s.ref.id in nodes and p.backup[k] is not None
        and p.backup[k].ref.id != s.ref.id)
    squatter.__class__ = Squatter

    def token() -> Token:  # as the tracker issues them, now
        return tracker.crypto.issue_token(tracker.key, squatter.id, parent.id, "ch", k,
                                          w.now + TOKEN_LIFETIME)

    def subscribed() -> bool:
        return any(c.node_id == squatter.id and c.subs >> k & 1 for c in parent.conns.values())

    spent = token()
    w.advance(w.now + 0.1)
    squatter._switch(k, w.now, "squatting")  # to its backup, telling the tracker; it stays put
    w.run()
    assert squatter.primary[k].ref.id != parent.id
    assert subscribed() and parent.detached  # within the grace period
    stream(w, seed, 12)  # 2.4 s
    assert not subscribed()
    link = squatter._link_to(parent.id)
    squatter._out.append(fx.Send(link, Subscribe(k, spent, -1, False)))
    w.run()
    assert not subscribed()
    squatter._out.append(fx.Send(link, Subscribe(k, token(), -1, False)))
    w.run()
    assert subscribed()
    # Moved away and straight back: the subscription with the fresh token outlives the grace
    # period of the move before it.
    parent.handle(parent.tracker_link, Detach(squatter.id, k, w.now + TOKEN_LIFETIME), now=w.now)
    w.advance(w.now + 0.1)
    squatter._out.append(fx.Send(link, Subscribe(k, token(), -1, False)))
    w.run()
    stream(w, seed, 12)
    assert subscribed()
    # Unsubscribed when the next move's notice comes, back within its grace period with the
    # token that move spent: taken for now, and dropped when the grace period ends.
    squatter._out.append(fx.Send(link, Unsubscribe(k)))
    w.run()
    spent = token()
    w.advance(w.now + 0.1)
    parent.handle(parent.tracker_link, Detach(squatter.id, k, w.now + TOKEN_LIFETIME), now=w.now)
    squatter._out.append(fx.Send(link, Subscribe(k, spent, -1, False)))
    w.run()
    assert subscribed()
    stream(w, seed, 12)
    assert not subscribed()
    for p in peers:
        assert played(w, p)[-1] == seed.next_seq - 1 and p.skipped == 0


def test_whole_chunks_play_out_exactly_as_streamed_ones():
    """The simulator hands each chunk over whole (`chunk_received`), the runtime as a stream
    (`chunk_begin`/`chunk_data`/`chunk_end`): the nodes decide the same either way, through a
    relay's death and a forger's eviction."""

    def run(whole: bool) -> tuple[list, list[str]]:
        # One tracker key for both runs: the node ids in the notices start where it says.
        key = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
        w, tracker, seed, peers = build(20, seed_kbps=4000, peer_kbps=3000, whole=whole,
                                        tracker_key=key)
        stream(w, seed, 10)
        by_children = sorted(peers, key=lambda p: p._children())
        w.tamper[by_children[-1]] = lambda data: bytes([data[0] ^ 0xFF]) + data[1:]
        w.kill(by_children[-2])
        stream(w, seed, 20)
        w.advance(w.now + 3)
        return [(played(w, p), w.skipped[p], p.bytes_up, p.forged) for p in peers], w.notices

    streamed, whole = run(False), run(True)
    assert any("failed verification" in n for n in streamed[1])
    assert whole == streamed
    # (Shared by every node until its first streamed chunk, or chunk from the seed: never
    # written.)
    assert not peer_node._NO_RX and not peer_node._NO_RECEIVING and not peer_node._NONE_FROM_SEED


@pytest.mark.parametrize("strategy", ["random", "mesh"])
def test_baselines_deliver_too(strategy):
    w, tracker, seed, peers = build(10, seed_kbps=6000, peer_kbps=3000, strategy=strategy)
    stream(w, seed, 40)
    w.advance(w.now + 3)
    for p in peers:
        seqs = played(w, p)
        assert seqs, strategy
        assert seqs[-1] >= 35
