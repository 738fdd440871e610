"""Simulator vs network runtime on the same scenario: do they agree on latency?

The same 20-peer scenario (`sim/scenarios/small-20.toml`) is run twice:

- **sim**: `sim.driver.Simulation` on its virtual clock;
- **runtime**: the real TrackerNode, SeedNode and 20 PeerNodes, each driven by a `NodeRunner`
  over its own QUIC endpoint on 127.0.0.1, with the simulator's per-node upload
  (`open_endpoint(upload_bps=...)`) and the simulator's per-pair one-way delays
  (`open_endpoint(delay=...)`: node index i listens on port base + i, so every process maps a
  destination port back to a simulator index). Tracker and seed run in this process, the peers
  in `--workers` subprocesses (default 2: one process cannot keep real time on a loaded 2-core
  machine; 0 runs everything here). The nodes get what the simulator gives them: the tracker's
  rng seed, each peer's rng seed and coordinates; peers start, in index order, 50 ms after the
  seed; chunks (random bytes, a RAP every `gop_ms`) are ingested every `chunk_ms` from 100 ms
  on, on an absolute real-time schedule.

Both record every `Deliver.latency` (seed ingest → verified and released in order to the player)
by chunk seq; the figures are over the same window of seqs (ingested after `WARMUP_S` and at
least `TAIL_S` before the end of the run). Also printed: p50 by tree depth, and p50 of the
seed's direct children by their place in the seed's send order — rising under the simulator's
FIFO uplink, flat when the uplink is shared among links.

    python bench/sim_vs_runtime.py [--runs 3] [--workers 2] [--scenario PATH]
    python bench/sim_vs_runtime.py --shaper-only

prints sim vs runtime p50/p95/p99 latency, startup and offload (each the median of `--runs`
runs), and how well the runtime kept real time: CPU (process time / wall, all processes),
run-queue wait (s/s: runnable but not running), event-loop lag p95 (worst process), and the
ingest loop's worst lateness. A run whose loop lag is tens of ms measures the machine's load,
not the protocol.

`--shaper-only` measures the upload discipline alone: one endpoint shaped at 10 Mbit/s writes a
25 kB chunk to each of 8 links at once; it prints when each child has its copy, next to the
simulator's FIFO (20, 40, …, 160 ms). A shared uplink instead finishes every copy near the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import statistics
import sys
import time
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

from bench._common import JsonLineProcess, stop_worker
from meshcast import effects as fx
from meshcast.crypto import Crypto, SigningKey
from meshcast.net.quic import open_endpoint
from meshcast.runtime import NodeRunner
from peer.node import PeerNode
from seed.node import SeedNode
from sim.driver import TRACKER, Simulation
from sim.metrics import MetricsCollector
from sim.scenario import SCENARIO_DIR, Scenario, load_scenario
from tracker.node import TrackerNode

SCENARIO = SCENARIO_DIR / "small-20.toml"
WARMUP_S = 3.0
"""Chunks ingested in the first seconds are left out (joins, handshakes, start of playback)."""
TAIL_S = 2.0
"""...and so are those ingested in the last seconds (the sim stops at `duration_s`)."""
MAX_LOOP_LAG_MS = 25.0
"""Event-loop lag p95 (worst process) above which a runtime run did not keep real time: seen
here 11–24 ms on runs whose figures repeat, 33–230 ms on runs whose p50 is 0.25–5 s."""
SEED = 1
"""The seed's node index (0 is the tracker, then the peers: `sim.driver`)."""
JOIN_AT = 0.05
INGEST_AT = 0.1
"""As `sim.driver.Simulation`: peers start at 0.05 s, the seed ingests from 0.1 s."""


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


