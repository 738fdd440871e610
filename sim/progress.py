"""Show long simulations' progress on stderr: simulated time, events/s, wall time, and an
estimate of the wall time left; `MultiProgress` does it for several runs in parallel.

Pass a `Progress` as ``Scheduler.run(..., progress=...)``. It redraws at most ``max_hz`` times a
second: one ``\\r``-rewritten line on a terminal, or a plain line every ``log_step`` of the run
otherwise (CI logs stay short). The wall clock is injected so tests can drive it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Mapping, TextIO

__all__ = ["Progress", "MultiProgress"]


class Progress:
    """Callable ``progress(sim_now, events)`` for `sim.scheduler.Scheduler.run`."""

    __slots__ = (
        "total_s", "stream", "tty", "clock", "_min_gap", "_log_step",
        "_start", "_last_draw", "_logged", "_width", "_done",
    )

    def __init__(
        self,
        total_s: float,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_hz: float = 5.0,
        log_step: float = 0.1,
    ) -> None:
        self.total_s = total_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self._min_gap = 1.0 / max_hz
        self._log_step = log_step
        self._start = clock()
        self._last_draw = -float("inf")
        self._logged = 0
        self._width = 0
        self._done = False

    def __call__(self, sim_now: float, events: int) -> None:
        frac = min(1.0, sim_now / self.total_s) if self.total_s > 0 else 1.0
        self._show(f"sim {sim_now:8.1f}/{self.total_s:g} s {frac:4.0%}", frac, events,
                   sim_now >= self.total_s)

    def _show(self, head: str, frac: float, events: int, done: bool) -> None:
        """Draw `head` plus events, rate, wall time and time left (at most `max_hz`, or a
        line per `log_step` of the work when not a terminal; always when `done`)."""
        if self._done:
            return  # the final line is drawn once
        wall = self.clock()
        if wall - self._last_draw < self._min_gap and not done:
            return
        self._done = done
        if not self.tty:
            step = int(frac / self._log_step + 1e-9)  # epsilon: 0.3/0.1 is 2.9999…
            if step <= self._logged and not done:
                return
            self._logged = step
        self._last_draw = wall
        elapsed = wall - self._start
        rate = events / elapsed if elapsed > 0 else 0.0
        line = f"{head} | {events:,} events, {rate:,.0f}/s | wall {elapsed:.1f} s"
        if 0.0 < frac < 1.0:
            # At the average pace so far: a low guess while an audience still grows.
            line += f", ~{_duration(elapsed * (1.0 - frac) / frac)} left"
        if self.tty:
            pad = " " * max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write("\r" + line + pad)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the ``\\r`` line (call once the run is over)."""
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()


class MultiProgress(Progress):
    """One line for several runs at once (`sim.batch`): each run's share done, and the events,
    rate, wall time and time left of them all. Feed it with `update(label, sim_now, events)`."""

    __slots__ = ("_runs",)

    def __init__(self, totals: Mapping[str, float], **kwargs: Any) -> None:
        super().__init__(sum(totals.values()), **kwargs)
        self._runs = {label: [total, 0.0, 0] for label, total in totals.items()}
        """label → [its simulated duration, simulated time reached, events so far]"""

    def update(self, label: str, sim_now: float, events: int) -> None:
        run = self._runs[label]
        run[1], run[2] = min(sim_now, run[0]), events
        runs = self._runs.values()
        done = sum(r[1] for r in runs)
        frac = done / self.total_s if self.total_s > 0 else 1.0
        head = " · ".join(f"{label} {r[1] / r[0] if r[0] > 0 else 1.0:.0%}"
                          for label, r in self._runs.items())
        self._show(head, frac, int(sum(r[2] for r in runs)), done >= self.total_s)


def _duration(seconds: float) -> str:
    """A wall-time estimate to the precision it deserves: 42 s, 3 min 20 s, 1 h 05 min."""
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
