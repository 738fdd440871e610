"""Arrival processes, sessions, capacity classes and channel popularity of generated peers."""

import math
import random
import statistics
from collections import Counter

import pytest

from sim.scenario import parse_scenario
from sim.workload import (
    PeerSpec,
    arrival_times,
    generate_peers,
    peers_for,
    session_length,
    zipf_weights,
)


def test_arrivals():
    rng = random.Random(1)
    assert arrival_times("all", 3, rng, t0=2.0) == [2.0, 2.0, 2.0]
    poisson = arrival_times("poisson", 5000, rng, rate=100.0)
    assert poisson == sorted(poisson) and 45 < poisson[-1] < 55  # ~n/rate
    flash = arrival_times("flash", 1000, rng, t0=1.0, window_s=10.0)
    assert flash == sorted(flash) and 1.0 <= flash[0] and flash[-1] <= 11.0
    pareto = arrival_times("pareto", 1000, rng, alpha=1.5, scale_s=0.01)
    gaps = [b - a for a, b in zip([0.0, *pareto], pareto)]
    assert min(gaps) >= 0.01 and max(gaps) > 10 * statistics.median(gaps)  # heavy tail
    with pytest.raises(ValueError, match="unknown arrival"):
        arrival_times("weibull", 1, rng)


def test_sessions():
    rng = random.Random(2)
    assert session_length("infinite", rng) == math.inf
    assert session_length("fixed", rng, length_s=30.0) == 30.0
    exp = [session_length("exponential", rng, mean_s=50.0) for _ in range(5000)]
    assert 45 < statistics.mean(exp) < 55
    logn = [session_length("lognormal", rng, mu=4.0, sigma=1.0) for _ in range(5000)]
    assert 50 < statistics.median(logn) < 60  # e^4 ≈ 54.6


def test_zipf_weights():
    w = zipf_weights(4, 1.0)
    assert sum(w) == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2.0) and w[0] / w[3] == pytest.approx(4.0)


def _peers(seed=3, n=4000, **kw):
    rng = random.Random(seed)
    args = dict(
        arrivals=arrival_times("poisson", n, rng, rate=100.0),
        session={"kind": "exponential", "mean_s": 60.0},
        upload_classes=[(0.25, 0.0), (0.5, 1000.0), (0.25, 5000.0)],
        graceful_fraction=0.3,
        nat_fraction=0.4,
        channels=10,
        zipf_s=1.0,
    )
    args.update(kw)
    return generate_peers(n, rng, **args)


def test_generated_peers_follow_their_distributions():
    peers = _peers()
    assert [p.id for p in peers] == list(range(1, 4001))
    assert all(isinstance(p, PeerSpec) for p in peers)
    assert [p.join_at for p in peers] == sorted(p.join_at for p in peers)
    assert all(p.leave_at > p.join_at for p in peers)
    n = len(peers)
    up = Counter(p.upload_kbps for p in peers)
    assert set(up) == {0.0, 1000.0, 5000.0} and abs(up[1000.0] / n - 0.5) < 0.03
    assert abs(sum(p.nat for p in peers) / n - 0.4) < 0.03
    assert abs(sum(p.graceful for p in peers) / n - 0.3) < 0.03
    ch = Counter(p.channel for p in peers)
    assert set(ch) <= set(range(10)) and ch[0] > ch[1] > ch[9]
    assert abs(ch[0] / n - zipf_weights(10, 1.0)[0]) < 0.03


def test_same_seed_same_peers_and_single_channel():
    assert _peers(seed=9) == _peers(seed=9) != _peers(seed=10)
    assert {p.channel for p in _peers(channels=1)} == {0}


def test_arrival_count_must_match():
    with pytest.raises(ValueError, match="3 arrival times for 4 peers"):
        generate_peers(4, random.Random(1), arrivals=[0, 0, 0], session={"kind": "infinite"},
                       upload_classes=[(1.0, 1.0)])


def test_peers_for_a_scenario():
    sc = parse_scenario({
        "peers": {
            "count": 300,
            "arrival": {"kind": "flash", "window_s": 5},
            "session": {"kind": "fixed", "length_s": 20},
            "upload": [{"share": 0.5, "kbps": 100}, {"share": 0.5, "kbps": 200}],
            "graceful_fraction": 0.0,
        },
        "channels": {"count": 3, "zipf_s": 2.0},
    })
    peers = peers_for(sc, random.Random(4), first_id=5)
    assert len(peers) == 300 and peers[0].id == 5
    assert all(p.join_at <= 5 and p.leave_at == pytest.approx(p.join_at + 20) for p in peers)
    assert not any(p.graceful for p in peers)
    assert {p.upload_kbps for p in peers} == {100.0, 200.0}
    assert Counter(p.channel for p in peers).most_common(1)[0][0] == 0

