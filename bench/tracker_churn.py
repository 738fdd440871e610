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

`--restart`: instead, a new tracker (a new key) takes the whole channel over, as after a
restart: the seed announces itself with its old id and the old tracker's key, then every viewer
comes back, in random order, with its `Resume` (old id, parents, children, a token of the old
tracker's as proof). Prints µs per node taken over, and the whole takeover's CPU time.

    python bench/tracker_churn.py [--sizes 1000,10000,100000] [--ops 2000] [--runs 3] [--restart]
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


def restart_run(size: int, rng_seed: int) -> tuple[float, float]:
    """(µs per node taken over, seconds for the whole channel) for a new tracker."""
    d = Driver(rng_seed)
    for i in range(size):
        d.join(now=i * 1e-3)
    old, crypto = d.tracker, d.tracker.crypto
    ch = old.channels[CHANNEL]
    seed = ch.forest.seed
    assert seed is not None
    viewers = [mm for mm in ch.forest.members.values() if not mm.is_seed]
    d.rng.shuffle(viewers)
    joins = []
    for mm in viewers:  # what each would send: built (and its proof signed) before the clock runs
        proof = crypto.issue_token(old.key, mm.id, seed.id, CHANNEL, m.NO_PEER, TOKEN_LIFETIME)
        parents = tuple(ch.forest.members[p].ref if p in ch.forest.members else m.NO_REF
                        for p in mm.parent)
        joins.append(m.Join(CHANNEL, mm.address, mm.upload_kbps, mm.coords,
                            m.Resume(mm.id, mm.home, parents, proof, mm.used)))
    new = TrackerNode(key=SigningKey(), crypto=Crypto(), rng=random.Random(rng_seed))
    seed_key = SigningKey()  # (the channel key: any will do for a new channel entry)
    t = time.perf_counter()
    new.link_opened(0, now=0.0)
    new.handle(0, m.Announce(CHANNEL, seed_key.public, "seed", 40_000, BITRATE, K, 100,
                             crypto.sign_announce(seed_key, CHANNEL, "seed"), seed.id,
                             old.key.public, seed.used), now=0.0)
    new.drain()
    for i, join in enumerate(joins, start=1):
        new.link_opened(i, now=1.0)
        new.handle(i, join, now=1.0)
        new.drain()
    total = time.perf_counter() - t
    assert new.channels[CHANNEL].resumed == size + 1, "a node was not taken over"
    return total / (size + 1) * 1e6, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000",
                    help="channel sizes (viewers), comma-separated")
    ap.add_argument("--ops", type=int, default=2000, help="joins, then departures, measured")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--restart", action="store_true",
                    help="time a new tracker taking the channel over instead")
    args = ap.parse_args()
    if args.restart:
        print(f"{'viewers':>9} {'per node (µs)':>14} {'whole takeover (s)':>19}")
        for size in (int(s) for s in args.sizes.split(",")):
            runs = [restart_run(size, seed) for seed in range(1, args.runs + 1)]
            print(f"{size:>9,} {statistics.median(r[0] for r in runs):>14.0f} "
                  f"{statistics.median(r[1] for r in runs):>19.1f}", flush=True)
        return
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
