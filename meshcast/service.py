"""Run each role on the network: tracker, seed and peer services (anyio tasks).

Each `run_*` builds the sans-IO node, opens a QUIC endpoint (shaped to the node's declared
upload), hands both to a `NodeRunner`, and reports readiness trio-style with a handle the
caller can read live figures from. Cancelling the task shuts the role down cleanly.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from meshcast import effects as fx
from meshcast.crypto import Crypto, SigningKey
from meshcast.net.admission import PER_IP_BURST, PER_IP_RATE, Admission
from meshcast.net.front import FrontEndpoint, run_fronts
from meshcast.net.quic import open_endpoint
from meshcast.runtime import NodeRunner, parse_address
from peer.node import PeerNode
from peer.player import PlayerOutput
from seed.ingest import open_source
from seed.node import SeedNode, live_first_seq
from tracker.node import JOIN_HOLD_S, TrackerNode

log = logging.getLogger("meshcast")


def default_key_path(channel: str) -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "meshcast" / f"{channel}.pem"


def _log_effect(role: str) -> Any:
    def on_effect(eff: fx.Effect) -> None:
        if type(eff) is fx.Notice:
            log.warning("%s: %s", role, eff.text)
    return on_effect


TRACKER_RECEIVE_BUFFER = 1024 * 1024
"""The tracker's socket receive buffer (bytes asked; the kernel doubles it): 910 datagrams of
1,200 bytes on loopback here, ~1 s of its work at ~1.1 ms a QUIC handshake (bench/tracker_cpu.py).
A flash crowd's first packets beyond that are dropped by the kernel, at no cost, and the clients
send them again; with the 4 MB the other nodes use, ~4 s of handshakes could queue, and the
links of viewers already in, whose heartbeats wait in the same queue, would reach their 3 s
idle time-out. The simulator's `[tracker] backlog_s` models this bound."""

PerIp = tuple[float, int] | None
"""New inbound connections per source address: (a second, at once); None: no limit."""
PER_IP: PerIp = (PER_IP_RATE, PER_IP_BURST)


def _admission(per_ip: PerIp) -> Admission | None:
    return Admission(*per_ip) if per_ip else None


@dataclass
class TrackerHandle:
    node: TrackerNode
    address: str
    fronts: FrontEndpoint | None = None
    """With front processes: their links and pids (`meshcast.net.front`)."""


