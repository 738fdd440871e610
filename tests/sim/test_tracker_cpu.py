"""The tracker's CPU in the simulator: one server, so it admits viewers no faster than it can
do their handshakes and joins; swamped, it loses first packets, and viewers get in on a later
try (`sim.driver`, `[tracker]` costs)."""

from __future__ import annotations

import math

from sim.driver import CONNECT_TIMEOUT, RunResult, Simulation
from sim.scenario import TrackerConfig, parse_scenario

FREE = {"handshake_us": 0, "event_us": 0, "send_us": 0, "receive_us": 0, "relay_us": 0, "sign_us": 0,
        "verify_us": 0, "keepalive_us": 0}


def crowd_sim(count: int, tracker: dict, *, duration_s: float = 20, seed: int = 1,
              channels: int = 1) -> Simulation:
    """`count` viewers arriving together at live 1 Mbit/s streams."""
    return Simulation(parse_scenario({
        "stream": {"bitrate_kbps": 1000, "chunk_ms": 100, "gop_ms": 100, "substreams": 4,
                   "duration_s": duration_s},
        "seed": {"upload_kbps": 10000},
        "peers": {"count": count, "arrival": {"kind": "flash", "t0": 1.0, "window_s": 0.01},
                  "session": {"kind": "infinite"}, "upload": [{"share": 1.0, "kbps": 3000}]},
        "network": {"model": "coordinates", "rtt_min_ms": 10, "rtt_max_ms": 60},
        "channels": {"count": channels, "zipf_s": 0},
        "tracker": tracker,
        "run": {"seed": seed},
    }))


def crowd(count: int, tracker: dict, **kwargs) -> RunResult:
    return crowd_sim(count, tracker, **kwargs).run()


def startups(result: RunResult) -> list[float]:
    return sorted(s for s in result.metrics.startup_s if not math.isnan(s))


def test_the_kth_viewer_in_cannot_start_before_k_handshakes_of_tracker_cpu():
    handshake_s = 0.05
    result = crowd(60, {"handshake_us": handshake_s * 1e6})
    times = startups(result)
    assert len(times) == 60 and result.metrics.rejected == 0
    # Every viewer's join waits for the handshakes the tracker did before it (and its own).
    assert all(t >= (k + 1) * handshake_s for k, t in enumerate(times)), times
    summary = result.summary()
    assert summary["tracker"]["cpu"] * summary["duration_s"] >= 60 * handshake_s
    assert times[-1] < 60 * handshake_s + 2.0  # and not much more: 3 s of handshakes
    # A tracker that costs nothing lets them all in sooner than its handshakes would take.
    free = startups(crowd(60, FREE))
    assert max(free) < 60 * handshake_s < max(times)
    assert crowd(60, FREE).summary()["tracker"]["cpu"] == 0


def test_a_swamped_tracker_drops_first_packets_and_the_viewers_get_in_on_a_later_try():
    # 200 handshakes at 40 ms each: 8 s of work, with room for 1 s of it queued. The first
    # packets that find the queue full are lost; QUIC's resends and the viewers' next tries
    # (REJOIN_S later, doubling) bring everyone in, the last well after a connect time-out.
    result = crowd(200, {"handshake_us": 40_000, "backlog_s": 1.0}, duration_s=30)
    times = startups(result)
    assert result.metrics.rejected == 0 and len(times) == 200
    assert times[-1] > CONNECT_TIMEOUT
    # Never more than the backlog's worth of handshakes queued (plus the joins behind them).
    assert result.summary()["tracker"]["wait_ms"]["p99"] < 1000 + 200


def test_viewers_give_up_on_a_tracker_that_cannot_take_them_in_three_tries():
    # 400 handshakes at 100 ms: 40 s of work, more than three tries (~20 s) can wait for.
    # Those left out are refused ("tracker unreachable"); those in play on.
    result = crowd(400, {"handshake_us": 100_000, "backlog_s": 1.0}, duration_s=40)
    admitted = len(startups(result))
    assert result.metrics.rejected > 0
    assert admitted + result.metrics.rejected == 400
    assert admitted >= 100  # the tracker kept working through the crowd
    assert result.summary()["continuity"] > 0.99


def test_a_site_spreads_its_channels_over_tracker_processes():
    # Two channels' crowds: one process does every handshake in turn; two do them side by
    # side, each for its own channel (channel c at process c mod 2), and both crowds are in
    # sooner than one process could have let them in.
    h = 0.04
    cpu = {"handshake_us": h * 1e6, "backlog_s": 4.5}

    def by_channel(sim: Simulation) -> dict[int, list[float]]:
        result, out = sim.run(), {0: [], 1: []}
        assert result.metrics.rejected == 0
        for spec in sim.specs:
            out[spec.channel].append(result.metrics.startup_s[spec.id])
        return {c: sorted(times) for c, times in out.items()}

    one = by_channel(crowd_sim(80, cpu, channels=2))
    assert max(max(one[0]), max(one[1])) >= 80 * h  # one CPU: all 80 handshakes in a row
    two_sim = crowd_sim(80, cpu | {"processes": 2}, channels=2)
    two = by_channel(two_sim)
    assert set(two_sim.nodes[0].channels) == {"ch0"} and set(two_sim.nodes[1].channels) == {"ch1"}
    for times in two.values():  # each process: its own channel's handshakes in a row
        assert all(t >= (k + 1) * h for k, t in enumerate(times)), times
    assert max(max(two[0]), max(two[1])) < 80 * h


