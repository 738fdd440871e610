"""Who joins when, for how long, with what uplink, on which channel: the peers of a run.

Every draw comes from the injected ``random.Random``, in a fixed order (arrival times first, then
per peer in join order: session, departure mode, capacity, NAT, channel), so the same seed gives
the same population. Peer ids are dense, in join order, from ``first_id`` (the driver keeps the
ids below for its seed nodes).

Arrivals: ``all`` (everyone at ``t0``), ``poisson`` (rate per second), ``flash`` (N uniform
joins within ``window_s``), ``pareto`` (Pareto inter-arrival gaps: bursty, heavy-tailed).
Sessions: ``infinite``, ``fixed``, ``exponential(mean)``, ``lognormal(mu, sigma)`` (of seconds;
measured live-streaming sessions are close to lognormal). Channels: C channels with Zipf(s)
popularity, channel 0 the most popular (Justin.tv-like: a few big channels, a long tail).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from sim.scenario import Scenario

__all__ = [
    "PeerSpec",
    "arrival_times",
    "session_length",
    "zipf_weights",
    "generate_peers",
    "peers_for",
]


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """One viewer of the run."""

    id: int
    """Node id (dense, in join order)."""
    join_at: float
    """Virtual time of joining, seconds."""
    leave_at: float
    """Virtual time of leaving (``math.inf``: stays to the end)."""
    graceful: bool
    """True: announces its departure and hands off its children; False: vanishes."""
    upload_kbps: float
    """Upload capacity (0: a pure leech)."""
    nat: bool
    """Behind a NAT: cannot accept incoming connections without traversal."""
    channel: int
    """Channel watched (0 = most popular)."""


def arrival_times(
    kind: str,
    n: int,
    rng: random.Random,
    *,
    t0: float = 0.0,
    rate: float = 1.0,
    window_s: float = 1.0,
    alpha: float = 1.5,
    scale_s: float = 0.01,
) -> list[float]:
    """``n`` sorted join times of the given arrival process."""
    if kind == "all":
        return [t0] * n
    if kind == "poisson":
        return list(accumulate((rng.expovariate(rate) for _ in range(n)), initial=t0))[1:]
    if kind == "flash":
        return sorted(t0 + rng.random() * window_s for _ in range(n))
    if kind == "pareto":
        # paretovariate(alpha) >= 1: gaps are scale_s·X, X Pareto(alpha), minimum scale_s.
        gaps = (scale_s * rng.paretovariate(alpha) for _ in range(n))
        return list(accumulate(gaps, initial=t0))[1:]
    raise ValueError(f"unknown arrival kind {kind!r}")


def session_length(
    kind: str,
    rng: random.Random,
    *,
    mean_s: float = 600.0,
    length_s: float = 600.0,
    mu: float = 5.5,
    sigma: float = 1.0,
) -> float:
    """One session length in seconds (``math.inf`` for ``infinite``)."""
    if kind == "infinite":
        return math.inf
    if kind == "fixed":
        return length_s
    if kind == "exponential":
        return rng.expovariate(1.0 / mean_s)
    if kind == "lognormal":
        return rng.lognormvariate(mu, sigma)
    raise ValueError(f"unknown session kind {kind!r}")


def zipf_weights(count: int, s: float) -> list[float]:
    """Zipf popularity of ranks 1..count, normalised to sum 1."""
    raw = [1.0 / (rank**s) for rank in range(1, count + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def generate_peers(
    n: int,
    rng: random.Random,
    *,
    arrivals: Sequence[float],
    session: dict,
    upload_classes: Sequence[tuple[float, float]],
    graceful_fraction: float = 1.0,
    nat_fraction: float = 0.0,
    channels: int = 1,
    zipf_s: float = 1.0,
    first_id: int = 1,
) -> list[PeerSpec]:
    """Peers sorted by join time; ``session`` holds `session_length` keyword arguments."""
    if len(arrivals) != n:
        raise ValueError(f"{len(arrivals)} arrival times for {n} peers")
    up_cum = list(accumulate(share for share, _ in upload_classes))
    up_kbps = [kbps for _, kbps in upload_classes]
    ch_cum = list(accumulate(zipf_weights(channels, zipf_s))) if channels > 1 else None
    rand = rng.random
    out = []
    for i, join_at in enumerate(sorted(arrivals)):
        leave_at = join_at + session_length(rng=rng, **session)
        graceful = rand() < graceful_fraction
        # bisect on cumulative shares: O(log k) per peer, and no float drift past the last class.
        cls = min(bisect_right(up_cum, rand() * up_cum[-1]), len(up_kbps) - 1)
        nat = rand() < nat_fraction
        channel = min(bisect_right(ch_cum, rand() * ch_cum[-1]), channels - 1) if ch_cum else 0
        out.append(PeerSpec(first_id + i, join_at, leave_at, graceful, up_kbps[cls], nat, channel))
    return out


def peers_for(scenario: Scenario, rng: random.Random, *, first_id: int = 1) -> list[PeerSpec]:
    """The peers a scenario describes (``[peers]`` and ``[channels]``)."""
    p = scenario.peers
    arrival = p.arrival
    times = arrival_times(arrival.kind, p.count, rng, **arrival.params())
    return generate_peers(
        p.count,
        rng,
        arrivals=times,
        session={"kind": p.session.kind, **p.session.params()},
        upload_classes=[(u.share, u.kbps) for u in p.upload],
        graceful_fraction=p.graceful_fraction,
        nat_fraction=p.nat_fraction,
        channels=scenario.channels.count,
        zipf_s=scenario.channels.zipf_s,
        first_id=first_id,
    )
