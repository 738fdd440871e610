"""The nodes and the tracker agree on the trees: every parent → child feed a node keeps up is
one the tracker placed, give or take the messages in flight.

A feed the tracker does not know about is upload it did not give: enough of them and a parent's
queue outgrows its slots, every chunk below it comes late, and a channel collapses (a refused
viewer kept its feeds this way, until fixed). A seeded run with churn, NAT, refusals and a
stretched channel is probed every 5 s, and no difference may outlive two probes.
"""

from __future__ import annotations

from collections import Counter

from meshcast.node import NO_LINK
from peer import node as peer_node
from peer.node import PeerNode
from sim.driver import Simulation
from sim.scenario import parse_scenario

PROBE_S = 5.0


def busy_channel():
    return parse_scenario({
        "stream": {"bitrate_kbps": 1000, "chunk_ms": 200, "substreams": 4, "duration_s": 60},
        "seed": {"upload_kbps": 8000},
        "peers": {"count": 400, "arrival": {"kind": "poisson", "rate": 10},
                  "session": {"kind": "lognormal", "mu": 3.4, "sigma": 1.0},
                  "graceful_fraction": 0.5, "nat_fraction": 0.3,
                  "upload": [{"share": 0.3, "kbps": 300}, {"share": 0.5, "kbps": 1300},
                             {"share": 0.2, "kbps": 3300}]},
        "network": {"model": "coordinates", "rtt_min_ms": 10, "rtt_max_ms": 200},
        "run": {"seed": 3},
    })


def test_no_feed_outlives_the_tracker_s_placement():
    sim = Simulation(busy_channel())
    age: Counter[tuple[str, int, int, int]] = Counter()
    worst: list[tuple[float, int]] = []
    pushes_checked: list[int] = []
    senders_checked: list[int] = []
    links_cached: list[int] = []
    pulls_seen: list[int] = []

    def probe() -> None:
        now = sim.sched.now
        fed, placed = set(), set()
        for i, node in enumerate(sim.nodes[1:], 1):
            if node is not None and sim.alive[i]:
                # A chunk's sender is read from `_ids`, not from `conns`: the two agree.
                assert len(node._ids) == 2 * len(node.conns), node.id
                for link, conn in node.conns.items():
                    assert node._sender(link) == conn.node_id, (node.id, link)
                    senders_checked.append(link)
                assert node._sender(len(sim.owner) + 7) == NO_LINK
                if isinstance(node, PeerNode):
                    # A peer with no pull in flight holds the shared empty dict again.
                    if not node.requested:
                        assert node.requested is peer_node._NO_REQUESTS, node.id
                    else:
                        pulls_seen.append(len(node.requested))
                    # A sub-stream's parent link noted in `subs` is open and is the parent's.
                    for k in range(len(node.subs) // 5):
                        link = int(node.subs[5 * k + 4])
                        if link >= 0:
                            assert node._sender(link) == node.subs[5 * k], (node.id, k)
                            links_cached.append(link)
                if isinstance(node, PeerNode) and not node._recheck_links:
                    # `_close_unused` skips its walk: nothing it would close may be there.
                    assert not [c for c in node.conns.values()
                                if c.ours and c.node_id != node.seed_id
                                and c.node_id not in node.neighbours
                                and not node._is_parent(c.node_id)], node.id
            if node is not None and sim.alive[i] and node.id >= 0:
                for k, subs in enumerate(node._subscribers):
                    fed.update((node.id, c.node_id, k) for c, _ in subs
                               if sim.owner[c.link ^ 1] >= 0)  # the child is still there
                    # A chunk goes to the subscribers as listed (their flat copy is current).
                    K = node.substreams
                    next_k = (node.newest // K + 1) * K + k  # sub-stream k's next chunk
                    for seq in (next_k, next_k - 5 * K):
                        want = [c.link for c, first in subs if first <= seq]
                        assert node._push_targets(seq) == want, (node.id, k, seq)
                        if want:
                            assert node._push_targets(seq, but=want[0]) == want[1:]
                            pushes_checked.append(len(want))
        tracker = sim.nodes[0]  # node 0 (made when the run starts)
        for member in tracker.channels["ch0"].forest.members.values():
            for k, kids in enumerate(member.children):
                placed.update((member.id, child, k) for child in kids)
        now_diff = {("fed only",) + e for e in fed - placed} | {
            ("placed only",) + e for e in placed - fed}
        for e in list(age):
            if e not in now_diff:
                del age[e]
        age.update(now_diff)
        worst.append((now, max(age.values(), default=0)))
        sim.sched.at(now + PROBE_S, probe)

    sim.sched.at(PROBE_S, probe)
    result = sim.run()
    summary = result.summary()
    # The run is the kind that went wrong: viewers refused, and churn.
    assert summary["rejected"] > 0
    assert sum(1 for s in sim.specs if s.leave_at < 60) > 50
    assert len(worst) >= 10
    assert len(pushes_checked) > 300 and max(pushes_checked) > 1
    assert len(senders_checked) > 1000
    assert len(links_cached) > 500
    assert pulls_seen  # some probe found pulls in flight
    # The empty dicts peers share until they need their own were never written to.
    assert not peer_node._NO_RX and not peer_node._NO_RECEIVING and not peer_node._NO_REQUESTS
    assert not peer_node._NONE_FROM_SEED
    stuck = [(t, n) for t, n in worst if n > 2]
    assert not stuck, f"a feed and the tracker disagreed for over {2 * PROBE_S:g} s: {stuck}"
