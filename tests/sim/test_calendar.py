"""The scheduler's C event calendar (`sim/_calendar.c`) against its pure-Python twin (`Calendar`).

The compiled build (bench/build_compiled.sh) runs the simulator on the C calendar, and everything
else on `Calendar`; a run must be the same event for event, so both must pop in one order, and
that order is one (time, seq) heap's. The C module is compiled here from the source (the
suite's setup installs a C compiler).
"""

import gc
import heapq
import importlib.util
import math
import weakref
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.build import build_c_module
from sim.scheduler import Calendar, Scheduler

PER_S, RING = 10.0, 8  # small: the ring's ends and the later buckets are reached often


@pytest.fixture(scope="module")
def EventCalendar(tmp_path_factory):
    path = build_c_module("_calendar", tmp_path_factory.mktemp("calendar"))
    spec = importlib.util.spec_from_file_location("_calendar", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EventCalendar


NODES = 3


def wake(i, when):
    """The node wakes' callback in these tests."""


def on_link(link, *args):
    """An event naming a link first, which the calendar is told to warm (`warm`)."""


# What `warm` is told, with what a bad event could point at: links beyond `OWNER`, negative
# ones, owners beyond `NODE_OBJS` or -1, and nodes that are not objects of any one type.
NODE_OBJS = [object(), None, "x"]
OWNER = array("i", [0, 2, -1, 5, 1, -7])


class OneHeap:
    """The order both calendars must keep: one `heapq` heap of the same tuples, numbered in
    order; and node wakes as the driver handled them itself before the calendars did: a wake
    dropped when stale or its node gone, set again when the node's deadline moved later."""

    def __init__(self):
        self.items = []
        self.seq = 0
        self.armed = [math.inf] * NODES  # (the driver's `timer_at`)
        self.due = [math.inf] * NODES    # (the node's `next_due()`)
        self.alive = [True] * NODES

    def push(self, time, fn, *args):
        self.seq += 1
        heapq.heappush(self.items, (time, self.seq, fn, *args))

    def arm(self, i, t, now):
        self.due[i] = t
        if t < self.armed[i]:
            self.armed[i] = t
            self.push(max(t, now), wake, i, t)

    def disarm(self, i):
        self.alive[i] = False
        self.armed[i] = math.inf

    def revive(self, i):
        self.alive[i] = True
        self.armed[i] = self.due[i] = math.inf

    def first(self):
        return self.items[0] if self.items else None

    def pop_until(self, until):
        while self.items and self.items[0][0] <= until:
            e = heapq.heappop(self.items)
            if e[2] is not wake:
                return e
            _, now, _, i, when = e[0], e[0], e[2], e[3], e[4]
            if not self.alive[i] or self.armed[i] != when:
                continue  # stale, or its node is gone
            self.armed[i] = math.inf
            if not self.due[i] > now:
                return e
            self.arm(i, self.due[i], now)  # nothing due yet: wake it then
        return None


# An operation on all three: push an event at a time (ahead of the last popped one, as a
# scheduler only schedules from now on), pop, or pop up to a time. Times near bucket edges, ties
# (broken by the unique seq), times beyond the ring and at infinity. Events have 0 to 6
# arguments, numbers (kept as C numbers by the C calendar, up to four) and other objects. And
# node wakes: a node's deadline set (ahead, passed already, or none), a node gone and back.
_ahead = (st.floats(min_value=0, max_value=3.0, allow_nan=False)
          | st.sampled_from([0.0, 0.1, 0.05, 0.7, 0.8, 0.85, 2.0, 50.0, 1e15, math.inf]))
_args = st.lists(st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.booleans()
                 | st.none() | st.text(max_size=3), max_size=6).map(tuple)
_ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.tuples(_ahead, _args)),
    st.tuples(st.just("pop"), st.none()),
    st.tuples(st.just("pop_until"), _ahead),
    st.tuples(st.just("arm"), st.tuples(st.integers(0, NODES - 1),
                                        _ahead | st.sampled_from([-0.3, -0.05]))),
    st.tuples(st.just("disarm"), st.integers(0, NODES - 1)),
    st.tuples(st.just("revive"), st.integers(0, NODES - 1)),
), max_size=150)