def test_a_premiere_audience_is_placed_without_stalling_the_tracker():
    # 1,000 viewers wait for the broadcast: placing them at go-live is ~1.3 s of the tracker's
    # CPU (each held join taken again costs a join's work, its answers and one signature). In
    # slices of PLACE_SLICE it is never busy with one piece for long (links to it time out
    # after 3 s of silence): ~0.13 s, against 1.3 s in one go (10k: 13 s).
    sim = Simulation(parse_scenario({
        "stream": {"bitrate_kbps": 1000, "chunk_ms": 100, "substreams": 4, "duration_s": 12},
        "seed": {"upload_kbps": 10000, "start_s": 5},
        "peers": {"count": 1000, "arrival": {"kind": "flash", "window_s": 4},
                  "session": {"kind": "infinite"}, "upload": [{"share": 1.0, "kbps": 3000}]},
        "run": {"seed": 2},
    }))
    result = sim.run()
    tracker = result.summary()["tracker"]
    cpu = tracker["cpu_s"]
    held = 1000 * TrackerConfig().event_us * 1e-6  # the joins, as they came
    assert cpu["events"] + cpu["signatures"] + cpu["sends"] - held > 0.9  # the placing
    assert tracker["longest_ms"] < 200
    assert len(startups(result)) == 1000


def test_a_seed_up_before_the_premiere_lets_its_audience_start_at_go_live():
    # The same 1,000 viewers, with the seed up from t = 0 (`lead_s` 5) instead of at go-live:
    # the tracker places each as it comes, and takes no held join again, so at go-live
    # nothing waits for it: everyone plays within a second (from go-live), where the held
    # audience waits for its placing. No chunk goes out before go-live either way.
    def premiere(lead_s: float) -> RunResult:
        return Simulation(parse_scenario({
            "stream": {"bitrate_kbps": 1000, "chunk_ms": 100, "substreams": 4, "duration_s": 12},
            "seed": {"upload_kbps": 10000, "start_s": 5, "lead_s": lead_s},
            "peers": {"count": 1000, "arrival": {"kind": "flash", "window_s": 4},
                      "session": {"kind": "infinite"}, "upload": [{"share": 1.0, "kbps": 3000}]},
            "run": {"seed": 2},
        })).run()

    held, early = premiere(0), premiere(5)
    assert len(startups(held)) == len(startups(early)) == 1000
    assert max(startups(early)) < 1.0 < 2.0 < max(startups(held))
    spent = [r.summary()["tracker"]["cpu_s"]["events"] for r in (held, early)]
    assert spent[1] < 0.6 * spent[0]
    for r in (held, early):
        assert sum(b.verified for b in r.metrics.buckets[:5]) == 0


def test_each_open_link_costs_the_tracker_its_heartbeats_every_second():
    # Only heartbeats cost anything here: 1 ms a link and second. The seed's link is open for
    # the whole 20 s, the 50 viewers' from their joins at ~1.05 s: ~0.97 s of CPU in all.
    result = crowd(50, {**FREE, "keepalive_us": 1000})
    spent = result.summary()["tracker"]["cpu_s"]
    assert 0.9 < spent["keepalives"] < 1.0, spent
    assert sum(spent.values()) == spent["keepalives"]


def test_fronts_do_the_handshakes_side_by_side_and_the_tracker_process_none():
    # 60 handshakes of 50 ms: one process does them in a row (3 s); two fronts each do about
    # half, at once, and the tracker process only handles the joins that come through them.
    h = 0.05
    one = crowd(60, {**FREE, "handshake_us": h * 1e6})
    sim = crowd_sim(60, {**FREE, "handshake_us": h * 1e6, "fronts": 2, "event_us": 100,
                         "relay_us": 10, "send_us": 20, "receive_us": 20})
    two = sim.run()
    times = startups(two)
    assert len(times) == 60 and two.metrics.rejected == 0
    assert max(times) < max(startups(one)) - 1.0
    assert max(times) >= 29 * h  # a front's share, in a row
    tracker = two.summary()["tracker"]
    assert tracker["cpu_s"]["handshakes"] == 0
    fronts = tracker["fronts"]
    assert fronts["per_process"] == 2
    assert math.isclose(fronts["cpu_s"]["handshakes"], 61 * h)  # the viewers' and the seed's
    # Each message to a viewer went out through its front, and arrived in order: they play.
    assert fronts["cpu_s"]["sends"] > 0 and fronts["cpu_s"]["receives"] > 0
    assert tracker["cpu_s"]["sends"] > 0  # ... after crossing the local stream
    assert two.summary()["continuity"] > 0.99
