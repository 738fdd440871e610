"""The simulated network: how long a message takes from one node to another, and why.

This docstring is the one place the network model is written down.

Nodes are dense integer ids ``0..n-1`` (the driver gives the seed(s) the first ids).

Latency
    Every model answers ``one_way(a, b) -> seconds`` (symmetric, stable across calls) and
    includes each end's *access delay* (``access[a] + access[b]``: the last-mile hop that
    coordinates and country averages do not see).

    - `CoordinateLatency`: nodes placed uniformly at random in the unit n-cube; the propagation
      RTT grows linearly with distance from ``rtt_min_ms`` (same point) to ``rtt_max_ms``
      (opposite corners). Access delays uniform in [access_min_ms, access_max_ms].
    - `MatrixLatency`: RTTs from a CSV file ``src,dst,rtt_ms`` (one direction is enough; a
      missing pair is an error, not a guess).
    - `CountryLatency`: RIPE Atlas. Data: RIPE NCC RIPE Atlas ping measurements (2.48 billion
      pings, March–April 2025), summarised per country pair by the ouroboros-leios project
      (input-output-hk/ouroboros-leios, ``data/internet/``, Apache-2.0); files
      ``country_rtt_stat.csv.gz`` and ``intra_rtt_stat.csv.gz``. Each node is placed in a
      country with probability proportional to a weight (default: the number of pings involving
      the country — a proxy for where Internet hosts are; the unknown country ``None`` is never
      used). A pair's RTT is a draw from a Gaussian(``rtt_avg``, σ) truncated to [lo, hi], made
      by inverse CDF from a uniform that is a hash of (run salt, min(a,b), max(a,b)): stable
      across calls and runs with the same rng, with no n² matrix. Because a few pathological
      pings (``rtt_max`` up to hours) inflate the summaries, σ = min(``rtt_std``, ½·``rtt_avg``)
      and hi = min(``rtt_max``, ``rtt_avg`` + 3σ); lo = ``rtt_min``. Fallbacks: a pair with
      fewer than 100 pings keeps its mean, but σ is widened to at least 20% of the mean and
      the window is avg ± 3σ (floored at 0): a few samples understate the spread, and their
      min/max are only those samples; a missing same-country pair uses
      ``intra_rtt_stat.csv.gz``; a missing cross-country pair uses the medians (of ``rtt_avg``,
      ``rtt_std``, ``rtt_min``) over the pairs with ≥ 100 pings, treated as a few-ping pair.
      The data directory is a parameter, else ``$MESHCAST_RTT_DATA``, else ``../shared/data``
      next to the repository.
      No access delay is added by default: the pings already include it.

Capacity (cut-through relay; the runtime forwards a chunk's bytes as they arrive)
    Each node has an `Uplink` (``kbps``, FIFO): everything a node sends shares it. A chunk of
    B bytes whose head the sender has at ``t_head`` and whose last byte reaches the sender at
    ``t_src_end`` (for the seed, ``t_src_end = t_head``) is sent as::

        start   = max(t_head, uplink.free_at)
        free_at = start + B·8 / (kbps·1000)          # the uplink is busy for B at its rate
        finish  = max(free_at, t_src_end + tail)     # cannot send the last byte before having it
        tail    = min(B, 1200)·8 / (kbps·1000)       # the last packet's own serialisation
        head arrives at start + one_way, last byte at finish + one_way

    `transfer` is that arithmetic. An optional download capacity is the same FIFO at the
    receiver: the arriving bytes are a second stage with zero propagation (`Network.send_chunk`).
    Control messages pay propagation only; their bytes are counted by the metrics, not queued.

Loss (a simplification, chosen and stated)
    QUIC retransmits lost packets, so packet loss mostly shows up as delay, not as missing
    chunks. With per-packet loss rate p, a chunk of ⌈B/1200⌉ packets loses at least one with
    probability 1-(1-p)^packets; it then arrives one RTT later (the retransmission of the lost
    packet; retransmitted bytes are not charged to the uplink — at p ≤ a few % it is noise). A
    separate ``chunk_drop`` probability makes a whole transfer vanish (a reset stream, a relay
    that gives up), after which the child must repair by pull. Control messages are not lost:
    they ride a reliable stream, and their retransmission delay is below the model's precision.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import random
from array import array
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Final, Iterable, Mapping, Protocol, Sequence, TYPE_CHECKING

if TYPE_CHECKING:
    from sim.scenario import NetworkConfig

__all__ = [
    "PACKET_BYTES",
    "LatencyModel",
    "CoordinateLatency",
    "MatrixLatency",
    "CountryLatency",
    "default_rtt_data_dir",
    "build_latency",
    "Uplink",
    "transfer",
    "Loss",
    "Network",
]

PACKET_BYTES: Final = 1200  # QUIC's conservative datagram payload: the unit of the tail and of loss
MIN_PINGS: Final = 100  # below this a country pair's spread is not trusted (see module docstring)
_MASK64: Final = (1 << 64) - 1
_STD_NORMAL = NormalDist()


class LatencyModel(Protocol):
    """One-way delay between two nodes, in seconds, access delays included."""

    def one_way(self, a: int, b: int) -> float: ...


def _access_delays(n: int, rng: random.Random, lo_ms: float, hi_ms: float) -> array:
    if lo_ms == hi_ms:
        return array("d", [lo_ms / 1000.0]) * n
    return array("d", (rng.uniform(lo_ms, hi_ms) / 1000.0 for _ in range(n)))


class CoordinateLatency:
    """Random placement in the unit n-cube; RTT linear in distance (see module docstring)."""

    __slots__ = ("pos", "access", "_base", "_per_unit")

    def __init__(
        self,
        n: int,
        rng: random.Random,
        *,
        dims: int = 2,
        rtt_min_ms: float = 10.0,
        rtt_max_ms: float = 200.0,
        access_min_ms: float = 0.0,
        access_max_ms: float = 0.0,
    ) -> None:
        if dims < 1:
            raise ValueError(f"dims must be >= 1, got {dims}")
        self.pos: list[tuple[float, ...]] = [
            tuple(rng.random() for _ in range(dims)) for _ in range(n)
        ]
        self.access = _access_delays(n, rng, access_min_ms, access_max_ms)
        self._base = rtt_min_ms / 2000.0
        self._per_unit = (rtt_max_ms - rtt_min_ms) / 2000.0 / math.sqrt(dims)

    def one_way(self, a: int, b: int) -> float:
        access = self.access
        return (
            self._base
            + math.dist(self.pos[a], self.pos[b]) * self._per_unit
            + access[a]
            + access[b]
        )


class MatrixLatency:
    """RTTs read from a ``src,dst,rtt_ms`` CSV; symmetric; a missing pair raises KeyError."""

    __slots__ = ("_one_way", "access")

    def __init__(self, rows: Iterable[tuple[int, int, float]], n: int, *, access_ms: float = 0.0):
        self._one_way: dict[tuple[int, int], float] = {}
        for src, dst, rtt_ms in rows:
            key = (src, dst) if src <= dst else (dst, src)
            self._one_way[key] = rtt_ms / 2000.0
        self.access = array("d", [access_ms / 1000.0]) * n

    @classmethod
    def from_csv(cls, path: str | os.PathLike, n: int, *, access_ms: float = 0.0) -> MatrixLatency:
        with open(path, newline="") as f:
            rows = [(int(r["src"]), int(r["dst"]), float(r["rtt_ms"])) for r in csv.DictReader(f)]
        return cls(rows, n, access_ms=access_ms)

    def one_way(self, a: int, b: int) -> float:
        key = (a, b) if a <= b else (b, a)
        try:
            return self._one_way[key] + self.access[a] + self.access[b]
        except KeyError:
            raise KeyError(f"RTT matrix has no entry for nodes {a} and {b}") from None


def default_rtt_data_dir() -> Path:
    """``$MESHCAST_RTT_DATA`` if set, else ``../shared/data`` next to the repository."""
    env = os.environ.get("MESHCAST_RTT_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@dataclass(frozen=True, slots=True)
class _PairStats:
    avg: float
    std: float
    lo: float
    hi: float
    cnt: int


def _read_gz_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"RIPE Atlas RTT data not found: {path} "
            "(pass data_dir, or set MESHCAST_RTT_DATA to the folder holding it)"
        )
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def _stats(row: Mapping[str, str]) -> _PairStats:
    return _PairStats(
        float(row["rtt_avg"]),
        float(row["rtt_std"] or 0.0),  # empty for single-ping pairs
        float(row["rtt_min"]),
        float(row["rtt_max"]),
        int(row["rtt_cnt"]),
    )


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


class CountryLatency:
    """RIPE Atlas country-pair RTTs with hashed per-pair draws (see module docstring)."""

    __slots__ = ("countries", "country_of", "access", "_salt", "_params", "_nc")

    def __init__(
        self,
        n: int,
        rng: random.Random,
        *,
        data_dir: str | os.PathLike | None = None,
        weights: Mapping[str, float] | None = None,
        access_min_ms: float = 0.0,
        access_max_ms: float = 0.0,
    ) -> None:
        root = Path(data_dir) if data_dir is not None else default_rtt_data_dir()
        pair_rows = _read_gz_csv(root / "country_rtt_stat.csv.gz")
        intra = _stats(_read_gz_csv(root / "intra_rtt_stat.csv.gz")[0])
        pairs: dict[tuple[str, str], _PairStats] = {}
        pings: dict[str, float] = {}
        trusted = []
        for row in pair_rows:
            a, b = row["cty1"], row["cty2"]
            if a == "None" or b == "None":
                continue
            st = _stats(row)
            pairs[(a, b)] = pairs[(b, a)] = st
            pings[a] = pings.get(a, 0.0) + st.cnt
            pings[b] = pings.get(b, 0.0) + st.cnt
            if st.cnt >= MIN_PINGS:
                trusted.append(st)
        cross = _PairStats(
            _median([s.avg for s in trusted]),
            _median([s.std for s in trusted]),
            _median([s.lo for s in trusted]),
            math.inf,
            0,
        )
        w = dict(weights) if weights is not None else pings
        unknown = sorted(set(w) - set(pings))
        if unknown:
            raise ValueError(f"no RTT data for countries {unknown}")
        self.countries: list[str] = sorted(c for c, x in w.items() if x > 0)
        if not self.countries:
            raise ValueError("country weights are all zero")
        cum = []
        total = 0.0
        for c in self.countries:
            total += w[c]
            cum.append(total)
        self.country_of = array(
            "H", rng.choices(range(len(self.countries)), cum_weights=cum, k=n)
        )
        self.access = _access_delays(n, rng, access_min_ms, access_max_ms)
        self._salt = rng.getrandbits(64)
        # Per country pair (index i*nc + j): (mean, sigma, Φ(lo), Φ(hi)) in standard units, so a
        # draw is one inverse CDF.
        nc = self._nc = len(self.countries)
        params: list[tuple[float, float, float, float]] = []
        for ca in self.countries:
            for cb in self.countries:
                st = pairs.get((ca, cb)) or (intra if ca == cb else cross)
                params.append(_truncated_params(st))
        self._params = params

    def rtt_ms(self, a: int, b: int) -> float:
        """The pair's RTT in milliseconds, without access delays."""
        if a == b:
            return 0.0
        lo, hi = (a, b) if a < b else (b, a)
        mean, sigma, plo, phi = self._params[self.country_of[a] * self._nc + self.country_of[b]]
        if sigma == 0.0:
            return mean
        u = _unit_hash(self._salt ^ (lo << 32 | hi))
        return mean + sigma * _STD_NORMAL.inv_cdf(plo + u * (phi - plo))

    def one_way(self, a: int, b: int) -> float:
        return self.rtt_ms(a, b) / 2000.0 + self.access[a] + self.access[b]


