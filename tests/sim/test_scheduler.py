"""The scheduler's ordering, cancellation and run semantics; the progress line."""

import io
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.progress import MultiProgress, Progress
from sim.scheduler import BUCKET_S, PROGRESS_EVERY, RING, Scheduler


@given(st.lists(
    st.floats(min_value=0, max_value=1e6, allow_nan=False) | st.integers(0, 3).map(float),
    max_size=200,
))  # the small integers force many ties
def test_events_run_in_time_then_insertion_order(times):
    s = Scheduler()
    ran = []
    for i, t in enumerate(times):
        s.at(t, ran.append, (t, i))
    assert s.run() == len(times)
    assert ran == sorted(ran)


@given(
    st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=100),
    st.data(),
)
def test_cancelled_events_never_run(times, data):
    s = Scheduler()
    ran = []
    handles = [s.at(t, ran.append, i) for i, t in enumerate(times)]
    cancel = data.draw(st.sets(st.integers(0, len(times) - 1)))
    for i in cancel:
        s.cancel(handles[i])
    assert s.run() == len(times) - len(cancel)
    assert sorted(ran) == [i for i in range(len(times)) if i not in cancel]


# Delays an event's callback schedules more events at: 0 (a tie at `now`), within a calendar
# bucket, across one, at the ring's far end and just beyond it, far ahead, and at infinity.
_DELAYS = [0.0, BUCKET_S / 3, BUCKET_S, 2.5 * BUCKET_S, 0.0371, (RING - 1.5) * BUCKET_S,
           (RING + 0.5) * BUCKET_S, 7.0, math.inf]


@given(
    st.lists(st.floats(min_value=0, max_value=0.05, allow_nan=False) | st.sampled_from(
        [0.0, BUCKET_S, 2 * BUCKET_S]), min_size=1, max_size=60),
    st.lists(st.lists(st.sampled_from(_DELAYS), max_size=3), max_size=60),
    st.lists(st.floats(min_value=0, max_value=0.2, allow_nan=False), max_size=4),
    st.sets(st.integers(0, 200), max_size=20),
)
def test_the_calendar_runs_exactly_the_order_of_one_heap(times, spawns, untils, cancel):
    """Events scheduled before and during a run, across calendar buckets, run in run(until)
    segments with some cancelled, come out exactly as from one (time, seq) heap."""
    s = Scheduler()
    live: list[tuple[float, int]] = []  # (time, seq) of every event not cancelled
    ran: list[tuple[float, int]] = []
    made = [0]
    handles = []

    def schedule(t):
        made[0] += 1
        n = made[0]
        handles.append(s.at(t, event, n))
        if n - 1 in cancel:
            s.cancel(handles[-1])
        else:
            live.append((t, n))

    def event(n):
        ran.append((s.now, n))
        for d in (spawns[n % len(spawns)] if spawns else ()):
            if made[0] < 200:
                schedule(s.now + d)

    for t in times:
        schedule(t)
    for until in sorted(untils) + [math.inf]:
        s.run(until=until)
    assert ran == sorted(live)


def test_callbacks_see_their_time_and_can_schedule():
    s = Scheduler(now=5.0)
    log = []

    def tick(n):
        log.append((s.now, n))
        if n < 3:
            s.after(0.5, tick, n + 1)

    s.after(1.0, tick, 0)
    assert s.run() == 4
    assert log == [(6.0, 0), (6.5, 1), (7.0, 2), (7.5, 3)]


def test_run_until_stops_and_resumes():
    s = Scheduler()
    ran = []
    for t in (1.0, 2.0, 3.0):
        s.at(t, ran.append, t)
    assert s.run(until=2.0) == 2
    assert s.now == 2.0 and ran == [1.0, 2.0]
    assert s.next_time() == 3.0
    assert s.run(until=10.0) == 1
    assert s.now == 10.0 and s.next_time() is None


def test_stop_returns_after_current_event():
    s = Scheduler()
    s.at(1.0, s.stop)
    s.at(2.0, lambda: None)
    assert s.run() == 1 and s.now == 1.0
    assert s.run() == 1


def test_past_and_negative_are_errors():
    s = Scheduler(now=1.0)
    with pytest.raises(ValueError):
        s.at(0.5, print)
    with pytest.raises(ValueError):
        s.after(-1, print)