async def run_tracker(listen: str = "127.0.0.1:0", *, strategy: str = "tree", seed: int | None = None,
                      hold_s: float = JOIN_HOLD_S, per_ip: PerIp = PER_IP, key: str | None = None,
                      fronts: int = 0,
                      task_status: anyio.abc.TaskStatus[TrackerHandle] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve a tracker on `listen` until cancelled (`hold_s`: see `TrackerNode`; `per_ip`:
    the new connections, hence joins, one address may make: see `meshcast.net.admission`).

    `key`: a PEM file with the tracker's signing key, created on first use: the tokens it
    signed stay good across restarts. Without one, each start has a new key.
    `fronts`: that many other processes do its QUIC (`meshcast.net.front`); 0: this one."""
    host, port = parse_address(listen)
    # The same key as before a restart gives out ids from another block than last time's.
    node = TrackerNode(key=SigningKey.load_or_create(key) if key else SigningKey(), crypto=Crypto(),
                       rng=random.Random(seed), strategy=strategy, hold_s=hold_s,
                       id_block=random.SystemRandom().getrandbits(24) if key else None)
    # Its viewers' links stay alive by heartbeats: QUIC keep-alives cost it 5–12× more
    # (`policy.QUIET_LINK_IDLE_S`).
    endpoint: Any = (
        run_fronts(fronts, host, port, per_ip=per_ip,
                   socket_receive_buffer=TRACKER_RECEIVE_BUFFER) if fronts
        else open_endpoint(host, port, admission=_admission(per_ip), heartbeats=True,
                           socket_receive_buffer=TRACKER_RECEIVE_BUFFER))
    async with endpoint as ep:
        runner = NodeRunner(node, ep, on_effect=_log_effect("tracker"))
        address = f"{host}:{ep.local_address[1]}"
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            log.info("tracker listening on %s (strategy %s%s)", address, strategy,
                     f", {fronts} front processes" if fronts else "")
            task_status.started(TrackerHandle(node, address, ep if fronts else None))


@dataclass
class SeedHandle:
    node: SeedNode
    address: str
    public_key: bytes
    ingested_bytes: int = 0
    finished: anyio.Event = field(default_factory=anyio.Event)
    """Set when the input ended (the seed keeps serving pulls until cancelled)."""


async def run_seed(*, tracker: str, channel: str, input: str, key: str | None = None,
                   listen: str = "127.0.0.1:0", upload_kbps: int = 20_000,
                   bitrate_kbps: int = 2_000, chunk_ms: int = 200, substreams: int = 4,
                   realtime: bool = False, per_ip: PerIp = PER_IP,
                   task_status: anyio.abc.TaskStatus[SeedHandle] = anyio.TASK_STATUS_IGNORED) -> None:
    """Ingest `input`, sign and push its chunks, until the input ends and then until cancelled."""
    parse_address(tracker)
    key_path = Path(key) if key else default_key_path(channel)
    signing_key = SigningKey.load_or_create(key_path)
    host, port = parse_address(listen)
    async with open_endpoint(host, port, upload_bps=upload_kbps * 1000,
                             admission=_admission(per_ip)) as ep:
        address = f"{host}:{ep.local_address[1]}"
        node = SeedNode(channel=channel, key=signing_key, crypto=Crypto(), tracker=tracker,
                        address=address, upload_kbps=upload_kbps, bitrate_kbps=bitrate_kbps,
                        substreams=substreams, chunk_ms=chunk_ms,
                        first_seq=live_first_seq(time.time(), chunk_ms))
        runner = NodeRunner(node, ep, on_effect=_log_effect("seed"))
        handle = SeedHandle(node, address, signing_key.public)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            log.info("seed for %r on %s, channel key %s (from %s), chunks numbered from %d",
                     channel, address, signing_key.public.hex(), key_path, node.next_seq)
            async with open_source(input, chunk_ms=chunk_ms, realtime=realtime) as source:
                task_status.started(handle)
                async for chunk in source:
                    if node.rejected:
                        raise SystemExit(f"seed: the tracker refused the channel: {node.rejected}")
                    runner.call(lambda now: node.ingest(chunk.payload, rap=chunk.rap, now=now))
                    handle.ingested_bytes += len(chunk.payload)
            log.info("seed: input ended after %d chunks", node.chunks_sent)
            handle.finished.set()


@dataclass
class PeerHandle:
    node: PeerNode
    player: PlayerOutput
    address: str
    http_port: int | None = None
    latencies: deque = field(default_factory=lambda: deque(maxlen=10_000))
    first_seq: int | None = None
    last_seq: int | None = None
    last_deliver: float | None = None
    max_stall: float = 0.0
    """Longest wall-clock gap between two consecutive chunks handed to the player (seconds)."""

    def delivered(self, seq: int, latency: float, now: float) -> None:
        if self.first_seq is None:
            self.first_seq = seq
        elif self.last_deliver is not None:
            self.max_stall = max(self.max_stall, now - self.last_deliver)
        self.last_seq, self.last_deliver = seq, now
        self.latencies.append(latency)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        node = self.node
        return {
            "id": node.id,
            "delivered": node.delivered,
            "skipped": node.skipped,
            "bytes_from_peers": node.bytes_from_peers,
            "bytes_from_seed": node.bytes_from_seed,
            "latency_ms_p50": round(1000 * statistics.median(lat), 1) if lat else None,
            "startup_ms": round(1000 * (node.first_play - node.joined_at), 1)
            if node.first_play is not None and node.joined_at is not None else None,
            "children": node._children(),
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "max_stall_ms": round(1000 * self.max_stall, 1),
            "address": self.address,
            "forged": node.forged,
            "rejected": node.rejected,
            "playout_delay_s": node.playout_delay,
        }


async def run_peer(*, tracker: str, channel: str, listen: str = "127.0.0.1:0",
                   http: str | None = None, output: str | None = None, upload_kbps: int = 5_000,
                   channel_key: bytes | None = None, playout_delay: float = 0.5,
                   per_ip: PerIp = PER_IP,
                   task_status: anyio.abc.TaskStatus[PeerHandle] = anyio.TASK_STATUS_IGNORED) -> None:
    """Watch `channel`: relay to children, serve the player over HTTP and/or to a file."""
    parse_address(tracker)
    host, port = parse_address(listen)
    player = PlayerOutput()
    async with open_endpoint(host, port, upload_bps=upload_kbps * 1000 if upload_kbps else None,
                             admission=_admission(per_ip)) as ep:
        address = f"{host}:{ep.local_address[1]}" if upload_kbps > 0 else ""
        node = PeerNode(channel=channel, crypto=Crypto(), rng=random.Random(), tracker=tracker,
                        address=address, upload_kbps=upload_kbps, public_key=channel_key,
                        playout_delay=playout_delay)
        handle = PeerHandle(node, player, address)
        notice = _log_effect(f"peer {address or '(no upload)'}")

        def on_effect(eff: fx.Effect) -> None:
            if type(eff) is fx.Deliver:
                player.push(eff.head.seq, eff.payload, eff.head.rap)
                handle.delivered(eff.head.seq, eff.latency, time.time())
            elif type(eff) is fx.Skip:
                player.gap(eff.seq)
            else:
                notice(eff)

        runner = NodeRunner(node, ep, on_effect=on_effect, accept=upload_kbps > 0)
        async with anyio.create_task_group() as tg:
            if http is not None:
                hhost, hport = parse_address(http)
                handle.http_port = await tg.start(player.serve_http, hhost, hport)
                log.info("peer: play it with  ffplay http://%s:%d/stream.ts", hhost, handle.http_port)
            if output is not None:
                await tg.start(player.write_to, output)
            await tg.start(runner.run)
            task_status.started(handle)
