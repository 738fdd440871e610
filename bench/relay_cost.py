"""Relay cost: % of one core used by a peer that receives 4 Mbit/s and relays it to 8 children.

Processes: the relay peer runs alone in a worker process (`_common.py worker`); tracker, seed
and the 8 children run in this process. The relay's CPU (utime + stime from /proc/PID/stat) is
read at the start and end of a steady window (default 10 s, after 2 s of warm-up) while the seed
is fed synthetic 4 Mbit/s chunks (200 ms, 100,000 random bytes, RAP every 5th) in real time.

Topology (checked with the tracker before measuring): K = 4 sub-streams; the seed's upload is
the smallest that carries exactly K slots (5,000 kbps at 90 % headroom, 5,000 at 80 %), all taken
by the relay (one per tree); the relay's upload is the smallest giving exactly 32 = 8 children ×
4 sub-streams slots (36,000 kbps at 90 % headroom, 40,000 at 80 %) and its shaper runs at that
rate; the children have upload 0, so the relay is their only possible parent in every tree.

    python bench/relay_cost.py [--runs 5] [--quick] [--profile FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import anyio

from _common import (CLK_TCK, Worker, cpu_ticks, feed, median, pct, print_table,
                     run_peer, run_seed, run_tracker, upload_for_slots)
from meshcast.policy import child_slots

BITRATE = 4000
K = 4
CHILDREN = 8
CHUNK_MS = 200
SEED_UPLOAD = upload_for_slots(K, BITRATE, K)  # exactly K slots: one per tree, all the relay's
RELAY_UPLOAD = upload_for_slots(CHILDREN * K, BITRATE, K)  # exactly 8 children × K sub-streams

assert child_slots(SEED_UPLOAD, BITRATE, K) == K
assert child_slots(RELAY_UPLOAD, BITRATE, K) == CHILDREN * K


async def one_run(warmup: float, window: float, profile: str | None, shaped: bool = True) -> dict:
    async with anyio.create_task_group() as tg:
        tracker = await tg.start(lambda task_status: run_tracker(seed=1, task_status=task_status))
        seed = await tg.start(lambda task_status: run_seed(
            tracker=tracker.address, upload_kbps=SEED_UPLOAD, bitrate_kbps=BITRATE, substreams=K,
            chunk_ms=CHUNK_MS, task_status=task_status))
        async with Worker.start(tracker=tracker.address, uploads=[RELAY_UPLOAD], rng_seed=1,
                                profile=profile, shaped=shaped) as relay:
            relay_id, relay_pid = relay.ready["ready"][0], relay.ready["pid"]
            children = []
            for i in range(CHILDREN):
                children.append(await tg.start(lambda task_status, i=i: run_peer(
                    tracker=tracker.address, upload_kbps=0, rng_seed=100 + i, task_status=task_status)))
            members = tracker.members()
            seed_id = seed.node.id
            if members[relay_id].parent != [seed_id] * K:
                raise SystemExit(f"relay's parents are {members[relay_id].parent}, not the seed")
            for c in children:
                if members[c.node.id].parent != [relay_id] * K:
                    raise SystemExit(f"child {c.node.id} has parents {members[c.node.id].parent}, "
                                     f"not the relay {relay_id} in every tree")
            await anyio.sleep(0.3)  # let the Subscribes land

            stats: dict = {}

            async def measure() -> None:
                await anyio.sleep(warmup)
                t0, c0 = time.perf_counter(), cpu_ticks(relay_pid)
                s0 = seed.node.next_seq
                b0 = sum(c.node.bytes_from_peers for c in children)
                await anyio.sleep(window)
                t1, c1 = time.perf_counter(), cpu_ticks(relay_pid)
                b1 = sum(c.node.bytes_from_peers for c in children)
                stats.update(wall=t1 - t0, cpu=(c1 - c0) / CLK_TCK, seqs=(s0, seed.node.next_seq),
                             relayed=b1 - b0)

            tg.start_soon(measure)
            n, late = await feed(seed, bitrate_kbps=BITRATE, chunk_ms=CHUNK_MS,
                                 duration=warmup + window + 0.4)
            await anyio.sleep(1.0)
            relay_lat = (await relay.dump())[relay_id]
        tg.cancel_scope.cancel()

    lo, hi = stats["seqs"]
    window_seqs = range(lo, hi)
    got = [sum(1 for s in window_seqs if s in c.lat) / len(window_seqs) for c in children]
    child_lat = [c.lat[s] for c in children for s in window_seqs if s in c.lat]
    # Chunk bytes the children accepted from the relay in the window, as a fraction of the full
    # 8 × 4 Mbit/s: when the relay is CPU-starved (a busy machine) it forwards less and so spends
    # less; "per full load" scales its CPU to what relaying everything would cost at that rate.
    relayed = stats["relayed"] * 8 / stats["wall"] / (BITRATE * 1000 * CHILDREN)
    core = 100 * stats["cpu"] / stats["wall"]
    return {
        "relay_core_pct": round(core, 1),
        "relayed_fraction": round(relayed, 3),
        "relay_core_pct_per_full_load": round(core / relayed, 1) if relayed > 0 else None,
        "window_s": round(stats["wall"], 2),
        "children_delivered_min": round(min(got), 3),
        "relay_delivered": round(sum(1 for s in window_seqs if s in relay_lat) / len(window_seqs), 3),
        "child_latency_p50_ms": round(1000 * pct(child_lat, 50), 1) if child_lat else None,
        "driver_late_ms": round(1000 * late, 1),
        "loadavg_1min": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one short run")
    ap.add_argument("--window", type=float, default=10.0, help="seconds of steady state measured")
    ap.add_argument("--profile", help="cProfile the relay process into this file (one run)")
    ap.add_argument("--no-shape", action="store_true",
                    help="diagnosis: the relay's QUIC upload shaper off (default: on, 36 Mbit/s)")
    args = ap.parse_args()
    runs, warmup, window = (1, 1.0, 4.0) if args.quick else (args.runs, 2.0, args.window)
    if args.profile:
        runs = 1

    results = []
    for r in range(runs):
        t = time.perf_counter()
        res = anyio.run(one_run, warmup, window, args.profile, not args.no_shape, backend="asyncio")
        results.append(res)
        print(f"run {r + 1}/{runs} ({time.perf_counter() - t:4.1f} s): {res}", file=sys.stderr)

    core = [x["relay_core_pct"] for x in results]
    summary = {
        "relay_core_pct_median": round(median(core), 1),
        "relay_core_pct_runs": core,
        "relayed_fraction_runs": [x["relayed_fraction"] for x in results],
        "relay_core_pct_per_full_load_median": round(median(
            [x["relay_core_pct_per_full_load"] or 0.0 for x in results]), 1),
        "children_delivered_min": min(x["children_delivered_min"] for x in results),
        "child_latency_p50_ms": round(median([x["child_latency_p50_ms"] for x in results]), 1),
        "loadavg_1min_median": round(median([x["loadavg_1min"] for x in results]), 2),
    }
    print(f"\nrelay cost: 1 relay receiving {BITRATE} kbit/s, relaying to {CHILDREN} children "
          f"(K={K}), relay in its own process, relay shaper {'off' if args.no_shape else 'on'}; median of {runs} run(s), {window:g} s window")
    print_table(["figure", "value"], [
        ["relay % of one core (median)", summary["relay_core_pct_median"]],
        ["relay % of one core (runs)", " ".join(map(str, core))],
        ["relay upload out (Mbit/s)", BITRATE * CHILDREN / 1000],
        ["fraction of that actually relayed in the window (runs)",
         " ".join(str(x["relayed_fraction"]) for x in results)],
        ["relay % of one core scaled to the full load (median)",
         summary["relay_core_pct_per_full_load_median"]],
        ["relay / seed declared upload (kbps)", f"{RELAY_UPLOAD} / {SEED_UPLOAD}"],
        ["min fraction of window chunks delivered (children)", summary["children_delivered_min"]],
        ["child seed->player latency p50 (ms)", summary["child_latency_p50_ms"]],
        ["machine 1-min load average (median; 2 cores)", summary["loadavg_1min_median"]],
    ])
    print(json.dumps({"bench": "relay_cost", "runs": runs, "window_s": window, "relay_shaper": not args.no_shape,
                      "relay_upload_kbps": RELAY_UPLOAD, "seed_upload_kbps": SEED_UPLOAD, "target_pct": 25,
                      "meets_target": max(summary["relay_core_pct_median"],
                                          summary["relay_core_pct_per_full_load_median"]) <= 25, **summary}))


if __name__ == "__main__":
    main()