@dataclass
class Figures:
    """One run's raw observations and the figures derived from them."""

    lat: dict[tuple[int, int], float] = field(default_factory=dict)
    """(sim node index, seq) → Deliver latency (s), every delivery."""
    startup: dict[int, float] = field(default_factory=dict)
    """node index → join to first Deliver (s)."""
    bytes_from_peers: int = 0
    bytes_from_seed: int = 0
    skipped: int = 0
    depth: dict[tuple[int, int], int] = field(default_factory=dict)
    """(sim node index, sub-stream) → the peer's depth in that tree at the end (seed's children: 1)."""
    arrival: dict[tuple[int, int], float] = field(default_factory=dict)
    """(sim node index, seq) → seed ingest → chunk complete at the peer (s), before in-order
    release to the player: the transport's share of the latency."""
    position: dict[tuple[int, int], int] = field(default_factory=dict)
    """(sim node index, sub-stream) → place in the seed's send order for that sub-stream (0 first)."""
    substreams: int = 1
    chunks: int = 0
    chunk_ms: int = 200
    duration_s: float = 20.0
    extra: dict[str, Any] = field(default_factory=dict)

    def seqs(self) -> range:
        """The chunks compared: those ingested in [WARMUP_S, duration − TAIL_S)."""
        period = self.chunk_ms / 1000
        lo = math.ceil((WARMUP_S - INGEST_AT) / period - 1e-9)
        hi = math.ceil((self.duration_s - TAIL_S - INGEST_AT) / period - 1e-9)
        return range(lo, hi)

    def window(self) -> list[float]:
        """Latencies of the chunks in `seqs()`, every peer."""
        lo, hi = self.seqs().start, self.seqs().stop
        return [v for (_, seq), v in self.lat.items() if lo <= seq < hi]

    def by_depth(self, arrival: bool = False) -> dict[int, list[float]]:
        """Window latencies (or arrival latencies) grouped by the receiving peer's depth in the
        chunk's tree."""
        lo, hi = self.seqs().start, self.seqs().stop
        out: dict[int, list[float]] = {}
        for (i, seq), v in (self.arrival if arrival else self.lat).items():
            d = self.depth.get((i, seq % self.substreams))
            if d is not None and lo <= seq < hi:
                out.setdefault(d, []).append(v)
        return out

    def by_position(self) -> dict[int, float]:
        """p50 window latency of the seed's direct children, by their place in its send order."""
        lo, hi = self.seqs().start, self.seqs().stop
        out: dict[int, list[float]] = {}
        for (i, seq), v in self.lat.items():
            pos = self.position.get((i, seq % self.substreams))
            if pos is not None and lo <= seq < hi:
                out.setdefault(pos, []).append(v)
        return {p: round(1000 * pct(v, 50), 1) for p, v in sorted(out.items())}

    def summary(self) -> dict[str, float | None]:
        w = self.window()
        ms = lambda x: round(1000 * x, 1)  # noqa: E731
        total = self.bytes_from_peers + self.bytes_from_seed
        st = list(self.startup.values())
        return {
            "samples": len(w),
            "p50_ms": ms(pct(w, 50)) if w else None,
            "p95_ms": ms(pct(w, 95)) if w else None,
            "p99_ms": ms(pct(w, 99)) if w else None,
            "startup_p50_ms": ms(statistics.median(st)) if st else None,
            "offload": round(self.bytes_from_peers / total, 3) if total else None,
            "skipped": self.skipped,
            **{f"p50_ms_depth{d}": ms(pct(v, 50)) for d, v in sorted(self.by_depth().items())},
            **{f"arrival_p50_ms_depth{d}": ms(pct(v, 50))
               for d, v in sorted(self.by_depth(arrival=True).items())},
            **self.extra,
        }


