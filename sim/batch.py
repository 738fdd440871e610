"""Run several simulations side by side, one worker process each, behind one progress line.

`meshcast sim compare` (a run per strategy) and `meshcast sim run --seeds` (a run per seed) are
independent runs of a deterministic simulator, so on a multi-core machine they run in parallel,
up to `jobs` at once, with the same results as one after another. Each worker writes its own
output files and sends back a `Digest` (plain data), not its whole run.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from sim.driver import run_scenario
from sim.metrics import Digest
from sim.progress import MultiProgress, Progress
from sim.scenario import Scenario

__all__ = ["Outcome", "default_jobs", "run_all"]

_REPORT_S = 0.2
"""A worker reports its progress at most this often (the parent redraws at 5 Hz anyway)."""


@dataclass(frozen=True)
class Outcome:
    """One finished run: its digest (for plots), and its `RunResult.summary()` (metrics plus
    the run's event count and wall time)."""

    digest: Digest
    summary: dict[str, Any]


def default_jobs() -> int:
    """Worker processes to use: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_all(scenarios: Mapping[str, Scenario], *, jobs: int = 1,
            out: Mapping[str, Path] | None = None, plots: bool = True, quiet: bool = False,
            stream: TextIO | None = None) -> dict[str, Outcome]:
    """Run each labelled scenario; with `out`, write each run's files into ``out[label]``.

    `jobs` > 1 runs them in that many worker processes; results do not depend on it.
    """
    out = out or {}
    stream = stream if stream is not None else sys.stderr
    workers = min(jobs, len(scenarios))
    if workers <= 1:
        results = {}
        for label, sc in scenarios.items():
            progress = None if quiet else Progress(sc.stream.duration_s, stream=stream)
            try:
                results[label] = _run(sc, out.get(label), plots, progress)
            finally:
                if progress is not None:
                    progress.close()
        return results
    board = None if quiet else MultiProgress(
        {label: sc.stream.duration_s for label, sc in scenarios.items()}, stream=stream)
    try:
        return _in_workers(scenarios, workers, out, plots, board)
    finally:
        if board is not None:
            board.close()


def _in_workers(scenarios: Mapping[str, Scenario], workers: int, out: Mapping[str, Path],
                plots: bool, board: MultiProgress | None) -> dict[str, Outcome]:
    """A process per run, `workers` at a time ("spawn": fresh interpreters, none of this
    process's state). They report on one queue; a failed run, or Ctrl-C, stops them all."""
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    todo = list(scenarios.items())
    running: dict[str, Any] = {}
    results: dict[str, Outcome] = {}
    # SIGTERM too must go through `finally` below, or the workers would run on as orphans.
    on_term = signal.signal(signal.SIGTERM, _terminated)
    try:
        while todo or running:
            while todo and len(running) < workers:
                label, sc = todo.pop(0)
                proc = ctx.Process(target=_work, args=(reports, label, sc, out.get(label), plots),
                                   name=f"meshcast-sim {label}", daemon=True)
                proc.start()
                running[label] = proc
            try:
                kind, label, *rest = reports.get(timeout=1.0)
            except queue_mod.Empty:
                for label, proc in running.items():
                    if not proc.is_alive():  # killed (out of memory?) before it could report
                        raise RuntimeError(f"simulation {label!r} died: exit code {proc.exitcode}")
                continue
            if kind == "progress":
                if board is not None:
                    board.update(label, *rest)
                continue
            running.pop(label).join()
            if kind == "error":
                raise RuntimeError(f"simulation {label!r} failed:\n{rest[0]}")
            results[label] = rest[0]
            if board is not None:
                board.update(label, scenarios[label].stream.duration_s, rest[0].summary["events"])
    finally:
        signal.signal(signal.SIGTERM, on_term)
        for proc in running.values():
            proc.terminate()
            proc.join()
    return {label: results[label] for label in scenarios}


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run(scenario: Scenario, out_dir: Path | None, plots: bool,
         progress: Callable[[float, int], Any] | None) -> Outcome:
    result = run_scenario(scenario, progress=progress)
    if out_dir is not None:
        result.metrics.write(out_dir, plots=plots)
    return Outcome(result.metrics.digest(), result.summary())


def _work(reports: Any, label: str, scenario: Scenario, out_dir: Path | None,
          plots: bool) -> None:
    """A worker: run one scenario, reporting progress, then the outcome (or the error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    last = [0.0]

    def report(sim_now: float, events: int) -> None:
        t = time.monotonic()
        if t - last[0] >= _REPORT_S:
            last[0] = t
            reports.put(("progress", label, sim_now, events))

    try:
        outcome = _run(scenario, out_dir, plots, report)
    except BaseException:
        reports.put(("error", label, traceback.format_exc()))
    else:
        reports.put(("done", label, outcome))
