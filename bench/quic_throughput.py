"""QUIC transport throughput on loopback: MB/s and CPU per side, median of 5 runs per backend.

The sender (this process) queues 64 KiB writes, 16 per unidirectional stream (1 MiB "chunks"),
to a receiver in a separate process, which times first byte to last byte and its own CPU time.

    python bench/quic_throughput.py [--mib 48] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import anyio

from meshcast.net.quic import StreamData, open_endpoint

WRITE = 64 * 1024
WRITES_PER_STREAM = 16


async def receive(total: int) -> None:
    async with open_endpoint() as endpoint:
        print(endpoint.local_address[1], flush=True)
        link = await endpoint.accept()
        received = 0
        while received < total:
            event = await link.receive()
            assert isinstance(event, StreamData), event
            if not received:
                wall, cpu = time.perf_counter(), time.process_time()
            received += len(event.data)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(json.dumps({"mb_s": total / wall / 1e6, "cpu": cpu / wall}), flush=True)
        link.close("done")


async def send(port: int, total: int) -> tuple[float, float]:
    """Returns the handshake time in seconds and the sender's CPU share while sending."""
    async with open_endpoint() as endpoint:
        started = time.perf_counter()
        link = await endpoint.connect("127.0.0.1", port)
        handshake = time.perf_counter() - started
        wall, cpu = time.perf_counter(), time.process_time()
        payload = bytes(WRITE)
        for _ in range(total // (WRITE * WRITES_PER_STREAM)):
            stream_id = link.open_stream()
            for i in range(WRITES_PER_STREAM):
                link.send_stream(stream_id, payload, end=i == WRITES_PER_STREAM - 1)
        await link.receive()  # LinkClosed("done") once the receiver has everything
        return handshake, (time.process_time() - cpu) / (time.perf_counter() - wall)


def run_once(backend: str, total: int) -> dict:
    receiver = subprocess.Popen(
        [sys.executable, __file__, "--receiver", backend, "--bytes", str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(receiver.stdout.readline())
        handshake, sender_cpu = anyio.run(send, port, total, backend=backend)
        result = json.loads(receiver.stdout.readline())
        result |= {"handshake_ms": handshake * 1e3, "sender_cpu": sender_cpu}
        return result
    finally:
        receiver.kill()
        receiver.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=48)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--receiver", choices=["asyncio", "trio"], help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        anyio.run(receive, args.bytes, backend=args.receiver)
        return
    total = args.mib * 1024 * 1024
    print(f"{args.mib} MiB in 64 KiB writes, 1 MiB per stream; median of {args.runs} runs")
    for backend in ("asyncio", "trio"):
        runs = [run_once(backend, total) for _ in range(args.runs)]
        mb_s = statistics.median(r["mb_s"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        sender_cpu = statistics.median(r["sender_cpu"] for r in runs)
        handshake = statistics.median(r["handshake_ms"] for r in runs)
        each = ", ".join(f"{r['mb_s']:.1f}" for r in runs)
        print(
            f"{backend:8} {mb_s:6.1f} MB/s  receiver CPU {cpu:4.0%}  sender CPU {sender_cpu:4.0%}"
            f"  handshake {handshake:4.1f} ms  (runs: {each})"
        )


if __name__ == "__main__":
    main()