@settings(max_examples=400)
@given(ops=_ops)
def test_both_calendars_pop_in_one_heaps_order(EventCalendar, ops):
    c, py, ref = EventCalendar(PER_S, RING), Calendar(PER_S, RING), OneHeap()
    for q in (c, py):
        q.wakes(NODES, wake)
        q.warm(NODE_OBJS, OWNER, 200, on_link)  # (speed only: the order must not change)
    now = 0.0
    for op, arg in ops:
        if op == "push":
            ahead, args = arg
            fn = on_link if len(args) % 2 else print
            for q in (c, py, ref):
                q.push(now + ahead, fn, *args)
        elif op == "arm":
            i, ahead = arg
            if ref.alive[i]:  # (the driver arms no node that is gone)
                for q in (c, py, ref):
                    q.arm(i, now + ahead, now)
        elif op in ("disarm", "revive"):
            for q in (c, py, ref):
                getattr(q, op)(arg)
        elif op == "pop":
            e = ref.pop_until(math.inf)
            if e is not None:
                assert same(c.pop(), e) and same(py.pop(), e)
                now = e[0]
            else:
                for q in (c, py):
                    with pytest.raises(IndexError):
                        q.pop()
        else:
            until = now + arg
            e = ref.pop_until(until)
            got = c.pop_until(until), py.pop_until(until)
            if e is None:
                assert got == (None, None)
            else:
                assert same(got[0], e) and same(got[1], e)
                now = e[0]
        assert len(c) == len(py) == len(ref.items)
        assert c.seq == py.seq == ref.seq
        assert same(c.first(), ref.first()) and same(py.first(), ref.first())
        key = lambda e: e[:2]  # noqa: E731
        for q in (c, py):
            assert all(map(same, sorted(q.entries(), key=key), sorted(ref.items, key=key)))


