"""Seed → player latency for 20 peers at 2 Mbit/s, next to the raw-UDP floor of one hop.

meshcast: tracker + seed in this process; the 20 peers in 2 worker processes of 10 (so the two
cores are both used; peers inside a worker share its event loop). K = 4 sub-streams, 200 ms
chunks of 50,000 random bytes (RAP every 5th) fed in real time. Seed upload 4,000 kbps
and peers 3,000 kbps (shaped at 3 Mbit/s = 1.5× the stream): the seed
cannot take everyone, so the trees have ≥ 2 levels (checked with the tracker). Slot counts follow
`meshcast.policy` (7 and 5 at 90 % headroom, 6 and 4 at 80 %). Latency is seed
ingest → chunk verified and released in order to the player, over every (peer, chunk) after 1 s
of warm-up; p50 and p95.

Floor: one hop of raw UDP in Python, measured the same way — a sender process with a blocking
socket has a whole 50,000-byte chunk at t0 (timestamp), sends it as 1,200-byte datagrams to a
receiver process (blocking socket) on loopback; latency = receiver has the chunk's last byte − t0.
One chunk every 200 ms (2 Mbit/s) for 5 s. Two variants: datagrams back-to-back (pure software floor) and
datagrams paced at 2 Mbit/s (the chunk's serialization time at the stream rate).

    python bench/seed_to_player.py [--runs 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
from contextlib import AsyncExitStack

import anyio

from _common import (CHANNEL, CLK_TCK, Worker, cpu_ticks, feed, median, pct, print_table, run_seed, run_tracker)
from meshcast.policy import child_slots

PEERS = 20
WORKERS = 2
BITRATE = 2000
K = 4
SEED_UPLOAD = 4000
PEER_UPLOAD = 3000
CHUNK_MS = 200
CHUNK_BYTES = BITRATE * 1000 // 8 * CHUNK_MS // 1000  # 50,000
WARMUP = 1.0

assert child_slots(SEED_UPLOAD, BITRATE, K) < PEERS * K


# --- meshcast --------------------------------------------------------------------------------


async def mesh_run(duration: float, peer_upload: int = PEER_UPLOAD, seed_upload: int = SEED_UPLOAD) -> dict:
    async with anyio.create_task_group() as tg, AsyncExitStack() as stack:
        tracker = await tg.start(lambda task_status: run_tracker(seed=1, task_status=task_status))
        seed = await tg.start(lambda task_status: run_seed(
            tracker=tracker.address, upload_kbps=seed_upload, bitrate_kbps=BITRATE, substreams=K,
            chunk_ms=CHUNK_MS, task_status=task_status))
        workers = []
        per = PEERS // WORKERS
        for w in range(WORKERS):  # one worker at a time: a deterministic join order
            workers.append(await stack.enter_async_context(Worker.start(
                tracker=tracker.address, uploads=[peer_upload] * per, rng_seed=10 + w)))
        ids = [i for w in workers for i in w.ready["ready"]]
        depth = {i: tracker.node.depth_of(CHANNEL, i) for i in ids}
        if min(depth.values()) < 1 or max(depth.values()) < 2:
            raise SystemExit(f"expected ≥ 2 levels, tracker depths: {sorted(depth.values())}")
        await anyio.sleep(0.3)
        pids = [w.ready["pid"] for w in workers]
        t0, c0, w0 = time.perf_counter(), time.process_time(), sum(cpu_ticks(p) for p in pids)
        b0 = seed.runner.bytes_out
        n, late = await feed(seed, bitrate_kbps=BITRATE, chunk_ms=CHUNK_MS, duration=duration)
        wall = time.perf_counter() - t0
        seed_kbps = (seed.runner.bytes_out - b0) * 8 / wall / 1000
        own_cpu = (time.process_time() - c0) / wall
        workers_cpu = (sum(cpu_ticks(p) for p in pids) - w0) / CLK_TCK / wall
        await anyio.sleep(1.5)  # let the last chunks arrive (and be repaired, if at all)
        lat: dict[int, dict[int, float]] = {}
        for w in workers:
            lat.update(await w.dump())
        tg.cancel_scope.cancel()

    first = int(WARMUP * 1000 / CHUNK_MS)
    seqs = range(first, n)
    values = [lat[i][s] for i in ids for s in seqs if s in lat[i]]
    delivered = len(values) / (len(ids) * len(seqs))
    levels = sorted(set(depth.values()))
    by_level = {d: [lat[i][s] for i in ids if depth[i] == d for s in seqs if s in lat[i]]
                for d in levels}
    ms = lambda x: round(1000 * x, 1)
    return {"p50_ms": ms(pct(values, 50)), "p95_ms": ms(pct(values, 95)),
            "delivered": round(delivered, 4), "max_depth": max(levels),
            "peers_per_depth": {d: sum(1 for i in ids if depth[i] == d) for d in levels},
            "p50_ms_by_depth": {d: ms(pct(v, 50)) for d, v in by_level.items() if v},
            "driver_late_ms": ms(late), "loadavg_1min": os.getloadavg()[0],
            # CPU this benchmark itself used while streaming, in % of one core
            "seed_sent_kbps": round(seed_kbps), "seed_pushes_kbps": round(
                child_slots(seed_upload, BITRATE, K) * BITRATE / K),
            "cpu_pct_seed_tracker": round(100 * own_cpu), "cpu_pct_peer_workers": round(100 * workers_cpu)}


# --- raw UDP floor -------------------------------------------------------------------------

HDR = struct.Struct("!IHHd")  # chunk no, datagram index, datagram count, t0 (time.time())
DGRAM = 1200
END = 0xFFFFFFFF


def udp_receiver() -> None:
    """Subprocess: print the port, then record last-byte latencies until the END datagram."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(30)
    print(sock.getsockname()[1], flush=True)
    got: dict[int, int] = {}
    lat: list[float] = []
    while True:
        data = sock.recv(2048)
        now = time.time()
        chunk, index, count, t0 = HDR.unpack_from(data)
        if chunk == END:
            break
        c = got[chunk] = got.get(chunk, 0) + 1
        if c == count:
            lat.append(now - t0)
    print(json.dumps({"lat": lat}), flush=True)


