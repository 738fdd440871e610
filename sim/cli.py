"""`meshcast sim run|compare`: the simulator's command line (progress bar, summary table, files)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sim.batch import Outcome, default_jobs, run_all
from sim.build import is_compiled
from sim.scenario import SCENARIO_DIR, Scenario, ScenarioError, load_scenario, resource_index
from tracker.placement import STRATEGIES

BIG_RUN = 20_000
"""Audiences from which a run says that a compiled build exists (100k: ~40 min pure)."""
JSON_KEYS = ("peers", "rejected", "duration_s", "latency_ms", "continuity", "offload", "startup_ms",
             "seed_egress_kbps", "control_overhead", "max_depth", "tracker", "events", "wall_s")


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the `sim` command and its `run` / `compare` sub-commands to the meshcast CLI."""
    parser = subparsers.add_parser(
        "sim", help="run the discrete-event simulator on the real node code",
        description="Simulate a channel's audience on a virtual clock with the same tracker, "
                    f"seed and peer logic as the network runtime. Shipped scenarios: {SCENARIO_DIR}")
    sub = parser.add_subparsers(dest="sim_command", metavar="{run,compare}")
    parser.set_defaults(func=lambda args: parser.error("choose 'run' or 'compare'"))

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("scenario", help="scenario TOML file, or the name of a shipped one "
                                        "(e.g. steady-10k)")
        p.add_argument("--seed", type=int, help="override [run] seed")
        p.add_argument("--peers", type=int, help="override [peers] count")
        p.add_argument("--duration", type=float, help="override [stream] duration_s")
        p.add_argument("--out", metavar="DIR",
                       help="write metrics.json, peers.csv and PNG plots into DIR")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--jobs", type=int, default=default_jobs(),
                       help="worker processes for several runs (compare, --seeds); results do "
                            "not depend on it (default: the CPUs here, %(default)s)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       dest="settings",
                       help="override any scenario key, dotted, with a TOML value, e.g. "
                            "--set stream.chunk_ms=50 --set network.loss=0.01 (repeatable)")

    run = sub.add_parser("run", help="run one scenario",
                         description="Run one scenario; print a summary table (or JSON).")
    common(run)
    run.add_argument("--strategy", choices=sorted(STRATEGIES), help="override [run] strategy")
    run.add_argument("--seeds", metavar="LIST",
                     help="run once per seed, e.g. 1-5 or 1,3,7, side by side (JSON: an object "
                          "per seed; --out: a directory per seed plus side-by-side plots)")
    run.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    run.set_defaults(func=cmd_run)

    compare = sub.add_parser("compare", help="run one scenario under several strategies",
                             description="Run the same scenario and seed under each strategy "
                                         "and print them side by side.")
    common(compare)
    compare.add_argument("--strategies", default=",".join(STRATEGIES),
                         help="comma-separated (default: %(default)s)")
    compare.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    compare.set_defaults(func=cmd_compare)


def _resolve(name: str) -> Path:
    """A scenario file, or the name of a shipped one (a directory of that name is not a file)."""
    path = Path(name)
    if not path.is_file() and not path.suffix:
        shipped = Path(SCENARIO_DIR) / f"{name}.toml"
        if shipped.exists():
            return shipped
    return path


