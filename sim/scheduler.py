"""One simulated timeline: timed callbacks, run in (time, insertion order).

Determinism is the point (libsimulator: "the simulation has to have a single time-line to be
deterministic"): two events at the same instant run in the order they were scheduled, so the same
seed gives the same run. Each entry is a tuple ``(time, seq, fn, *args)`` — tuples compare and
allocate faster than lists, which matters at a million events — and ``seq`` is unique, so
entries never compare callbacks.

The timeline is a calendar of `BUCKET_S`-wide buckets (Brown's calendar queue, simplified):
entries of the bucket being run are a heap; entries of later buckets wait unsorted in a list per
bucket, and a bucket's list is heapified when the run reaches it. The order is exactly the one
heap's, since a bucket holds a span of time, but a pop sifts through the ~10³ entries of one
millisecond rather than the ~10⁵–10⁶ pending in a 100k-peer run, whose scattered tuples made
`heappop` the largest single cost of the run (3.4 µs a pop at 40k peers). The next `RING`
buckets' lists are a ring indexed by bucket number (nearly every event is due within a second);
later ones are in a dict, with a heap of their bucket numbers.

The calendar is an `EventCalendar` from the optional C module `sim._calendar` (built into the
compiled copy by `bench/build_compiled.sh`): the same structure, holding each event in a slot of
C numbers (its time, seq and numeric arguments) rather than a tuple of objects that would be cold
in memory when it comes up (see the module). Without it, `Calendar` is the structure in Python;
both pop in exactly the same order. Told where the nodes are (`warm`), the C calendar also starts
fetching from memory the node each coming event is for while the event before it runs: speed
only, 1.2× at 100k peers (the Python one has nothing to gain by it and ignores it). `at` returns
``(time, seq)`` as the event's handle.

The calendar numbers the events itself (``seq``), so that it can also keep the driver's node
wakes (`Scheduler.wakes`): one live wake per node, at its first deadline. Most wakes, when they
come up, have nothing to do (the node's deadline moved later meanwhile, or a wake set since for
an earlier one made it stale); the calendar sets those again or drops them itself, numbered as
the driver did it, and hands out only the wakes with something due.

Cancelling records the event's ``seq`` as a tombstone in O(1); the entry is discarded when it
comes up, and the loop only looks the tombstones up when there are any. A handle cancelled after
it ran (legal, and common for timers) leaves a stale tombstone; stale ones are purged, amortised
O(1), each time the tombstones double in number. The hot loop binds what it can to locals: it is
the inner loop of a 100k-peer run.
"""

from __future__ import annotations

import math
from heapq import heapify, heappop, heappush
from itertools import chain
from typing import Any, Callable, Final

__all__ = ["Scheduler", "Handle", "PROGRESS_EVERY", "BUCKET_S", "RING", "Calendar", "EventCalendar"]

Entry = tuple
"""An event as the calendar gives it back: (time, seq, fn, *args)."""
Handle = tuple
"""What `Scheduler.at` returns, for `cancel`: (time, seq)."""

# How many events run between two progress callbacks: rare enough to cost nothing per event.
PROGRESS_EVERY: Final = 8192

BUCKET_S: Final = 0.001
"""Calendar bucket width: a 100k-peer run has ~1,400 events per simulated millisecond."""
_PER_S: Final = 1.0 / BUCKET_S
RING: Final = 1024
"""Buckets held in the ring (a power of two): those of the next ~1 s."""
_NEVER: Final = 1 << 62
"""The bucket of events at infinity (or beyond any run): the last."""


