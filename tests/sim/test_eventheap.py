"""The scheduler's C event heap (`sim/_eventheap.c`) against its pure-Python twin (`ListHeap`).

The compiled build (bench/build_compiled.sh) runs the simulator on the C heap, and everything
else on `ListHeap`; a run must be the same event for event, so both must pop in one order. The
C module is compiled here from the source (the suite's setup installs a C compiler).
"""

import gc
import importlib.util
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.build import build_eventheap
from sim.scheduler import ListHeap, Scheduler


@pytest.fixture(scope="module")
def EventHeap(tmp_path_factory):
    path = build_eventheap(tmp_path_factory.mktemp("eventheap"))
    spec = importlib.util.spec_from_file_location("_eventheap", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EventHeap


# An operation on both heaps: push a time, pop, pop up to a time, or extend with several times.
# Small integer times force ties, broken by the (unique) sequence number.
_times = st.floats(min_value=0, max_value=1e3, allow_nan=False) | st.integers(0, 4).map(float)
_ops = st.lists(st.one_of(
    st.tuples(st.just("push"), _times),
    st.tuples(st.just("pop"), st.none()),
    st.tuples(st.just("pop_until"), _times | st.just(float("inf"))),
    st.tuples(st.just("extend"), st.lists(_times, max_size=20)),
), max_size=120)


@settings(max_examples=300)
@given(ops=_ops)
def test_same_order_as_heapq(EventHeap, ops):
    c, py = EventHeap(), ListHeap()
    seq = 0

    def entry(t):
        nonlocal seq
        seq += 1
        return (t, seq, print, "arg")

    for op, arg in ops:
        if op == "push":
            e = entry(arg)
            c.push(e)
            py.push(e)
        elif op == "pop":
            if len(py):
                assert c.pop() is py.pop()
            else:
                with pytest.raises(IndexError):
                    c.pop()
        elif op == "pop_until":
            got, want = c.pop_until(arg), py.pop_until(arg)
            assert got is want
        else:
            es = [entry(t) for t in arg]
            c.extend(es)
            py.extend(es)
        assert len(c) == len(py) and bool(c) == bool(py)
        assert c.first() is py.first()
        assert sorted(c.entries()) == sorted(py.entries())


@given(st.lists(_times, max_size=200))
def test_scheduler_runs_the_same_events_on_either_heap(EventHeap, times):
    runs = []
    for heap in (EventHeap, ListHeap):
        s = Scheduler(heap=heap)
        ran = []
        for i, t in enumerate(times):
            s.at(t, ran.append, i)
            if i % 7 == 3:  # some at the current time, into the bucket being run
                s.at(0.0, ran.append, -i)
        s.run(until=2.0)
        s.run()
        runs.append(ran)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("bad, error", [
    ([1.0, 2, print], TypeError),             # not a tuple
    ((1.0, 2), TypeError),                    # too short for (time, seq, fn)
    (("soon", 2, print), TypeError),          # time not a number
    ((float("nan"), 2, print), ValueError),   # NaN would break the order
    ((1.0, -1, print), OverflowError),        # seq below zero
    ((1.0, 2**64, print), OverflowError),     # seq beyond 64 bits
    ((1.0, "2", print), TypeError),           # seq not an int
])
def test_malformed_entries_are_refused_and_change_nothing(EventHeap, bad, error):
    h = EventHeap()
    good = (1.0, 1, print)
    h.push(good)
    with pytest.raises(error):
        h.push(bad)
    with pytest.raises(error):
        h.extend([(0.5, 5, print), bad, (0.7, 6, print)])  # nothing half-added
    with pytest.raises(TypeError):
        h.extend((good,))  # a tuple, not a list
    assert len(h) == 1 and h.first() is good and h.pop() is good
    with pytest.raises(IndexError):
        h.pop()
    assert h.first() is None and h.pop_until(float("inf")) is None


def test_entries_are_released(EventHeap):
    """The heap owns one reference per entry: popped entries and a dropped heap leak none."""

    class Payload:
        pass

    kept = []
    h = EventHeap()
    for i in range(100):
        p = Payload()
        kept.append(weakref.ref(p))
        h.push((float(i % 10), i, print, p))
    h.extend([(5.0, 100 + i, print, Payload()) for i in range(10)])
    popped = [h.pop() for _ in range(50)]
    del popped
    del h, p
    gc.collect()
    assert all(r() is None for r in kept)