class _Probe(MetricsCollector):
    """A `MetricsCollector` that also keeps each (peer, seq) latency: the sim's Deliver log."""

    def __init__(self, figures: Figures, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.figures = figures

    def chunk_verified(self, peer: int, seq: int, latency_s: float, on_time: bool,
                       from_peer: bool, nbytes: int, *, now: float) -> None:
        super().chunk_verified(peer, seq, latency_s, on_time, from_peer, nbytes, now=now)
        self.figures.lat[(peer, seq)] = latency_s

    def startup(self, peer: int, delay_s: float) -> None:
        super().startup(peer, delay_s)
        self.figures.startup[peer] = delay_s

    def chunk_missed(self, peer: int, seq: int, *, now: float) -> None:
        super().chunk_missed(peer, seq, now=now)
        self.figures.skipped += 1


def _note_arrival(node: PeerNode, index: int, seq: int, now: float,
                  arrival: dict[tuple[int, int], float]) -> None:
    """Note when chunk `seq` was first complete and verified at peer `index`."""
    entry = node.chunk(seq)
    if entry is not None and (index, seq) not in arrival:
        arrival[(index, seq)] = now - entry[0].ts


class _ArrivalPeer(PeerNode):
    """A runtime peer that notes its chunk arrivals (`_note_arrival`)."""

    __slots__ = ("index", "arrival")

    def __init__(self, index: int, arrival: dict[tuple[int, int], float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index, self.arrival = index, arrival

    def chunk_end(self, link: int, seq: int, *, now: float, aborted: bool = False) -> None:
        super().chunk_end(link, seq, now=now, aborted=aborted)
        _note_arrival(self, self.index, seq, now, self.arrival)


class _ProbeSimulation(Simulation):
    def __init__(self, scenario: Scenario, figures: Figures) -> None:
        super().__init__(scenario)
        self.figures = figures

    def _chunk_arrives(self, link: int, chunk: Any, ok: bool, t_head: float) -> None:
        dst = self.owner[link]
        super()._chunk_arrives(link, chunk, ok, t_head)
        if dst >= 0 and self.alive[dst]:
            _note_arrival(self.nodes[dst], dst, chunk.head.seq, self.sched.now,
                          self.figures.arrival)


def run_sim(scenario: Scenario) -> Figures:
    sc = scenario
    fig = Figures(chunk_ms=sc.stream.chunk_ms, duration_s=sc.stream.duration_s,
                  substreams=sc.stream.substreams)
    sim = _ProbeSimulation(sc, fig)
    probe = _Probe(fig, sim.n, sc.stream.duration_s)
    sim.metrics = probe
    res = sim.run()
    fig.bytes_from_peers = sum(probe.bytes_from_peers)
    fig.bytes_from_seed = sum(probe.bytes_from_seed)
    fig.chunks = int(sc.stream.duration_s * 1000 / sc.stream.chunk_ms)
    fig.extra["max_depth"] = res.metrics.summary()["max_depth"]
    _depths(fig, res.tracker, {s.id: sim.nodes[s.id] for s in sim.specs}, sim.nodes[SEED])
    return fig


def _depths(fig: Figures, tracker: TrackerNode, peers: dict[int, Any], seed: SeedNode) -> None:
    index_of = {node.id: i for i, node in peers.items() if node is not None}
    for k, conns in enumerate(seed._subscribers):
        for pos, (conn, _) in enumerate(conns):
            if conn.node_id in index_of:
                fig.position[(index_of[conn.node_id], k)] = pos
    members = tracker.channels["ch0"].forest.members
    for i, node in peers.items():
        member = members.get(node.id) if node is not None else None
        if member is not None:
            for k, d in enumerate(member.depth):
                fig.depth[(i, k)] = d


def _check_supported(sc: Scenario) -> None:
    if sc.channels.count != 1 or sc.peers.nat_fraction or sc.network.loss or sc.network.chunk_drop \
            or sc.peers.download_kbps:
        raise ValueError("the runtime side models one channel, no NAT, no loss, no download cap")
    if sc.peers.arrival.kind != "all" or sc.peers.session.kind != "infinite":
        raise ValueError("the runtime side models peers all present from t0 (arrival 'all', "
                         "session 'infinite')")


class _Env:
    """What the simulator builds from a scenario and the runtime copies: latency model, uploads,
    peer specs, coordinates, rng seeds. Every process of a run derives the same from `scenario`."""

    def __init__(self, scenario: Scenario, base_port: int) -> None:
        sc = self.sc = scenario
        _check_supported(sc)
        sim = self.sim = Simulation(sc)
        shadow = random.Random()
        shadow.setstate(sim.rng.getstate())
        self.tracker_rng_seed = shadow.random()  # Simulation.run()'s next draw: the tracker's rng
        self.one_way = sim.net.latency.one_way
        self.n = sim.n
        self.specs = sorted(sim.specs, key=lambda s: s.id)
        self.upload_kbps: dict[int, float] = {SEED: sc.seed.upload_kbps}
        self.upload_kbps.update({s.id: s.upload_kbps for s in self.specs})
        self.base_port = base_port

    def address(self, i: int) -> str:
        """Node index i listens on 127.0.0.1:(base_port + i): every process can map a port back."""
        return f"127.0.0.1:{self.base_port + i}"

    def endpoint(self, i: int):
        one_way, base, n = self.one_way, self.base_port, self.n

        def delay(address: tuple[str, int]) -> float:
            j = address[1] - base
            return one_way(i, j) if 0 <= j < n else 0.0

        up = self.upload_kbps.get(i)
        return open_endpoint("127.0.0.1", self.base_port + i,
                             upload_bps=up * 1000 if up else None, delay=delay)

    def peer(self, i: int, upload_kbps: float, arrival: dict[tuple[int, int], float]) -> PeerNode:
        sim, sc = self.sim, self.sc
        return _ArrivalPeer(i, arrival, channel="ch0", crypto=Crypto(),
                            rng=random.Random(i * 7919 + sc.run.seed),
                            tracker=self.address(TRACKER), address=self.address(i),
                            upload_kbps=int(upload_kbps),
                            coords=sim.coords[i] if sim.coords else (),
                            playout_delay=sim.playout_delay)


def udp_rcvbuf_errors() -> int:
    """Datagrams the kernel dropped for a full receive buffer, host-wide (/proc/net/snmp)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def runqueue_wait() -> float:
    """Seconds this process's threads spent runnable but waiting for a CPU (/proc schedstat)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            total += int(f.read().split()[1])
    return total / 1e9


def _free_base_port(n: int) -> int:
    """A base port with n consecutive free UDP ports on 127.0.0.1 (checked, then released)."""
    import socket
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 60000 - n)
        socks = []
        try:
            for i in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free UDP ports found")


class LagMonitor:
    """How late the event loop wakes up: a task sleeps `period` s in a loop and records the
    overshoot. A loop that is often late (CPU-starved process) cannot keep real time, and then
    its latencies measure the machine, not the protocol."""

    def __init__(self, period: float = 0.02) -> None:
        self.period = period
        self.lags: list[float] = []

    async def run(self) -> None:
        while True:
            t = anyio.current_time()
            await anyio.sleep(self.period)
            self.lags.append(anyio.current_time() - t - self.period)

    def p95(self) -> float:
        return pct(self.lags, 95) if self.lags else 0.0


class _PeerGroup:
    """Peers of one process: endpoints, nodes, and what they delivered."""

    def __init__(self, env: _Env, indexes: list[int]) -> None:
        self.env = env
        self.indexes = indexes
        self.lat: dict[tuple[int, int], float] = {}
        self.arrival: dict[tuple[int, int], float] = {}
        self.startup: dict[int, float] = {}
        self.joined: dict[int, float] = {}
        self.skipped = 0
        self.notices: dict[int, list[str]] = {}
        """Node index → its last few `Notice` texts (why a link was cut, a rejection)."""
        self.nodes: dict[int, PeerNode] = {}
        self.eps: dict[int, Any] = {}
        self.lag = LagMonitor()

    async def bind(self, stack: AsyncExitStack) -> None:
        for i in self.indexes:
            self.eps[i] = await stack.enter_async_context(self.env.endpoint(i))

    async def start(self, tg: Any) -> None:
        """Start every peer, in index order (the sim's join order), as fast as possible."""
        uploads = self.env.upload_kbps
        self.cpu0 = time.process_time()
        self.wait0 = runqueue_wait()
        for i in self.indexes:
            node = self.nodes[i] = self.env.peer(i, uploads[i], self.arrival)
            self.joined[i] = time.time()
            await tg.start(NodeRunner(node, self.eps[i], on_effect=self._recorder(i)).run)

    def _recorder(self, i: int):
        def on_effect(eff: fx.Effect) -> None:
            t = type(eff)
            if t is fx.Deliver:
                if i not in self.startup:
                    self.startup[i] = time.time() - self.joined[i]
                self.lat[(i, eff.head.seq)] = eff.latency
            elif t is fx.Skip:
                self.skipped += 1
            elif t is fx.Notice:
                self.notices.setdefault(i, []).append(eff.text)
                del self.notices[i][:-4]
        return on_effect

    def silent(self) -> dict[str, dict]:
        """What each peer that never played knows: welcomed, its parents, links, bytes, notices."""
        out = {}
        for i, n in self.nodes.items():
            if i in self.startup:
                continue
            out[str(i)] = {
                "id": n.id, "rejected": n.rejected,
                "parents": [s.ref.id if s else None for s in (n.primary or [])],
                "links": len(n.conns), "rx": n.bytes_from_peers + n.bytes_from_seed,
                "notices": self.notices.get(i, []),
            }
        for i in self.indexes:
            if i not in self.nodes:
                out[str(i)] = {"started": False}
        return out

    def dump(self) -> dict:
        return {
            "lat": [[i, seq, v] for (i, seq), v in self.lat.items()],
            "arrival": [[i, seq, v] for (i, seq), v in self.arrival.items()],
            "startup": {str(i): v for i, v in self.startup.items()},
            "skipped": self.skipped,
            "ids": {str(i): n.id for i, n in self.nodes.items()},
            "from_peers": sum(n.bytes_from_peers for n in self.nodes.values()),
            "from_seed": sum(n.bytes_from_seed for n in self.nodes.values()),
            "lag_p95": self.lag.p95(),
            "silent": self.silent(),
            "cpu_s": time.process_time() - getattr(self, "cpu0", 0.0),
            "wait_s": runqueue_wait() - getattr(self, "wait0", 0.0),
        }


async def run_runtime(scenario: Scenario, *, workers: int = 2, ready_timeout: float = 30.0) -> Figures:
    """Run `scenario` over real QUIC on loopback with the sim's delays and uploads.

    The tracker and the seed run in this process; the peers in `workers` subprocesses (0: in this
    process too). Deterministic inputs only (rng seeds, coordinates, delays, join order); the
    timing is the real clock's. Raises if a worker fails or does not answer in time.
    """
    sc = scenario
    base = _free_base_port(1 + sc.channels.count + sc.peers.count)
    env = _Env(sc, base)
    fig = Figures(chunk_ms=sc.stream.chunk_ms, duration_s=sc.stream.duration_s,
                  substreams=sc.stream.substreams)
    chunk_ms, bitrate = sc.stream.chunk_ms, sc.stream.bitrate_kbps
    size = int(bitrate * chunk_ms / 8)
    rap_every = env.sim.rap_every  # the scenario's GOP, as the simulator
    payload_rng = random.Random(sc.run.seed)
    all_peers = [s.id for s in env.specs]
    shares = [all_peers[w::workers] for w in range(workers)] if workers else []
    local = _PeerGroup(env, [] if workers else all_peers)

    cpu0, wall0, wait0 = time.process_time(), time.perf_counter(), runqueue_wait()
    drops0 = udp_rcvbuf_errors()
    async with AsyncExitStack() as stack:
        procs = []
        for share in shares:
            proc = await stack.enter_async_context(_Worker.spawn(sc, base, share))
            procs.append(proc)
        eps = {TRACKER: await stack.enter_async_context(env.endpoint(TRACKER)),
               SEED: await stack.enter_async_context(env.endpoint(SEED))}
        await local.bind(stack)
        for w in procs:
            await w.read_json(ready_timeout, "worker start-up")
        tracker = TrackerNode(key=SigningKey(), crypto=Crypto(),
                              rng=random.Random(env.tracker_rng_seed), strategy=sc.run.strategy)
        seed = SeedNode(channel="ch0", key=SigningKey(), crypto=Crypto(),
                        tracker=env.address(TRACKER), address=env.address(SEED),
                        upload_kbps=int(sc.seed.upload_kbps), bitrate_kbps=int(bitrate),
                        substreams=sc.stream.substreams, chunk_ms=chunk_ms)
        lag = LagMonitor()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lag.run)
            await tg.start(NodeRunner(tracker, eps[TRACKER]).run)
            t0_wall = time.time() + 0.3
            for w in procs:
                await w.send(f"go {t0_wall!r}")
            t0 = anyio.current_time() + (t0_wall - time.time())
            await anyio.sleep_until(t0)
            seed_runner = NodeRunner(seed, eps[SEED])
            await tg.start(seed_runner.run)
            await anyio.sleep_until(t0 + JOIN_AT)
            await local.start(tg)
            # Ingest on an absolute schedule from t0 + 0.1 s; note how late the loop ran.
            period = chunk_ms / 1000
            count = int(round((sc.stream.duration_s - INGEST_AT) / period))
            late = 0.0
            for k in range(count):
                at = t0 + INGEST_AT + k * period
                await anyio.sleep_until(at)
                late = max(late, anyio.current_time() - at)
                seed_runner.call(lambda now, k=k: seed.ingest(
                    payload_rng.randbytes(size), rap=k % rap_every == 0, now=now))
            await anyio.sleep_until(t0 + sc.stream.duration_s)
            dumps = [local.dump()] if not workers else []
            for w in procs:
                await w.send("dump")
                dumps.append(await w.read_json(ready_timeout, "worker results"))
            tg.cancel_scope.cancel()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    wait = runqueue_wait() - wait0
    fig.extra["udp_drops"] = udp_rcvbuf_errors() - drops0
    ids: dict[int, int] = {}
    lag_p95 = lag.p95()
    for d in dumps:
        lag_p95 = max(lag_p95, d["lag_p95"])
        fig.lat.update({(i, seq): v for i, seq, v in d["lat"]})
        fig.arrival.update({(i, seq): v for i, seq, v in d["arrival"]})
        fig.startup.update({int(i): v for i, v in d["startup"].items()})
        fig.skipped += d["skipped"]
        fig.bytes_from_peers += d["from_peers"]
        fig.bytes_from_seed += d["from_seed"]
        ids.update({int(i): v for i, v in d["ids"].items()})
        if d["silent"]:
            fig.extra.setdefault("silent", {}).update(d["silent"])
        if workers:
            cpu += d["cpu_s"]
            wait += d["wait_s"]
    fig.chunks = count
    fig.extra["cpu"] = round(cpu / wall, 2)
    fig.extra["runq_wait"] = round(wait / wall, 2)
    fig.extra["late_ms"] = round(1000 * late, 1)
    fig.extra["loop_lag_p95_ms"] = round(1000 * lag_p95, 1)

    class _Id:
        def __init__(self, id: int) -> None:
            self.id = id
    _depths(fig, tracker, {i: _Id(v) for i, v in ids.items()}, seed)
    fig.extra["max_depth"] = max((d for d in fig.depth.values()), default=None)
    return fig


class _Worker(JsonLineProcess):
    """A `python bench/sim_vs_runtime.py worker` subprocess running some of the peers."""

    @classmethod
    @asynccontextmanager
    async def spawn(cls, scenario: Scenario, base_port: int, indexes: list[int]):
        cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--base-port",
               str(base_port), "--indexes", ",".join(map(str, indexes))]
        # Its own session: with autogroup scheduling (Linux default) a session's processes share
        # one CPU share, so workers left in ours would split what one process gets.
        proc = await anyio.open_process(cmd, stderr=None, start_new_session=True)
        w = cls(proc)
        try:
            await w.send(pickle.dumps(scenario).hex())
            yield w
        finally:
            await stop_worker(proc)

    async def send(self, line: str) -> None:
        await self.proc.stdin.send(line.encode() + b"\n")



