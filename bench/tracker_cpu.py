"""The tracker's CPU per event, split the way the simulator charges it (`[tracker]` cpu keys).

The simulator runs the real `TrackerNode` on a virtual clock, where handling a message takes no
time; a real tracker is one Python process, and a flash crowd or a restart queues work on it.
`sim.driver` models it as one server: each QUIC handshake it accepts costs `handshake_us`, each
event it handles (a message, a link closed, a timer) `event_us`, plus `sign_us` per signature it
makes, `verify_us` per signature it checks and `send_us` per message it sends. This measures the four, on this machine, the way
the runtime spends them (`meshcast.net.quic`, `meshcast.runtime`):

- handshake: the server's side of a QUIC handshake with aioquic (P-256 certificate, as
  `meshcast.net.tls` makes; X25519 key exchange, as `meshcast.net.quic.Connection` sets), over
  a sans-IO connection pair: its datagram handling only;
- sign / verify: Ed25519 on a token-sized message, with `cryptography` (the tracker signs a
  viewer's tokens together: one signature per join or renewal, `Crypto.issue_tokens`);
- event: a viewer's `Join` taken from the client's datagram to the answers' datagrams — QUIC
  receive, frame decoding, `TrackerNode.handle` (placement, real tokens), framing each answer,
  QUIC send — in a channel of `--viewers`; `send_us` is framing and sending one answer (a
  join's ~7.5: Welcome, an Assign per sub-stream, Neighbours, and others'), all queued and
  handed to aioquic at once as the runtime does (the same 31 µs as one hand-over per answer),
  `event_us` what is left after the answers and the signatures.

Median of `--runs` runs. No sockets: the kernel's part (one `recvmsg`/`sendmsg` per datagram)
is left out, so the figures are a floor. A real tracker process spends ~2.9× as much per join
(event loop, sockets, timers, the collector: `bench/tracker_fronts.py`), and the simulator's
defaults come from there; this script splits a join's cost into its parts.

    python bench/tracker_cpu.py [--viewers 10000] [--joins 500] [--runs 5]
"""

from __future__ import annotations

import argparse
import random
import ssl
import statistics
import time
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshcast import effects as fx
from meshcast import messages as m
from meshcast import wire
from meshcast.crypto import Crypto
from meshcast.net.quic import ALPN, Connection
from meshcast.net.tls import self_signed_certificate
from tracker_churn import CHANNEL, Driver

SERVER = ("127.0.0.1", 4433)
CLIENT = ("127.0.0.1", 50000)
CERT, KEY = self_signed_certificate()


class CountingCrypto(Crypto):
    """Real crypto that counts what it signs and checks."""

    signs = 0
    verifies = 0

    def issue_token(self, *args: Any, **kwargs: Any) -> m.Token:
        self.signs += 1
        return super().issue_token(*args, **kwargs)

    def issue_tokens(self, key: Any, tokens: Any) -> list[m.Token]:
        self.signs += len(tokens) > 1  # (one alone is `issue_token`'s, counted there)
        return super().issue_tokens(key, tokens)

    def token_valid(self, *args: Any, **kwargs: Any) -> bool:
        self.verifies += 1
        return super().token_valid(*args, **kwargs)


def _config(client: bool) -> QuicConfiguration:
    config = QuicConfiguration(is_client=client, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE,
                               connection_id_length=8)
    if not client:
        config.certificate, config.private_key = CERT, KEY
    return config


def _pair() -> tuple[QuicConnection, QuicConnection, float]:
    """A handshaken (client, server) pair, and the server's CPU seconds for the handshake."""
    now = 0.0
    client = Connection(configuration=_config(True))
    client.connect(SERVER, now=now)
    server: QuicConnection | None = None
    spent = 0.0
    for _ in range(10):
        out = [d for d, _ in client.datagrams_to_send(now=now)]
        if not out:
            break
        t = time.perf_counter()
        if server is None:
            server = Connection(configuration=_config(False),
                                    original_destination_connection_id=client.original_destination_connection_id)
        for d in out:
            server.receive_datagram(d, CLIENT, now=now)
        back = [d for d, _ in server.datagrams_to_send(now=now)]
        while server.next_event():
            pass
        spent += time.perf_counter() - t
        for d in back:
            client.receive_datagram(d, SERVER, now=now)
        while client.next_event():
            pass
        now += 0.001
    assert server is not None
    return client, server, spent


