"""The simulator and the network runtime agree on the same scenario (DESIGN §7).

`sim/scenarios/small-20.toml` (20 peers all present from t0, 1000 kbps, K = 2, 200 ms chunks,
seed 10 Mbit/s, peers 3 Mbit/s, coordinate latency with a fixed seed) runs in
`sim.driver.Simulation` and over real QUIC on 127.0.0.1 (`bench.sim_vs_runtime.run_runtime`:
tracker and seed in this process, the peers in two worker processes, each in a session of its
own so that a loaded 2-core machine gives the run enough CPU; every endpoint shaped to the
node's upload and delayed per destination by the simulator's `one_way`). Both record every
`Deliver.latency`; the figures are over the chunks ingested in [3 s, 18 s).

Acceptance: p50 and p95 within 20% + 5 ms of the simulator's, compared on the medians of
`RUNS` runtime runs (runs where the event loop lagged, i.e. the machine did not leave the run
enough CPU, are left out; with fewer than two left the test is skipped, saying so).

What it takes to agree (measured on this 2-core machine; bench/sim_vs_runtime.py prints every
figure below: latency by tree depth, chunk-complete time before in-order release, and the seed's
children by their place in its send order):

1. A FIFO uplink at the seed. The simulator's uplink is FIFO over chunk copies (`sim.network`:
   a chunk pushed to 8 children reaches the first after one serialisation time, the eighth
   after eight). A shaper that shares the uplink among links (round-robin turns, as
   `meshcast.net.quic` had before its oldest-first turn `_OldestFirst`) finishes every copy
   near the end: p50/p95 207/358 ms against the sim's 148/281 (+39% / +27%).
2. A FIFO uplink at relays. A cut-through relay writes each arriving piece to its children in
   turn, so ordering by the age of each *write* interleaves the copies (shared again: depth-2
   chunks complete at 233–280 ms against the sim's 189). The runtime orders by the age of each
   *stream's* first write (`meshcast/net/quic.py`, `_stream_age`), which is FIFO per copy.
   `test_runtime_uplinks_are_fifo` measures both disciplines on their own, so a regression is
   named as such rather than showing up as a latency miss.
3. With both, the runs of 2026-11-25: p50 149–156 ms (sim 148), p95 273–295 ms (sim 281),
   medians 152 / 279 ms, against bounds of ±35 / ±61 ms. On 2026-11-26: p95 280–358 ms over
   16 runs (median 317): one run's tail is the machine's as much as ours (see `RUNS`). The
   runtime's remaining extra cost (QUIC packet and chunk-head overhead, ~4% on every copy;
   event-loop wake-up lag) shows at depth 1 (p50 101–107 ms against 89) and is within the
   bound.
"""

from __future__ import annotations

import math
import statistics

import anyio
import pytest

from bench.sim_vs_runtime import (MAX_LOOP_LAG_MS, RELAY, SCENARIO, compare, run_runtime,
                                  run_sim, shaper_order)
from sim.scenario import load_scenario

pytestmark = pytest.mark.net

RUNS = 5
"""Runtime runs; the latency figures compared are the medians over the runs that kept real time.

Five, not three: one run's p95 moves a lot with how the two cores are shared among the three
processes (2026-11-26, 16 runs: 280–358 ms, median 317, against the sim's 281 and a bound of
342; run-queue wait ~0.4 s/s). A median of three failed one clean-clone CI run in four on
2026-11-25; resampling today's 16 runs, a median of three misses 1.2 % of the time, of five
0.2 %."""
RUN_LIMIT_S = 120.0
"""A runtime run lasts ~21 s of stream plus start-up; far beyond that something is stuck."""
MAX_LOOP_LAG_S = MAX_LOOP_LAG_MS / 1000
"""Event-loop lag (p95, worst process) above which a run did not keep real time: its latencies
then measure the machine's load, not the protocol, and the run is left out."""


def _fifo_like(order: dict[int, float], step_ms: float) -> bool:
    """Did the copies finish one after another (FIFO), not together near the end (shared)?"""
    return bool(order) and order.get(0, math.inf) < 2.5 * step_ms


