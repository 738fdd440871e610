"""Latency models and the cut-through capacity arithmetic, on hand-computed cases."""

import gzip
import math
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.network import (
    CoordinateLatency,
    CountryLatency,
    Loss,
    MatrixLatency,
    Network,
    Uplink,
    build_latency,
    default_rtt_data_dir,
    transfer,
)
from sim.scenario import parse_scenario

B = 10_000  # bytes; at 8000 kbps: 1 µs per byte → 10 ms per chunk, 1.2 ms per 1200-byte tail


class Const:
    def __init__(self, one_way):
        self.v = one_way

    def one_way(self, a, b):
        return self.v


# --- transfer ---------------------------------------------------------------------------------


def test_seed_sends_a_whole_chunk():
    link = Uplink(8000)
    assert transfer(link, B, 0.0, 0.0, 0.05) == pytest.approx((0.05, 0.06))
    assert link.free_at == pytest.approx(0.01) and link.carried_bytes == B


def test_chain_of_three_relays_adds_one_way_plus_tail_per_hop():
    s, a, b = Uplink(8000), Uplink(8000), Uplink(8000)
    head, end = transfer(s, B, 0.0, 0.0, 0.01)
    assert (head, end) == pytest.approx((0.01, 0.02))
    head, end = transfer(a, B, head, end, 0.01)
    assert (head, end) == pytest.approx((0.02, 0.0312))
    head, end = transfer(b, B, head, end, 0.01)
    # store-and-forward would be 0.06; cut-through pays only the last packet per hop
    assert (head, end) == pytest.approx((0.03, 0.0424))


def test_parent_with_four_children_serialises_fifo():
    link = Uplink(8000)
    got = [t for _ in range(4) for t in transfer(link, B, 0.0, 0.0, 0.005)]
    assert got == pytest.approx([0.005, 0.015, 0.015, 0.025, 0.025, 0.035, 0.035, 0.045])


def test_fast_relay_is_held_back_by_its_slow_parent():
    parent, relay = Uplink(800), Uplink(80_000)
    head, end = transfer(parent, B, 0.0, 0.0, 0.0)
    assert (head, end) == pytest.approx((0.0, 0.1))
    assert transfer(relay, B, head, end, 0.0) == pytest.approx((0.0, 0.10012))
    assert relay.free_at == pytest.approx(0.001)  # its uplink is free for others meanwhile


def test_slow_child_download_limits_arrival():
    net = Network(Const(0.01), [80_000, 0], random.Random(1), download_kbps=[0, 800])
    # uplink: 1 ms; downlink stage: 100 ms from the head's arrival
    assert net.send_chunk(0, 1, B, 0.0, 0.0) == pytest.approx((0.01, 0.11))
    assert net.downlinks[0] is None


def test_zero_capacity_cannot_send():
    with pytest.raises(ValueError):
        transfer(Uplink(0), B, 0.0, 0.0, 0.0)


@given(
    kbps=st.floats(1, 1e6),
    nbytes=st.integers(1, 10**6),
    free_at=st.floats(0, 100),
    t_head=st.floats(0, 100),
    lag=st.floats(0, 100),
    one_way=st.floats(0, 1),
)
def test_transfer_never_beats_the_source_or_the_link(kbps, nbytes, free_at, t_head, lag, one_way):
    link = Uplink(kbps)
    link.free_at = free_at
    t_src_end = t_head + lag
    head, end = transfer(link, nbytes, t_head, t_src_end, one_way)
    start = head - one_way
    finish = end - one_way
    eps = 1e-9 * (1 + abs(end))
    assert start >= max(t_head, free_at) - eps
    assert finish >= t_src_end - eps
    assert finish >= start + nbytes * 8 / (kbps * 1000) - eps
    assert link.free_at == pytest.approx(start + nbytes * 8 / (kbps * 1000))
    assert head <= end + eps


# --- loss and control ----------------------------------------------------------------------------


def test_packet_loss_delays_by_one_rtt_and_chunk_drop_loses():
    lossy = Network(Const(0.01), [8000, 8000], random.Random(3), loss=Loss(packet=0.5))
    _, end = lossy.send_chunk(0, 1, B, 0.0, 0.0)  # 9 packets: a loss is near certain
    assert end == pytest.approx(0.02 + 0.02)
    dropping = Network(Const(0.01), [1e9, 1e9], random.Random(3), loss=Loss(chunk_drop=0.5))
    outcomes = [dropping.send_chunk(0, 1, 100, 0.0, 0.0) for _ in range(1000)]
    assert 400 < sum(o is None for o in outcomes) < 600


def test_loss_rates_are_validated():
    with pytest.raises(ValueError, match="loss.packet"):
        Loss(packet=1.0)


def test_control_pays_propagation_only():
    net = Network(Const(0.02), [1, 1], random.Random(1))
    assert net.send_control(0, 1, 5.0) == pytest.approx(5.02)
    assert net.uplinks[0].free_at == 0.0


# --- latency models -----------------------------------------------------------------------------


def test_coordinates_are_symmetric_bounded_and_seeded():
    m = CoordinateLatency(200, random.Random(7), dims=3, rtt_min_ms=10, rtt_max_ms=200,
                          access_min_ms=1, access_max_ms=2)
    again = CoordinateLatency(200, random.Random(7), dims=3, rtt_min_ms=10, rtt_max_ms=200,
                              access_min_ms=1, access_max_ms=2)
    for a, b in [(0, 1), (5, 199), (42, 17)]:
        assert m.one_way(a, b) == m.one_way(b, a) == again.one_way(a, b)
        assert 0.005 + 0.002 <= m.one_way(a, b) <= 0.1 + 0.004


