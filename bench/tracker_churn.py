"""Tracker cost per viewer joining and leaving, by channel size: what a tracker operator budgets.

Drives one real `TrackerNode` (real Ed25519 tokens, the `tree` strategy) with its messages, no
network: a seed announces a channel and N viewers join (the steady scenario's upload mix, 2.5
or 4.5 Mbit/s for a 2 Mbit/s stream; random network coordinates). Then `--ops` more viewers join
and `--ops` viewers leave abruptly (their link closes), timed. Prints µs per join and per
departure (the orphans' re-placement included), median of `--runs` runs; then viewers who
upload nothing join until the channel is full, and `--ops` more are refused, timed. Most of a
join is signing its tokens: a parent and a backup per sub-stream, and the seed's for pulls.
Also timed: renewing one member's tokens (what the tracker's sweeps do for every member every
`TOKEN_LIFETIME` / 2), and the share of a core that takes for the whole channel.

    python bench/tracker_churn.py [--sizes 1000,10000,100000] [--ops 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from meshcast import messages as m
from meshcast.crypto import Crypto, SigningKey
from tracker.node import TOKEN_LIFETIME, TrackerNode

CHANNEL = "bench"
BITRATE = 2000
K = 4


class Driver:
    """Feeds the tracker one message at a time and throws its effects away (they are the
    tracker's answers: Welcome, Assign, Neighbours, Reject)."""

    def __init__(self, rng_seed: int) -> None:
        crypto = Crypto()
        self.tracker = TrackerNode(key=SigningKey(), crypto=crypto, rng=random.Random(rng_seed))
        self.rng = random.Random(rng_seed)
        self.next_link = 0
        seed_key = SigningKey()
        link = self.open()
        proof = crypto.sign_announce(seed_key, CHANNEL, "seed")
        self.tracker.handle(link, m.Announce(CHANNEL, seed_key.public, "seed", 40_000, BITRATE, K,
                                             100, proof), now=0.0)
        self.tracker.drain()
        self.viewers: list[int] = []

    def open(self) -> int:
        link = self.next_link
        self.next_link += 1
        self.tracker.link_opened(link, now=0.0)
        return link

    def join(self, now: float, upload: int | None = None) -> None:
        link = self.open()
        upload = self.rng.choice((2500, 4500)) if upload is None else upload
        address = f"p{link}" if upload else ""
        coords = (self.rng.random(), self.rng.random())
        self.tracker.handle(link, m.Join(CHANNEL, address, upload, coords), now=now)
        self.tracker.drain()
        self.viewers.append(link)

    def leave(self, now: float) -> None:
        i = self.rng.randrange(len(self.viewers))
        self.viewers[i], self.viewers[-1] = self.viewers[-1], self.viewers[i]
        self.tracker.link_closed(self.viewers.pop(), now=now)
        self.tracker.drain()


def one_run(size: int, ops: int, rng_seed: int) -> tuple[float, float, float, float]:
    d = Driver(rng_seed)
    for i in range(size):
        d.join(now=i * 1e-3)
    now = size * 1e-3
    t = time.perf_counter()
    for i in range(ops):
        d.join(now=now + i * 1e-3)
    join_us = (time.perf_counter() - t) / ops * 1e6
    now += ops * 1e-3
    t = time.perf_counter()
    for i in range(ops):
        d.leave(now=now + i * 1e-3)
    leave_us = (time.perf_counter() - t) / ops * 1e6
    assert d.tracker.rejections == 0, "the channel ran out of slots: not what this measures"
    now += ops * 1e-3
    tracker = d.tracker
    ch = tracker.channels[CHANNEL]
    members = [mm for mm in ch.forest.members.values() if not mm.is_seed][:ops]
    t = time.perf_counter()
    for mm in members:
        tracker._renew_member(ch, mm, now)
        tracker.drain()
    renew_us = (time.perf_counter() - t) / len(members) * 1e6
    while d.tracker.rejections == 0:  # viewers who upload nothing, until one is refused
        d.join(now=now, upload=0)
    t = time.perf_counter()
    for i in range(ops):
        d.join(now=now + i * 1e-3, upload=0)
    refused_us = (time.perf_counter() - t) / ops * 1e6
    assert d.tracker.rejections == ops + 1
    return join_us, leave_us, refused_us, renew_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000",
                    help="channel sizes (viewers), comma-separated")
    ap.add_argument("--ops", type=int, default=2000, help="joins, then departures, measured")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"{'viewers':>9} {'join (µs)':>10} {'departure (µs)':>15} {'departures/s':>13} "
          f"{'refused join (µs)':>18} {'renewal (µs)':>13} {'renewal CPU':>12}")
    for size in (int(s) for s in args.sizes.split(",")):
        runs = [one_run(size, args.ops, seed) for seed in range(1, args.runs + 1)]
        join = statistics.median(r[0] for r in runs)
        leave = statistics.median(r[1] for r in runs)
        refused = statistics.median(r[2] for r in runs)
        renew = statistics.median(r[3] for r in runs)
        share = size * renew * 1e-6 / (TOKEN_LIFETIME / 2)  # a sweep per half lifetime
        print(f"{size:>9,} {join:>10.0f} {leave:>15.0f} {1e6 / leave:>13,.0f} {refused:>18.0f} "
              f"{renew:>13.0f} {share:>11.1%}", flush=True)


if __name__ == "__main__":
    main()