def _truncated_params(st: _PairStats) -> tuple[float, float, float, float]:
    sigma = min(st.std, 0.5 * st.avg)
    if st.cnt < MIN_PINGS:
        sigma = max(sigma, 0.2 * st.avg)
        lo, hi = max(0.0, st.avg - 3.0 * sigma), st.avg + 3.0 * sigma
    else:
        hi = min(st.hi, st.avg + 3.0 * sigma)
        lo = min(st.lo, hi)
    if sigma <= 0.0:
        return (st.avg, 0.0, 0.0, 1.0)
    cdf = _STD_NORMAL.cdf
    plo, phi = cdf((lo - st.avg) / sigma), cdf((hi - st.avg) / sigma)
    # Keep the uniform strictly inside (0, 1): inv_cdf is undefined at the ends.
    eps = 1e-12
    return (st.avg, sigma, min(max(plo, eps), 1 - eps), min(max(phi, eps), 1 - eps))


def _unit_hash(x: int) -> float:
    """splitmix64 finaliser → a float in [0, 1): a cheap, well-mixed per-pair uniform."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((x ^ (x >> 31)) >> 11) * (1.0 / (1 << 53))


def build_latency(config: NetworkConfig, n: int, rng: random.Random) -> LatencyModel:
    """The latency model a scenario's ``[network]`` table describes, for nodes ``0..n-1``."""
    p = config.params()
    if config.model == "coordinates":
        return CoordinateLatency(n, rng, **p)
    if config.model == "matrix":
        return MatrixLatency.from_csv(p["path"], n, access_ms=p["access_ms"])
    if config.model == "ripe":
        p["data_dir"] = p["data_dir"] or None
        p["weights"] = p["weights"] or None
        return CountryLatency(n, rng, **p)
    raise ValueError(f"unknown network model {config.model!r}")