def _settings(pairs: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` pairs as dotted overrides (the value is parsed as TOML later)."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or not key or not value.strip():
            raise SystemExit(f"meshcast sim: --set {pair!r}: expected KEY=VALUE, "
                             f"e.g. stream.chunk_ms=50")
        out[key] = value.strip()
    return out


def _load(args: argparse.Namespace, strategy: str | None = None,
          seed: int | None = None) -> Scenario:
    overrides: dict[str, Any] = _settings(args.settings)
    seed = seed if seed is not None else args.seed
    if seed is not None:
        overrides["run.seed"] = seed
    if args.peers is not None:
        overrides["peers.count"] = args.peers
    if args.duration is not None:
        overrides["stream.duration_s"] = args.duration
    if strategy:
        overrides["run.strategy"] = strategy
    path = _resolve(args.scenario)
    if not path.is_file():
        raise SystemExit(f"meshcast sim: no scenario file {args.scenario!r} "
                         f"(shipped ones are in {SCENARIO_DIR})")
    try:
        return load_scenario(path, overrides=overrides)
    except ScenarioError as exc:
        raise SystemExit(f"meshcast sim: {path}: {exc}") from None


def _simulate(args: argparse.Namespace, scenarios: dict[str, Scenario],
              out: dict[str, Path] | None = None, plots: bool = True) -> dict[str, Outcome]:
    """Run the labelled scenarios (in parallel up to --jobs), with a header line for each."""
    if args.jobs < 1:
        raise SystemExit(f"meshcast sim: --jobs {args.jobs}: expected at least 1")
    if not args.quiet:
        for label, sc in scenarios.items():
            print(f"{label}: {sc.name or 'scenario'}, {sc.peers.count} peers, "
                  f"{sc.stream.duration_s:g} s, strategy {sc.run.strategy}, seed {sc.run.seed}, "
                  f"resource index {resource_index(sc):.2f}", file=sys.stderr)
        if max(sc.peers.count for sc in scenarios.values()) >= BIG_RUN and not is_compiled():
            print("note: this is the pure-Python build; the compiled one runs 1.6-2 times as "
                  "fast with identical results (README, 'For long runs')", file=sys.stderr)
    return run_all(scenarios, jobs=args.jobs, out=out, plots=plots, quiet=args.quiet)


def _seeds(text: str) -> list[int]:
    """`--seeds 1,2,5-8` → [1, 2, 5, 6, 7, 8]."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            seeds.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
        except ValueError:
            raise SystemExit(f"meshcast sim: --seeds {text!r}: expected seeds like 1,2,5-8") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"meshcast sim: --seeds {text!r}: expected distinct seeds, e.g. 1-5")
    return seeds


def _pick(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary.get(k) for k in JSON_KEYS}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.2f}%"
    return f"{v:,.0f}" if isinstance(v, (int, float)) and abs(v) >= 100 else f"{v:.3g}"


ROWS = (
    ("latency p50 (ms)", lambda s: _fmt(s["latency_ms"]["p50"])),
    ("latency p95 (ms)", lambda s: _fmt(s["latency_ms"]["p95"])),
    ("latency p99 (ms)", lambda s: _fmt(s["latency_ms"]["p99"])),
    ("continuity", lambda s: _fmt(s["continuity"], pct=True)),
    ("offload", lambda s: _fmt(s["offload"], pct=True)),
    ("startup p50 (ms)", lambda s: _fmt(s["startup_ms"]["p50"])),
    ("startup p95 (ms)", lambda s: _fmt(s["startup_ms"]["p95"])),
    ("seed egress (kbps)", lambda s: _fmt(s["seed_egress_kbps"])),
    ("control overhead", lambda s: _fmt(s["control_overhead"], pct=True)),
    ("max depth", lambda s: _fmt(s["max_depth"])),
    ("tracker CPU", lambda s: _fmt(s["tracker"]["cpu"], pct=True)),
    ("tracker wait p99 (ms)", lambda s: _fmt(s["tracker"]["wait_ms"]["p99"])),
    ("peers", lambda s: _fmt(s["peers"])),
    ("rejected", lambda s: _fmt(s["rejected"])),
    ("events", lambda s: _fmt(s["events"])),
    ("wall (s)", lambda s: _fmt(s["wall_s"])),
)


def table(columns: dict[str, dict[str, Any]]) -> str:
    """Summaries side by side, one column per run."""
    names = list(columns)
    width = max(12, *(len(n) + 2 for n in names))
    lines = ["".ljust(20) + "".join(n.rjust(width) for n in names)]
    for label, fn in ROWS:
        lines.append(label.ljust(20) + "".join(fn(columns[n]).rjust(width) for n in names))
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    if args.seeds is None:
        scenario = _load(args, args.strategy)
        label = scenario.run.strategy
        out = {label: Path(args.out)} if args.out else None
        summary = _simulate(args, {label: scenario}, out)[label].summary
        if args.json:
            print(json.dumps(_pick(summary)))
        else:
            print(table({label: summary}))
            if args.out:
                print(f"wrote {args.out}/metrics.json, peers.csv and plots")
        return 0
    if args.seed is not None:
        raise SystemExit("meshcast sim: give --seed or --seeds, not both")
    scenarios = {f"seed {seed}": _load(args, args.strategy, seed=seed)
                 for seed in _seeds(args.seeds)}
    return _report_many(args, scenarios, {label: label.replace(" ", "-") for label in scenarios},
                        plots=True)


def cmd_compare(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise SystemExit(f"meshcast sim: unknown strategy {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(STRATEGIES)}")
    return _report_many(args, {name: _load(args, name) for name in names},
                        {name: name for name in names}, plots=False)


def _report_many(args: argparse.Namespace, scenarios: dict[str, Scenario], dirs: dict[str, str],
                 plots: bool) -> int:
    """Run several variants of a scenario; a table (or JSON) with a column each, and with
    --out, each run's files in its own directory plus side-by-side plots."""
    from sim.metrics import write_comparison

    out = {label: Path(args.out) / dirs[label] for label in scenarios} if args.out else None
    outcomes = _simulate(args, scenarios, out, plots)
    keys = {label: label.removeprefix("seed ") for label in scenarios}  # JSON: "1", not "seed 1"
    if args.out:
        write_comparison(args.out, {keys[label]: o.digest for label, o in outcomes.items()})
    if args.json:
        print(json.dumps({keys[label]: _pick(o.summary) for label, o in outcomes.items()}))
    else:
        print(table({label: o.summary for label, o in outcomes.items()}))
        if args.out:
            print(f"wrote {args.out}/comparison.json and side-by-side plots")
    return 0
