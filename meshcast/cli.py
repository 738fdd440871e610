"""The `meshcast` command: run a tracker, a seed or a peer, a one-process live demo, or the simulator.

Every sub-command is a thin front end over `meshcast.service` (tracker/seed/peer) or `sim.cli`.
User errors end the process with a one-line message and exit status 1 (2 for bad usage) — never
a traceback; a traceback means a bug. SIGINT/SIGTERM cancel the running roles, which close their
links cleanly, and the process exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import anyio
import anyio.abc

from meshcast.errors import MeshcastError
from meshcast.messages import NO_PEER
from meshcast.net.admission import PER_IP_BURST, PER_IP_RATE
from meshcast.net.quic import ConnectError
from meshcast.policy import HEADROOM, child_slots
from meshcast.runtime import parse_address, tune_gc_for_serving
from meshcast.service import PeerHandle, SeedHandle, TrackerHandle, run_peer, run_seed, run_tracker
from seed.ingest import IngestError, synthetic_stream_command
from tracker.node import JOIN_HOLD_S

log = logging.getLogger("meshcast.cli")

SEED_WELCOME_TIMEOUT = 8.0
"""Seconds a seed waits for the tracker's Welcome before giving up (a QUIC connect times out at 5)."""
DEMO_BITRATE_KBPS = 500
"""Declared bitrate of the demo stream: ffmpeg's test card at 640x360 is ~220 kbit/s, so this
leaves room for keyframe bursts without lying to the tracker's capacity arithmetic."""
DEMO_SUBSTREAMS = 4
DRAIN_S = 1.5
"""After the demo's input stops: time for in-flight chunks to land before measuring."""
INSTALL_FFMPEG = ("ffmpeg not found on PATH; install it (Debian/Ubuntu: sudo apt-get install ffmpeg, "
                  "macOS: brew install ffmpeg) and try again")


class Fatal(Exception):
    """A runtime failure to report in one line (exit status 1)."""


# -- argument types -------------------------------------------------------------------------------


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _float(text: str, *, zero: bool) -> float:
    """A finite number above 0 (or at least 0, with `zero`), for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 if zero else value > 0) or math.isinf(value):
        raise argparse.ArgumentTypeError(
            f"must be {'0 or ' if zero else ''}a positive number, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _float(text, zero=False)


def _non_negative_float(text: str) -> float:
    return _float(text, zero=True)


def _channel_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise argparse.ArgumentTypeError("expected the 64 hex digits the seed printed")
    return key


# -- running roles --------------------------------------------------------------------------------


def _user_error(exc: BaseException) -> str | None:
    """The one-line message for an expected failure anywhere in `exc` (an exception group too)."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            message = _user_error(sub)
            if message is not None:
                return message
        return None
    if isinstance(exc, SystemExit) and isinstance(exc.code, str):
        return exc.code  # how the seed service reports a refused channel
    if isinstance(exc, (Fatal, MeshcastError, IngestError, ConnectError)):
        return str(exc)
    if isinstance(exc, OSError):  # e.g. a port in use, an unwritable output file
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return None


