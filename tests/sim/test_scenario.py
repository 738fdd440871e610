"""Scenario parsing: defaults, overrides, error messages, and every shipped scenario."""

import pytest

from sim.driver import run_scenario
from sim.scenario import (
    SCENARIO_DIR,
    Scenario,
    ScenarioError,
    load_scenario,
    parse_scenario,
    resource_index,
)

SHIPPED = sorted(SCENARIO_DIR.glob("*.toml"))


def test_empty_document_is_all_defaults():
    s = parse_scenario({})
    assert s == Scenario()
    assert s.run.strategy == "tree" and s.channels.count == 1
    assert resource_index(s) == pytest.approx((20000 + 4000 * 100) / (100 * 2000))


def test_load_with_overrides(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('[peers]\ncount = 10\n[peers.arrival]\nkind = "flash"\nwindow_s = 2\n')
    s = load_scenario(path, overrides={"run.seed": 3, "peers.count": "500", "run.strategy": "mesh"})
    assert s.name == "x" and s.run.seed == 3 and s.peers.count == 500
    assert s.run.strategy == "mesh" and s.peers.arrival.params() == {"t0": 0.0, "window_s": 2.0}


def test_matrix_path_is_relative_to_the_scenario(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[network]\nmodel = "matrix"\npath = "rtt.csv"\n')
    assert load_scenario(path).network.path == str(tmp_path / "rtt.csv")


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"peers": {"arrival": {"rate": "abc"}}},
         "peers.arrival.rate: expected a positive number, got 'abc'"),
        ({"peers": {"arrival": {"rate": -2}}},
         "peers.arrival.rate: expected a positive number, got -2.0"),
        ({"peers": {"arrival": {"kind": "flash", "rate": 3}}},
         "peers.arrival.rate: not a parameter of kind 'flash' "
         "(expected one of: kind, t0, window_s)"),
        ({"peers": {"arrival": {"kind": "storm"}}},
         "peers.arrival.kind: expected one of 'all', 'poisson', 'flash', 'pareto', got 'storm'"),
        ({"peers": {"count": True}}, "peers.count: expected a positive integer, got True"),
        ({"peers": {"count": 2.5}}, "peers.count: expected a positive integer, got 2.5"),
        ({"peers": {"nat_fraction": 1.5}},
         "peers.nat_fraction: expected a number in [0, 1], got 1.5"),
        ({"peers": {"upload": [{"share": 0.5, "kbps": 1000}]}},
         "peers.upload: expected shares summing to 1, got 0.5"),
        ({"peers": {"upload": [{"share": 1, "kbps": 1, "tier": 2}]}},
         "peers.upload[0].tier: unknown key (expected one of: kbps, share)"),
        ({"peers": {"upload": {"share": 1}}}, "peers.upload: expected an array of tables"),
        ({"stream": {"bitrate": 2000}}, "stream.bitrate: unknown key"),
        ({"streams": {}}, "streams: unknown key"),
        ({"stream": 5}, "stream: expected a table, got 5"),
        ({"network": {"model": "ripe", "rtt_min_ms": 5}},
         "network.rtt_min_ms: not a parameter of model 'ripe'"),
        ({"network": {"loss": 1}}, "network.loss: expected a number in [0, 1), got 1.0"),
        ({"network": {"rtt_min_ms": 50, "rtt_max_ms": 10}},
         "network.rtt_max_ms: expected a number >= rtt_min_ms (50), got 10.0"),
        ({"network": {"model": "matrix"}}, "network.path: expected a CSV file path"),
        ({"network": {"model": "ripe", "weights": {"US": "many"}}},
         "network.weights.US: expected a number, got 'many'"),
        ({"run": {"strategy": ""}}, "run.strategy: expected a non-empty string, got ''"),
        ({"run": {"seed": "x"}}, "run.seed: expected an integer, got 'x'"),
        ({"name": "x"}, "name: unknown key"),
    ],
)
def test_errors_name_the_key_and_the_expectation(doc, message):
    with pytest.raises(ScenarioError) as e:
        parse_scenario(doc)
    assert str(e.value).startswith(message)


