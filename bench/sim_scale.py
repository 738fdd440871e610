"""Simulator scale: 10k and 100k viewers × 60 s of a 2 Mbit/s stream.

Prints wall time, events/s, peer-chunk deliveries per wall second, peak memory and memory per
peer, one row per audience size (each size in a fresh process, so peak RSS is its own). The
audience joins at 500/s or within 20 s, whichever is faster, at a tracker that costs nothing.

    python bench/sim_scale.py                 # 10k and 100k, 60 s each (100k takes a while)
    python bench/sim_scale.py --peers 10000 --duration 20

Compiled (mypyc, opt-in): `bench/build_compiled.sh`, then run with `PYTHONPATH=build/mypyc`;
the output says `compiled: yes` or `no` (and warns when the compiled snapshot is stale).

Each size runs with glibc's malloc heap on transparent huge pages where the system allows it
(THP `madvise` or `always`; `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): the objects over 512
bytes (a peer's node, its buffers) then take one TLB entry per 2 MB, not per 4 kB.
`--no-huge-pages` runs without. Python's small objects stay in its own arenas: all of them from
glibc's malloc (`PYTHONMALLOC=malloc`, with `--all-huge-pages`) is faster still at 50k peers
and up, but costs ~1 KB more per peer. The output gives how much of the process was on huge
pages.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def huge_pages_env(env: dict[str, str], everything: bool = False) -> dict[str, str]:
    """`env` for a child whose glibc heap is on huge pages (`everything`: with Python's small
    objects in it); glibc tunables already set are kept (see the module)."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    out = dict(env, GLIBC_TUNABLES=":".join([*tunables, "glibc.malloc.hugetlb=1"]))
    if everything:
        out["PYTHONMALLOC"] = "malloc"
    return out


def huge_pages_mb() -> int:
    """This process's anonymous memory on huge pages, in MB (0 where the kernel does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def one(peers: int, duration: float, chunk_ms: int) -> dict:
    from sim.build import status
    from sim.driver import run_scenario
    from sim.progress import Progress
    from sim.scenario import SCENARIO_DIR, load_scenario

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scenario = load_scenario(SCENARIO_DIR / "steady-10k.toml", overrides={
        "peers.count": peers, "stream.duration_s": duration, "stream.chunk_ms": chunk_ms,
        "peers.arrival.rate": max(500, peers / 20),
        # The data path at scale is what this measures: a tracker that costs nothing lets a 100k
        # audience in within 20 s, as before the tracker's CPU was simulated (one process
        # admits ~480 a second: bench/tracker_cpu.py).
        **{f"tracker.{cost}": 0 for cost in ("handshake_us", "event_us", "send_us", "receive_us",
                                              "relay_us", "sign_us", "verify_us", "keepalive_us",
                                              "fronts")}})
    t0 = time.perf_counter()
    result = run_scenario(scenario, progress=Progress(duration, tty=False))  # stderr, every 10%
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    huge_mb = huge_pages_mb()
    s = result.summary()
    deliveries = s["chunks"]["verified"]
    return {
        "peers": peers, "duration_s": duration, "chunk_ms": chunk_ms, "wall_s": round(wall, 1),
        "events": result.events, "events_per_s": round(result.events / wall),
        "deliveries": deliveries, "deliveries_per_s": round(deliveries / wall),
        "peak_rss_mb": round(peak_kb / 1024), "kb_per_peer": round((peak_kb - base) / peers, 2),
        "latency_p95_ms": s["latency_ms"]["p95"], "continuity": s["continuity"],
        "offload": s["offload"], "huge_pages_mb": huge_mb, "compiled": status(REPO),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--chunk-ms", type=int, default=100)
    ap.add_argument("--no-huge-pages", action="store_true",
                    help="run without glibc's heap on transparent huge pages (see above)")
    ap.add_argument("--all-huge-pages", action="store_true",
                    help="... and with Python's small objects in that heap too (see above)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.peers[0], args.duration, args.chunk_ms)))
        return
    rows = []
    for n in args.peers:
        out = subprocess.run([sys.executable, __file__, "--child", "--peers", str(n), "--duration",
                              str(args.duration), "--chunk-ms", str(args.chunk_ms)],
                             stdout=subprocess.PIPE, text=True, check=True,
                             env=None if args.no_huge_pages
                             else huge_pages_env(dict(os.environ), args.all_huge_pages))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        if len(rows) == 1:
            pages = ("off" if args.no_huge_pages else "glibc's heap and Python's objects"
                     if args.all_huge_pages else "glibc's heap")
            print(f"compiled: {r['compiled']}; huge pages: {pages}", flush=True)
        print(f"{r['peers']:>7} peers  {r['wall_s']:>8.1f} s wall  {r['events_per_s']:>9,} ev/s  "
              f"{r['deliveries_per_s']:>8,} deliveries/s  peak {r['peak_rss_mb']:>6,} MB  "
              f"{r['kb_per_peer']:>6.1f} KB/peer  p95 {r['latency_p95_ms']} ms  "
              f"continuity {r['continuity']:.4f}  offload {r['offload']:.4f}  "
              f"{r['huge_pages_mb']:,} MB on huge pages", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