async def _cancel_on_signal(soft: anyio.CancelScope | None, hard: anyio.CancelScope) -> None:
    """First SIGINT/SIGTERM: cancel `soft` (a graceful stop) if given, else `hard`; then `hard`."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            if soft is not None and not soft.cancel_called:
                soft.cancel()
                continue
            hard.cancel()
            return


def _run(body: Callable[..., Awaitable[int | None]], backend: str, *, graceful: bool = False) -> int:
    """Run `body` on an event loop until it returns or a signal arrives; map user errors to 1.

    With `graceful`, `body` gets a cancel scope that the first signal cancels, so it can wind
    down and report; a second signal stops everything.
    """

    async def supervised() -> int:
        status = 0
        soft = anyio.CancelScope() if graceful else None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_signal, soft, tg.cancel_scope)
            status = await (body(soft) if graceful else body()) or 0
            tg.cancel_scope.cancel()
        return status

    try:
        return anyio.run(supervised, backend=backend)
    except KeyboardInterrupt:  # before the signal receiver was installed
        return 130
    except BaseException as exc:
        message = _user_error(exc)
        if message is None:
            raise
        print(f"meshcast: {message}", file=sys.stderr)
        return 1


# -- tracker --------------------------------------------------------------------------------------


async def _tracker(args: argparse.Namespace) -> int:
    _check_stats_path(args.stats)
    async with anyio.create_task_group() as tg:
        handle: TrackerHandle = await tg.start(partial(run_tracker, args.listen,
                                                       strategy=args.strategy, hold_s=args.hold,
                                                       per_ip=_per_ip(args), key=args.key,
                                                       fronts=args.fronts))
        if args.stats:
            fronts = handle.fronts
            stats = (handle.node.stats if fronts is None
                     else lambda: {**handle.node.stats(), "fronts": fronts.stats()})
            tg.start_soon(_write_stats, stats, args.stats)
    return 0


def cmd_tracker(args: argparse.Namespace) -> int:
    """Serve a tracker until interrupted."""
    _check_listen(args.listen)
    tune_gc_for_serving()
    return _run(partial(_tracker, args), args.backend)


# -- seed -----------------------------------------------------------------------------------------


async def _watch_seed(handle: SeedHandle, tracker: str) -> None:
    """Fail fast when the tracker is unreachable at start-up or refuses the channel."""
    node = handle.node
    deadline = time.monotonic() + SEED_WELCOME_TIMEOUT
    while not node.rejected:
        if node.id == NO_PEER and time.monotonic() > deadline:
            raise Fatal(f"seed: no answer from the tracker at {tracker} "
                        f"after {SEED_WELCOME_TIMEOUT:g} s (is it running?)")
        await anyio.sleep(0.1)
    raise Fatal(f"seed: the tracker refused the channel: {node.rejected}")


async def _seed(args: argparse.Namespace) -> int:
    _check_listen(args.listen)
    async with anyio.create_task_group() as tg:
        handle: SeedHandle = await tg.start(partial(
            run_seed, tracker=args.tracker, channel=args.channel, input=args.input, key=args.key,
            listen=args.listen, upload_kbps=args.upload_kbps, bitrate_kbps=args.bitrate_kbps,
            chunk_ms=args.chunk_ms, realtime=args.realtime, per_ip=_per_ip(args)))
        # The key alone on stdout, so a script can capture it; the hint goes to the log.
        print(handle.public_key.hex(), flush=True)
        log.info("viewers pin it with: meshcast peer --tracker %s --channel %s --channel-key %s",
                 args.tracker, args.channel, handle.public_key.hex())
        tg.start_soon(_watch_seed, handle, args.tracker)
        await handle.finished.wait()
        # Keep serving late pulls for a moment: the last chunks are still travelling.
        await anyio.sleep(args.linger)
        if handle.node.id == NO_PEER:  # a short file can end before the tracker ever answered
            raise Fatal(f"seed: the input ended, but the tracker at {args.tracker} never answered")
        tg.cancel_scope.cancel()
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    """Ingest a stream, sign it and push it to the channel's peers."""
    return _run(partial(_seed, args), args.backend)


# -- peer -----------------------------------------------------------------------------------------


def _check_stats_path(path: str | None) -> None:
    """Fail now, not a second in: a `--stats` file must be writable."""
    if path:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as exc:
            raise Fatal(f"cannot write the stats file {path}: {exc.strerror}") from None


