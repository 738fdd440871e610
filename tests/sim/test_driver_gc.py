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


def test_what_a_run_made_is_not_left_for_the_collector_s_next_young_pass() -> None:
    """The run's objects go to the oldest generation when the collector comes back on: its
    next pass of the youngest generation does not walk them all (0.13 s after 10k × 20 s)."""
    sc = load_scenario(SCENARIO_DIR / "steady-10k.toml", overrides={
        "peers.count": 100, "stream.duration_s": 5.0})
    gc.collect()
    sim = Simulation(sc)
    sim.run()
    young = gc.get_objects(generation=0)
    assert len(young) < 1000, len(young)
    assert any(obj is sim.nodes[-1] for obj in gc.get_objects(generation=2))
