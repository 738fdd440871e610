"""Shared harness for the meshcast benchmarks (not a benchmark itself).

Runs the real sans-IO nodes (TrackerNode, SeedNode, PeerNode) through `NodeRunner` over real
QUIC endpoints on loopback, without ffmpeg and without the player: the seed is fed synthetic
chunks (random bytes; the seed signs any payload, peers verify it) and each peer records, per
chunk seq, the seed-ingest → verified-and-released latency its node reports (`Deliver.latency`,
`now - head.ts` on the shared wall clock, so it is comparable across processes).

`python bench/_common.py worker ...` is the peer-worker subprocess used by the multi-process
benchmarks: it starts peers one at a time, prints one JSON line {"ready": [...node ids...]},
then on the line "dump" on stdin prints {"lat": {id: {seq: latency_s}}, ...}, and exits when
stdin closes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from meshcast import effects as fx
from meshcast.crypto import Crypto, SigningKey
from meshcast.messages import NO_PEER
from meshcast.net.quic import open_endpoint
from meshcast.runtime import NodeRunner
from peer.node import PeerNode
from seed.node import SeedNode
from tracker.node import TrackerNode

CHANNEL = "bench"
HERE = os.path.dirname(os.path.abspath(__file__))


# --- small helpers ------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    i = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[i]


def median(values: list[float]) -> float:
    return statistics.median(values)


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `pred` every 10 ms; a clear error after `timeout` seconds."""
    with anyio.move_on_after(timeout):
        while not pred():
            await anyio.sleep(0.01)
        return
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def upload_for_slots(slots: int, bitrate_kbps: int, substreams: int) -> int:
    """Smallest upload (kbps, a multiple of 100) that `meshcast.policy.child_slots` turns into
    exactly `slots` (whatever the policy's headroom is today)."""
    from meshcast.policy import child_slots
    u = 100
    while child_slots(u, bitrate_kbps, substreams) < slots:
        u += 100
    if child_slots(u, bitrate_kbps, substreams) != slots:
        raise RuntimeError(f"no upload gives exactly {slots} slots")
    return u


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


# --- roles --------------------------------------------------------------------------------------


async def stop_worker(proc: Any) -> None:
    """End a worker process: close its stdin (it exits), wait 5 s, then kill it."""
    with anyio.CancelScope(shield=True):
        if proc.returncode is None:
            try:
                await proc.stdin.aclose()
            except Exception:
                pass
            with anyio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@dataclass
class Tracker:
    node: TrackerNode
    address: str

    def members(self) -> dict[int, Any]:
        ch = self.node.channels.get(CHANNEL)
        return ch.forest.members if ch else {}