async def _write_stats(summary: Callable[[], dict[str, Any]], path: str) -> None:
    """Append one JSON line of `summary()` a second. One write(2) per line on an O_APPEND
    descriptor: a reader never sees half a line, and every line is on disk when written."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while True:
            line = json.dumps({"time": round(time.time(), 3), **summary()}) + "\n"
            os.write(fd, line.encode())
            await anyio.sleep(1.0)
    finally:
        os.close(fd)


async def _watch_rejected(handle: PeerHandle) -> None:
    """Wait until the tracker refuses or evicts us (or cannot be reached), then raise `Fatal`."""
    node = handle.node
    while not node.rejected:
        await anyio.sleep(0.1)
    reason = node.rejected
    if reason.startswith(_LOCAL_REASONS):  # our own verdicts, not the tracker's
        raise Fatal(f"peer: {reason}")
    raise Fatal(f"peer: rejected by the tracker: {reason}")


_LOCAL_REASONS = ("tracker unreachable", "the tracker's channel key differs")


def _play_hint(port: int) -> str:
    url = f"http://127.0.0.1:{port}/stream.ts"
    return f"play it: ffplay {url}   (or: mpv {url}, vlc {url})"


async def _peer(args: argparse.Namespace) -> int:
    _check_listen(args.listen)
    _check_stats_path(args.stats)
    async with anyio.create_task_group() as tg:
        handle: PeerHandle = await tg.start(partial(
            run_peer, tracker=args.tracker, channel=args.channel, listen=args.listen,
            http=args.http, output=args.output, upload_kbps=args.upload_kbps,
            channel_key=args.channel_key, playout_delay=args.playout_delay,
            per_ip=_per_ip(args)))
        if handle.http_port is not None:
            log.info("%s", _play_hint(handle.http_port))
        if args.stats:
            tg.start_soon(_write_stats, handle.summary, args.stats)
        await _watch_rejected(handle)
    return 0


def cmd_peer(args: argparse.Namespace) -> int:
    """Join a channel: relay it and hand it to a player."""
    return _run(partial(_peer, args), args.backend)


# -- demo -----------------------------------------------------------------------------------------


def _upload_for(slots: int, bitrate_kbps: int, substreams: int) -> int:
    """Smallest upload (kbps) that `child_slots` turns into at least `slots` slots."""
    kbps = max(1, math.ceil(slots * bitrate_kbps / (HEADROOM * substreams)))
    while child_slots(kbps, bitrate_kbps, substreams) < slots:
        kbps += 1
    return kbps


def plan_uploads(peers: int, bitrate_kbps: int, substreams: int) -> tuple[int, int]:
    """(seed, peer) upload in kbps for the demo: a real multi-level forest that admits everyone.

    The seed carries exactly one copy of the stream (one child per sub-stream tree), so peers
    must feed one another: offload tends to 1 - 1/n and every tree is at least two levels deep.
    Each tree k has at least r = max(1, n // K) relays (the tracker spreads home trees evenly),
    so 1 + r·S ≥ n slots hold everyone; S ≥ K also covers the trees a small swarm leaves without
    a relay of their own (members lend spare slots there). Keeping S this small, rather than n,
    makes the first relay of a tree fill up so that deeper levels form.
    """
    relays = max(1, peers // substreams)
    slots = max(substreams, math.ceil((peers - 1) / relays) + 1)
    return (_upload_for(substreams, bitrate_kbps, substreams),
            _upload_for(slots, bitrate_kbps, substreams))


def _check_listen(address: str) -> None:
    """Fail with a clear message now if the UDP address to listen on cannot be bound."""
    host, port = parse_address(address)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.bind(sockaddr)
    except OSError as exc:
        raise Fatal(f"cannot listen on {address}: {exc.strerror or exc}") from None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP listener will
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _percentiles(values: Sequence[float], *qs: int) -> list[float | None]:
    """Nearest-rank percentiles (None for no data)."""
    data = sorted(values)
    if not data:
        return [None for _ in qs]
    return [data[min(len(data) - 1, max(0, math.ceil(q / 100 * len(data)) - 1))] for q in qs]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


class Demo:
    """Everything the demo runs, and the figures it reports."""

    def __init__(self, tracker: Any, seed: SeedHandle, peers: list[PeerHandle], channel: str,
                 http_port: int, uploads: tuple[int, int]) -> None:
        self.tracker, self.seed, self.peers = tracker, seed, peers
        self.channel, self.http_port, self.uploads = channel, http_port, uploads
        self.started = time.monotonic()

    def depth(self, peer: PeerHandle) -> int:
        return self.tracker.node.depth_of(self.channel, peer.node.id)

    def results(self) -> dict[str, Any]:
        """The run's figures. delivered_ratio: chunks handed to players over chunks the seed
        produced from each peer's first played seq on (so a late joiner is not charged with
        what came before it)."""
        produced = self.seed.node.next_seq
        delivered = expected = from_peers = from_seed = 0
        latencies: list[float] = []
        startups: list[float] = []
        for p in self.peers:
            node = p.node
            delivered += node.delivered
            if p.first_seq is not None:
                expected += produced - p.first_seq
            from_peers += node.bytes_from_peers
            from_seed += node.bytes_from_seed
            latencies.extend(p.latencies)
            if node.first_play is not None and node.joined_at is not None:
                startups.append(node.first_play - node.joined_at)
        lat50, lat95, lat_max = _percentiles(latencies, 50, 95, 100)
        start50, start95 = _percentiles(startups, 50, 95)
        received = from_peers + from_seed
        return {
            "peers": len(self.peers),
            "duration_s": round(time.monotonic() - self.started, 1),
            "bitrate_kbps": DEMO_BITRATE_KBPS,
            "seed_upload_kbps": self.uploads[0],
            "peer_upload_kbps": self.uploads[1],
            "chunks_sent": self.seed.node.chunks_sent,
            "delivered": delivered,
            "expected": expected,
            "delivered_ratio": round(delivered / expected, 4) if expected else 0.0,
            "skipped": sum(p.node.skipped for p in self.peers),
            "playing": sum(1 for p in self.peers if p.first_seq is not None),
            "rejected": sum(1 for p in self.peers if p.node.rejected),
            "offload": round(from_peers / received, 4) if received else 0.0,
            "bytes_from_peers": from_peers,
            "bytes_from_seed": from_seed,
            "latency_ms": {"p50": _ms(lat50), "p95": _ms(lat95), "max": _ms(lat_max)},
            "startup_ms": {"p50": _ms(start50), "p95": _ms(start95)},
            "max_depth": max((self.depth(p) for p in self.peers), default=-1),
        }

    def table(self) -> str:
        """The live table: one row per peer, then the totals."""
        lines = [_play_hint(self.http_port),
                 f"{'peer':>5} {'depth':>5} {'chunks':>7} {'p50 ms':>7} {'from peers':>11} "
                 f"{'from seed':>10} {'children':>8}"]
        for p in self.peers:
            s = p.summary()
            lat = "-" if s["latency_ms_p50"] is None else f"{s['latency_ms_p50']:.0f}"
            lines.append(f"{s['id']:>5} {self.depth(p):>5} {s['delivered']:>7} {lat:>7} "
                         f"{_kib(s['bytes_from_peers']):>11} {_kib(s['bytes_from_seed']):>10} "
                         f"{s['children']:>8}")
        lines.append(self.status_line())
        return "\n".join(lines)

    def status_line(self) -> str:
        r = self.results()
        p50 = r["latency_ms"]["p50"]
        return (f"{r['duration_s']:.0f}s  seed chunks {r['chunks_sent']}  playing "
                f"{r['playing']}/{r['peers']}  offload {100 * r['offload']:.0f}%  "
                f"latency p50 {'-' if p50 is None else f'{p50:.0f} ms'}  max depth {r['max_depth']}")


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB"


async def _show(demo: Demo, interactive: bool) -> None:
    """Redraw the table each second on a terminal; otherwise print a status line every 5 s."""
    if interactive:
        while True:
            sys.stdout.write("\x1b[H\x1b[J" + demo.table() + "\n")  # home + clear: logs can't shear it
            sys.stdout.flush()
            await anyio.sleep(1.0)
    while True:
        await anyio.sleep(5.0)
        print(demo.status_line(), flush=True)


async def _log_stderr(stream: anyio.abc.ByteReceiveStream, name: str) -> None:
    """Pass a child process's error output on to our log, line by line."""
    buf = b""
    async for data in stream:
        *lines, buf = (buf + data).split(b"\n")
        for line in lines:
            if line.strip():
                log.warning("%s: %s", name, line.decode(errors="replace").rstrip())


