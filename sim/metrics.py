"""Collect a run's quality-of-experience and cost metrics, and write them as JSON, CSV and plots.

The driver calls the collector as things happen; nothing here reads a clock (times are
arguments). Memory stays flat in run length and in samples: latencies go into fixed-width
histograms (1 ms bins up to ``latency_max_s``; quantiles are exact to half a bin), per-peer
aggregates live in ``vec`` columns (compact arrays) indexed by node id, and the time series keep
a few counters plus a coarse (10 ms) latency histogram per bucket. The run's totals are the
buckets' sums; what each peer played and missed is its node's own count, given at the end
(`peer_played`).

Definitions (what the summary means):
    latency     source-to-play latency of each verified chunk (p50/p95/p99, ms).
    continuity  chunks verified on time / chunks due (verified + missed). The driver reports
                each (peer, seq) due for playback exactly once: `chunk_verified` (on time or
                late) or `chunk_missed` (never arrived).
    offload     bytes of verified chunks that came from peers / all verified chunk bytes.
    seed egress all bytes the seed(s) sent (media + control) over the run, in kbit/s.
    control overhead  control bytes / media bytes, all nodes.
    startup     join → first chunk played (p50/p95, ms); for a viewer who came before the
                broadcast went live (`[seed] start_s`), from the broadcast's start.
    rejected    peers the tracker refused (no capacity left for them) or evicted.
    depth       each peer's deepest tree position reported (root's children: depth 1);
                the histogram counts peers by that depth.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Mapping, NamedTuple

from librt.vecs import vec
from mypy_extensions import i16, i64

__all__ = ["Digest", "Histogram", "MetricsCollector", "write_comparison"]

_SERIES_BIN_S = 0.010  # per-bucket latency histograms: coarse, they only feed a p50 plot


class Histogram:
    """Fixed-width bins on [0, max_s); values at or above max_s land in the last bin."""

    __slots__ = ("width_s", "counts", "n", "_inv")

    def __init__(self, width_s: float = 0.001, max_s: float = 10.0) -> None:
        self.width_s = width_s
        self._inv = 1.0 / width_s
        self.counts: vec[i64] = vec[i64]([0] * int(math.ceil(max_s / width_s)))
        """A `vec`: a compiled build (mypyc) adds to its items natively, where a list's
        boxed count past 256 is a new int object each time."""
        self.n = 0

    def add(self, x_s: float) -> None:
        i = int(x_s * self._inv)
        counts = self.counts
        if i >= len(counts):
            i = len(counts) - 1
        elif i < 0:
            i = 0
        counts[i] += 1
        self.n += 1

    def quantile(self, q: float) -> float | None:
        """Nearest-rank q-quantile (seconds, the bin's midpoint); None if empty."""
        if self.n == 0:
            return None
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return (i + 0.5) * self.width_s
        raise AssertionError("unreachable: counts sum to n")

    def cdf(self) -> tuple[list[float], list[float]]:
        """(upper bin edge in seconds, fraction ≤ it) for the non-empty bins."""
        xs, ys, seen = [], [], 0
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                xs.append((i + 1) * self.width_s)
                ys.append(seen / self.n)
        return xs, ys


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


class _Bucket:
    """Counters of one time-series bucket."""

    __slots__ = (
        "verified", "on_time", "missed", "peer_bytes", "chunk_bytes", "seed_bytes", "latency",
    )

    def __init__(self, latency_max_s: float) -> None:
        self.verified = self.on_time = self.missed = 0
        self.peer_bytes = self.chunk_bytes = self.seed_bytes = 0
        self.latency = Histogram(_SERIES_BIN_S, latency_max_s)


class Digest(NamedTuple):
    """What reports and side-by-side plots need of a finished run, as plain data (small, and
    picklable: a run in a worker process sends back this, not its collector). A tuple, not a
    dataclass: a compiled build's (mypyc) frozen dataclass does not unpickle."""

    summary: dict[str, Any]
    series: dict[str, list[float | None]]
    latency_cdf: tuple[list[float], list[float]]
    depths: dict[int, int]


class MetricsCollector:
    """Per-run metrics, fed by the simulator driver; ids are dense node ids ``< n_nodes``."""

    # Per-node columns, in the CSV's order. `vec`s, not `array`s: as compact, and a compiled
    # build (mypyc) updates their items natively (an array's item goes through Python's item
    # protocol: ~20 times the time).
    _COLUMNS: ClassVar[tuple[str, ...]] = (
        "joined_at", "left_at", "startup_s", "verified", "on_time", "missed", "latency_sum",
        "bytes_from_peers", "bytes_from_seed", "bytes_uploaded", "max_depth",
    )

    def __init__(
        self,
        n_nodes: int,
        duration_s: float,
        *,
        bucket_s: float = 1.0,
        latency_max_s: float = 10.0,
        startup_max_s: float = 60.0,
        trackers: int = 1,
        fronts: int = 0,
    ) -> None:
        self.n_nodes = n_nodes
        self.duration_s = duration_s
        self.bucket_s = bucket_s
        self._latency_max_s = latency_max_s
        nan, zero = [math.nan] * n_nodes, [0] * n_nodes
        self.joined_at: vec[float] = vec[float](nan)
        self.left_at: vec[float] = vec[float](nan)
        self.startup_s: vec[float] = vec[float](nan)
        self.verified: vec[i64] = vec[i64](zero)
        self.on_time: vec[i64] = vec[i64](zero)
        self.missed: vec[i64] = vec[i64](zero)
        self.latency_sum: vec[float] = vec[float]([0.0] * n_nodes)
        self.bytes_from_peers: vec[i64] = vec[i64](zero)
        self.bytes_from_seed: vec[i64] = vec[i64](zero)
        self.bytes_uploaded: vec[i64] = vec[i64](zero)
        self.max_depth: vec[i16] = vec[i16]([-1] * n_nodes)
        self.seen = bytearray(n_nodes)  # 1 for ids that acted as peers
        self.latency = Histogram(0.001, latency_max_s)
        self.startup_hist = Histogram(0.001, startup_max_s)
        self.buckets: list[_Bucket] = []
        self.media_bytes = self.control_bytes = self.seed_bytes = 0
        self.rejected = 0
        self.tracker_cpu_s = {"handshakes": 0.0, "events": 0.0, "sends": 0.0, "signatures": 0.0,
                              "verifications": 0.0, "keepalives": 0.0}
        """The trackers' CPU, by what it was spent on (`sim.driver`'s model)."""
        self.tracker_busy_s = [0.0] * trackers
        self.front_busy_s = [0.0] * (trackers * fronts)
        """... and by front process (`[tracker] fronts` per tracker process)."""
        self.front_cpu_s = {"handshakes": 0.0, "receives": 0.0, "sends": 0.0, "keepalives": 0.0}
        self.front_wait = Histogram(0.001, latency_max_s)
        """... and by tracker process."""
        self.tracker_longest_s = 0.0
        """The longest single piece of a tracker's work: how long it answered nothing else."""
        self.tracker_wait = Histogram(0.001, latency_max_s)
        """How long each piece of a tracker's work waited for its CPU (longer than
        `latency_max_s` counts as that)."""

    # --- driver hooks --------------------------------------------------------------------------

    def _bucket(self, now: float) -> _Bucket:
        i = int(now / self.bucket_s)
        buckets = self.buckets
        while len(buckets) <= i:
            buckets.append(_Bucket(self._latency_max_s))
        return buckets[i]

    def peer_joined(self, peer: int, *, now: float) -> None:
        self.joined_at[peer] = now
        self.seen[peer] = 1

    def peer_left(self, peer: int, *, now: float) -> None:
        self.left_at[peer] = now

    def tracker_work(self, tracker: int, waited_s: float, *, handshakes: float = 0.0,
                     events: float = 0.0, sends: float = 0.0, signatures: float = 0.0,
                     verifications: float = 0.0) -> None:
        """One piece of a tracker process's work, which waited `waited_s` for its CPU, then
        took the seconds given by what for."""
        cpu = handshakes + events + sends + signatures + verifications
        self.tracker_busy_s[tracker] += cpu
        if cpu > self.tracker_longest_s:
            self.tracker_longest_s = cpu
        spent = self.tracker_cpu_s
        spent["handshakes"] += handshakes
        spent["events"] += events
        spent["sends"] += sends
        spent["signatures"] += signatures
        spent["verifications"] += verifications
        self.tracker_wait.add(waited_s)

    def tracker_keepalives(self, tracker: int, cpu_s: float) -> None:
        """A tracker process's CPU for its links' keep-alives: a steady load, spread thin, so
        neither a piece of work nor a wait of its own."""
        self.tracker_busy_s[tracker] += cpu_s
        self.tracker_cpu_s["keepalives"] += cpu_s

    def front_work(self, front: int, cpu_s: float, what: str, *, waited_s: float = 0.0) -> None:
        """A piece of a front process's work (`what`: a key of `front_cpu_s`), which waited
        `waited_s` for its CPU."""
        self.front_busy_s[front] += cpu_s
        self.front_cpu_s[what] += cpu_s
        if what != "keepalives":
            self.front_wait.add(waited_s)

    def peer_rejected(self, peer: int) -> None:
        """The tracker refused (or evicted) ``peer``: it plays nothing from then on."""
        self.seen[peer] = 1
        self.rejected += 1

    def chunk_verified(
        self,
        peer: int,
        seq: int,
        latency_s: float,
        on_time: bool,
        from_peer: bool,
        nbytes: int,
        *,
        now: float,
    ) -> None:
        """A chunk passed verification at ``peer``; ``latency_s`` is source-to-play.

        The run's totals and series count it here; the peer's own columns are its node's
        counters, given once by `peer_played` (an update per chunk of five per-peer columns
        was an eighth of a compiled run)."""
        self.latency.add(latency_s)
        i = int(now / self.bucket_s)
        buckets = self.buckets
        b = buckets[i] if i < len(buckets) else self._bucket(now)
        b.verified += 1
        b.latency.add(latency_s)
        b.chunk_bytes += nbytes
        if on_time:
            b.on_time += 1
        if from_peer:
            b.peer_bytes += nbytes

    def peer_played(self, peer: int, verified: int, on_time: int, missed: int,
                    latency_sum: float, from_peers: int, from_seed: int) -> None:
        """What ``peer`` played and missed in the whole run (its node's counters), for its
        columns."""
        self.verified[peer] = verified
        self.on_time[peer] = on_time
        self.missed[peer] = missed
        self.latency_sum[peer] = latency_sum
        self.bytes_from_peers[peer] = from_peers
        self.bytes_from_seed[peer] = from_seed

    def chunk_missed(self, peer: int, seq: int, *, now: float) -> None:
        """A chunk due for playback at ``peer`` never arrived (the run's totals and series; the
        peer's column is its node's count, given by `peer_played`)."""
        self.seen[peer] = 1
        self._bucket(now).missed += 1

    def startup(self, peer: int, delay_s: float) -> None:
        """Join (or the broadcast's start, if later) → first frame played."""
        self.seen[peer] = 1
        self.startup_s[peer] = delay_s
        self.startup_hist.add(delay_s)

    def bytes_sent(
        self,
        node: int,
        nbytes: int,
        kind: Literal["media", "control"],
        by_seed: bool,
        *,
        now: float,
    ) -> None:
        if kind == "media":
            self.media_bytes += nbytes
        else:
            self.control_bytes += nbytes
        if by_seed:
            self.seed_bytes += nbytes
            self._bucket(now).seed_bytes += nbytes
        else:
            self.bytes_uploaded[node] += nbytes

    def depth(self, peer: int, d: int) -> None:
        if d > self.max_depth[peer]:
            self.max_depth[peer] = d

    # --- results ---------------------------------------------------------------------------------

    def peers(self) -> list[int]:
        """Ids that acted as peers, ascending."""
        seen = self.seen  # (indexes, not enumerate: mypyc 2.4 cannot iterate a bytearray)
        return [i for i in range(len(seen)) if seen[i]]

    def depth_histogram(self) -> dict[int, int]:
        hist: dict[int, int] = {}
        for d in self.max_depth:
            if d >= 0:
                hist[d] = hist.get(d, 0) + 1
        return dict(sorted(hist.items()))

    def series(self) -> dict[str, list[float | None]]:
        """Per-bucket time series, indexed by bucket start time."""
        bs = self.buckets
        return {
            "t_s": [i * self.bucket_s for i in range(len(bs))],
            "offload": [_ratio(b.peer_bytes, b.chunk_bytes) for b in bs],
            "continuity": [_ratio(b.on_time, b.verified + b.missed) for b in bs],
            "latency_p50_ms": [_ms(b.latency.quantile(0.5)) for b in bs],
            "seed_egress_kbps": [b.seed_bytes * 8 / 1000 / self.bucket_s for b in bs],
        }

    def summary(self) -> dict[str, Any]:
        bs = self.buckets
        verified, on_time = sum(b.verified for b in bs), sum(b.on_time for b in bs)
        missed = sum(b.missed for b in bs)
        from_peers = sum(b.peer_bytes for b in bs)
        from_seed = sum(b.chunk_bytes for b in bs) - from_peers
        depths = self.depth_histogram()
        lat, st, tw = self.latency.quantile, self.startup_hist.quantile, self.tracker_wait.quantile
        fw = self.front_wait.quantile
        return {
            "peers": sum(self.seen),
            "rejected": self.rejected,
            "duration_s": self.duration_s,
            "latency_ms": {"p50": _ms(lat(0.5)), "p95": _ms(lat(0.95)), "p99": _ms(lat(0.99))},
            "continuity": _ratio(on_time, verified + missed),
            "offload": _ratio(from_peers, from_peers + from_seed),
            "startup_ms": {"p50": _ms(st(0.5)), "p95": _ms(st(0.95))},
            "seed_egress_kbps": self.seed_bytes * 8 / 1000 / self.duration_s,
            "control_overhead": _ratio(self.control_bytes, self.media_bytes),
            "max_depth": max(depths, default=None),
            "tracker": {
                "processes": len(self.tracker_busy_s),
                "cpu": max(self.tracker_busy_s) / self.duration_s,
                "cpu_s": dict(self.tracker_cpu_s),
                "longest_ms": self.tracker_longest_s * 1000,
                "wait_ms": {"p50": _ms(tw(0.5)), "p95": _ms(tw(0.95)), "p99": _ms(tw(0.99))},
                **({"fronts": {
                    "per_process": len(self.front_busy_s) // len(self.tracker_busy_s),
                    "cpu": max(self.front_busy_s) / self.duration_s,
                    "cpu_s": dict(self.front_cpu_s),
                    "wait_ms": {"p50": _ms(fw(0.5)), "p95": _ms(fw(0.95)), "p99": _ms(fw(0.99))},
                }} if self.front_busy_s else {}),
            },
            "depth_histogram": {str(d): c for d, c in depths.items()},
            "chunks": {"verified": verified, "on_time": on_time, "missed": missed},
            "bytes": {
                "media": self.media_bytes,
                "control": self.control_bytes,
                "seed": self.seed_bytes,
            },
        }

    def digest(self) -> Digest:
        return Digest(self.summary(), self.series(), self.latency.cdf(), self.depth_histogram())

    def write(self, out_dir: str | Path, *, plots: bool = True) -> None:
        """``metrics.json`` (summary + series), ``peers.csv`` and, if ``plots``, PNG plots."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "metrics.json", {**self.summary(), "series": self.series()})
        with open(out / "peers.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            names = list(self._COLUMNS)
            w.writerow(["id", *names])
            cols = [getattr(self, name) for name in names]
            for i in self.peers():
                w.writerow([i, *(_csv_value(c[i]) for c in cols)])
        if plots:
            _plot(out, {"": self.digest()})


def write_comparison(out_dir: str | Path, runs: Mapping[str, Digest]) -> None:
    """Side-by-side: ``comparison.json`` (summary per run) and overlaid PNG plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "comparison.json", {name: d.summary for name, d in runs.items()})
    _plot(out, runs, prefix="comparison_")


