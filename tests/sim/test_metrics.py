"""Metrics: histogram quantiles, summary definitions, and the files a run writes."""

import csv
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.metrics import Histogram, MetricsCollector, _rounded, write_comparison


def _exact_nearest_rank(xs, q):
    xs = sorted(xs)
    return xs[max(1, math.ceil(q * len(xs))) - 1]


@given(st.lists(st.floats(0, 9.99, allow_nan=False), min_size=1, max_size=300),
       st.sampled_from([0.5, 0.95, 0.99, 0.01, 1.0]))
def test_histogram_quantiles_are_within_a_millisecond(xs, q):
    h = Histogram(0.001, 10.0)
    for x in xs:
        h.add(x)
    assert abs(h.quantile(q) - _exact_nearest_rank(xs, q)) <= 0.001


def test_histogram_edges():
    h = Histogram(0.001, 1.0)
    assert h.quantile(0.5) is None
    h.add(-1.0)
    h.add(50.0)  # overflow lands in the last bin
    assert h.quantile(0.0) == pytest.approx(0.0005) and h.quantile(1.0) == pytest.approx(0.9995)
    assert h.cdf() == ([pytest.approx(0.001), pytest.approx(1.0)], [0.5, 1.0])


def _run():
    """Seed = node 0; peers 1..3; two one-second buckets."""
    m = MetricsCollector(5, 2.0)
    for p in (1, 2, 3):
        m.peer_joined(p, now=0.0)
        m.startup(p, 0.1 * p)
    # bucket 0: peer 1 from the seed, peer 2 from peer 1 (late), peer 3 misses
    m.chunk_verified(1, 0, 0.200, True, False, 1000, now=0.5)
    m.chunk_verified(2, 0, 0.400, False, True, 1000, now=0.7)
    m.chunk_missed(3, 0, now=0.9)
    # bucket 1: all three on time, two from peers
    m.chunk_verified(1, 1, 0.300, True, False, 1000, now=1.2)
    m.chunk_verified(2, 1, 0.300, True, True, 1000, now=1.3)
    m.chunk_verified(3, 1, 0.500, True, True, 1000, now=1.4)
    m.bytes_sent(0, 2000, "media", True, now=0.5)
    m.bytes_sent(0, 500, "control", True, now=0.5)
    m.bytes_sent(1, 3000, "media", False, now=1.0)
    m.bytes_sent(2, 100, "control", False, now=1.0)
    m.depth(1, 1)
    m.depth(2, 2)
    m.depth(3, 1)
    m.depth(3, 2)
    m.depth(3, 1)  # the deepest position reported counts
    m.peer_left(3, now=1.9)
    return m


def test_summary_definitions():
    s = _run().summary()
    assert s["peers"] == 3 and s["duration_s"] == 2.0
    assert s["latency_ms"] == {"p50": pytest.approx(300.5), "p95": pytest.approx(500.5),
                               "p99": pytest.approx(500.5)}
    assert s["continuity"] == pytest.approx(4 / 6)
    assert s["offload"] == pytest.approx(3 / 5)
    assert s["startup_ms"] == {"p50": pytest.approx(200.5), "p95": pytest.approx(300.5)}
    assert s["seed_egress_kbps"] == pytest.approx(2500 * 8 / 1000 / 2.0)
    assert s["control_overhead"] == pytest.approx(600 / 5000)
    assert s["max_depth"] == 2 and s["depth_histogram"] == {"1": 1, "2": 2}
    assert s["chunks"] == {"verified": 5, "on_time": 4, "missed": 1}


def test_series_are_bucketed_by_time():
    series = _run().series()
    assert series["t_s"] == [0.0, 1.0]
    assert series["offload"] == pytest.approx([0.5, 2 / 3])
    assert series["continuity"] == pytest.approx([1 / 3, 1.0])
    assert series["latency_p50_ms"] == pytest.approx([205.0, 305.0])
    assert series["seed_egress_kbps"] == pytest.approx([20.0, 0.0])