async def _demo(args: argparse.Namespace, stop: anyio.CancelScope) -> int:
    if shutil.which("ffmpeg") is None:
        raise Fatal(INSTALL_FFMPEG)
    channel, k = "demo", DEMO_SUBSTREAMS
    seed_kbps, peer_kbps = plan_uploads(args.peers, DEMO_BITRATE_KBPS, k)
    http_port = args.http_port
    if http_port and not _tcp_port_free(http_port):
        log.warning("port %d is busy: serving the player on an ephemeral port", http_port)
        http_port = 0
    udp_port = _free_udp_port()
    key_dir = tempfile.mkdtemp(prefix="meshcast-demo-")  # a throwaway channel key
    key_path = os.path.join(key_dir, "demo.pem")
    ffmpeg: anyio.abc.Process | None = None
    try:
        async with anyio.create_task_group() as tg:
            # No per-address limit: the whole swarm connects from 127.0.0.1.
            tracker = await tg.start(partial(run_tracker, "127.0.0.1:0", per_ip=None))
            seed: SeedHandle = await tg.start(partial(
                run_seed, tracker=tracker.address, channel=channel, input=f"udp://127.0.0.1:{udp_port}",
                key=key_path, upload_kbps=seed_kbps, bitrate_kbps=DEMO_BITRATE_KBPS, substreams=k,
                per_ip=None))
            # Its own session: the terminal's Ctrl-C reaches only us, and we stop ffmpeg in order.
            ffmpeg = await anyio.open_process(
                synthetic_stream_command(f"udp://127.0.0.1:{udp_port}?pkt_size=1316", realtime=True),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True)
            if ffmpeg.stderr is not None:
                tg.start_soon(_log_stderr, ffmpeg.stderr, "ffmpeg")
            peers: list[PeerHandle] = []
            for i in range(args.peers):
                peers.append(await tg.start(partial(
                    run_peer, tracker=tracker.address, channel=channel, upload_kbps=peer_kbps,
                    http=f"127.0.0.1:{http_port}" if i == 0 else None, per_ip=None)))
            demo = Demo(tracker, seed, peers, channel, peers[0].http_port or http_port,
                        (seed_kbps, peer_kbps))
            if not args.json:
                log.info("seed upload %d kbps, peers %d kbps each, stream declared at %d kbps",
                         seed_kbps, peer_kbps, DEMO_BITRATE_KBPS)
                print(_play_hint(demo.http_port), flush=True)
                tg.start_soon(_show, demo, sys.stdout.isatty())
            with stop, anyio.move_on_after(args.duration):  # until the duration or Ctrl-C
                exited = await ffmpeg.wait()
                raise Fatal(f"ffmpeg stopped unexpectedly (exit status {exited})")
            # Measure like a broadcast that ended: stop the input, let the last chunks land.
            await _stop(ffmpeg)
            await anyio.sleep(DRAIN_S)
            results = demo.results()
            tg.cancel_scope.cancel()
        if args.json:
            print(json.dumps(results), flush=True)
        else:
            print(demo.table() if not sys.stdout.isatty() else demo.status_line(), flush=True)
        return 0
    finally:
        if ffmpeg is not None:
            with anyio.CancelScope(shield=True):
                await _stop(ffmpeg)
        shutil.rmtree(key_dir, ignore_errors=True)