class Calendar:
    """Entries ``(time, seq, fn, *args)`` in (time, seq) order, as a calendar: `per_s` buckets
    a second, the next `ring` of them in a ring (see the module). The interface and order of the
    C module's `EventCalendar`, which replaces it when built."""

    __slots__ = ("_per_s", "_ring_size", "_heap", "_bucket", "_ring", "_in_ring", "_later",
                 "_pending", "seq", "_wake", "_armed", "_due")

    def __init__(self, per_s: float, ring: int) -> None:
        if not per_s > 0 or ring < 1 or ring & (ring - 1):
            raise ValueError("per_s must be positive and ring a power of two")
        self._per_s = per_s
        self._ring_size = ring
        self._heap: list[Entry] = []
        """The entries of bucket `_bucket` and earlier: a heap (`heapq`)."""
        self._bucket = -1
        self._ring: list[list[Entry] | None] = [None] * ring
        """Bucket b's entries, unsorted, at b % ring, for `_bucket` < b < `_bucket` + ring (a
        list index, where a dict needs the bucket number as a Python int and a lookup)."""
        self._in_ring = 0
        """Entries in `_ring`."""
        self._later: dict[int, list[Entry]] = {}
        """Bucket → its entries, unsorted, for buckets `ring` or more after the current one
        when put (the ring may since have reached them and hold entries of theirs too)."""
        self._pending: list[int] = []
        """The buckets in `_later` (a heap)."""
        self.seq = 0
        """The last event's sequence number (the first is 1)."""
        self._wake: Callable[..., Any] | None = None
        self._armed: list[float] = []
        self._due: list[float] = []

    def push(self, time: float, fn: Callable[..., Any], *args: Any) -> None:
        """Add the event ``fn(*args)`` at `time`, numbered one more than the last (`seq`)."""
        if time != time:
            raise ValueError("an event's time is NaN")
        self.seq += 1
        self._put((time, self.seq, fn, *args))

    def _put(self, entry: Entry) -> None:
        time = entry[0]
        # The bucket: monotone in time, so the calendar keeps one heap's order.
        b = int(time * self._per_s) if time < 1e15 else _NEVER
        current = self._bucket
        if b <= current:
            heappush(self._heap, entry)
            return
        if b - current < self._ring_size:
            ring, i = self._ring, b & (self._ring_size - 1)
            slot = ring[i]
            if slot is None:
                ring[i] = [entry]
            else:
                slot.append(entry)
            self._in_ring += 1
            return
        later = self._later.get(b)
        if later is None:
            self._later[b] = [entry]
            heappush(self._pending, b)
        else:
            later.append(entry)

    def _advance(self) -> bool:
        """The current bucket is empty: make the next non-empty one current (False: none)."""
        pending, current = self._pending, self._bucket
        if self._in_ring:
            ring, mask = self._ring, self._ring_size - 1
            b = current + 1
            while ring[b & mask] is None:  # (within `ring` steps: the ring holds one)
                b += 1
            if pending and pending[0] <= b:
                # A bucket in `_later` comes first, or is the same one: a bucket put there may
                # since have come within the ring's reach and got entries there too.
                first = heappop(pending)
                self._take(self._later.pop(first))
                if first < b:
                    self._bucket = first
                    return True
            entries = ring[b & mask]
            assert entries is not None
            ring[b & mask] = None
            self._in_ring -= len(entries)
            self._take(entries)
            self._bucket = b
            return True
        if not pending:
            return False
        b = heappop(pending)
        self._take(self._later.pop(b))
        self._bucket = b
        return True

    def _take(self, entries: list[Entry]) -> None:
        heap = self._heap
        heap.extend(entries)
        heapify(heap)

    def first(self) -> Entry | None:
        """The first event (None: nothing pending)."""
        heap = self._heap
        while not heap:
            if not self._advance():
                return None
        return heap[0]

    def pop(self) -> Entry:
        """Remove and return the first event (wakes with nothing to do are dealt with first)."""
        entry = self.pop_until(math.inf)
        if entry is None:
            raise IndexError("pop from an empty Calendar")
        return entry

    def pop_until(self, until: float) -> Entry | None:
        """Remove and return the first event if its time is at most `until`, else None."""
        while True:
            first = self.first()
            if first is None or first[0] > until:
                return None
            if first[2] is not self._wake or len(first) != 5:
                return heappop(self._heap)
            # A node's wake (see `wakes`).
            _, _, _, i, when = first
            armed, due, now = self._armed, self._due, first[0]
            if armed[i] == when and not due[i] > now:
                armed[i] = math.inf  # something is due: handed out, and spent
                return heappop(self._heap)
            heappop(self._heap)
            if armed[i] == when:  # the deadline moved later: wake the node then
                armed[i] = math.inf
                if due[i] < math.inf:
                    self._push_wake(i, due[i], now)

    # -- node wakes (the C module's comment says what they are for) --

    def wakes(self, nodes: int, fn: Callable[[int, float], Any]) -> None:
        """Handle the wakes ``fn(i, when)`` of nodes 0 .. `nodes` - 1: no node's wake comes out
        of `pop` or `pop_until` unless it has something due (its deadline has come)."""
        if nodes < 0 or self._wake is not None:
            raise ValueError("wakes are set once, for a count of nodes >= 0")
        self._wake = fn
        self._armed = [math.inf] * nodes
        self._due = [math.inf] * nodes

    def arm(self, i: int, t: float, now: float) -> None:
        """Node i's first deadline is `t` (inf: none): wake it then, unless a wake is set no
        later (one set later comes up, finds nothing due, and is set again for `t`)."""
        if t != t:
            raise ValueError("a deadline is NaN")
        self._due[i] = t
        if t < self._armed[i]:
            self._push_wake(i, t, now)

    def disarm(self, i: int) -> None:
        """Node i is gone: no wake of it runs, and none is set."""
        self._armed[i] = math.nan

    def revive(self, i: int) -> None:
        """Node i starts anew, with no wake set."""
        self._armed[i] = self._due[i] = math.inf

    def _push_wake(self, i: int, t: float, now: float) -> None:
        self.seq += 1
        self._put((max(t, now), self.seq, self._wake, i, t))
        self._armed[i] = t

    def warm(self, nodes: list[Any], owner: Any, size: int, *fns: Callable[..., Any]) -> None:
        """Where the nodes are, for the C calendar to fetch ahead the node of each coming event
        (its `warm`); nothing to do here, where no event's order or result depends on it."""

    def entries(self) -> list[Entry]:
        """The events held, in no order."""
        waiting = [e for e in self._ring if e is not None] + list(self._later.values())
        return list(chain(self._heap, *waiting))

    def __len__(self) -> int:
        return len(self._heap) + self._in_ring + sum(len(v) for v in self._later.values())


