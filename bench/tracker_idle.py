"""What a quiet link costs the process at its server end: keep-alives only, no messages.

A tracker holds a link per viewer, and most say nothing for minutes. The server runs alone in a
subprocess (a QUIC endpoint that accepts and reads, as the tracker's does); this process opens
`--links` links to it and keeps them open. After they settle, the server measures its own CPU
(`time.process_time`) and counts the datagrams it receives and sends over `--window` seconds,
`--runs` times; the figure is the median, per link and second. Two set-ups, on the same machine:

- QUIC keep-alives: the links of a peer or a seed (and a tracker's until 2026-11-26): a 3 s
  idle time-out, and each end sends a PING after 1 s of quiet;
- heartbeats: a tracker's links (`open_endpoint(heartbeats=True)`, as
  `meshcast.service.run_tracker` opens it): the client sends a heartbeat every second, outside
  QUIC, and the server echoes it (`meshcast.net.quic`, "Heartbeats").

    python bench/tracker_idle.py [--links 1000] [--window 10] [--runs 3] [--only heartbeats]
                                 [--clients 1]

(`--only heartbeats` for thousands of links: with QUIC keep-alives, 4,000 quiet links would
want ~1.6 cores of the server's one.)

The simulator charges a tracker `[tracker] keepalive_us` per link and second from this.
Datagrams are counted as the endpoint sees them (`QuicEndpoint._send_now`, each QUIC or
heartbeat datagram the server receives).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from _common import JsonLineProcess
from meshcast.net.quic import ConnectError, QuicEndpoint, QuicLink, open_endpoint
SETUPS = {
    "QUIC keep-alives (3 s, both ends)": False,
    "heartbeats (a tracker's links)": True,
}


async def busy_loop(share: float, spent: list[float]) -> None:
    """Keep the server busy `share` of the time, in 5 ms slices of pure Python work (as a
    tracker admitting a crowd is), adding the time spent to `spent[0]`."""
    slice_s = 0.005
    while True:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < slice_s:
            pass
        spent[0] += time.perf_counter() - t0
        await anyio.sleep(slice_s * (1 / share - 1))


async def serve(links: int, heartbeats: bool, window: float, runs: int, busy: float) -> None:
    """The server: accept `links`, then print one JSON line per measured window."""
    counts = {"in": 0, "out": 0}

    def counting(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def counted(*args: Any) -> Any:
            counts[key] += 1
            return fn(*args)
        return counted

    QuicLink._datagram_received = counting(QuicLink._datagram_received, "in")  # type: ignore[method-assign]
    QuicEndpoint._heartbeat = counting(QuicEndpoint._heartbeat, "in")  # type: ignore[method-assign]
    QuicEndpoint._send_now = counting(QuicEndpoint._send_now, "out")  # type: ignore[method-assign]
    async with open_endpoint("127.0.0.1", 0, heartbeats=heartbeats) as ep:
        print(json.dumps({"port": ep.local_address[1]}), flush=True)

        async def drain(link: QuicLink) -> None:
            while type(await link.receive()).__name__ != "LinkClosed":
                pass

        async with anyio.create_task_group() as tg:
            with anyio.fail_after(600):
                for _ in range(links):
                    tg.start_soon(drain, await ep.accept())
            await anyio.sleep(3)  # the handshakes' last packets and timers
            spent = [0.0]
            if busy > 0:
                tg.start_soon(busy_loop, busy, spent)
            for _ in range(runs):
                cpu0, wall0, in0, out0 = time.process_time(), time.monotonic(), counts["in"], counts["out"]
                busy0 = spent[0]
                await anyio.sleep(window)
                wall = time.monotonic() - wall0
                print(json.dumps({"cpu_s": (time.process_time() - cpu0 - (spent[0] - busy0)) / wall,
                                  "in": (counts["in"] - in0) / wall,
                                  "out": (counts["out"] - out0) / wall}), flush=True)
            tg.cancel_scope.cancel()


async def hold(port: int, count: int) -> None:
    """A client process: open `count` links to the server, say so, keep them open."""
    async with open_endpoint("127.0.0.1", 0) as ep:
        for i in range(count):
            try:
                await ep.connect("127.0.0.1", port)
            except ConnectError as exc:
                print(json.dumps({"error": f"link {i + 1} of {count}: {exc}"}), flush=True)
                return
        print(json.dumps({"ready": count}), flush=True)
        await anyio.sleep_forever()


async def measure(links: int, heartbeats: bool, window: float, runs: int, busy: float,
                  clients: int) -> dict:
    cmd = [sys.executable, __file__, "--serve", "--links", str(links), "--window", str(window),
           "--runs", str(runs), "--busy", str(busy)] + (["--heartbeats"] if heartbeats else [])
    procs: list[anyio.abc.Process] = []
    try:
        server = await anyio.open_process(cmd, stderr=None)
        procs.append(server)
        out = JsonLineProcess(server)
        port = (await out.read_json(60, "the server's port"))["port"]
        for c in range(clients):  # each holds its share; the last, what is left
            share = links // clients if c < clients - 1 else links - links // clients * (clients - 1)
            procs.append(await anyio.open_process(
                [sys.executable, __file__, "--hold", str(port), "--links", str(share)], stderr=None))
        for client in procs[1:]:
            try:
                await JsonLineProcess(client).read_json(600, "a client's links")
            except RuntimeError as exc:
                raise SystemExit(f"{exc} (is the machine busy? the server answers handshakes "
                                 f"too)") from None
        windows = [await out.read_json(3 + window + 60, "a measurement") for _ in range(runs)]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.aclose()
    cpu = statistics.median(w["cpu_s"] for w in windows)
    return {"cpu_share": cpu, "us_per_link_s": cpu / links * 1e6,
            "datagrams_in_per_link_s": statistics.median(w["in"] for w in windows) / links,
            "datagrams_out_per_link_s": statistics.median(w["out"] for w in windows) / links}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--links", type=int, default=1000, help="quiet links held open (default 1000)")
    ap.add_argument("--window", type=float, default=10.0, help="seconds per measurement (default 10)")
    ap.add_argument("--runs", type=int, default=3, help="measurements, median taken (default 3)")
    ap.add_argument("--only", choices=["quic", "heartbeats"], help="measure one set-up")
    ap.add_argument("--clients", type=int, default=1,
                    help="client processes sharing the links (default 1; one cannot keep the "
                         "heartbeats of ~8,000 links on time while it still makes handshakes)")
    ap.add_argument("--hold", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--busy", type=float, default=0.0, metavar="SHARE",
                    help="keep the server busy this share of the time with other work, in 5 ms "
                         "slices, as a tracker admitting a crowd is; that work is not counted")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--heartbeats", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hold:
        anyio.run(hold, args.hold, args.links)
        return
    if args.serve:
        anyio.run(serve, args.links, args.heartbeats, args.window, args.runs, args.busy)
        return
    rows = {}
    for name, heartbeats in SETUPS.items():
        if args.only and heartbeats != (args.only == "heartbeats"):
            continue
        r = rows[name] = anyio.run(measure, args.links, heartbeats, args.window, args.runs, args.busy,
                                   args.clients)
        print(f"{name:<36} {args.links:>6} links: server CPU {100 * r['cpu_share']:5.1f} % of a core, "
              f"{r['us_per_link_s']:6.1f} µs per link per second; datagrams per link per second "
              f"in {r['datagrams_in_per_link_s']:.2f}, out {r['datagrams_out_per_link_s']:.2f}", flush=True)
    if len(rows) == 2:
        before, after = (row["us_per_link_s"] for row in rows.values())
        print(f"ratio: {before / after:.1f}× less CPU per quiet link with heartbeats")
    print(json.dumps({"links": args.links, "window_s": args.window, "runs": args.runs,
                      "busy": args.busy, **rows}))


if __name__ == "__main__":
    main()