async def _stop(proc: anyio.abc.Process) -> None:
    """Terminate `proc` (SIGTERM, then SIGKILL after 3 s) and reap it."""
    if proc.returncode is None:
        proc.terminate()
        with anyio.move_on_after(3.0):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
    await proc.wait()


def cmd_demo(args: argparse.Namespace) -> int:
    """Tracker, seed (ffmpeg test card) and N peers in one process, with a live table."""
    return _run(partial(_demo, args), args.backend, graceful=True)


# -- parser ---------------------------------------------------------------------------------------


def _admission_args(p: argparse.ArgumentParser) -> None:
    """The per-address limit on new inbound connections, which every role takes."""
    p.add_argument("--per-ip-rate", type=_non_negative_float, default=PER_IP_RATE, metavar="N",
                   help="new connections a second one source address may open once its burst is "
                        f"spent; more are dropped before any handshake (default {PER_IP_RATE:g}; "
                        "0: no limit)")
    p.add_argument("--per-ip-burst", type=_positive_int, default=PER_IP_BURST, metavar="N",
                   help=f"new connections one source address may open at once (default "
                        f"{PER_IP_BURST}): enough for a household or a NAT's viewers")


def _per_ip(args: argparse.Namespace) -> tuple[float, int] | None:
    return (args.per_ip_rate, args.per_ip_burst) if args.per_ip_rate > 0 else None


