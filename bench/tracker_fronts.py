"""A real tracker's CPU per join, all in one process against QUIC in front processes.

Starts `meshcast tracker --fronts F` (F = 0: one process, as before fronts) in a subprocess,
announces a channel from this process (a real `Announce`, real Ed25519), then joins `--joins`
viewers over real QUIC on 127.0.0.1, `--concurrency` at a time: each opens a link, sends its
`Join` and waits for its `Welcome`, and its link stays open. The CPU each tracker process spent
during the joins (utime + stime from `/proc`) is divided by the joins: the state process's
(the one holding `TrackerNode`) apart from the fronts'. One process admits at most
1 / (its CPU per join) viewers a second; with fronts, the state process is the one that cannot
be spread over cores. Median of `--runs` runs per F. The joiners run in this process, on the
same two cores: the joins per wall second are what this machine managed, not a ceiling.

    python bench/tracker_fronts.py [--fronts 0,1,2] [--joins 1000] [--concurrency 32] [--runs 3]
                                   [--client-sockets 16]

The joiners use `--client-sockets` UDP sockets: Linux spreads clients over the fronts by their
address, and one socket would put every joiner on the same front.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time

import anyio
import anyio.abc

from _common import CLK_TCK, cpu_ticks, print_table
from meshcast import messages as m
from meshcast.cli import _free_udp_port, _stop
from meshcast import wire
from meshcast.crypto import Crypto, SigningKey
from meshcast.net.quic import ConnectError, QuicLink, open_endpoint

CHANNEL = "bench"
BITRATE, K = 2000, 4


def children(pid: int) -> list[int]:
    """The processes `pid` started (its fronts)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


async def first_message(link: QuicLink, want: type) -> m.Message:
    reader = wire.FrameReader()
    while True:
        event = await link.receive()
        data = getattr(event, "data", None)
        if data is None:
            raise RuntimeError(f"link closed before {want.__name__}: {event}")
        for msg in reader.feed(data):
            if isinstance(msg, want):
                return msg
            if isinstance(msg, m.Reject):
                raise RuntimeError(f"rejected: {msg}")


async def one_run(fronts: int, joins: int, concurrency: int, sockets: int, rate: float,
                  rng: random.Random) -> dict:
    port = _free_udp_port()
    cmd = [sys.executable, "-m", "meshcast.cli", "tracker", "--listen", f"127.0.0.1:{port}",
           "--fronts", str(fronts), "--per-ip-rate", "0"]
    proc = await anyio.open_process(cmd, stdout=None, stderr=None)
    try:
        async with contextlib.AsyncExitStack() as stack:
            eps = [await stack.enter_async_context(open_endpoint("127.0.0.1", 0))
                   for _ in range(sockets)]
            ep = eps[0]
            with anyio.fail_after(30):
                while True:  # until it listens
                    try:
                        seed = await ep.connect("127.0.0.1", port, timeout=0.5)
                        break
                    except ConnectError:
                        if proc.returncode is not None:
                            raise RuntimeError(f"the tracker exited ({proc.returncode})") from None
            key = SigningKey()
            proof = Crypto().sign_announce(key, CHANNEL, "127.0.0.1:1")
            seed.send_control(wire.frame(m.Announce(CHANNEL, key.public, "127.0.0.1:1", 40_000,
                                                    BITRATE, K, 100, proof)))
            with anyio.fail_after(30):
                await first_message(seed, m.Welcome)
            pids = [proc.pid] + sorted(children(proc.pid))
            if len(pids) != 1 + fronts:
                raise RuntimeError(f"expected {fronts} front processes, found {pids[1:]}")
            links: list[QuicLink] = []
            joined = 0
            limiter = anyio.Semaphore(concurrency)

            async def join(i: int) -> None:
                nonlocal joined
                async with limiter:
                    link = await eps[i % sockets].connect("127.0.0.1", port, timeout=30)
                    upload = rng.choice((2500, 4500))
                    link.send_control(wire.frame(m.Join(CHANNEL, f"127.0.0.1:{10_000 + i}", upload,
                                                        (rng.random(), rng.random()))))
                    await first_message(link, m.Welcome)
                    links.append(link)
                    joined += 1

            before = [cpu_ticks(p) for p in pids]
            t0 = time.perf_counter()
            t0_loop = anyio.current_time()
            with anyio.fail_after(600):
                async with anyio.create_task_group() as tg:
                    for i in range(joins):
                        tg.start_soon(join, i)
                        if rate:
                            await anyio.sleep_until(t0_loop + (i + 1) / rate)
            wall = time.perf_counter() - t0
            spent = [(cpu_ticks(p) - b) / CLK_TCK for p, b in zip(pids, before)]
            for link in links:
                link.close("done")
    finally:
        await _stop(proc)
        await proc.aclose()
    return {"state_us": spent[0] / joins * 1e6, "fronts_us": sum(spent[1:]) / joins * 1e6,
            "joins_per_s": joins / wall}


async def main_async(args: argparse.Namespace) -> None:
    rng = random.Random(1)
    rows = []
    base = None
    for fronts in args.fronts:
        runs = [await one_run(fronts, args.joins, args.concurrency, args.client_sockets, args.rate,
                              rng)
                for _ in range(args.runs)]
        state = statistics.median(r["state_us"] for r in runs)
        front = statistics.median(r["fronts_us"] for r in runs)
        rate = statistics.median(r["joins_per_s"] for r in runs)
        base = base or state
        rows.append([fronts, f"{state:,.0f}", f"{front:,.0f}" if fronts else "-",
                     f"{1e6 / state:,.0f}", f"{base / state:.2f}×", f"{rate:,.0f}"])
        print(f"fronts {fronts}: runs {[{k: round(v) for k, v in r.items()} for r in runs]}",
              flush=True)
    print_table(["fronts", "state process µs/join", "fronts µs/join (sum)",
                 "joins/s one state process admits", "vs. one process", "joins/s here (wall)"],
                rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fronts", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--joins", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--client-sockets", type=int, default=16)
    ap.add_argument("--rate", type=float, default=100,
                    help="joins started per second (default 100, below what this machine's "
                         "joiners and tracker manage together; 0: as fast as they can)")
    args = ap.parse_args()
    anyio.run(main_async, args)


if __name__ == "__main__":
    main()