try:
    from sim._calendar import EventCalendar
except ImportError:  # not built: the pure-Python calendar, same order
    EventCalendar = Calendar  # type: ignore[misc,assignment]


class Scheduler:
    """A discrete-event loop on a virtual clock (seconds, plain floats)."""

    __slots__ = ("now", "_queue", "_push", "_arm", "_stopped", "_cancelled", "_purge_at")

    def __init__(self, now: float = 0.0, *, calendar: Callable[[float, int], Any] | None = None) -> None:
        """`calendar`: the timeline's type (default `EventCalendar`, the C one if built)."""
        self.now = float(now)
        self._queue: Any = (EventCalendar if calendar is None else calendar)(_PER_S, RING)
        """The pending entries (`EventCalendar` or `Calendar`)."""
        self._push: Callable[..., None] = self._queue.push
        """(Its `push`, looked up once: compiled, `self._queue.push(...)` looks it up each call.)"""
        self._arm: Callable[[int, float, float], None] = self._queue.arm
        self._cancelled: dict[int, float] = {}  # seq -> time, tombstones
        self._purge_at = 1024
        self._stopped = False

    def at(self, time: float, fn: Callable[..., Any], *args: Any) -> Handle:
        """Run ``fn(*args)`` at absolute virtual ``time``; return a handle for `cancel`."""
        self._check(time)
        self._push(time, fn, *args)
        return (time, self._queue.seq)

    def at2(self, time: float, fn: Callable[[Any, Any], Any], a: Any, b: Any) -> None:
        """`at(time, fn, a, b)`, without a handle, nor a tuple of the arguments: the driver's
        frequent events take two or four arguments, and are never cancelled."""
        self._check(time)
        self._push(time, fn, a, b)

    def at4(self, time: float, fn: Callable[[Any, Any, Any, Any], Any], a: Any, b: Any, c: Any,
            d: Any) -> None:
        """`at(time, fn, a, b, c, d)`, without a handle (see `at2`)."""
        self._check(time)
        self._push(time, fn, a, b, c, d)

    # Node wakes: one per node, dealt with by the calendar unless something is due (see
    # `Calendar.wakes`).

    def wakes(self, nodes: int, fn: Callable[[int, float], Any]) -> None:
        """`fn(i, when)` runs when node i's deadline `when` (as last given to `arm`) has come."""
        self._queue.wakes(nodes, fn)

    def arm(self, i: int, t: float) -> None:
        """Node i's first deadline is now `t` (inf: none)."""
        self._arm(i, t, self.now)

    def disarm(self, i: int) -> None:
        """Node i is gone: none of its wakes runs."""
        self._queue.disarm(i)

    def revive(self, i: int) -> None:
        """Node i starts anew, with no wake set."""
        self._queue.revive(i)

    def warm(self, nodes: list[Any], owner: Any, size: int, *by_link: Callable[..., Any]) -> None:
        """Speed only: the node objects (`size` bytes each) that wakes (``nodes[i]``) and the
        events of `by_link` (``nodes[owner[link]]``, `owner` an int32 buffer) are for, so that
        the C calendar starts fetching each coming event's node from memory ahead of it. Tell it
        again whenever `owner` is replaced."""
        self._queue.warm(nodes, owner, size, *by_link)

    def after(self, delay: float, fn: Callable[..., Any], *args: Any) -> Handle:
        """Run ``fn(*args)`` ``delay`` seconds from now."""
        if not delay >= 0:
            raise ValueError(f"negative delay: {delay}")
        return self.at(self.now + delay, fn, *args)

    def _check(self, time: float) -> None:
        """Refuse an event at `time` in the past."""
        if not time >= self.now:  # also refuses NaN
            raise ValueError(f"cannot schedule in the past: {time} < now {self.now}")

    def cancel(self, handle: Handle) -> None:
        """Cancel a scheduled callback (no-op if it already ran or was cancelled)."""
        time, seq = handle[0], handle[1]
        if time < self.now:
            return  # already ran
        cancelled = self._cancelled
        cancelled[seq] = time
        if len(cancelled) > self._purge_at:
            # Tombstones of events that already ran can never match again; mutate in place,
            # since a running `run` holds a reference to this dict. Entries at `now` may also
            # wait in a later bucket (after `run(until)` moved the clock past the heap's), so
            # every pending entry is looked at, as with one heap.
            now = self.now
            pending_now = {e[1] for e in self._queue.entries() if e[0] == now}
            for s, t in list(cancelled.items()):
                if t < now or (t == now and s not in pending_now):
                    del cancelled[s]
            self._purge_at = max(1024, 2 * len(cancelled))

    def stop(self) -> None:
        """Make the running `run` return after the current event."""
        self._stopped = True

    def next_time(self) -> float | None:
        """Time of the next event not cancelled, or None when nothing is pending (a node's wake
        there may yet turn out to have nothing to do: see `wakes`)."""
        queue, cancelled = self._queue, self._cancelled
        first = queue.first()
        while first is not None and first[1] in cancelled:
            del cancelled[queue.pop()[1]]
            first = queue.first()
        return None if first is None else first[0]

    def __len__(self) -> int:
        """Number of pending entries, tombstones and node wakes with nothing to do included
        (an upper bound on pending events)."""
        return len(self._queue)

    def run(
        self,
        until: float = float("inf"),
        *,
        progress: Callable[[float, int], Any] | None = None,
    ) -> int:
        """Run events with time <= ``until``; return how many ran (tombstones excluded).

        On return ``now`` is ``until`` (if finite and not stopped early), so a later ``run``
        continues from there. ``progress(now, events_so_far)`` is called every `PROGRESS_EVERY`
        events and once at the end.
        """
        cancelled = self._cancelled
        # (Looked up once, and `until` boxed once: compiled, each would be done every event.)
        pop_until: Callable[[object], Entry | None] = self._queue.pop_until
        until_obj: object = until
        count = 0
        self._stopped = False
        # One loop for both cases: without a callback the report threshold is never reached.
        next_report = PROGRESS_EVERY if progress is not None else -1
        while True:
            entry: Entry | None = pop_until(until_obj)  # (typed: a compiled build indexes it
            if entry is None:                                 # as a tuple, not through Python)
                break  # the next event is after `until`, or there is none
            if cancelled and entry[1] in cancelled:
                del cancelled[entry[1]]
                continue
            self.now = entry[0]
            # The driver's frequent events take 2, 3 or 4 arguments: passed from the entry
            # directly, a call builds no argument tuple (`entry[3:]` is a copy of the entry).
            fn, n = entry[2], len(entry)
            if n == 5:
                fn(entry[3], entry[4])
            elif n == 7:
                fn(entry[3], entry[4], entry[5], entry[6])
            elif n == 6:
                fn(entry[3], entry[4], entry[5])
            else:
                fn(*entry[3:])
            count += 1
            if count == next_report and progress is not None:
                next_report += PROGRESS_EVERY
                progress(self.now, count)
            if self._stopped:
                break
        if not self._stopped and until != float("inf") and until > self.now:
            self.now = until
        if progress is not None:
            progress(self.now, count)
        return count
