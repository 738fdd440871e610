"""The simulator driver: runs the real TrackerNode, SeedNode and PeerNode on a virtual clock.

It is the second of the two drivers (DESIGN §1) and, like the runtime, it only pumps: it
turns node effects into scheduled deliveries and calls the nodes back at those times. What it
adds is the network model (`sim.network`: propagation, FIFO uplinks, cut-through, loss) and
the workload (`sim.workload`).

Modelling choices that mirror the runtime, in one place:

- Node indexes 0..P-1 are the tracker processes (`[tracker] processes`, channel c tracked by
  process c mod P, as a site spreads its channels over processes), then the C channel seeds,
  then the peers; a node's address is its index as a string.
- Opening a link costs one RTT (QUIC handshake): the acceptor learns of it after one one-way
  delay, the opener after two. A connection to a node that is gone fails after
  `CONNECT_TIMEOUT` (the runtime's connect time-out), unless the node comes back meanwhile (a
  restarted tracker): the opener's first packet is sent again on aioquic's schedule
  (`INITIAL_RESENDS`), and the first copy sent after the node is back opens the link.
- Control messages: propagation only (`Network.send_control`), in order per link.
- A chunk transfer is one event at its last byte's arrival, where the receiver gets the whole
  chunk at once (`chunk_received`) and passes it on whole (`SendChunk`); cut-through is in the
  timing: a relay's onward transfers start from the time the chunk's head reached it
  (`sim.network.transfer`), so a relay forwards before it has the whole chunk, as the runtime
  does.
- Back-pressure as in `meshcast.runtime`: a chunk is dropped for a child when it would wait
  too long in the sender's queue (`meshcast.policy.drop_chunk`: pushes wait up to 2 s, pull
  answers and catch-ups only 0.1 s), and the node is told (`chunk_dropped`).
- An abrupt departure (kill -9) is seen by the other end only after `IDLE_TIMEOUT` (the QUIC
  idle time-out, `meshcast.policy.LINK_IDLE_TIMEOUT_S`), unless the node's own stall detection
  acts first; a graceful one closes links.
- Crypto is `SimCrypto`: same checks on fields, no curve arithmetic.
- A tracker's CPU (`[tracker]` `handshake_us` … `verify_us`, from `bench/tracker_fronts.py`,
  real processes): a real tracker is one Python process, so it is one server here. Each QUIC
  handshake it accepts (`handshake_us`), message it receives (`receive_us`) and event it
  handles (`event_us`; a held join it takes again is one too), message it sends (`send_us`)
  and signature it makes or checks (`sign_us`, `verify_us`,
  counted by its own `SimCrypto`; a batch of tokens is one) takes that much of it, in arrival
  order. The node decides at once; what it sends leaves once the CPU has got
  through everything before it, and a handshake completes then too. A client's first packet
  that finds more than `backlog_s` of work queued is lost (the socket's receive buffer is
  full) and its resends (`INITIAL_RESENDS`) try again; a client whose handshake finishes after
  its `CONNECT_TIMEOUT` fails to connect. Its open links' heartbeats load it steadily
  (`keepalive_us` per link and second, charged every `KEEPALIVE_TICK`). Messages on open links
  are never lost (QUIC would send them again).
- Fronts (`[tracker] fronts` = F, `meshcast tracker --fronts`): each tracker process has F
  more CPUs doing its QUIC, and a link's is its client's index mod F. There go the
  handshakes (and the backlog that loses first packets), receiving messages (`receive_us`),
  sending the tracker's (`send_us`, in order per front) and the heartbeats (spread evenly);
  the tracker process pays `relay_us` instead for each message, link opened or closed that
  crosses the local stream, plus its `event_us`, signatures and verifications.
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from librt.vecs import extend, vec
from mypy_extensions import i32, i64

from meshcast import effects as fx
from meshcast import messages as m
from meshcast import wire
from meshcast.crypto import SimCrypto, SimKey
from meshcast.node import NodeBase, RelayNode
from meshcast.policy import LINK_IDLE_TIMEOUT_S, drop_chunk
from peer.node import PeerNode
from seed.node import SeedNode
from sim.metrics import MetricsCollector
from sim.network import CoordinateLatency, Loss, Network, build_latency
from sim.scenario import Scenario
from sim.scheduler import Scheduler
from sim.workload import PeerSpec, peers_for
from tracker.node import TrackerNode

BUFFER_S: Final = 3.0
"""Each simulated peer keeps 3 s of chunks for pulls (memory: 100k peers)."""
CONNECT_TIMEOUT: Final = 5.0
INITIAL_RESENDS: Final[tuple[float, ...]] = (0.2, 0.6, 1.4, 3.0)
# (Typed as a tuple of any length: compiled (mypyc), a fixed-size tuple of floats read in
# `_handshake` raised "value for final name ... was not set".)
"""When a QUIC client sends its first packet again, in seconds after the first, while nothing
answers: aioquic's probe time-out, 2 × its 0.1 s initial RTT, doubling each time (those within
`CONNECT_TIMEOUT`)."""
IDLE_TIMEOUT: Final = LINK_IDLE_TIMEOUT_S
KEEPALIVE_TICK: Final = 0.01
"""How often a tracker's CPU for its links' heartbeats is charged (its share of the tick)."""
GOP_MS: Final = 1000
"""Default keyframe interval (`[stream] gop_ms`)."""
TRACKER: Final = 0
"""The first (with one, the) tracker process's node index."""