def test_empty_run_has_nulls_not_crashes():
    s = MetricsCollector(3, 10.0).summary()
    assert s["peers"] == 0 and s["continuity"] is None and s["latency_ms"]["p50"] is None
    assert s["max_depth"] is None and s["depth_histogram"] == {}


def test_write_files_deterministically(tmp_path):
    _run().write(tmp_path / "a")
    _run().write(tmp_path / "b", plots=False)
    a = (tmp_path / "a" / "metrics.json").read_text()
    assert a == (tmp_path / "b" / "metrics.json").read_text()
    data = json.loads(a)
    assert list(data) == sorted(data) and data["series"]["t_s"] == [0.0, 1.0]
    rows = list(csv.DictReader(open(tmp_path / "a" / "peers.csv")))
    assert [r["id"] for r in rows] == ["1", "2", "3"]
    assert rows[2]["left_at"] == "1.9" and rows[0]["left_at"] == "" and rows[1]["max_depth"] == "2"
    assert rows[0]["bytes_uploaded"] == "3000"
    for name in ("latency_cdf", "timeseries", "depth_histogram"):
        assert (tmp_path / "a" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_write_comparison(tmp_path):
    other = MetricsCollector(5, 2.0)
    other.chunk_verified(1, 0, 0.9, True, True, 10, now=0.1)
    other.depth(1, 4)
    write_comparison(tmp_path, {"tree": _run().digest(), "mesh": other.digest()})
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert set(data) == {"tree", "mesh"} and data["mesh"]["max_depth"] == 4
    for name in ("latency_cdf", "timeseries", "depth_histogram"):
        assert (tmp_path / f"comparison_{name}.png").is_file()


@given(st.floats(allow_nan=True))
def test_json_floats_are_rounded_to_six_significant_digits(x):
    got = _rounded({"x": [x]})["x"][0]
    if math.isfinite(x):
        assert got == pytest.approx(x, rel=1e-5) and float(f"{got:.6g}") == got
    else:
        assert got is None


def test_per_peer_storage_is_compact():
    m = MetricsCollector(100_000, 60.0)
    per_node = sum(memoryview(getattr(m, name)).nbytes for name in m._COLUMNS) / 100_000 + 1
    assert per_node <= 96  # bytes per node, whatever the number of chunks


def test_each_peer_s_columns_add_up_to_the_run_s_totals():
    """Two counts of the same chunks: the run's totals are the driver's, one `Deliver` at a time
    (time buckets); a peer's columns are its node's own counters, read at the end. Under churn,
    with viewers leaving gracefully and killed, they must agree to the chunk and the byte."""
    from sim.driver import Simulation
    from sim.scenario import parse_scenario

    sim = Simulation(parse_scenario({
        "stream": {"bitrate_kbps": 1000, "chunk_ms": 200, "substreams": 4, "duration_s": 30},
        "seed": {"upload_kbps": 6000},
        "peers": {"count": 120, "arrival": {"kind": "poisson", "rate": 8},
                  "session": {"kind": "exponential", "mean_s": 12},
                  "graceful_fraction": 0.5,
                  "upload": [{"share": 0.5, "kbps": 400}, {"share": 0.5, "kbps": 2500}]},
        "run": {"seed": 5},
    }))
    result = sim.run()
    m, s = result.metrics, result.summary()
    assert sum(1 for x in m.left_at if not math.isnan(x)) > 20, "viewers left during the run"
    chunks = s["chunks"]
    assert chunks["verified"] > 4_000
    assert sum(m.verified) == chunks["verified"] and sum(m.on_time) == chunks["on_time"]
    assert sum(m.missed) == chunks["missed"]
    from_peers, from_seed = sum(m.bytes_from_peers), sum(m.bytes_from_seed)
    assert from_peers / (from_peers + from_seed) == pytest.approx(s["offload"], abs=0)
    mean = sum(m.latency_sum) / sum(m.verified)
    assert s["latency_ms"]["p50"] / 1000 - 0.2 < mean < s["latency_ms"]["p99"] / 1000 + 0.001
