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

The current bucket's heap is an `EventHeap` from the optional C module `sim._eventheap` (built
into the compiled copy by `bench/build_compiled.sh`), which keeps each entry's (time, seq) as C
numbers: `heapq` compares tuples through Python's rich comparison, an eighth of a compiled run.
Without it, `ListHeap` does the same with `heapq`; both pop in exactly the same order.

Cancelling records the entry's ``seq`` as a tombstone in O(1); the entry is discarded when it
comes up, and the loop only looks the tombstones up when there are any. A handle cancelled after
it ran (legal, and common for timers) leaves a stale tombstone; stale ones are purged, amortised
O(1), each time the tombstones double in number. The hot loop binds what it can to locals: it is
the inner loop of a 100k-peer run.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from itertools import chain
from typing import Any, Callable, Final

__all__ = ["Scheduler", "Handle", "PROGRESS_EVERY", "BUCKET_S", "RING", "ListHeap", "EventHeap"]

# An entry of the heap, returned as the cancellation handle: (time, seq, fn, *args) — flat, so
# a pending event is one tuple, not two (~170 bytes less per simulated peer).
Handle = tuple

# How many events run between two progress callbacks: rare enough to cost nothing per event.
PROGRESS_EVERY: Final = 8192

BUCKET_S: Final = 0.001
"""Calendar bucket width: a 100k-peer run has ~1,400 events per simulated millisecond."""
_PER_S: Final = 1.0 / BUCKET_S
RING: Final = 1024
"""Buckets held in the ring (a power of two): those of the next ~1 s."""
_NEVER: Final = 1 << 62
"""The bucket of events at infinity (or beyond any run): the last."""


