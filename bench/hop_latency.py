"""Added latency per relay hop: a chain seed → p1 → … → p10 at 2 Mbit/s on loopback.

Topology: one sub-stream (K=1) and every node's declared upload is 3,000 kbps, so
`child_slots(3000, 2000, 1) == 1`: the tracker ("tree" strategy) can only chain them. The chain is
checked against the tracker's `depth_of` (depths must be exactly 1..10) before measuring.

The seed is fed synthetic 2 Mbit/s chunks (200 ms, 50,000 random bytes, RAP every 5th) paced in
real time. Each peer records, per chunk, seed-ingest → verified-and-released latency. Per-hop
latency of chunk s at depth d = lat_d(s) − lat_{d−1}(s) (lat_0 = 0, the seed's ingest). "relay
hops" are d = 2..10 (peer → peer); hop 1 (seed → p1) is reported separately as it includes signing.

Two transport settings, each a full run:
- shaped:   every endpoint's QUIC upload shaper at 3 Mbit/s = 1.5× the stream (realistic);
- unshaped: no shaper (pure software overhead of a hop: QUIC + the relay's node code).

All nodes run in ONE process on one asyncio event loop (the 2 cores are not used in parallel;
the whole chain shares one core and one scheduler, so each hop also waits for the others' work).
`--procs` puts each peer in its own worker process instead (12 processes on 2 cores).

    python bench/hop_latency.py [--runs 5] [--quick] [--procs]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import anyio

from contextlib import AsyncExitStack

from _common import (CHANNEL, Worker, feed, median, pct, print_table, run_peer, run_seed,
                     run_tracker, wait_for)
from meshcast.policy import child_slots

HOPS = 10
BITRATE = 2000
UPLOAD = 3000  # 1.5× the stream; exactly one child slot at K=1
CHUNK_MS = 200
WARMUP = 1.0  # seconds of chunks left out of the figures (handshakes, congestion windows)

assert child_slots(UPLOAD, BITRATE, 1) == 1


class _Lat:
    def __init__(self, lat: dict[int, float]) -> None:
        self.lat = lat


def check_chain(tracker, ids: list[int]) -> list[int]:
    depths = [tracker.node.depth_of(CHANNEL, i) for i in ids]
    if sorted(depths) != list(range(1, HOPS + 1)):
        raise SystemExit(f"not a chain: tracker depths {depths}")
    members = tracker.members()
    for i in ids:  # each peer's parent is the one just above it
        parent = members[members[i].parent[0]]
        if parent.depth[0] != members[i].depth[0] - 1:
            raise SystemExit("not a chain: parent depth mismatch")
    return depths


async def one_run(shaped: bool, duration: float, procs: bool) -> dict:
    async with anyio.create_task_group() as tg, AsyncExitStack() as stack:
        tracker = await tg.start(lambda task_status: run_tracker(seed=1, task_status=task_status))
        seed = await tg.start(lambda task_status: run_seed(
            tracker=tracker.address, upload_kbps=UPLOAD, bitrate_kbps=BITRATE, substreams=1,
            chunk_ms=CHUNK_MS, shaped=shaped, task_status=task_status))
        if procs:  # one worker process per peer, started in chain order
            workers = []
            for i in range(HOPS):
                workers.append(await stack.enter_async_context(Worker.start(
                    tracker=tracker.address, uploads=[UPLOAD], shaped=shaped, rng_seed=i)))
            ids = [w.ready["ready"][0] for w in workers]
        else:
            peers = []
            for i in range(HOPS):
                peers.append(await tg.start(lambda task_status, i=i: run_peer(
                    tracker=tracker.address, upload_kbps=UPLOAD, shaped=shaped, rng_seed=i,
                    task_status=task_status)))
            ids = [p.node.id for p in peers]
        depths = check_chain(tracker, ids)
        await anyio.sleep(0.3)  # let the Subscribes land
        cpu0 = time.process_time()
        n, late = await feed(seed, bitrate_kbps=BITRATE, chunk_ms=CHUNK_MS, duration=duration)
        cpu = time.process_time() - cpu0
        last = n - 1
        if procs:
            tail = ids[depths.index(HOPS)]
            with anyio.move_on_after(5):  # poll until the last chunk is at the chain's end
                while True:
                    await anyio.sleep(0.5)
                    if last in (await workers[depths.index(HOPS)].dump())[tail]:
                        break
            lats = {}
            for w in workers:
                lats.update(await w.dump())
            by_depth = {d: _Lat(lats[i]) for d, i in zip(depths, ids)}
        else:
            by_depth = {d: p for d, p in zip(depths, peers)}
            await wait_for(lambda: last in by_depth[HOPS].lat, 5, f"chunk {last} at depth {HOPS}")
        tg.cancel_scope.cancel()

    first = int(WARMUP * 1000 / CHUNK_MS)
    seqs = [s for s in range(first, n) if all(s in by_depth[d].lat for d in range(1, HOPS + 1))]
    if len(seqs) < (n - first) * 0.5:
        raise SystemExit(f"only {len(seqs)} of {n - first} chunks reached every depth")
    hop1, relay = [], []
    for s in seqs:
        hop1.append(by_depth[1].lat[s])
        for d in range(2, HOPS + 1):
            relay.append(by_depth[d].lat[s] - by_depth[d - 1].lat[s])
    e2e = [by_depth[HOPS].lat[s] for s in seqs]
    ms = lambda x: round(1000 * x, 2)
    return {
        "chunks": len(seqs), "complete_fraction": round(len(seqs) / (n - first), 3),
        "driver_late_ms": ms(late), "loadavg_1min": os.getloadavg()[0],
        # one-process mode: this process's CPU while feeding, per chunk per hop (seed send + 10 relays)
        "cpu_ms_per_chunk_hop": None if procs else round(1000 * cpu / n / HOPS, 2),
        "relay_hop_p50_ms": ms(pct(relay, 50)), "relay_hop_p99_ms": ms(pct(relay, 99)),
        "all_hops_p50_ms": ms(pct(relay + hop1, 50)), "all_hops_p99_ms": ms(pct(relay + hop1, 99)),
        "hop1_p50_ms": ms(pct(hop1, 50)),
        "e2e_depth10_p50_ms": ms(pct(e2e, 50)), "e2e_depth10_p99_ms": ms(pct(e2e, 99)),
        "per_depth_p50_ms": [ms(pct([by_depth[d].lat[s] for s in seqs], 50)) for d in range(1, HOPS + 1)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one short run per setting")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of stream per run")
    ap.add_argument("--procs", action="store_true",
                    help="each peer in its own process (default: all nodes in one process)")
    args = ap.parse_args()
    runs, duration = (1, 4.0) if args.quick else (args.runs, args.duration)

    results: dict[str, list[dict]] = {"shaped": [], "unshaped": []}
    for r in range(runs):
        for name in results:
            t = time.perf_counter()
            res = anyio.run(one_run, name == "shaped", duration, args.procs, backend="asyncio")
            results[name].append(res)
            print(f"run {r + 1}/{runs} {name:8s} ({time.perf_counter() - t:4.1f} s): "
                  f"relay hop p50 {res['relay_hop_p50_ms']} ms, p99 {res['relay_hop_p99_ms']} ms, "
                  f"e2e@10 p50 {res['e2e_depth10_p50_ms']} ms, complete {res['complete_fraction']}, "
                  f"load {res['loadavg_1min']}", file=sys.stderr)

    keys = ["relay_hop_p50_ms", "relay_hop_p99_ms", "all_hops_p50_ms", "all_hops_p99_ms",
            "hop1_p50_ms", "e2e_depth10_p50_ms", "e2e_depth10_p99_ms"]
    summary = {name: {k: round(median([x[k] for x in rs]), 2) for k in keys}
               for name, rs in results.items()}
    for name, rs in results.items():
        summary[name]["per_depth_p50_ms"] = [round(median([x["per_depth_p50_ms"][d] for x in rs]), 1)
                                             for d in range(HOPS)]
        summary[name]["chunks_per_run"] = rs[0]["chunks"]
        summary[name]["complete_fraction_min"] = min(x["complete_fraction"] for x in rs)
        summary[name]["loadavg_1min_median"] = round(median([x["loadavg_1min"] for x in rs]), 2)
        if not args.procs:
            summary[name]["cpu_ms_per_chunk_hop"] = round(median([x["cpu_ms_per_chunk_hop"] for x in rs]), 2)
    print(f"\nhop latency, chain of {HOPS} peers, {BITRATE} kbit/s, {CHUNK_MS} ms chunks, "
          f"{'one process per peer' if args.procs else 'one process'}; median of {runs} run(s)")
    print_table(["figure (ms)", "shaped 1.5x", "unshaped"],
                [[k, summary["shaped"][k], summary["unshaped"][k]] for k in keys])
    if not args.procs:
        print("CPU of the process per chunk per hop (ms): shaped",
              summary["shaped"]["cpu_ms_per_chunk_hop"], " unshaped", summary["unshaped"]["cpu_ms_per_chunk_hop"])
    print("chunks complete at every depth (min fraction): shaped",
          summary["shaped"]["complete_fraction_min"], " unshaped", summary["unshaped"]["complete_fraction_min"],
          "; machine 1-min load average (median):", summary["shaped"]["loadavg_1min_median"],
          summary["unshaped"]["loadavg_1min_median"])
    print("per-depth p50 (shaped):  ", summary["shaped"]["per_depth_p50_ms"])
    print("per-depth p50 (unshaped):", summary["unshaped"]["per_depth_p50_ms"])
    target = summary["unshaped"]["relay_hop_p50_ms"] <= 2.0
    print(json.dumps({"bench": "hop_latency", "runs": runs, "procs": "per-peer" if args.procs else "one", "target_p50_ms": 2.0,
                      "meets_target_unshaped": target,
                      "meets_target_shaped": summary["shaped"]["relay_hop_p50_ms"] <= 2.0, **summary}))


if __name__ == "__main__":
    main()