def _member_args(p: argparse.ArgumentParser, listen_help: str) -> None:
    """The flags a seed and a peer share: where the tracker is, the channel, our own address."""
    p.add_argument("--tracker", required=True, type=_address, metavar="HOST:PORT", help="the tracker")
    p.add_argument("--channel", required=True, metavar="NAME", help="channel name")
    p.add_argument("--listen", default="127.0.0.1:0", type=_address, metavar="HOST:PORT",
                   help=f"{listen_help} (default 127.0.0.1:0)")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar (kept separate from `main` so tests and docs can use it)."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a sub-command's default must not hide `meshcast -v COMMAND` (see `main`).
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging (including the QUIC library's)")
    common.add_argument("--backend", choices=("asyncio", "trio"), default=argparse.SUPPRESS,
                        help="event loop to run on (default: asyncio)")

    parser = argparse.ArgumentParser(
        prog="meshcast", parents=[common],
        description="Peer-assisted P2P live video: a tracker builds push trees, a seed signs the "
                    "stream, peers relay it to one another and to a local player.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("tracker", parents=[common], help="run a tracker (places viewers in the trees)",
                       description="Run a tracker: admits seeds and peers, builds and repairs the "
                                   "channels' push trees.")
    p.add_argument("--listen", required=True, type=_address, metavar="HOST:PORT",
                   help="UDP address to serve QUIC on (port 0: any free port)")
    p.add_argument("--strategy", choices=("tree", "random", "mesh"), default="tree",
                   help="placement: our shallow latency-aware trees (default), random trees, or a "
                        "pull-only mesh (baselines)")
    p.add_argument("--hold", type=_non_negative_float, default=JOIN_HOLD_S, metavar="SECONDS",
                   help="how long a viewer who joins a channel that is not live (yet) waits for its "
                        f"seed before it is refused (default {JOIN_HOLD_S:g}; 0: refuse at once)")
    p.add_argument("--fronts", type=_non_negative_int, default=0, metavar="N",
                   help="do QUIC (handshakes, packets, heartbeats) in N other processes sharing "
                        "the port, so a flash crowd is admitted on more cores; this process keeps "
                        "the state (default 0: all in this process)")
    p.add_argument("--stats", metavar="PATH",
                   help="append a JSON line to PATH every second: per channel, viewers, relays, "
                        "tree depth, the seed's children and slots, refusals and evictions (and "
                        "with --fronts, each front's pid and links)")
    p.add_argument("--key", metavar="FILE",
                   help="the tracker's signing key (PEM, created on first use); keep it across "
                        "restarts and the tokens it signed stay good, and viewers keep their "
                        "places even if the seed restarted too (default: a new key each start)")
    _admission_args(p)
    p.set_defaults(func=cmd_tracker)

    p = sub.add_parser("seed", parents=[common], help="publish a channel from a live MPEG-TS input",
                       description="Ingest MPEG-TS, cut it into signed chunks and push them into the "
                                   "channel's trees. Prints the channel public key (hex) on stdout.")
    _member_args(p, "address peers reach the seed on")
    p.add_argument("--input", default="-", metavar="PATH|-|udp://HOST:PORT",
                   help="MPEG-TS file, '-' for stdin (default), or a UDP address to listen on")
    p.add_argument("--key", metavar="FILE",
                   help="channel signing key (PEM, Ed25519; created if missing; default "
                        "~/.config/meshcast/NAME.pem)")
    p.add_argument("--upload-kbps", type=_positive_int, default=20_000, metavar="N",
                   help="upload the seed may use (default 20000)")
    p.add_argument("--bitrate-kbps", type=_positive_int, default=2_000, metavar="N",
                   help="the stream's peak bitrate, for capacity planning (default 2000)")
    p.add_argument("--chunk-ms", type=_positive_int, default=200, metavar="N",
                   help="target chunk duration in media time (default 200)")
    p.add_argument("--realtime", action="store_true",
                   help="pace a file by its media time, as if it were live")
    p.add_argument("--linger", type=float, default=10.0, metavar="S",
                   help="seconds to keep serving after the input ends, for late peers' "
                        "pulls (default 10, the seed's buffer)")
    _admission_args(p)
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("peer", parents=[common], help="watch a channel and relay it",
                       description="Join a channel: receive, verify and relay it, and hand it to a "
                                   "player over HTTP and/or to a file.")
    _member_args(p, "address other peers reach this one on")
    p.add_argument("--http", type=_address, metavar="HOST:PORT",
                   help="serve the stream at http://HOST:PORT/stream.ts")
    p.add_argument("--output", metavar="PATH|-", help="write the stream to a file, or '-' for stdout")
    p.add_argument("--upload-kbps", type=_non_negative_int, default=5_000, metavar="N",
                   help="upload offered to other peers (default 5000; 0: relay nothing)")
    p.add_argument("--channel-key", type=_channel_key, metavar="HEX",
                   help="pin the channel's public key (as the seed printed it)")
    p.add_argument("--playout-delay", type=_positive_float, default=0.5, metavar="S",
                   help="how late a chunk may be before it is skipped: the margin for repair "
                        "(default 0.5 s; more rides out a lossy network, but the stream then "
                        "waits up to that long behind a missing chunk)")
    p.add_argument("--stats", metavar="PATH",
                   help="append a JSON line of live figures to PATH every second")
    _admission_args(p)
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("demo", parents=[common], help="a whole live swarm in one process",
                       description="Run a tracker, a seed fed by ffmpeg's test card and N peers in "
                                   "this process, with a live table; one peer serves the stream "
                                   "over HTTP for a player.")
    p.add_argument("--peers", type=_positive_int, default=10, metavar="N", help="peers (default 10)")
    p.add_argument("--duration", type=_positive_float, metavar="S",
                   help="stop after S seconds (default: run until Ctrl-C)")
    p.add_argument("--json", action="store_true",
                   help="no table: print one JSON object with the run's figures at the end")
    p.add_argument("--http-port", type=_non_negative_int, default=8080, metavar="P",
                   help="player port on 127.0.0.1 (default 8080; an ephemeral one if busy)")
    p.set_defaults(func=cmd_demo)

    from sim import cli as sim_cli  # the simulator's own front end

    sim_cli.register(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not verbose:
        logging.getLogger("quic").setLevel(logging.WARNING)  # one line per packet event otherwise


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `meshcast` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Defaults here, not in the parser: the flags' actions are shared by every sub-command, and
    # a default set on one would override `meshcast -v COMMAND`.
    args.verbose = getattr(args, "verbose", False)
    args.backend = getattr(args, "backend", "asyncio")
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except Fatal as exc:  # raised before an event loop runs (see `_run` for the rest)
        print(f"meshcast: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