def udp_run(chunks: int, paced: bool) -> dict:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--udp-receiver"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        sock.connect(("127.0.0.1", port))
        body = DGRAM - HDR.size
        count = -(-CHUNK_BYTES // body)
        payload = os.urandom(CHUNK_BYTES)
        gap = DGRAM * 8 / (BITRATE * 1000)  # one datagram's time at the stream rate
        start = time.perf_counter() + 0.1
        for c in range(chunks):
            at = start + c * CHUNK_MS / 1000
            while (d := at - time.perf_counter()) > 0:
                time.sleep(d)
            t0 = time.time()
            p0 = time.perf_counter()
            for i in range(count):
                if paced:
                    while (d := p0 + i * gap - time.perf_counter()) > 0:
                        time.sleep(d)
                sock.send(HDR.pack(c, i, count, t0) + payload[i * body:(i + 1) * body])
        time.sleep(0.2)
        sock.send(HDR.pack(END, 0, 0, 0.0))
        out, _ = proc.communicate(timeout=10)
        lat = json.loads(out.strip().splitlines()[-1])["lat"][int(WARMUP * 1000 / CHUNK_MS):]
        if len(lat) < (chunks - WARMUP * 1000 / CHUNK_MS) * 0.9:
            raise SystemExit(f"UDP floor: only {len(lat)} chunks complete (loss?)")
        return {"p50_ms": round(1000 * pct(lat, 50), 3), "p95_ms": round(1000 * pct(lat, 95), 3)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    if "--udp-receiver" in sys.argv:
        udp_receiver()
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one short run")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of stream per run")
    ap.add_argument("--peer-upload", type=int, default=PEER_UPLOAD,
                    help=f"each peer's upload in kbps (default {PEER_UPLOAD}, 1.5x the stream)")
    ap.add_argument("--seed-upload", type=int, default=SEED_UPLOAD,
                    help=f"the seed's upload in kbps (default {SEED_UPLOAD})")
    args = ap.parse_args()
    if child_slots(args.seed_upload, BITRATE, K) >= PEERS * K:
        ap.error("--seed-upload so large that every peer hangs off the seed (1 level)")
    runs, duration = (1, 4.0) if args.quick else (args.runs, args.duration)
    chunks = int(min(duration, 5.0) * 1000 / CHUNK_MS)  # UDP floor: 5 s of chunks is plenty

    mesh, b2b, paced = [], [], []
    for r in range(runs):
        t = time.perf_counter()
        mesh.append(anyio.run(mesh_run, duration, args.peer_upload, args.seed_upload, backend="asyncio"))
        b2b.append(udp_run(chunks, paced=False))
        paced.append(udp_run(chunks, paced=True))
        print(f"run {r + 1}/{runs} ({time.perf_counter() - t:4.1f} s): meshcast {mesh[-1]}; "
              f"udp back-to-back {b2b[-1]}; udp paced {paced[-1]}", file=sys.stderr)

    med = lambda rs, k: round(median([x[k] for x in rs]), 3)
    s = {"meshcast": {"p50_ms": med(mesh, "p50_ms"), "p95_ms": med(mesh, "p95_ms"),
                      "delivered_min": min(x["delivered"] for x in mesh),
                      "peer_upload_kbps": args.peer_upload, "seed_upload_kbps": args.seed_upload,
                      "seed_slots": child_slots(args.seed_upload, BITRATE, K),
                      "loadavg_1min_median": med(mesh, "loadavg_1min"),
                      "cpu_pct_seed_tracker": med(mesh, "cpu_pct_seed_tracker"),
                      "seed_sent_kbps": med(mesh, "seed_sent_kbps"),
                      "cpu_pct_peer_workers": med(mesh, "cpu_pct_peer_workers"),
                      "peer_slots": child_slots(args.peer_upload, BITRATE, K),
                      "max_depth": max(x["max_depth"] for x in mesh),
                      "peers_per_depth": mesh[0]["peers_per_depth"],
                      "p50_ms_by_depth": mesh[0]["p50_ms_by_depth"]},
         "udp_back_to_back": {"p50_ms": med(b2b, "p50_ms"), "p95_ms": med(b2b, "p95_ms")},
         "udp_paced_2mbps": {"p50_ms": med(paced, "p50_ms"), "p95_ms": med(paced, "p95_ms")}}
    for name in ("udp_back_to_back", "udp_paced_2mbps"):
        for q in ("p50_ms", "p95_ms"):
            s[name][f"ratio_{q[:3]}"] = round(s["meshcast"][q] / s[name][q], 1)
    print(f"\nseed -> player, {PEERS} peers at {BITRATE} kbit/s (K={K}, {WORKERS} worker processes, "
          f"seed upload {args.seed_upload} kbps, peer upload {args.peer_upload} kbps), "
          f"vs one raw-UDP hop; median of {runs} run(s)")
    print_table(["path", "p50 ms", "p95 ms", "meshcast/this p50", "meshcast/this p95"], [
        ["meshcast seed->player", s["meshcast"]["p50_ms"], s["meshcast"]["p95_ms"], "", ""],
        ["raw UDP 1 hop, back-to-back", s["udp_back_to_back"]["p50_ms"], s["udp_back_to_back"]["p95_ms"],
         s["udp_back_to_back"]["ratio_p50"], s["udp_back_to_back"]["ratio_p95"]],
        ["raw UDP 1 hop, paced 2 Mbit/s", s["udp_paced_2mbps"]["p50_ms"], s["udp_paced_2mbps"]["p95_ms"],
         s["udp_paced_2mbps"]["ratio_p50"], s["udp_paced_2mbps"]["ratio_p95"]],
    ])
    print("meshcast peers per depth:", s["meshcast"]["peers_per_depth"],
          " p50 ms by depth (run 1):", s["meshcast"]["p50_ms_by_depth"],
          " min delivered fraction:", s["meshcast"]["delivered_min"],
          " load avg (1 min, median):", s["meshcast"]["loadavg_1min_median"])
    print(f"CPU used while streaming (% of one core, median): seed+tracker process "
          f"{s['meshcast']['cpu_pct_seed_tracker']}, the {WORKERS} peer workers together "
          f"{s['meshcast']['cpu_pct_peer_workers']}; seed sent {s['meshcast']['seed_sent_kbps']} kbit/s "
          f"(its tree pushes alone: {mesh[0]['seed_pushes_kbps']} kbit/s; the rest is repair pulls)")
    print(json.dumps({"bench": "seed_to_player", "runs": runs, **s}))


if __name__ == "__main__":
    main()