def _rounded(x: Any) -> Any:
    """Floats rounded to 6 significant digits (NaN/inf → null): stable, diffable files."""
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_rounded(data), sort_keys=True, indent=2) + "\n")


def _csv_value(v: float | int) -> str | int:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _plot(out: Path, runs: Mapping[str, Digest], prefix: str = "") -> None:
    # Figure without pyplot: no global backend state, works headless (Agg via savefig).
    from matplotlib.figure import Figure

    def save(fig: Any, name: str) -> None:
        for ax in fig.axes:
            if any(label for label in runs):
                ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{prefix}{name}.png", dpi=100)

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, m in runs.items():
        xs, ys = m.latency_cdf
        ax.step([x * 1000 for x in xs], ys, where="post", label=label or None)
    ax.set(xlabel="source-to-play latency (ms)", ylabel="CDF", title="Latency", ylim=(0, 1.02))
    save(fig, "latency_cdf")

    fig = Figure(figsize=(7, 5))
    ax1, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for label, m in runs.items():
        s = m.series
        ax1.plot(_nan(s["t_s"]), _nan(s["offload"]), label=label or None)
        ax2.plot(_nan(s["t_s"]), _nan(s["continuity"]), label=label or None)
    ax1.set(ylabel="offload", ylim=(0, 1.02), title="Offload and continuity over time")
    ax2.set(xlabel="time (s)", ylabel="continuity", ylim=(0, 1.02))
    save(fig, "timeseries")

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(runs))
    for k, (label, m) in enumerate(runs.items()):
        hist = m.depths
        ax.bar([d + k * width for d in hist], list(hist.values()), width, label=label or None)
    ax.set(xlabel="tree depth (hops from the seed)", ylabel="peers", title="Depth")
    save(fig, "depth_histogram")


def _nan(xs: Iterable[float | None]) -> list[float]:
    return [math.nan if x is None else x for x in xs]