class Uplink:
    """A FIFO link of ``kbps`` kilobits/s: what a node sends (or receives) shares it."""

    __slots__ = ("kbps", "free_at", "carried_bytes", "_sec_per_byte")

    def __init__(self, kbps: float) -> None:
        self.kbps = float(kbps)
        self.free_at = 0.0
        self.carried_bytes = 0
        self._sec_per_byte = 8.0 / (self.kbps * 1000.0) if self.kbps > 0 else math.inf


def transfer(
    link: Uplink, nbytes: int, t_head: float, t_src_end: float, one_way: float
) -> tuple[float, float]:
    """Send ``nbytes`` cut-through on ``link``; return (head arrival, last-byte arrival).

    Pure arithmetic on the FIFO state (module docstring): the link is busy from
    ``max(t_head, free_at)`` for the bytes' serialisation time, and the last byte leaves no
    earlier than one packet's serialisation after it reached the sender at ``t_src_end``.
    """
    spb = link._sec_per_byte
    if spb == math.inf:
        raise ValueError("transfer on a link of zero capacity")
    free_at = link.free_at
    start = t_head if t_head > free_at else free_at
    link.free_at = free_at = start + nbytes * spb
    link.carried_bytes += nbytes
    finish = t_src_end + (nbytes if nbytes < PACKET_BYTES else PACKET_BYTES) * spb
    if free_at > finish:
        finish = free_at
    return start + one_way, finish + one_way