def test_at2_and_at4_are_at_with_two_and_four_arguments():
    """The driver's short forms run their events as `at` does, in its order (one sequence
    number each), and refuse the past as it does; they return no handle."""
    ran: list[tuple[float, tuple]] = []

    def record(*args):
        ran.append((args[0], args))

    def schedule(s: Scheduler, short: bool) -> None:
        for i, t in enumerate([0.3, 0.1, 0.3, 2.5, 0.1, 0.0]):
            if i % 2:
                h = s.at2(t, record, t, i) if short else s.at(t, record, t, i)
            else:
                h = (s.at4(t, record, t, i, "c", None) if short
                     else s.at(t, record, t, i, "c", None))
            assert h == (None if short else (t, i + 1))  # `at`'s handle: (time, seq)
        s.cancel(s.at(0.3, record, 0.3, 6))  # (seq 7, never runs)

    plain, short = Scheduler(), Scheduler()
    schedule(plain, False)
    schedule(short, True)
    plain.at(0.3, record, 0.3, 7)
    short.at(0.3, record, 0.3, 7)
    plain.run()
    by_at, ran[:] = list(ran), []
    short.run()
    assert ran == by_at and [a[1] for _, a in ran] == [5, 1, 4, 0, 2, 7, 3]
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError):
            short.at2(bad, record, 1, 2)
        with pytest.raises(ValueError):
            short.at4(bad, record, 1, 2, 3, 4)


def test_cancel_after_run_is_harmless_and_tombstones_are_purged():
    s = Scheduler()
    handles = [s.at(0.0, lambda: None) for _ in range(5000)]
    s.run(until=0.0)
    for h in handles:  # all already ran, at t == now
        s.cancel(h)
    assert len(s._cancelled) <= 1024
    ran = []
    s.at(0.0, ran.append, 1)
    s.run()
    assert ran == [1]


def test_progress_called_periodically_and_at_end():
    s = Scheduler()
    for i in range(PROGRESS_EVERY * 2 + 5):
        s.at(i * 1e-3, lambda: None)
    calls = []
    n = s.run(until=100.0, progress=lambda now, ev: calls.append((now, ev)))
    assert calls == [
        (pytest.approx((PROGRESS_EVERY - 1) * 1e-3), PROGRESS_EVERY),
        (pytest.approx((2 * PROGRESS_EVERY - 1) * 1e-3), 2 * PROGRESS_EVERY),
        (100.0, n),
    ]


def test_progress_log_lines_every_tenth_when_not_a_tty():
    out, wall = io.StringIO(), [0.0]
    p = Progress(100.0, stream=out, tty=False, clock=lambda: wall[0])
    for t in range(0, 101):
        wall[0] += 1.0
        p(float(t), t * 1000)
    lines = out.getvalue().splitlines()
    assert [line.split("|")[0].split()[-1] for line in lines] == [f"{k}0%" for k in range(1, 11)]
    assert "100,000 events" in lines[-1]
    # The rest is estimated at the pace so far: 10 % took 11 s of wall time, 50 % took 51 s.
    assert lines[0].endswith("~1 min 39 s left") and lines[4].endswith("~51 s left")
    assert "left" not in lines[-1]


def test_multi_progress_shows_each_run_and_the_time_left_of_all():
    out, wall = io.StringIO(), [0.0]
    p = MultiProgress({"tree": 10.0, "mesh": 30.0}, stream=out, tty=False, clock=lambda: wall[0])
    wall[0] = 4.0
    p.update("tree", 10.0, 500)  # a quarter of all the simulated time
    wall[0] = 8.0
    p.update("mesh", 10.0, 700)  # half
    wall[0] = 16.0
    p.update("mesh", 30.0, 2000)  # all
    p.update("mesh", 30.0, 2000)  # a late report: the final line is not repeated
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("tree 100% · mesh 0% | 500 events")
    assert lines[0].endswith("~12 s left")
    assert lines[1].startswith("tree 100% · mesh 33% | 1,200 events")
    assert lines[1].endswith("~8 s left")
    assert lines[2].startswith("tree 100% · mesh 100% | 2,500 events") and "left" not in lines[2]


def test_progress_tty_redraws_in_place_at_most_max_hz():
    out, wall = io.StringIO(), [0.0]
    p = Progress(10.0, stream=out, tty=True, clock=lambda: wall[0], max_hz=5)
    for i in range(100):
        wall[0] += 0.01  # 1 s of wall time in total → at most ~5 redraws
        p(i * 0.05, i)
    p.close()
    text = out.getvalue()
    assert "\n" == text[-1] and text.count("\r") <= 6 and text.count("\n") == 1


def test_cancelled_events_at_now_in_a_later_bucket_stay_cancelled_through_a_purge():
    """After run(until) moves the clock past the bucket being run, events scheduled at `now`
    wait in a later bucket; purging tombstones (here, > 1024 of them) must keep theirs."""
    s = Scheduler()
    s.at(0.0, lambda: None)
    s.run(until=5.0)
    ran = []
    for i in range(1100):
        s.cancel(s.at(5.0, ran.append, i))
    s.run()
    assert ran == []