def handshake_us(n: int) -> float:
    return statistics.median(_pair()[2] for _ in range(n)) * 1e6


def sign_verify_us(n: int = 3000) -> tuple[float, float]:
    key = Ed25519PrivateKey.generate()
    public, msg = key.public_key(), bytes(96)
    t = time.perf_counter()
    for _ in range(n):
        sig = key.sign(msg)
    sign = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        public.verify(sig, msg)
    return sign * 1e6, (time.perf_counter() - t) / n * 1e6


def join_us(viewers: int, joins: int, seed: int) -> tuple[float, float, float, float]:
    """Per Join through QUIC and the tracker: (µs in all, signatures, µs to send the answers,
    answers sent)."""
    d = Driver(seed)
    crypto = CountingCrypto()
    d.tracker.crypto = crypto
    for i in range(viewers):
        d.join(now=i * 1e-3)
    rng = random.Random(seed)
    spent, signs, sending, answers = 0.0, 0, 0.0, 0
    now = viewers * 1e-3
    for _ in range(joins):
        client, server, _ = _pair()
        link = d.open()
        join = m.Join(CHANNEL, f"p{link}", rng.choice((2500, 4500)), (rng.random(), rng.random()))
        client.send_stream_data(0, wire.frame(join))
        datagrams = [dg for dg, _ in client.datagrams_to_send(now=0.01)]
        before = crypto.signs
        t = time.perf_counter()
        for dg in datagrams:
            server.receive_datagram(dg, CLIENT, now=0.01)
        reader = wire.FrameReader()
        while (event := server.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                for msg in reader.feed(event.data):
                    d.tracker.handle(link, msg, now=now)
        effects = d.tracker.drain()  # (the tracker's work: it signs the tokens here)
        t_send = time.perf_counter()
        # As the runtime does: each answer framed and queued on its link (`QuicLink.send_control`),
        # then one hand-over to aioquic and one packetisation per link (here all on one).
        queued = bytearray()
        for eff in effects:
            if isinstance(eff, fx.Send):
                queued += wire.frame(eff.msg)
                answers += 1
        server.send_stream_data(0, bytes(queued))
        sent = server.datagrams_to_send(now=0.01)
        end = time.perf_counter()
        spent += end - t
        sending += end - t_send
        assert sent, "the tracker answered nothing"
        signs += crypto.signs - before
        now += 1e-3
    return spent / joins * 1e6, signs / joins, sending / joins * 1e6, answers / joins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--viewers", type=int, default=10_000, help="channel size before the timed joins")
    ap.add_argument("--joins", type=int, default=500)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    rows: dict[str, list[float]] = {"handshake_us": [], "sign_us": [], "verify_us": [],
                                    "event_us": [], "send_us": [], "join_us": []}
    for run in range(args.runs):
        hs = handshake_us(200)
        sign, verify = sign_verify_us()
        join, signs, sending, answers = join_us(args.viewers, args.joins, run + 1)
        send = sending / answers
        event = join - sending - signs * sign
        for name, value in (("handshake_us", hs), ("sign_us", sign), ("verify_us", verify),
                            ("event_us", event), ("send_us", send), ("join_us", join)):
            rows[name].append(value)
        print(f"run {run + 1}: handshake {hs:.0f} µs, sign {sign:.1f} µs, verify {verify:.1f} µs; "
              f"a join {join:.0f} µs = {signs:.1f} signatures + {answers:.1f} answers sent at "
              f"{send:.0f} µs + the rest (event) {event:.0f} µs", flush=True)
    print(f"\nmedian of {args.runs} ({args.viewers:,} viewers in the channel):")
    for name, values in rows.items():
        print(f"  {name:13} {statistics.median(values):8.1f}")


if __name__ == "__main__":
    main()
