"""A simulation run makes no reference cycles, so the driver may switch the cyclic collector
off while it runs (at 100k peers the collector otherwise re-scans every live node, again and
again, as the audience grows)."""

from __future__ import annotations

import gc

import pytest

from sim.driver import Simulation
from sim.scenario import SCENARIO_DIR, load_scenario


@pytest.mark.parametrize(("strategy", "peers"), [("tree", 150), ("mesh", 60)])
def test_a_run_with_joins_and_both_kinds_of_departure_leaves_no_cyclic_garbage(strategy: str,
                                                                             peers: int) -> None:
    sc = load_scenario(SCENARIO_DIR / "churn.toml", overrides={
        "peers.count": peers, "stream.duration_s": 20.0, "peers.arrival.rate": 20,
        "run.strategy": strategy})
    gc.collect()
    during: list[bool] = []
    sim = Simulation(sc, progress=lambda now, events: during.append(gc.isenabled()))
    assert gc.isenabled()
    result = sim.run()
    assert during and not any(during), "the collector must be off while the run runs"
    assert gc.isenabled(), "the run must switch the collector back on"
    assert result.metrics.summary()["chunks"]["verified"] > 0
    gc.disable()
    try:
        # `sim` is still alive: whatever the collector finds now was made and dropped by the run.
        assert gc.collect() == 0
    finally:
        gc.enable()