async def run_tracker(*, seed: int = 1,
                      task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
    node = TrackerNode(key=SigningKey(), crypto=Crypto(), rng=random.Random(seed), strategy="tree")
    async with open_endpoint("127.0.0.1", 0) as ep:
        runner = NodeRunner(node, ep)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            task_status.started(Tracker(node, f"127.0.0.1:{ep.local_address[1]}"))


@dataclass
class Seed:
    node: SeedNode
    runner: NodeRunner

    def ingest(self, payload: bytes, rap: bool) -> None:
        self.runner.call(lambda now: self.node.ingest(payload, rap=rap, now=now))


async def run_seed(*, tracker: str, upload_kbps: int, bitrate_kbps: int, substreams: int,
                   chunk_ms: int = 200, shaped: bool = True,
                   task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
    async with open_endpoint("127.0.0.1", 0, upload_bps=upload_kbps * 1000 if shaped else None) as ep:
        node = SeedNode(channel=CHANNEL, key=SigningKey(), crypto=Crypto(), tracker=tracker,
                        address=f"127.0.0.1:{ep.local_address[1]}", upload_kbps=upload_kbps,
                        bitrate_kbps=bitrate_kbps, substreams=substreams, chunk_ms=chunk_ms)
        runner = NodeRunner(node, ep)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            await wait_for(lambda: node.id != NO_PEER or bool(node.rejected), 5, "the seed's Welcome")
            if node.rejected:
                raise RuntimeError(f"tracker refused the seed: {node.rejected}")
            task_status.started(Seed(node, runner))


@dataclass
class Peer:
    node: PeerNode
    runner: NodeRunner
    lat: dict[int, float] = field(default_factory=dict)
    """seq → seed-ingest → released-to-player latency (s)."""
    skipped: int = 0


async def run_peer(*, tracker: str, upload_kbps: int, shaped: bool = True, rng_seed: int = 0,
                   task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
    """A viewer peer: PeerNode over its own QUIC endpoint, no player, latencies recorded."""
    bps = upload_kbps * 1000 if (shaped and upload_kbps) else None
    async with open_endpoint("127.0.0.1", 0, upload_bps=bps) as ep:
        address = f"127.0.0.1:{ep.local_address[1]}" if upload_kbps > 0 else ""
        node = PeerNode(channel=CHANNEL, crypto=Crypto(), rng=random.Random(rng_seed), tracker=tracker,
                        address=address, upload_kbps=upload_kbps)
        peer: Peer

        def on_effect(eff: fx.Effect) -> None:
            t = type(eff)
            if t is fx.Deliver:
                peer.lat[eff.head.seq] = eff.latency
            elif t is fx.Skip:
                peer.skipped += 1

        runner = NodeRunner(node, ep, on_effect=on_effect, accept=upload_kbps > 0)
        peer = Peer(node, runner)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            await wait_for(lambda: (node.id != NO_PEER and all(s is not None for s in node.primary)
                                    and len(node.primary) > 0) or bool(node.rejected),
                           5, "a peer's Welcome and parent assignments")
            if node.rejected:
                raise RuntimeError(f"tracker refused a peer: {node.rejected}")
            task_status.started(peer)


async def feed(seed: Seed, *, bitrate_kbps: int, chunk_ms: int, duration: float, rng_seed: int = 7,
               rap_every: int = 5) -> tuple[int, float]:
    """Ingest synthetic chunks in real time (absolute schedule, no drift) for `duration` s.

    Returns (chunks ingested, worst lateness of the driver loop in seconds)."""
    rng = random.Random(rng_seed)
    size = bitrate_kbps * 1000 // 8 * chunk_ms // 1000
    period = chunk_ms / 1000
    n = int(round(duration / period))
    t0 = anyio.current_time()
    late = 0.0
    for i in range(n):
        at = t0 + i * period
        delay = at - anyio.current_time()
        if delay > 0:
            await anyio.sleep(delay)
        late = max(late, anyio.current_time() - at)
        seed.ingest(rng.randbytes(size), rap=(i % rap_every == 0))
    return n, late


# --- peer worker subprocess ----------------------------------------------------------------------


class JsonLineProcess:
    """A subprocess that answers with one JSON object per line on stdout."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        self._buf = b""

    async def read_json(self, timeout: float, what: str) -> dict:
        """The next line as JSON; a line with an "error" key, an exit or a time-out raises."""
        with anyio.move_on_after(timeout):
            while b"\n" not in self._buf:
                try:
                    self._buf += await self.proc.stdout.receive()
                except anyio.EndOfStream:
                    raise RuntimeError(f"worker exited while waiting for {what}") from None
            line, self._buf = self._buf.split(b"\n", 1)
            msg = json.loads(line)
            if "error" in msg:
                raise RuntimeError(f"worker failed: {msg['error']}")
            return msg
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


class Worker(JsonLineProcess):
    """A `python bench/_common.py worker` subprocess seen from the orchestrating process."""

    @classmethod
    @asynccontextmanager
    async def start(cls, *, tracker: str, uploads: list[int], shaped: bool = True,
                    timeout: float = 20.0, rng_seed: int = 0, profile: str | None = None):
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        cmd = [sys.executable, *prof, os.path.join(HERE, "_common.py"), "worker", "--tracker", tracker,
               "--uploads", ",".join(map(str, uploads)), "--rng-seed", str(rng_seed)]
        if not shaped:
            cmd.append("--no-shape")
        proc = await anyio.open_process(cmd, stderr=None)
        w = cls(proc)
        try:
            w.ready = await w.read_json(timeout, "worker start-up")
            yield w
        finally:
            await stop_worker(proc)

    async def dump(self, timeout: float = 10.0) -> dict[int, dict[int, float]]:
        await self.proc.stdin.send(b"dump\n")
        msg = await self.read_json(timeout, "worker latency dump")
        return {int(pid): {int(s): v for s, v in lat.items()} for pid, lat in msg["lat"].items()}


async def _worker_main(args: argparse.Namespace) -> None:
    uploads = [int(u) for u in args.uploads.split(",")]
    out = sys.stdout
    try:
        async with anyio.create_task_group() as tg:
            peers: list[Peer] = []
            for i, up in enumerate(uploads):
                peers.append(await tg.start(lambda task_status, up=up, i=i: run_peer(
                    tracker=args.tracker, upload_kbps=up, shaped=not args.no_shape,
                    rng_seed=args.rng_seed * 1000 + i, task_status=task_status)))
            out.write(json.dumps({"ready": [p.node.id for p in peers], "pid": os.getpid()}) + "\n")
            out.flush()
            stdin = anyio.wrap_file(sys.stdin)
            while True:
                line = await stdin.readline()
                if not line:
                    break
                if line.strip() == "dump":
                    out.write(json.dumps({"lat": {p.node.id: p.lat for p in peers},
                                          "skipped": {p.node.id: p.skipped for p in peers}}) + "\n")
                    out.flush()
            tg.cancel_scope.cancel()
    except Exception as exc:  # report, so the orchestrator fails with a clear message
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        raise


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--tracker", required=True)
    w.add_argument("--uploads", required=True, help="comma-separated upload kbps, one per peer")
    w.add_argument("--no-shape", action="store_true")
    w.add_argument("--rng-seed", type=int, default=0)
    args = ap.parse_args()
    anyio.run(_worker_main, args, backend="asyncio")


if __name__ == "__main__":
    main()