@pytest.fixture(scope="module")
def figures():
    sc = load_scenario(SCENARIO)
    sim = run_sim(sc)

    async def runtime():
        with anyio.fail_after(60):
            order = {"seed": await shaper_order(), "relay": await shaper_order(**RELAY)}
        runs = []
        for _ in range(RUNS):
            with anyio.fail_after(RUN_LIMIT_S):
                runs.append(await run_runtime(sc, workers=2))
        return order, runs

    order, runs = anyio.run(runtime, backend="asyncio")
    s = sim.summary()
    print(f"\nuplink discipline, ms until child #p has its copy: seed {order['seed']} "
          f"(FIFO 20, 40, …, 160); relay {order['relay']} (FIFO 67, 133, 200, 267)")
    print(f"sim     {s}\n        seed's children by send order {sim.by_position()}")
    for rt in runs:
        print(f"runtime {rt.summary()}\n        seed's children by send order {rt.by_position()}")
    kept = [rt for rt in runs if rt.summary()["loop_lag_p95_ms"] / 1000 <= MAX_LOOP_LAG_S]
    starved = ""
    if len(kept) < 2:
        lags = [rt.summary()["loop_lag_p95_ms"] for rt in runs]
        starved = (f"the runtime could not keep real time on this machine: event-loop lag p95 "
                   f"{lags} ms, > {MAX_LOOP_LAG_S * 1000:.0f} ms in {RUNS - len(kept)} of {RUNS} "
                   f"runs: its latencies would measure the load, not the protocol")
    return sc, sim, runs, kept, order, starved


def test_runtime_runs_the_scenario(figures):
    """The comparison is not vacuous: the runtime built the same swarm and played it."""
    sc, sim, runs, kept, _, _ = figures
    s = sim.summary()
    assert len(sim.startup) == sc.peers.count
    for rt in runs:
        assert len(rt.startup) == sc.peers.count, (
            f"every runtime peer started playing; not: {sorted(set(sim.startup) - set(rt.startup))}"
            f" (run: {rt.extra}, depths: {rt.depth})")
        assert {i for i, _ in rt.lat} == {i for i, _ in sim.lat}, "the same peers played"
        placed = {i for (i, _k), d in rt.depth.items() if d >= 1}
        assert placed == {i for i, _ in sim.lat}, "the tracker placed every runtime peer"
    for rt in kept:  # runs that kept real time: also the same volume and offload
        r = rt.summary()
        assert r["samples"] >= 0.9 * s["samples"], (s, r)
        assert abs(r["offload"] - s["offload"]) <= 0.1, (s["offload"], r["offload"])


def test_runtime_uplinks_are_fifo(figures):
    """The runtime's upload shaper is FIFO over copies, as the simulator's `Uplink` is: a seed's
    8 whole copies and a cut-through relay's 4 piecewise copies finish one after another."""
    order = figures[4]
    assert _fifo_like(order["seed"], 20.0), (
        f"the shaper shares the uplink among links: a seed's 8 copies done at {order['seed']} ms, "
        f"FIFO would be 20, 40, …, 160 ms")
    assert _fifo_like(order["relay"], 200 / 3), (
        f"the shaper interleaves a cut-through relay's copies: done at {order['relay']} ms, FIFO "
        f"would be 67, 133, 200, 267 ms (pieces ordered by write, not by stream?)")


def test_latency_agrees(figures):
    """p50 and p95 (medians over the runs that kept real time) within 20% + 5 ms of the sim's."""
    _, sim, _, kept, _, starved = figures
    if starved:
        pytest.skip(starved)
    s = sim.summary()
    r = {k: statistics.median(rt.summary()[k] for rt in kept) for k in ("p50_ms", "p95_ms")}
    print(f"p50 ms: sim {s['p50_ms']} runtime {r['p50_ms']}; "
          f"p95 ms: sim {s['p95_ms']} runtime {r['p95_ms']} (median of {len(kept)} runs)")
    bad = compare(s, r, keys=("p50_ms", "p95_ms"))
    assert not bad, "; ".join(bad)