def _arenas_on_huge_pages() -> None:
    """Where the C module `sim/_arenas.c` is built (the compiled copy): Python's object arenas
    from now on come from memory marked for transparent huge pages, for the rest of the
    process. A large run reads its ~1 GB of small objects in no order, and on 4 kB pages a
    cold read walks the page tables too. Results do not depend on it."""
    try:
        from sim._arenas import use_huge_pages
    except ImportError:
        return
    use_huge_pages()


@dataclass
class RunResult:
    metrics: MetricsCollector
    events: int
    wall_s: float
    peers: int
    tracker: TrackerNode

    def summary(self) -> dict[str, Any]:
        out = self.metrics.summary()
        out["events"] = self.events
        out["wall_s"] = round(self.wall_s, 3)
        return out


def _control_size(msg: m.Message) -> int:
    """Bytes a control message takes on the wire (estimated for the frequent, variable ones)."""
    if isinstance(msg, m.Have):
        return 14 + len(msg.bitmap)
    if isinstance(msg, (m.Request, m.Missing)):
        return 10 + 5 * len(msg.seqs)
    return wire.frame_size(msg)


class Simulation:
    """One scenario run. `run()` returns a `RunResult`."""

    def __init__(self, scenario: Scenario, *, progress: Callable[[float, int], Any] | None = None,
                 playout_delay: float | None = None) -> None:
        _arenas_on_huge_pages()
        self.scenario = sc = scenario
        self.progress = progress
        self.playout_delay = sc.peers.playout_delay_s if playout_delay is None else playout_delay
        self.rng = random.Random(sc.run.seed)
        self.sched = Scheduler()
        self.channels = sc.channels.count
        self.channel_names = [f"ch{c}" for c in range(self.channels)]
        """One string per channel, shared by its seed and peers (and so by every chunk head and
        message naming it): a node compares a chunk's channel with its own by identity first,
        without reading a string of its own (~50 bytes a peer, cold in a large run)."""
        self.trackers = P = sc.tracker.processes
        self.first_peer = P + self.channels
        """Node indexes: trackers below `trackers`, seeds below `first_peer`, then peers."""
        self.specs: list[PeerSpec] = peers_for(sc, random.Random(self.rng.random()),
                                               first_id=self.first_peer)
        n = self.first_peer + len(self.specs)
        self.n = n
        latency = build_latency(sc.network, n, random.Random(self.rng.random()))
        uploads = [0.0] * n
        for t in range(P):
            uploads[t] = 1e9
        for c in range(self.channels):
            uploads[P + c] = sc.seed.upload_kbps
        for spec in self.specs:
            uploads[spec.id] = spec.upload_kbps if spec.upload_kbps > 0 else 1.0
        downloads = None
        if sc.peers.download_kbps:
            downloads = [0.0] * self.first_peer + [sc.peers.download_kbps] * len(self.specs)
        self.net = Network(latency, uploads, random.Random(self.rng.random()),
                           download_kbps=downloads,
                           loss=Loss(sc.network.loss, sc.network.chunk_drop))
        self.coords = latency.pos if isinstance(latency, CoordinateLatency) else None
        self.metrics = MetricsCollector(n, sc.stream.duration_s, trackers=P, fronts=sc.tracker.fronts)
        self.crypto = SimCrypto()
        self.cpu = sc.tracker
        self.cpu_on = (self.cpu.handshake_us, self.cpu.event_us, self.cpu.send_us,
                       self.cpu.receive_us, self.cpu.relay_us, self.cpu.sign_us,
                       self.cpu.verify_us, self.cpu.keepalive_us) != (0,) * 8
        self.fronts = self.cpu.fronts
        """Front processes per tracker process (`[tracker] fronts`; 0: it does its own QUIC)."""
        self.tracker_crypto = [SimCrypto() for _ in range(P)]
        """Each tracker's own, counting its signatures."""
        # Per-node and per-link columns are `vec`s: compact like an `array`, and a compiled build
        # (mypyc) reads and writes their items natively (an array's go through Python's item
        # protocol, with each index and value boxed).
        self.tracker_free = vec[float]([0.0] * P)
        """When each tracker's CPU has got through the work given it so far."""
        self.front_free = vec[float]([0.0] * (P * self.fronts))
        """... and each front's (tracker t's fronts are t·F … t·F + F − 1)."""
        self.tracker_gen = vec[i64]([0] * P)
        """Which process at each tracker's address (a restart starts another): its queued
        answers die with it."""
        self._tracker_us = 0.0
        """CPU (µs) of the event a tracker is handling, before its signatures and sends."""
        self.nodes: list[Any] = [None] * n
        self.alive = vec[bool]([False] * n)
        self.owner = vec[i32]([-1, -1])
        """Link → the node at that end, -1 once closed (links are indexes, from 2 on). It and
        the other per-link columns grow in `_new_link`, which replaces them (`extend` returns
        a new `vec`): a local alias is stale after it."""
        self.first_link = vec[i64]([-1] * n)
        self.next_link = vec[i64]([-1, -1])
        """Each node's link ends, newest first, as a chain: node → its newest end
        (`first_link`), end → the node's end registered before it (`next_link`); -1 ends it.
        Closed ends stay in the chain (their `owner` is -1)."""
        self.delay = vec[float]([0.0, 0.0])
        """Link → the one-way delay between its ends (the latency model's, kept at open: a
        chunk sent on the link then reads one number, not both ends' coordinates)."""
        self._ctx_node = -1
        """While a relay reacts to a chunk it just received: the relay, the chunk's seq and
        when its head arrived (-1: none)."""
        self._ctx_seq = -1
        self._ctx_head = 0.0
        self._lists: list[list[fx.Effect]] = []
        """Empty effect lists, handed to the nodes in turn (`NodeBase.swap_effects`)."""
        self._park: list[fx.Effect] = []
        """The one list every peer and seed queues its effects in between two of its events.
        Each event's effects are taken (`_pump`) before the next event runs, so it is empty
        whenever an event starts, and it is hot: a list of each node's own, cold by its next
        event, cost a cache miss on every event at 100k peers."""
        chunk_bytes = int(sc.stream.bitrate_kbps * sc.stream.chunk_ms / 8)
        self.payload = bytes(chunk_bytes)
        self.rap_every = max(1, round(sc.stream.gop_ms / sc.stream.chunk_ms))
        self.joined = vec[float]([math.nan] * n)
        self.peer_rng = random.Random(self.rng.random())
        """One generator for all peers: a Mersenne Twister is 2.5 KB, and one timeline keeps
        the draws in a deterministic order anyway."""
        self.live_at = sc.seed.start_s
        """When the seeds go live (`[seed] start_s`)."""
        self.started = vec[bool]([False] * n)
        """True once a peer has played its first chunk."""
        self.refused: set[int] = set()
        self.back_at: dict[int, float] = {}
        """Nodes that are down but will answer again at their address (the tracker during a
        restart): when."""
        # The frequent event callbacks, bound once (a compiled build would allocate a method
        # object for every event scheduled).
        self._chunk_arrives_cb: Callable[..., None] = self._chunk_arrives
        self._message_cb: Callable[..., None] = self._message
        self._closed_cb: Callable[..., None] = self._closed
        self.sched.wakes(n, self._timer)
        """Each node's wake at its first deadline (`_pump` tells the calendar when that is)."""
        self._warm()

    # -- set-up --------------------------------------------------------------------------------

    def _channel(self, c: int) -> str:
        return self.channel_names[c]

    def run(self) -> RunResult:
        # No cyclic garbage collection during a run: it allocates millions of short-lived
        # objects and forms no reference cycles (`tests/sim/test_driver_gc.py` checks it), yet
        # the collector's passes over a large, growing heap took 10 % (pure Python) to 20 %
        # (compiled) of a 10k-peer run, and more as the audience grows.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if gc_was_enabled:
                # What the run made is all in the youngest generation (nothing moved it on),
                # so the collector's first pass after it would walk every object of the run:
                # 0.13 s after 10k peers × 20 s. Move it to the oldest generation, where a run
                # with the collector on would have put what lives on.
                gc.freeze()
                gc.unfreeze()
                gc.enable()

    def _run(self) -> RunResult:
        sc = self.scenario
        wall = time.perf_counter()
        for t in range(self.trackers):
            self._start_tracker(t, SimKey(0 if t == 0 else self.n + self.trackers + t))
            if self.cpu.keepalive_us > 0:
                self.sched.at(KEEPALIVE_TICK, self._keepalives, t)
            if sc.tracker.restart_at_s > 0:
                self.sched.at(sc.tracker.restart_at_s, self._tracker_down, t)
        for c in range(self.channels):
            index = self.trackers + c
            seed = SeedNode(channel=self._channel(c), key=SimKey(index), crypto=self.crypto,
                            tracker=str(c % self.trackers), address=str(index),
                            upload_kbps=int(sc.seed.upload_kbps),
                            bitrate_kbps=int(sc.stream.bitrate_kbps), substreams=sc.stream.substreams,
                            chunk_ms=sc.stream.chunk_ms)
            self.nodes[index] = seed
            self.alive[index] = True
            self.sched.at(max(0.0, sc.seed.start_s - sc.seed.lead_s), self._seed_up, index)
        for spec in self.specs:
            if spec.join_at < sc.stream.duration_s:
                self.sched.at(spec.join_at + 0.05, self._join, spec)
        events = self.sched.run(sc.stream.duration_s, progress=self.progress)
        for spec in self.specs:
            node = self.nodes[spec.id]
            if node is None:
                continue
            peer: PeerNode = node
            self.metrics.peer_played(spec.id, peer.delivered, peer.delivered - peer.late,
                                     peer.skipped, peer.latency_sum, peer.bytes_from_peers,
                                     peer.bytes_from_seed)
            if self.alive[spec.id] and peer.id >= 0:
                tracker: TrackerNode = self.nodes[spec.channel % self.trackers]
                self.metrics.depth(spec.id, tracker.depth_of(peer.channel, peer.id))
        return RunResult(self.metrics, events, time.perf_counter() - wall, len(self.specs),
                         self.nodes[TRACKER])

    def _start_tracker(self, t: int, key: SimKey) -> None:
        self.back_at.pop(t, None)
        self.tracker_crypto[t] = SimCrypto()
        self.tracker_gen[t] += 1
        self.tracker_free[t] = self.sched.now
        self.nodes[t] = TrackerNode(key=key, crypto=self.tracker_crypto[t],
                                    rng=random.Random(self.rng.random()),
                                    strategy=self.scenario.run.strategy)
        self.alive[t] = True
        self.sched.revive(t)

    def _keepalives(self, t: int) -> None:
        """Tracker t's CPU (or its fronts', evenly) for its open links' heartbeats over the
        last tick."""
        if self.alive[t]:
            tracker: TrackerNode = self.nodes[t]
            cost = len(tracker.links) * self.cpu.keepalive_us * 1e-6 * KEEPALIVE_TICK
            F, now = self.fronts, self.sched.now
            if F:
                for q in range(t * F, t * F + F):
                    self.front_free[q] = max(now, self.front_free[q]) + cost / F
                    self.metrics.front_work(q, cost / F, "keepalives")
            else:
                self.tracker_free[t] = max(now, self.tracker_free[t]) + cost
                self.metrics.tracker_keepalives(t, cost)
        self.sched.after(KEEPALIVE_TICK, self._keepalives, t)

    def _front(self, t: int, node: int) -> int:
        """The front of tracker t that holds node's link (by the node's index, as Linux picks
        a front by the client's address); -1 without fronts or node."""
        F = self.fronts
        return t * F + node % F if F and node >= 0 else -1

    def _front_busy(self, q: int, cost_us: float, what: str) -> float:
        """Queue `cost_us` of work on front q; when it is done."""
        now = self.sched.now
        start = max(now, self.front_free[q])
        self.front_free[q] = done = start + cost_us * 1e-6
        self.metrics.front_work(q, cost_us * 1e-6, what, waited_s=start - now)
        return done

    def _tracker_down(self, t: int) -> None:
        """Tracker process t stops (a restart): its links close, each end told after one
        one-way delay; a new tracker answers at the same address `down_s` later."""
        self._stop(t, "tracker restarting", killed=False)
        down_s = self.scenario.tracker.down_s
        self.back_at[t] = self.sched.now + down_s
        self.sched.after(down_s, self._start_tracker, t, SimKey(self.n + t))

    def _seed_up(self, index: int) -> None:
        """The seed starts and announces its channel; it ingests from the broadcast's start
        (`[seed] start_s`), and at least 0.1 s after announcing."""
        seed: SeedNode = self.nodes[index]
        self._call(index, lambda now: seed.start(now=now))
        now = self.sched.now
        self.sched.at(max(now + 0.1, self.scenario.seed.start_s), self._ingest, index)

    def _ingest(self, index: int) -> None:
        seed: SeedNode = self.nodes[index]
        now = self.sched.now
        rap = seed.next_seq % self.rap_every == 0
        self._call(index, lambda t: seed.ingest(self.payload, rap=rap, now=t))
        self.sched.at(now + self.scenario.stream.chunk_ms / 1000, self._ingest, index)

    def _join(self, spec: PeerSpec) -> None:
        i = spec.id
        can_relay = spec.upload_kbps > 0 and not spec.nat
        node = PeerNode(channel=self._channel(spec.channel), crypto=self.crypto,
                        rng=self.peer_rng, tracker=str(spec.channel % self.trackers),
                        buffer_s=BUFFER_S,
                        address=str(i) if can_relay else "", upload_kbps=int(spec.upload_kbps),
                        coords=self.coords[i] if self.coords else (),
                        playout_delay=self.playout_delay)
        self.nodes[i] = node
        self.alive[i] = True
        self.sched.revive(i)
        self.joined[i] = self.sched.now
        self.metrics.peer_joined(i, now=self.sched.now)
        self._call(i, lambda now: node.start(now=now))
        leave_at = self.sched.now + (spec.leave_at - spec.join_at)
        if leave_at < self.scenario.stream.duration_s:
            self.sched.at(leave_at, self._leave, i, spec.graceful)

    def _leave(self, i: int, graceful: bool) -> None:
        node = self.nodes[i]
        if not self.alive[i]:
            return
        self.metrics.peer_left(i, now=self.sched.now)
        if graceful:
            self._call(i, lambda now: node.leave(now=now))
            self.alive[i] = False
            self.sched.disarm(i)
            return
        self._stop(i, "idle timeout", killed=True)

    def _stop(self, i: int, reason: str, *, killed: bool) -> None:
        """Node i's process ends and sends nothing more. Each remote end of its links learns so
        at its idle time-out if it was killed (kill -9), else one one-way delay later (the
        process closed its connections on the way out). Its index is free for a new node."""
        self.alive[i] = False
        self.nodes[i].drain()
        self.sched.disarm(i)
        owner = self.owner
        for link in self._links_of(i):
            owner[link] = -1
            if owner[link ^ 1] >= 0:
                delay = IDLE_TIMEOUT if killed else self.delay[link]
                self.sched.after(delay, self._closed_cb, link ^ 1, reason)
        self.first_link[i] = -1

    def _links_of(self, i: int) -> list[int]:
        """Node i's open links, in the order they were registered."""
        owner, after, links = self.owner, self.next_link, []
        link = self.first_link[i]
        while link >= 0:
            if owner[link] == i:
                links.append(link)
            link = after[link]
        links.reverse()
        return links

    # -- pumping -------------------------------------------------------------------------------

    def _call(self, i: int, fn: Callable[[float], Any]) -> None:
        fn(self.sched.now)
        self._pump(i)

    # The nodes are `Any` in `self.nodes`; the annotated locals below are for a compiled build
    # (mypyc), which then calls the node's methods directly instead of through Python.

    def _pump(self, i: int) -> None:
        node: NodeBase = self.nodes[i]
        if i < self.trackers:
            effects = node.drain()
            if self.cpu_on:
                effects = self._tracker_busy(i, effects)
            if effects:
                self._apply(i, effects)
        else:
            lists, park = self._lists, self._park
            effects = node.swap_effects(lists.pop() if lists else [])
            if effects:
                self._apply(i, effects)  # (which may pump node i again: a list each)
                effects.clear()
            # The node goes back to the park (a node pumped again from `_apply` is there
            # already, and the park is its `effects`, emptied just now). A node's first list,
            # its own, is dropped.
            spare = node.swap_effects(park)
            if spare is not park:
                lists.append(spare)
        self.sched.arm(i, node.next_due())

    def _timer(self, i: int, when: float) -> None:
        """Node i's first deadline, `when`, has come (the calendar deals with the wakes that
        find it moved later, and with those of nodes gone)."""
        node: NodeBase = self.nodes[i]
        now = self.sched.now
        if i < self.trackers:
            self._tracker_us += self.cpu.event_us
        node.handle_timer(now=now)
        self._pump(i)

    def _tracker_busy(self, t: int, effects: list[fx.Effect]) -> list[fx.Effect]:
        """Charge tracker t's CPU for what it just did; its effects, if they can go now (the
        CPU was idle and it cost nothing), else [] and they go when the CPU gets there."""
        cpu, crypto, now = self.cpu, self.tracker_crypto[t], self.sched.now
        sends = 0
        for eff in effects:
            if isinstance(eff, fx.Send):
                sends += 1
        tracker: TrackerNode = self.nodes[t]
        event_s = (self._tracker_us + cpu.event_us * tracker.rejoins) * 1e-6
        tracker.rejoins = 0
        # With fronts, a message leaves over the local stream here and by QUIC at its front.
        send_s = (cpu.relay_us if self.fronts else cpu.send_us) * sends * 1e-6
        sign_s = cpu.sign_us * crypto.signed * 1e-6
        verify_s = cpu.verify_us * crypto.checked * 1e-6
        self._tracker_us = 0.0
        crypto.signed = crypto.checked = 0
        cost = event_s + send_s + sign_s + verify_s
        start = max(now, self.tracker_free[t])
        if cost <= 0 and start <= now:
            if not self.fronts:
                return effects
            self._tracker_answers(t, self.tracker_gen[t], effects)
            return []
        self.tracker_free[t] = done = start + cost
        if cost > 0:
            self.metrics.tracker_work(t, start - now, events=event_s, sends=send_s,
                                      signatures=sign_s, verifications=verify_s)
        if effects:
            self.sched.at(done, self._tracker_answers, t, self.tracker_gen[t], effects)
        return []

    def _tracker_answers(self, t: int, gen: int, effects: list[fx.Effect]) -> None:
        """Tracker t's effects once its CPU got to them; with fronts, what goes on a link
        (a message, a close) then waits for that link's front, in order."""
        if gen != self.tracker_gen[t] or not self.alive[t]:
            return
        if not self.fronts:
            self._apply(t, effects)
            return
        now, owner, send_us = self.sched.now, self.owner, self.cpu.send_us
        at_once = []
        for eff in effects:
            if isinstance(eff, (fx.Send, fx.Close)):
                q = self._front(t, owner[eff.link ^ 1])
                if q >= 0:
                    done = self._front_busy(q, send_us if isinstance(eff, fx.Send) else 0.0,
                                            "sends")
                    if done > now:
                        self.sched.at(done, self._front_sent, t, gen, [eff])
                        continue
            at_once.append(eff)
        if at_once:
            self._apply(t, at_once)

    def _front_sent(self, t: int, gen: int, effects: list[fx.Effect]) -> None:
        if gen == self.tracker_gen[t] and self.alive[t]:
            self._apply(t, effects)

    def _apply(self, i: int, effects: list[fx.Effect]) -> None:
        now = self.sched.now
        net, sched, metrics, owner = self.net, self.sched, self.metrics, self.owner
        by_seed = self.trackers <= i < self.first_peer
        # A chunk this node is relaying right now leaves from when its head arrived (cut-through).
        ctx_seq, ctx_head = (self._ctx_seq, self._ctx_head) if self._ctx_node == i else (-1, now)
        dropped = []
        for eff in effects:
            if isinstance(eff, fx.SendChunk):
                chunk = eff.chunk
                head = chunk.head
                seq, size = head.seq, head.size
                push, ok = eff.push, eff.ok
                t_head = ctx_head if seq == ctx_seq else now
                uplink = net.uplinks[i]
                sent = 0
                for link in eff.links:
                    remote = link ^ 1
                    dst = owner[remote]
                    if owner[link] < 0 or dst < 0:
                        continue
                    if drop_chunk(uplink.free_at - now, push):
                        dropped.append((link, seq, push))
                        continue
                    arrival = net.send_chunk(i, dst, size, t_head, now, self.delay[link])
                    sent += size
                    if arrival is not None:
                        sched.at4(arrival[1], self._chunk_arrives_cb, remote, chunk, ok, arrival[0])
                if sent:
                    metrics.bytes_sent(i, sent, "media", by_seed, now=now)
            elif isinstance(eff, fx.Deliver):
                seq = eff.head.seq
                if not self.started[i]:
                    self.started[i] = True
                    # From the join, or from the broadcast's start for a viewer who came before.
                    metrics.startup(i, now - max(self.joined[i], self.live_at))
                metrics.chunk_verified(i, seq, eff.latency, eff.on_time, not eff.from_seed,
                                       eff.head.size, now=now)
            elif isinstance(eff, fx.Send):
                link = eff.link
                remote = link ^ 1
                dst = owner[remote]
                if owner[link] >= 0 and dst >= 0:
                    metrics.bytes_sent(i, _control_size(eff.msg), "control", by_seed, now=now)
                    sched.at2(net.send_control(i, dst, now, self.delay[link]), self._message_cb,
                              remote, eff.msg)
            elif isinstance(eff, fx.Skip):
                metrics.chunk_missed(i, eff.seq, now=now)
            elif isinstance(eff, fx.Open):
                self._open(i, eff.address, eff.ref)
                owner = self.owner  # (it may have grown: `_new_link`)
            elif isinstance(eff, fx.Notice):
                node = self.nodes[i]
                if i >= self.first_peer and node.rejected and i not in self.refused:
                    self.refused.add(i)
                    metrics.peer_rejected(i)
            elif isinstance(eff, fx.Close):
                link = eff.link
                remote = link ^ 1
                owner[link] = -1
                dst = owner[remote]
                if dst >= 0:
                    sched.at2(net.send_control(i, dst, now, self.delay[link]), self._closed_cb,
                              remote, eff.reason)
        if dropped:
            relay: RelayNode = self.nodes[i]
            for link, seq, push in dropped:
                relay.chunk_dropped(link, seq, now=now, push=push)
            self._pump(i)

    # -- events --------------------------------------------------------------------------------

    def _open(self, i: int, address: str, ref: Any) -> None:
        dst = int(address) if address.isdigit() else -1
        now = self.sched.now
        if not 0 <= dst < self.n or not self.alive[dst]:
            back = self.back_at.get(dst, math.inf)
            resend = next((now + s for s in INITIAL_RESENDS if now + s >= back), math.inf)
            if resend < now + CONNECT_TIMEOUT:
                self.sched.at(resend, self._open, i, address, ref)  # that copy is answered
            else:
                self.sched.at(now + CONNECT_TIMEOUT, self._open_failed, i, ref)
            return
        one_way = self.net.latency.one_way(i, dst)
        a = self._new_link(one_way)
        b = a ^ 1
        if dst < self.trackers and self.cpu_on:
            self.sched.at(now + one_way, self._handshake, dst, i, a, ref, now, 0)
            return
        self.sched.at(now + one_way, self._accepted, dst, b, a, i)
        self.sched.at(now + 2 * one_way, self._opened, i, a, ref)

    def _warm(self) -> None:
        """Tell the calendar where each event's node is, to fetch it ahead (the frequent events
        name a link end; peers are most nodes)."""
        self.sched.warm(self.nodes, self.owner, PeerNode.__basicsize__, self._chunk_arrives_cb,
                        self._message_cb)

    def _new_link(self, one_way: float) -> int:
        """Register a link: two ends, `a` and `a ^ 1`, closed until opened; return `a`."""
        a = len(self.owner)
        self.owner = extend(self.owner, (-1, -1))
        self._warm()  # (before any event: the calendar reads the old `owner` until told)
        self.next_link = extend(self.next_link, (-1, -1))
        self.delay = extend(self.delay, (one_way, one_way))
        return a

    def _handshake(self, t: int, i: int, link: int, ref: Any, sent: float, copy: int) -> None:
        """Node i's first packet (sent at `sent`; copy 0, or the client's resend number `copy`)
        reaches tracker t. The link opens (its end `link ^ 1`) once the tracker's CPU has done
        the server's side of the handshake; with more than `backlog_s` of work ahead of it, the
        socket's receive buffer is full and the packet is lost, so the client's next resend
        tries again."""
        now, one_way = self.sched.now, self.delay[link]
        deadline = sent + CONNECT_TIMEOUT
        if not self.alive[t]:
            self.sched.at(now + one_way, self._opened, i, link, ref)  # refused
            return
        q = self._front(t, i)
        start = max(now, self.front_free[q] if q >= 0 else self.tracker_free[t])
        if start - now > self.cpu.backlog_s:
            if copy < len(INITIAL_RESENDS) and sent + INITIAL_RESENDS[copy] + one_way < deadline:
                self.sched.at(sent + INITIAL_RESENDS[copy] + one_way, self._handshake, t, i, link,
                              ref, sent, copy + 1)
            else:
                self.sched.at(deadline, self._open_failed, i, ref)
            return
        if q >= 0:
            done = self._front_busy(q, self.cpu.handshake_us, "handshakes")
        else:
            cost = self.cpu.handshake_us * 1e-6
            self.tracker_free[t] = done = start + cost
            self.metrics.tracker_work(t, start - now, handshakes=cost)
        if done + one_way > deadline:  # the client gave up first: the work was for nothing
            self.sched.at(deadline, self._open_failed, i, ref)
            return
        self.sched.at(done, self._tracker_accepts, t, self.tracker_gen[t], i, link)
        self.sched.at(done + one_way, self._opened, i, link, ref)

    def _tracker_accepts(self, t: int, gen: int, i: int, link: int) -> None:
        if gen == self.tracker_gen[t]:  # else that tracker is gone, and the opener is refused
            if self.fronts:
                self._tracker_us += self.cpu.relay_us  # the front says so over its stream
            self._accepted(t, link ^ 1, link, i)

    def _accepted(self, dst: int, link: int, remote: int, src: int) -> None:
        if not self.alive[dst] or not self.alive[src]:
            return
        owner, first, after = self.owner, self.first_link, self.next_link
        owner[link], owner[remote] = dst, src
        after[link], first[dst] = first[dst], link
        after[remote], first[src] = first[src], remote
        node = self.nodes[dst]
        self._call(dst, lambda now: node.link_opened(link, now=now))

    def _opened(self, i: int, link: int, ref: Any) -> None:
        if not self.alive[i]:
            return
        node = self.nodes[i]
        if self.owner[link] < 0:  # the other end died during the handshake
            self._call(i, lambda now: node.open_failed(ref, now=now, reason="connection refused"))
            return
        self._call(i, lambda now: node.link_opened(link, now=now, ref=ref))

    def _open_failed(self, i: int, ref: Any) -> None:
        if self.alive[i]:
            node = self.nodes[i]
            self._call(i, lambda now: node.open_failed(ref, now=now, reason="no answer"))

    # The frequent events name the receiving link end, not its node (`owner[link]`, -1 once
    # closed): one boxed int less in each of the ~3 events pending per peer.

    def _message(self, link: int, msg: m.Message) -> None:
        dst: int = self.owner[link]
        if dst < 0 or not self.alive[dst]:
            return
        node: RelayNode | TrackerNode = self.nodes[dst]
        if dst < self.trackers:
            self._tracker_gets(dst, link)
        node.handle(link, msg, now=self.sched.now)
        self._pump(dst)

    def _tracker_gets(self, t: int, link: int) -> None:
        """Charge tracker t for a message arriving on `link`: received by QUIC at the link's
        front (then passed over the local stream) or here, and handled here."""
        cpu = self.cpu
        q = self._front(t, self.owner[link ^ 1])
        if q >= 0:
            self._front_busy(q, cpu.receive_us, "receives")
            self._tracker_us += cpu.event_us + cpu.relay_us
        else:
            self._tracker_us += cpu.event_us + cpu.receive_us

    def _closed(self, link: int, reason: str) -> None:
        dst: int = self.owner[link]
        self.owner[link] = -1
        if dst < 0 or not self.alive[dst]:
            return
        node = self.nodes[dst]
        if dst < self.trackers:  # (with fronts: its front says so over the local stream)
            self._tracker_us += self.cpu.event_us + (self.cpu.relay_us if self.fronts else 0.0)
        self._call(dst, lambda now: node.link_closed(link, now=now, reason=reason))

    def _chunk_arrives(self, link: int, chunk: fx.Chunk, ok: bool, t_head: float) -> None:
        dst: int = self.owner[link]
        if dst < 0 or not self.alive[dst]:
            return
        node: PeerNode = self.nodes[dst]  # only peers receive chunks
        self._ctx_node, self._ctx_seq, self._ctx_head = dst, chunk.head.seq, t_head
        node.chunk_received(link, chunk, now=self.sched.now, aborted=not ok)
        self._pump(dst)
        self._ctx_node = -1


def run_scenario(scenario: Scenario, *, progress: Callable[[float, int], Any] | None = None) -> RunResult:
    """Run one scenario to its `duration_s`; deterministic for a given scenario and seed."""
    return Simulation(scenario, progress=progress).run()