@dataclass(frozen=True, slots=True)
class Loss:
    """Per-packet loss rate (→ one RTT of delay per affected chunk) and whole-chunk drop rate."""

    packet: float = 0.0
    chunk_drop: float = 0.0

    def __post_init__(self) -> None:
        for name in ("packet", "chunk_drop"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"loss.{name} must be in [0, 1), got {v}")


class Network:
    """Latency + per-node uplinks (+ optional downlinks) + loss: what the driver asks."""

    __slots__ = ("latency", "uplinks", "downlinks", "loss", "_rng", "_one_way")

    def __init__(
        self,
        latency: LatencyModel,
        upload_kbps: Sequence[float],
        rng: random.Random,
        *,
        download_kbps: Sequence[float] | None = None,
        loss: Loss = Loss(),
    ) -> None:
        self.latency = latency
        self._one_way = latency.one_way
        self.uplinks = [Uplink(k) for k in upload_kbps]
        # A download of 0 (or None) means unlimited: no receiving stage.
        self.downlinks: list[Uplink | None] | None = (
            [Uplink(k) if k > 0 else None for k in download_kbps] if download_kbps else None
        )
        self.loss = loss
        self._rng = rng

    def send_chunk(
        self, src: int, dst: int, nbytes: int, t_head: float, t_src_end: float,
        one_way: float = -1.0,
    ) -> tuple[float, float] | None:
        """Relay a chunk src → dst: (head, end) arrival times at dst, or None if it is dropped.
        `one_way`: the pair's delay, if the caller has it (the driver keeps it per link)."""
        if one_way < 0.0:
            one_way = self._one_way(src, dst)
        head, end = transfer(self.uplinks[src], nbytes, t_head, t_src_end, one_way)
        loss = self.loss
        if loss.packet or loss.chunk_drop:
            rng = self._rng
            if loss.chunk_drop and rng.random() < loss.chunk_drop:
                return None
            if loss.packet:
                packets = -(-nbytes // PACKET_BYTES)
                if rng.random() < 1.0 - (1.0 - loss.packet) ** packets:
                    end += 2.0 * one_way
        if self.downlinks is not None:
            down = self.downlinks[dst]
            if down is not None:
                head, end = transfer(down, nbytes, head, end, 0.0)
        return head, end

    def send_control(self, src: int, dst: int, now: float, one_way: float = -1.0) -> float:
        """Arrival time of a small control message: propagation only (`one_way`, if the caller
        has it)."""
        return now + (one_way if one_way >= 0.0 else self._one_way(src, dst))