def same(a, b):
    """The same event: equal, item by item, of the same types (a bool stays a bool, an int
    beyond 64 bits an int)."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(type(x) is type(y) and x == y for x, y in zip(a, b))


@given(st.lists(st.floats(min_value=0, max_value=3.0, allow_nan=False), max_size=200))
def test_scheduler_runs_the_same_events_on_either_calendar(EventCalendar, times):
    runs = []
    for calendar in (EventCalendar, Calendar):
        s = Scheduler(calendar=calendar)
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
    ((1.0,), TypeError),                      # too short for (time, fn)
    (("soon", print), TypeError),             # time not a number
    ((float("nan"), print), ValueError),      # NaN would break the order
])
def test_malformed_events_are_refused_and_change_nothing(EventCalendar, bad, error):
    c = EventCalendar(PER_S, RING)
    c.push(1.0, print, "x", 2, 3.5)
    with pytest.raises(error):
        c.push(*bad)
    good = (1.0, 1, print, "x", 2, 3.5)
    assert len(c) == 1 and c.seq == 1 and c.first() == good and c.pop() == good
    with pytest.raises(IndexError):
        c.pop()
    assert c.first() is None and c.pop_until(math.inf) is None


@pytest.mark.parametrize("per_s, ring", [(0.0, 8), (-1.0, 8), (10.0, 0), (10.0, 6), (math.nan, 8)])
def test_bad_shapes_are_refused(EventCalendar, per_s, ring):
    for calendar in (EventCalendar, Calendar):
        with pytest.raises(ValueError):
            calendar(per_s, ring)


@pytest.mark.parametrize("args", [
    ((1, 2), OWNER, 64),                     # nodes not a list
    (NODE_OBJS, [0, 1], 64),                 # owner not a buffer
    (NODE_OBJS, array("q", [0, 1]), 64),     # nor one of int32
    (NODE_OBJS, OWNER, "64"),                # size not a number
    (NODE_OBJS, OWNER, 64, *[on_link] * 5),  # more callbacks than it keeps
])
def test_bad_warming_is_refused_and_keeps_the_last(EventCalendar, args):
    c = EventCalendar(PER_S, RING)
    owner = array("i", [0, 1])
    c.warm(NODE_OBJS, owner, 64, on_link)
    with pytest.raises(TypeError):
        c.warm(*args)
    with pytest.raises(BufferError):  # still held: the calendar reads it
        owner.append(2)
    c.push(0.5, on_link, 1, "x")
    c.push(0.25, wake, 1, 0.0)
    assert [c.pop()[2] for _ in range(2)] == [wake, on_link]


def test_warming_anew_lets_go_of_the_last_owner(EventCalendar):
    """The driver replaces its link → node column as links open, and tells the calendar each
    time: the old one is let go then (an array still exported could not grow), the new one
    held."""
    c = EventCalendar(PER_S, RING)
    old, new = array("i", [0]), array("i", [0, 1])
    c.warm(NODE_OBJS, old, 64, on_link)
    c.warm(NODE_OBJS, new, 64, on_link)
    old.append(1)
    with pytest.raises(BufferError):
        new.append(2)
    del c
    gc.collect()
    new.append(2)


def test_references_are_released(EventCalendar):
    """The calendar holds one reference per object argument (kept in the slot, or in a tuple
    beyond four): popped events and a dropped calendar leak none."""

    class Payload:
        pass

    kept = []
    c = EventCalendar(PER_S, RING)
    for i in range(100):
        p = Payload()
        kept.append(weakref.ref(p))
        extra = (1, 2, 3, 4) if i % 3 == 0 else ()
        c.push(float(i % 10) * 0.37, print, p, *extra)  # now, in the ring and later
    popped = [c.pop() for _ in range(50)]
    assert {type(e[3]) for e in popped} == {Payload}
    del popped
    del c, p
    gc.collect()
    assert all(r() is None for r in kept)


def test_a_cycle_through_pending_events_is_collected(EventCalendar):
    """The calendar reports what its events hold to the cyclic collector, so a cycle owner →
    calendar → event → owner (a simulation and its scheduled callbacks) is found."""

    class Owner:
        def tick(self, *args):
            pass

    o = Owner()
    o.calendar = EventCalendar(PER_S, RING)
    o.calendar.wakes(2, o.tick)  # (and the wakes' callback)
    o.nodes, o.owner = [o], array("i", [0])
    o.calendar.warm(o.nodes, o.owner, 64, o.tick)  # (and what it warms)
    for t in (0.0, 0.35, 5.0):
        o.calendar.push(t, o.tick)
        o.calendar.push(t, print, 1, o)
        o.calendar.push(t, print, 1, 2, 3, 4, o)
    ref = weakref.ref(o)
    del o
    gc.collect()
    assert ref() is None


def test_the_c_modules_stub_states_the_python_calendars_interface():
    """`sim/_calendar.pyi` types the C module for mypy (and the compiled build): its methods
    take what `Calendar`'s take, so a change to one interface shows up here."""
    import ast
    import inspect
    from pathlib import Path

    import sim

    tree = ast.parse((Path(sim.__file__).parent / "_calendar.pyi").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EventCalendar"]
    stub = {f.name: [a.arg for a in f.args.args] + ([f"*{f.args.vararg.arg}"] if f.args.vararg else [])
            for f in cls.body if isinstance(f, ast.FunctionDef)}
    for name, params in stub.items():
        sig = inspect.signature(getattr(Calendar, name))
        want = ["self"] + [("*" if p.kind is p.VAR_POSITIONAL else "") + p.name
                           for p in sig.parameters.values() if p.name != "self"]
        assert params == want, name
    public = {n for n, v in vars(Calendar).items()
              if callable(v) and (not n.startswith("_") or n in ("__init__", "__len__"))}
    assert set(stub) == public
    fields = {a.target.id for a in cls.body if isinstance(a, ast.AnnAssign)}
    assert fields == {n for n in Calendar.__slots__ if not n.startswith("_")} == {"seq"}


def test_a_simulation_keeps_the_calendar_warming_its_current_nodes_and_links(EventCalendar,
                                                                             monkeypatch):
    """The driver tells the C calendar where its nodes and links are at the start and each time
    the link column grows (`Simulation._warm`): after a run with links opened, the calendar
    holds the run's `nodes` and its current `owner`, not the first one (reading a stale one
    would fetch the wrong nodes, and the run would only be slower). The results are the Python
    calendar's."""
    import sim.scheduler
    from sim.driver import Simulation
    from sim.scenario import SCENARIO_DIR, load_scenario

    scenario = load_scenario(SCENARIO_DIR / "small-20.toml", overrides={"stream.duration_s": 4.0})
    expected = Simulation(scenario).run().metrics.summary()
    monkeypatch.setattr(sim.scheduler, "EventCalendar", EventCalendar)
    s = Simulation(scenario)
    first_owner = s.owner
    assert type(s.sched._queue) is EventCalendar
    assert s.run().metrics.summary() == expected
    held = gc.get_referents(s.sched._queue)
    assert len(s.owner) > len(first_owner)
    assert any(x is s.owner for x in held) and not any(x is first_owner for x in held)
    assert any(x is s.nodes for x in held)