def test_matrix_from_csv(tmp_path):
    path = tmp_path / "rtt.csv"
    path.write_text("src,dst,rtt_ms\n0,1,20\n2,1,50\n")
    m = MatrixLatency.from_csv(path, 3, access_ms=1)
    assert m.one_way(1, 0) == pytest.approx(0.012)
    assert m.one_way(1, 2) == pytest.approx(0.027)
    with pytest.raises(KeyError, match="nodes 0 and 2"):
        m.one_way(0, 2)


def _write_data(root, rows, intra="100,80,100,0,1000"):
    header = "cty1,cty2,rtt_cnt,rtt_avg,rtt_std,rtt_min,rtt_max\n"
    with gzip.open(root / "country_rtt_stat.csv.gz", "wt") as f:
        f.write(header + "".join(r + "\n" for r in rows))
    with gzip.open(root / "intra_rtt_stat.csv.gz", "wt") as f:
        f.write("rtt_cnt,rtt_avg,rtt_std,rtt_min,rtt_max\n" + intra + "\n")


def test_country_model_draws_within_the_pair_window_and_is_stable(tmp_path):
    _write_data(tmp_path, [
        "AA,BB,1000,100,10,80,5000",   # trusted: window [80, 130]
        "AA,AA,1000,20,2,15,25",
        "BB,CC,5,200,,200,200",        # few pings: σ = 40, window [80, 320]
        "CC,CC,500,50,1,49,51",
        "None,AA,9999999,1,1,1,1",     # unknown country: never used
    ])
    m = CountryLatency(600, random.Random(1), data_dir=tmp_path)
    assert m.countries == ["AA", "BB", "CC"]  # placement weighted by pings involving each
    by = {c: [i for i in range(600) if m.countries[m.country_of[i]] == c] for c in m.countries}
    ab = [m.rtt_ms(a, b) for a in by["AA"][:30] for b in by["BB"][:30]]
    assert all(80 <= x <= 130 for x in ab) and 95 < statistics.mean(ab) < 105
    assert all(15 <= m.rtt_ms(a, b) <= 25 for a in by["AA"][:10] for b in by["AA"][10:20])
    bc = [m.rtt_ms(b, c) for b in by["BB"][:30] for c in by["CC"][:30]]
    assert all(80 <= x <= 320 for x in bc) and statistics.stdev(bc) > 20
    # missing same-country pair (BB,BB) → intra stats; missing cross pair (AA,CC) → medians
    # of the trusted pairs (avg 50 here), widened like a few-ping pair (σ 10, window [20, 80])
    assert all(0 <= m.rtt_ms(a, b) <= 200 for a in by["BB"][:10] for b in by["BB"][10:20])
    ac = [m.rtt_ms(a, c) for a in by["AA"][:20] for c in by["CC"][:20]]
    assert all(20 <= x <= 80 for x in ac) and 45 < statistics.mean(ac) < 55
    again = CountryLatency(600, random.Random(1), data_dir=tmp_path)
    pairs = [(3, 9), (9, 3), (100, 599)]
    assert [m.one_way(a, b) for a, b in pairs] == [again.one_way(a, b) for a, b in pairs]
    assert m.one_way(3, 9) == m.one_way(9, 3) == m.rtt_ms(3, 9) / 2000


def test_country_weights_choose_placement(tmp_path):
    _write_data(tmp_path, ["AA,BB,1000,100,10,80,5000", "AA,AA,1000,20,2,15,25"])
    m = CountryLatency(50, random.Random(1), data_dir=tmp_path, weights={"AA": 1, "BB": 0})
    assert set(m.country_of) == {0} and m.countries == ["AA"]
    with pytest.raises(ValueError, match="ZZ"):
        CountryLatency(5, random.Random(1), data_dir=tmp_path, weights={"ZZ": 1})


def test_missing_data_names_the_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        CountryLatency(5, random.Random(1), data_dir=tmp_path / "nowhere")
    monkeypatch.setenv("MESHCAST_RTT_DATA", str(tmp_path / "env"))
    assert default_rtt_data_dir() == tmp_path / "env"
    with pytest.raises(FileNotFoundError, match="MESHCAST_RTT_DATA"):
        CountryLatency(5, random.Random(1))


@pytest.mark.skipif(
    not (default_rtt_data_dir() / "country_rtt_stat.csv.gz").is_file(), reason="no RIPE data"
)
def test_real_ripe_data_gives_plausible_internet_rtts():
    m = CountryLatency(2000, random.Random(5))
    rtts = [m.rtt_ms(i, i + 1) for i in range(0, 1999)]
    assert 20 < statistics.median(rtts) < 300
    assert all(x >= 0 and math.isfinite(x) for x in rtts)


def test_build_latency_from_a_scenario(tmp_path):
    sc = parse_scenario({"network": {"model": "coordinates", "rtt_min_ms": 20, "rtt_max_ms": 20}})
    m = build_latency(sc.network, 10, random.Random(1))
    assert m.one_way(0, 9) == pytest.approx(0.01)
    (tmp_path / "m.csv").write_text("src,dst,rtt_ms\n0,1,30\n")
    sc = parse_scenario({"network": {"model": "matrix", "path": str(tmp_path / "m.csv")}})
    assert build_latency(sc.network, 2, random.Random(1)).one_way(0, 1) == pytest.approx(0.015)
    _write_data(tmp_path, ["AA,AA,1000,20,0,20,20"])
    sc = parse_scenario({"network": {"model": "ripe", "data_dir": str(tmp_path)}})
    assert build_latency(sc.network, 3, random.Random(1)).one_way(0, 1) == pytest.approx(0.01)