async def _worker_main(base_port: int, indexes: list[int]) -> None:
    out = sys.stdout
    stdin = anyio.wrap_file(sys.stdin)
    try:
        scenario = pickle.loads(bytes.fromhex((await stdin.readline()).strip()))
        group = _PeerGroup(_Env(scenario, base_port), indexes)
        async with AsyncExitStack() as stack:
            await group.bind(stack)
            out.write(json.dumps({"ready": indexes}) + "\n")
            out.flush()
            line = (await stdin.readline()).split()
            if not line or line[0] != "go":
                return
            t0 = anyio.current_time() + (float(line[1]) - time.time())
            async with anyio.create_task_group() as tg:
                tg.start_soon(group.lag.run)
                await anyio.sleep_until(t0 + JOIN_AT)
                await group.start(tg)
                while True:
                    line = await stdin.readline()
                    if not line:
                        break
                    if line.strip() == "dump":
                        out.write(json.dumps(group.dump()) + "\n")
                        out.flush()
                tg.cancel_scope.cancel()
    except Exception as exc:  # report it, so the orchestrator fails with a clear message
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        raise


# --- the upload discipline alone ---------------------------------------------------------------


async def shaper_order(*, children: int = 8, nbytes: int = 25_000, upload_kbps: float = 10_000,
                       rounds: int = 10, gap: float = 0.4, pieces: int = 1,
                       piece_gap: float = 0.0) -> dict[int, float]:
    """The uplink discipline alone: one shaped endpoint sends `nbytes` to each of `children`
    links (as a seed pushing a chunk), in order; returns the median time (ms) until the last
    byte reached child #position. FIFO (the simulator): position p done after (p+1)·B/u;
    shared: every position near children·B/u. With `pieces` > 1 the chunk is written as a
    cut-through relay writes it: each piece, as it "arrives" (every `piece_gap` s), to every
    child in turn."""
    done: dict[int, list[float]] = {}
    async with AsyncExitStack() as stack:
        sender = await stack.enter_async_context(open_endpoint("127.0.0.1", 0,
                                                               upload_bps=upload_kbps * 1000))
        receivers = [await stack.enter_async_context(open_endpoint("127.0.0.1", 0))
                     for _ in range(children)]
        async with anyio.create_task_group() as tg:
            finished: dict[tuple[int, int], float] = {}

            async def drain(pos: int, ep: Any) -> None:
                link = await ep.accept()
                while True:
                    ev = await link.receive()
                    if getattr(ev, "end", False):
                        finished[(pos, ev.stream_id)] = anyio.current_time()
                    if type(ev).__name__ == "LinkClosed":
                        return

            for pos, ep in enumerate(receivers):
                tg.start_soon(drain, pos, ep)
            links = [await sender.connect("127.0.0.1", ep.local_address[1]) for ep in receivers]
            for link in links:  # warm up congestion windows
                sid = link.open_stream()
                link.send_stream(sid, bytes(nbytes), end=True)
            await anyio.sleep(1.0)
            payload = random.Random(1).randbytes(nbytes)
            size = -(-nbytes // pieces)
            for _ in range(rounds):
                t0 = anyio.current_time()
                sids = [link.open_stream() for link in links]
                for k in range(pieces):
                    piece = payload[k * size:(k + 1) * size]
                    for link, sid in zip(links, sids):
                        link.send_stream(sid, piece, end=k == pieces - 1)
                    if piece_gap and k < pieces - 1:
                        await anyio.sleep(piece_gap)
                await anyio.sleep(max(0.0, gap - (anyio.current_time() - t0)))
                for pos, sid in enumerate(sids):
                    t = finished.get((pos, sid))
                    if t is not None:
                        done.setdefault(pos, []).append(1000 * (t - t0))
            tg.cancel_scope.cancel()
    return {p: round(statistics.median(v), 1) for p, v in sorted(done.items())}


def compare(sim: dict, rt: dict, keys=("p50_ms", "p95_ms")) -> list[str]:
    """The figures that are not within 20% + 5 ms of the simulator's."""
    bad = []
    for k in keys:
        a, b = sim[k], rt[k]
        if a is None or b is None or abs(b - a) > 0.2 * a + 5.0:
            bad.append(f"{k}: sim {a} vs runtime {b} (allowed ±{0.2 * (a or 0) + 5:.1f})")
    return bad


RELAY = dict(children=4, upload_kbps=3000, pieces=20, piece_gap=0.001)
"""A relay of small-20: 4 children at 3 Mbit/s, the chunk arriving in 20 pieces over ~20 ms."""


def _print_disciplines() -> None:
    seed = anyio.run(shaper_order, backend="asyncio")
    relay = anyio.run(partial(shaper_order, **RELAY), backend="asyncio")
    print("the uplink discipline alone: ms until child #p has its 25 kB copy")
    print("  seed  (8 children, 10 Mbit/s, whole chunk)   FIFO",
          {p: round(20.0 * (p + 1), 1) for p in range(8)})
    print("                                            runtime", seed)
    print("  relay (4 children, 3 Mbit/s, 20 pieces)      FIFO",
          {p: round(200 / 3 * (p + 1), 1) for p in range(4)})
    print("                                            runtime", relay)


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        wp = argparse.ArgumentParser()
        wp.add_argument("--base-port", type=int, required=True)
        wp.add_argument("--indexes", required=True)
        a = wp.parse_args(sys.argv[2:])
        anyio.run(_worker_main, a.base_port, [int(x) for x in a.indexes.split(",")],
                  backend="asyncio")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2,
                    help="peer subprocesses (0: every node in this one process)")
    ap.add_argument("--scenario", default=str(SCENARIO))
    ap.add_argument("--duration", type=float, default=None, help="override stream.duration_s")
    ap.add_argument("--shaper-only", action="store_true",
                    help="only measure the upload discipline (one sender, 8 children, 25 kB each)")
    args = ap.parse_args()
    if args.shaper_only:
        _print_disciplines()
        return
    overrides = {"stream.duration_s": args.duration} if args.duration else None
    sc = load_scenario(args.scenario, overrides)
    fs = run_sim(sc)  # deterministic: once is enough
    sims, rts, rt_positions = [fs.summary()], [], []
    print(f"sim: {sims[0]}", file=sys.stderr)
    for r in range(args.runs):
        fr = anyio.run(partial(run_runtime, sc, workers=args.workers), backend="asyncio")
        rts.append(fr.summary())
        rt_positions.append(fr.by_position())
        print(f"runtime run {r + 1}: {rts[-1]}", file=sys.stderr)
    sim_pos = fs.by_position()
    rt_pos = {p: round(statistics.median(d[p] for d in rt_positions if p in d), 1)
              for p in sorted({p for d in rt_positions for p in d})}

    def med(rows: list[dict], k: str) -> Any:
        vals = [row[k] for row in rows if row.get(k) is not None]
        return round(statistics.median(vals), 3) if vals else None

    keys = ["p50_ms", "p95_ms", "p99_ms", "p50_ms_depth1", "p50_ms_depth2", "p50_ms_depth3",
            "arrival_p50_ms_depth1", "arrival_p50_ms_depth2", "arrival_p50_ms_depth3",
            "startup_p50_ms", "offload", "skipped", "samples", "max_depth"]
    s, rt = {k: med(sims, k) for k in keys}, {k: med(rts, k) for k in keys}
    print(f"scenario {sc.name}: {sc.peers.count} peers, {sc.stream.bitrate_kbps:g} kbps, "
          f"K={sc.stream.substreams}, {sc.stream.chunk_ms} ms chunks, {sc.stream.duration_s:g} s; "
          f"window: chunks ingested in [{WARMUP_S:g}, {sc.stream.duration_s - TAIL_S:g}) s; "
          f"runtime: median of {args.runs} run(s), peers in {args.workers} worker process(es)")
    width = max(len(k) for k in keys)
    print(f"{'':{width}}  {'sim':>10}  {'runtime':>10}  {'ratio':>6}")
    for k in keys:
        a, b = s[k], rt[k]
        ratio = f"{b / a:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""
        print(f"{k:{width}}  {a!s:>10}  {b!s:>10}  {ratio:>6}")
    print("p50 (ms) of the seed's children by place in its send order (FIFO: rising; shared: flat):")
    print("  sim    ", sim_pos)
    print("  runtime", rt_pos)
    _print_disciplines()
    print(f"runtime: CPU {med(rts, 'cpu')} cores (process time / wall, all processes), run-queue "
          f"wait {med(rts, 'runq_wait')} (s/s), event-loop lag p95 {med(rts, 'loop_lag_p95_ms')} ms "
          f"(worst process), ingest loop worst lateness {med(rts, 'late_ms')} ms")
    starved = [r["loop_lag_p95_ms"] for r in rts if r["loop_lag_p95_ms"] > MAX_LOOP_LAG_MS]
    if starved:
        print(f"WARNING: {len(starved)} of {len(rts)} runtime runs did not keep real time (event-loop "
              f"lag p95 {starved} ms > {MAX_LOOP_LAG_MS:g} ms): their figures measure the machine's "
              f"load, not the protocol")
    bad = compare(s, rt)
    print("agreement (p50, p95 within 20% + 5 ms):", "yes" if not bad else "NO — " + "; ".join(bad))


if __name__ == "__main__":
    main()