class ListHeap:
    """Entries ``(time, seq, fn, *args)`` ordered by (time, seq): a list and `heapq`. The
    interface of the C module's `EventHeap`, which replaces it when built."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[Handle] = []

    def push(self, entry: Handle) -> None:
        heappush(self._items, entry)

    def pop(self) -> Handle:
        return heappop(self._items)

    def first(self) -> Handle | None:
        items = self._items
        return items[0] if items else None

    def pop_until(self, until: float) -> Handle | None:
        """Remove and return the first entry if its time is at most `until`, else None."""
        items = self._items
        return heappop(items) if items and items[0][0] <= until else None

    def extend(self, entries: list[Handle]) -> None:
        items = self._items
        items.extend(entries)
        heapify(items)

    def entries(self) -> list[Handle]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


try:
    from sim._eventheap import EventHeap
except ImportError:  # not built: the pure-Python heap, same order
    EventHeap = ListHeap  # type: ignore[misc,assignment]


class Scheduler:
    """A discrete-event loop on a virtual clock (seconds, plain floats)."""

    __slots__ = ("now", "_heap", "_push", "_bucket", "_ring", "_in_ring", "_later", "_pending",
                 "_seq", "_stopped", "_cancelled", "_purge_at")

    def __init__(self, now: float = 0.0, *, heap: Callable[[], Any] | None = None) -> None:
        """`heap`: the current bucket's heap type (default `EventHeap`, the C one if built)."""
        self.now = float(now)
        self._heap: Any = EventHeap() if heap is None else heap()
        """The entries of bucket `_bucket` and earlier (`EventHeap` or `ListHeap`)."""
        self._push: Callable[[Handle], None] = self._heap.push
        """(Its `push`, looked up once: compiled, `self._heap.push(...)` looks it up each call.)"""
        self._bucket = -1
        self._ring: list[list[Handle] | None] = [None] * RING
        """Bucket b's entries, unsorted, at b % RING, for `_bucket` < b < `_bucket` + RING (a
        list index, where a dict needs the bucket number as a Python int and a lookup)."""
        self._in_ring = 0
        """Entries in `_ring`."""
        self._later: dict[int, list[Handle]] = {}
        """Bucket → its entries, unsorted, for buckets RING or more after the current one when
        put (the ring may since have reached them and hold entries of theirs too)."""
        self._pending: list[int] = []
        """The buckets in `_later` (a heap)."""
        self._cancelled: dict[int, float] = {}  # seq -> time, tombstones
        self._purge_at = 1024
        self._seq = 0
        self._stopped = False

    def at(self, time: float, fn: Callable[..., Any], *args: Any) -> Handle:
        """Run ``fn(*args)`` at absolute virtual ``time``; return a handle for `cancel`."""
        entry = (time, self._next_seq(time), fn) + args
        self._put(entry, time)
        return entry

    def at2(self, time: float, fn: Callable[[Any, Any], Any], a: Any, b: Any) -> Handle:
        """`at(time, fn, a, b)`, building one tuple (`at` builds three: its arguments', the
        head's and their sum); the driver's frequent events take two or four arguments."""
        entry: Handle = (time, self._next_seq(time), fn, a, b)  # (typed: boxed once, not at
        self._put(entry, time)                                  # each use)
        return entry

    def at4(self, time: float, fn: Callable[[Any, Any, Any, Any], Any], a: Any, b: Any, c: Any,
            d: Any) -> Handle:
        """`at(time, fn, a, b, c, d)`, building one tuple (see `at2`)."""
        entry: Handle = (time, self._next_seq(time), fn, a, b, c, d)
        self._put(entry, time)
        return entry

    def after(self, delay: float, fn: Callable[..., Any], *args: Any) -> Handle:
        """Run ``fn(*args)`` ``delay`` seconds from now."""
        if not delay >= 0:
            raise ValueError(f"negative delay: {delay}")
        return self.at(self.now + delay, fn, *args)

    def _next_seq(self, time: float) -> int:
        """The next entry's sequence number, for an event at `time` (not in the past)."""
        if not time >= self.now:  # also refuses NaN
            raise ValueError(f"cannot schedule in the past: {time} < now {self.now}")
        self._seq += 1
        return self._seq

    def _put(self, entry: Handle, time: float) -> None:
        # The bucket: monotone in time, so the calendar keeps one heap's order.
        b = int(time * _PER_S) if time < 1e15 else _NEVER
        current = self._bucket
        if b <= current:
            self._push(entry)
            return
        if b - current < RING:
            ring = self._ring
            slot = ring[b & (RING - 1)]
            if slot is None:
                ring[b & (RING - 1)] = [entry]
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
            ring = self._ring
            b = current + 1
            while ring[b & (RING - 1)] is None:  # (within RING steps: the ring holds one)
                b += 1
            if pending and pending[0] <= b:
                # A bucket in `_later` comes first, or is the same one: a bucket put there may
                # since have come within the ring's reach and got entries there too.
                first = heappop(pending)
                self._heap.extend(self._later.pop(first))
                if first < b:
                    self._bucket = first
                    return True
            entries = ring[b & (RING - 1)]
            assert entries is not None
            ring[b & (RING - 1)] = None
            self._in_ring -= len(entries)
            self._heap.extend(entries)
            self._bucket = b
            return True
        if not pending:
            return False
        b = heappop(pending)
        self._heap.extend(self._later.pop(b))
        self._bucket = b
        return True

    def _waiting(self) -> list[list[Handle]]:
        """The unsorted lists of the buckets after the current one."""
        return [e for e in self._ring if e is not None] + list(self._later.values())

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
            pending_now = {e[1] for e in chain(self._heap.entries(), *self._waiting())
                           if e[0] == now}
            for s, t in list(cancelled.items()):
                if t < now or (t == now and s not in pending_now):
                    del cancelled[s]
            self._purge_at = max(1024, 2 * len(cancelled))

    def stop(self) -> None:
        """Make the running `run` return after the current event."""
        self._stopped = True

    def next_time(self) -> float | None:
        """Time of the next live event, or None when nothing is pending."""
        heap, cancelled = self._heap, self._cancelled
        while True:
            first = heap.first()
            while first is not None and first[1] in cancelled:
                del cancelled[heap.pop()[1]]
                first = heap.first()
            if first is not None:
                return first[0]
            if not self._advance():
                return None

    def __len__(self) -> int:
        """Number of pending entries, tombstones included (an upper bound on pending events)."""
        return len(self._heap) + sum(len(v) for v in self._waiting())

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
        heap, cancelled = self._heap, self._cancelled
        # (Looked up once, and `until` boxed once: compiled, each would be done every event.)
        pop_until: Callable[[object], Handle | None] = heap.pop_until
        until_obj: object = until
        count = 0
        self._stopped = False
        # One loop for both cases: without a callback the report threshold is never reached.
        next_report = PROGRESS_EVERY if progress is not None else -1
        while True:
            entry: Handle | None = pop_until(until_obj)  # (typed: a compiled build indexes it
            if entry is None:                                 # as a tuple, not through Python)
                if heap.first() is not None or not self._advance():
                    break  # the next event is after `until`, or there is none
                continue
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