def test_override_errors_are_checked_the_same_way():
    with pytest.raises(ScenarioError, match=r"^peers\.count: expected a positive integer, got 0$"):
        parse_scenario({}, overrides={"peers.count": 0})
    with pytest.raises(ScenarioError, match="^run: expected a table"):
        parse_scenario({"run": 1}, overrides={"run.seed": 2})


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[peers\n")
    with pytest.raises(ScenarioError, match="bad.toml: invalid TOML"):
        load_scenario(path)


def test_the_shipped_scenarios_are_all_there():
    assert {p.stem for p in SHIPPED} >= {
        "steady-10k", "flash-crowd", "churn", "heterogeneous", "justin-tv", "small-20",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_scenario_loads(path):
    s = load_scenario(path)
    assert s.name == path.stem and s.description
    assert resource_index(s) >= 1.0


def test_shipped_scenarios_say_what_they_promise():
    premiere = load_scenario(SCENARIO_DIR / "premiere.toml")
    assert premiere.peers.count / premiere.peers.arrival.rate <= premiere.seed.start_s
    steady = load_scenario(SCENARIO_DIR / "steady-10k.toml")
    assert steady.peers.count == 10_000 and resource_index(steady) >= 1.5
    assert 100 <= steady.stream.chunk_ms <= 200 and steady.stream.substreams == 4
    assert steady.peers.count / steady.peers.arrival.rate == pytest.approx(20)
    hetero = load_scenario(SCENARIO_DIR / "heterogeneous.toml")
    assert resource_index(hetero) == pytest.approx(1.2, abs=0.02)
    assert any(u.kbps == 0 for u in hetero.peers.upload)
    churn = load_scenario(SCENARIO_DIR / "churn.toml")
    assert churn.peers.session.kind == "lognormal" and churn.peers.graceful_fraction < 0.5
    justin = load_scenario(SCENARIO_DIR / "justin-tv.toml")
    assert justin.channels.count == 2000 and justin.peers.count == 50_000
    assert load_scenario(SCENARIO_DIR / "flash-crowd.toml").peers.arrival.kind == "flash"
    assert load_scenario(SCENARIO_DIR / "small-20.toml").peers.count == 20


def test_playout_delay_is_a_scenario_key_the_peers_play_by():
    """`[peers] playout_delay_s` is the viewers' margin: with lossy transfers, a longer one leaves
    time for pull repair, so more chunks play on time (and later)."""
    assert parse_scenario({}).peers.playout_delay_s == 0.5
    with pytest.raises(ScenarioError, match="peers.playout_delay_s"):
        parse_scenario({"peers": {"playout_delay_s": -1}})
    runs = {d: run_scenario(load_scenario(SCENARIO_DIR / "small-20.toml", overrides={
        "stream.duration_s": 20, "network.chunk_drop": 0.2, "peers.playout_delay_s": d,
    })).summary() for d in (0.05, 2.0)}
    assert runs[2.0]["continuity"] > runs[0.05]["continuity"] + 0.1
    assert runs[2.0]["latency_ms"]["p50"] > runs[0.05]["latency_ms"]["p50"]


def test_a_long_playout_delay_keeps_what_waits_behind_a_gap():
    """Peers keep chunks for longer than their playout delay. While a lost chunk is repaired
    (10 % of transfers vanish), the chunks behind it wait for it; with a 4 s delay and the
    fixed 3 s window the simulator had, they fell out of the window first (90.6 %)."""
    s = run_scenario(load_scenario(SCENARIO_DIR / "small-20.toml", overrides={
        "stream.duration_s": 20, "network.chunk_drop": 0.1,
        "peers.playout_delay_s": 4.0})).summary()
    assert s["continuity"] == 1.0 and s["chunks"]["missed"] == 0
