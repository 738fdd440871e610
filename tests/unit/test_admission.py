"""The per-address limit on new connections (`meshcast.net.admission`): pure, time chosen here."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcast.net.admission import LOG_EVERY_S, Admission


def test_a_burst_then_the_rate() -> None:
    a = Admission(rate=2.0, burst=3)
    assert [a.admit("10.0.0.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert a.refused == 1
    assert not a.admit("10.0.0.1", 0.4)  # 0.8 of a token
    assert a.admit("10.0.0.1", 0.5)  # one token back after 1/rate s
    assert not a.admit("10.0.0.1", 0.5)
    # Idle long enough, the whole burst is back, and no more than that.
    assert [a.admit("10.0.0.1", 100.0) for _ in range(4)] == [True, True, True, False]


def test_addresses_are_independent() -> None:
    a = Admission(rate=1.0, burst=1)
    assert a.admit("10.0.0.1", 0.0) and not a.admit("10.0.0.1", 0.0)
    assert a.admit("10.0.0.2", 0.0)
    assert a.admit("::1", 0.0)


def test_refused_attempts_cost_nothing() -> None:
    # A client retransmitting its first datagram is refused again and again; that must not
    # push its next token further away.
    a = Admission(rate=1.0, burst=1)
    assert a.admit("x", 0.0)
    for i in range(1, 10):
        assert not a.admit("x", i / 10)
    assert a.admit("x", 1.0)


def test_an_address_exhausted_elsewhere_waits_for_its_bucket_to_refill() -> None:
    # Another process (a tracker front) saw the address spend its tokens: this one refuses it
    # from then on, until one token has come back, whatever it had here.
    a = Admission(rate=2.0, burst=3)
    assert a.admit("10.0.0.1", 0.0)
    a.exhaust("10.0.0.1", 1.0)
    a.exhaust("10.0.0.2", 1.0)  # never seen here
    assert not a.admit("10.0.0.1", 1.4) and not a.admit("10.0.0.2", 1.4)
    assert a.admit("10.0.0.1", 1.5) and not a.admit("10.0.0.1", 1.5)
    assert a.admit("10.0.0.3", 1.5)  # others untouched
    # A full table is pruned first, as for a new address.
    b = Admission(rate=1.0, burst=1, max_tracked=4)
    for i in range(4):
        b.exhaust(f"10.0.1.{i}", 0.0)
    b.exhaust("10.0.2.1", 10.0)  # the others have refilled by now: forgotten
    assert len(b) <= 4 and not b.admit("10.0.2.1", 10.0)


def test_the_table_stays_bounded_and_forgets_refilled_addresses_first() -> None:
    a = Admission(rate=1.0, burst=2, max_tracked=100)
    assert a.admit("busy", 0.0) and a.admit("busy", 0.0)  # spent
    for i in range(1000):  # a sweep of (maybe forged) addresses, one connection each
        assert a.admit(f"10.1.{i // 256}.{i % 256}", 0.0)
        assert len(a) <= 100
    # Spent addresses are kept over fresh ones as long as there is room...
    b = Admission(rate=1.0, burst=2, max_tracked=100)
    assert b.admit("busy", 0.0) and b.admit("busy", 0.0)
    for i in range(99):
        b.admit(f"old{i}", -10.0)  # refilled by now
    b.admit("new", 0.0)  # the table is full: refilled entries go
    assert len(b) == 2 and not b.admit("busy", 0.0)


def test_refusals_are_reported_once_a_minute_per_address() -> None:
    a = Admission()
    assert a.report("x", 0.0)
    assert not a.report("x", LOG_EVERY_S / 2)
    assert a.report("y", 1.0)
    assert a.report("x", LOG_EVERY_S)


@pytest.mark.parametrize("rate, burst, tracked", [(0, 1, 10), (-1, 1, 10), (1, 0, 10), (1, 1, 1)])
def test_bad_settings_are_refused(rate: float, burst: int, tracked: int) -> None:
    with pytest.raises(ValueError):
        Admission(rate, burst, max_tracked=tracked)


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.1, 50), burst=st.integers(1, 20),
       steps=st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 2)), max_size=200))
def test_no_address_beats_its_bucket(rate: float, burst: int, steps: list[tuple[str, float]]) -> None:
    # Over any stretch [t0, t1], an address gets at most burst + rate·(t1 − t0) connections in,
    # and a lone attempt on a full bucket always gets in.
    a = Admission(rate, burst)
    now = 0.0
    admitted: dict[str, list[float]] = {}
    for source, dt in steps:
        now += dt
        if a.admit(source, now):
            admitted.setdefault(source, []).append(now)
    for times in admitted.values():
        for i, t0 in enumerate(times):
            for j in range(i, len(times)):
                assert j - i + 1 <= burst + rate * (times[j] - t0) + 1e-9
    assert a.admit("fresh", now)
