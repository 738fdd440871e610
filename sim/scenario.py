"""Parse and validate TOML scenario files into frozen dataclasses.

Every key has a default, so a scenario states only what it changes. Anything else is an error
that names the dotted key and what was expected (``peers.arrival.rate: expected a positive
number, got 'abc'``): unknown keys, wrong types, out-of-range values, parameters that do not
belong to the chosen kind (``rate`` for a ``flash`` arrival), upload shares that do not sum to 1.
Overrides (from a CLI) are dotted keys applied before validation, so they are checked the same
way; a string override is read as a TOML value when it parses as one (``"3"`` → 3).

The tables (see the dataclasses below for keys and defaults)::

    description = "..."
    [stream]   bitrate_kbps, chunk_ms, substreams, duration_s
    [seed]     upload_kbps, start_s, lead_s
    [peers]    count, nat_fraction, graceful_fraction, download_kbps, playout_delay_s
    [peers.arrival]  kind = "all" | "poisson" | "flash" | "pareto"  (+ t0, rate, window_s, ...)
    [peers.session]  kind = "infinite" | "fixed" | "exponential" | "lognormal"  (+ params)
    [[peers.upload]] share, kbps          (capacity classes; shares sum to 1)
    [network]  model = "coordinates" | "matrix" | "ripe", loss, chunk_drop  (+ model params)
    [channels] count, zipf_s
    [tracker]  restart_at_s, down_s       (a tracker restart: 0 = none), processes
               handshake_us, event_us, send_us, sign_us, verify_us, backlog_s
                                          (its CPU; all the costs 0 = free)
    [run]      seed, strategy
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, get_args, get_origin, get_type_hints

__all__ = [
    "ScenarioError",
    "StreamConfig",
    "SeedConfig",
    "ArrivalConfig",
    "SessionConfig",
    "UploadClass",
    "PeersConfig",
    "NetworkConfig",
    "ChannelsConfig",
    "TrackerConfig",
    "RunConfig",
    "Scenario",
    "parse_scenario",
    "load_scenario",
    "resource_index",
    "SCENARIO_DIR",
]

SCENARIO_DIR = Path(__file__).parent / "scenarios"


class ScenarioError(ValueError):
    """A scenario file or override is malformed; the message names the dotted key."""


# A constraint on a value: (what is expected, predicate).
_Check = tuple[str, Callable[[Any], bool]]
POSITIVE: _Check = ("a positive number", lambda v: v > 0 and math.isfinite(v))
NON_NEGATIVE: _Check = ("a non-negative number", lambda v: v >= 0 and math.isfinite(v))
FRACTION: _Check = ("a number in [0, 1]", lambda v: 0 <= v <= 1)
UNIT_OPEN: _Check = ("a number in [0, 1)", lambda v: 0 <= v < 1)
POSITIVE_INT: _Check = ("a positive integer", lambda v: v > 0)
FRONTS: _Check = ("an integer from 0 to 255", lambda v: 0 <= v <= 255)
NON_EMPTY: _Check = ("a non-empty string", lambda v: v != "")


def _opt(default: Any, check: _Check | None = None) -> Any:
    return field(default=default, metadata={"check": check} if check else {})


def _choice(default: str, *choices: str) -> Any:
    expected = "one of " + ", ".join(repr(c) for c in choices)
    return _opt(default, (expected, lambda v: v in choices))


@dataclass(frozen=True)
class StreamConfig:
    bitrate_kbps: float = _opt(2000.0, POSITIVE)
    chunk_ms: int = _opt(200, POSITIVE_INT)
    substreams: int = _opt(4, POSITIVE_INT)
    """K: chunk seq mod K is sub-stream k, each with its own push tree."""
    duration_s: float = _opt(60.0, POSITIVE)
    """Simulated time the stream runs (and the run lasts)."""
    gop_ms: int = _opt(1000, POSITIVE_INT)
    """Keyframe interval: a chunk starting with a random-access point every gop_ms (a joiner
    starts playing at one, so this bounds startup delay from below)."""


@dataclass(frozen=True)
class SeedConfig:
    upload_kbps: float = _opt(20000.0, POSITIVE)
    """Upload of each channel's seed (with `[channels] count` > 1, every channel has its own)."""
    start_s: float = _opt(0.0, NON_NEGATIVE)
    """When the broadcast goes live: the seed announces its channel then and ingests from 0.1 s
    later. Viewers who arrive before wait at the tracker, which places them all at once when
    it does (a premiere)."""
    lead_s: float = _opt(0.0, NON_NEGATIVE)
    """How long before `start_s` the seed is up and has announced its channel (a broadcaster who
    starts it ahead of a premiere): viewers who arrive then are placed as they come and wait
    in their trees for the first chunk, at `start_s`."""


class _Tagged:
    """A table whose ``kind``-like key decides which of its other keys are allowed."""

    TAG: ClassVar[str] = "kind"
    COMMON: ClassVar[frozenset[str]] = frozenset()
    KEYS: ClassVar[dict[str, frozenset[str]]] = {}

    def params(self) -> dict[str, Any]:
        """The keys that belong to the chosen kind, as keyword arguments."""
        return {k: getattr(self, k) for k in sorted(self.KEYS[getattr(self, self.TAG)])}


@dataclass(frozen=True)
class ArrivalConfig(_Tagged):
    kind: str = _choice("poisson", "all", "poisson", "flash", "pareto")
    t0: float = _opt(0.0, NON_NEGATIVE)
    rate: float = _opt(10.0, POSITIVE)
    """Poisson: joins per second."""
    window_s: float = _opt(10.0, POSITIVE)
    """Flash crowd: every join falls within this many seconds after t0."""
    alpha: float = _opt(1.5, POSITIVE)
    """Pareto: tail index of the inter-arrival gaps."""
    scale_s: float = _opt(0.01, POSITIVE)
    """Pareto: the smallest gap."""

    KEYS: ClassVar[dict[str, frozenset[str]]] = {
        "all": frozenset({"t0"}),
        "poisson": frozenset({"t0", "rate"}),
        "flash": frozenset({"t0", "window_s"}),
        "pareto": frozenset({"t0", "alpha", "scale_s"}),
    }


@dataclass(frozen=True)
class SessionConfig(_Tagged):
    kind: str = _choice("infinite", "infinite", "fixed", "exponential", "lognormal")
    length_s: float = _opt(600.0, POSITIVE)
    mean_s: float = _opt(600.0, POSITIVE)
    mu: float = _opt(5.5, ("a finite number", math.isfinite))
    """Lognormal: mean of ln(seconds)."""
    sigma: float = _opt(1.0, POSITIVE)

    KEYS: ClassVar[dict[str, frozenset[str]]] = {
        "infinite": frozenset(),
        "fixed": frozenset({"length_s"}),
        "exponential": frozenset({"mean_s"}),
        "lognormal": frozenset({"mu", "sigma"}),
    }


@dataclass(frozen=True)
class UploadClass:
    share: float = _opt(1.0, FRACTION)
    kbps: float = _opt(4000.0, NON_NEGATIVE)


@dataclass(frozen=True)
class PeersConfig:
    count: int = _opt(100, POSITIVE_INT)
    arrival: ArrivalConfig = field(default_factory=ArrivalConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    upload: tuple[UploadClass, ...] = field(default=(UploadClass(),))
    nat_fraction: float = _opt(0.0, FRACTION)
    graceful_fraction: float = _opt(1.0, FRACTION)
    """Share of departures that are announced (the rest vanish abruptly)."""
    download_kbps: float = _opt(0.0, NON_NEGATIVE)
    """Per-peer download capacity; 0 means unlimited."""
    playout_delay_s: float = _opt(0.5, NON_NEGATIVE)
    """How long after its first playable chunk a viewer starts playing: its margin for late
    chunks and pull repair (`PeerNode.playout_delay`)."""


@dataclass(frozen=True)
class NetworkConfig(_Tagged):
    TAG: ClassVar[str] = "model"
    COMMON: ClassVar[frozenset[str]] = frozenset({"loss", "chunk_drop"})

    model: str = _choice("coordinates", "coordinates", "matrix", "ripe")
    loss: float = _opt(0.0, UNIT_OPEN)
    """Per-packet loss rate (shows as one RTT of extra delay; see sim.network)."""
    chunk_drop: float = _opt(0.0, UNIT_OPEN)
    """Probability that a whole chunk transfer is lost."""
    dims: int = _opt(2, POSITIVE_INT)
    rtt_min_ms: float = _opt(10.0, NON_NEGATIVE)
    rtt_max_ms: float = _opt(200.0, NON_NEGATIVE)
    access_min_ms: float = _opt(0.0, NON_NEGATIVE)
    access_max_ms: float = _opt(0.0, NON_NEGATIVE)
    path: str = _opt("", NON_EMPTY)
    """Matrix: CSV file ``src,dst,rtt_ms`` (relative paths: to the scenario file)."""
    access_ms: float = _opt(0.0, NON_NEGATIVE)
    data_dir: str = _opt("")
    """RIPE: folder of the RIPE Atlas files ("" → $MESHCAST_RTT_DATA or ../shared/data)."""
    weights: dict[str, float] = field(default_factory=dict)
    """RIPE: country → placement weight ({} → by number of pings)."""

    KEYS: ClassVar[dict[str, frozenset[str]]] = {
        "coordinates": frozenset(
            {"dims", "rtt_min_ms", "rtt_max_ms", "access_min_ms", "access_max_ms"}
        ),
        "matrix": frozenset({"path", "access_ms"}),
        "ripe": frozenset({"data_dir", "weights", "access_min_ms", "access_max_ms"}),
    }


@dataclass(frozen=True)
class TrackerConfig:
    restart_at_s: float = _opt(0.0, NON_NEGATIVE)
    """When the tracker process restarts (0: never). It closes its links; a new tracker, with a
    new key and nothing of the old one's state, starts `down_s` later at the same address. The
    seeds and viewers find it again by themselves."""
    down_s: float = _opt(5.0, POSITIVE)
    processes: int = _opt(1, POSITIVE_INT)
    """Tracker processes, each one CPU: channel c is tracked by process c mod `processes` (a
    site spreads its channels over several; one channel's viewers all go to one)."""
    fronts: int = _opt(0, FRONTS)
    """Front processes doing each tracker process's QUIC (`meshcast tracker --fronts`), each
    one more CPU: handshakes, receiving and sending messages, heartbeats; a link's front is
    its client's index mod `fronts` (Linux picks a front by the client's address). 0: the
    tracker process does its own QUIC."""
    # The tracker's CPU (`sim.driver`: each process one server, work done in arrival order).
    # Defaults: real processes here, `bench/tracker_fronts.py --rate 100` (2026-11-27, median
    # of 3, 1,000 joins): a join cost one process 4,740 µs; with a front, the state process
    # 1,250 and the front 4,080. So a join's QUIC (handshake + its Join received + ~7.5 answers
    # sent) is 4,080 µs, split as in `bench/tracker_cpu.py`'s sans-IO figures (1,070 µs
    # handshake, ~29 per message: 81 / 19 %); handling it is 4,740 − 4,080 − 1.5 signatures;
    # and a message over the local stream (~9.5 a join: the link opened, the Join, the answers)
    # the rest of the state process's 1,250, less the fifth the state process saved once its
    # links' records went straight to the runner (paired runs, 1,180 → 950 µs a join: 37, was
    # 60). Sign, verify: `bench/tracker_cpu.py`. All 0 gives a tracker that answers at once,
    # whatever the load.
    handshake_us: float = _opt(3300.0, NON_NEGATIVE)
    """Server side of one QUIC handshake (a viewer's or seed's first contact)."""
    receive_us: float = _opt(92.0, NON_NEGATIVE)
    """QUIC receiving one message."""
    send_us: float = _opt(92.0, NON_NEGATIVE)
    """Framing and sending one message by QUIC."""
    event_us: float = _opt(610.0, NON_NEGATIVE)
    """Handling one message, closed link or timer: decoding, deciding, framing the answers."""
    relay_us: float = _opt(37.0, NON_NEGATIVE)
    """With fronts: one message (or link opened or closed) over the local stream between a
    front and the tracker process, at the tracker process."""
    sign_us: float = _opt(32.0, NON_NEGATIVE)
    """One Ed25519 signature (a viewer's batch of tokens, `Crypto.issue_tokens`)."""
    verify_us: float = _opt(102.0, NON_NEGATIVE)
    """One Ed25519 verification (a seed's announcement, a returning node's proof)."""
    keepalive_us: float = _opt(11.0, NON_NEGATIVE)
    """Heartbeats, per open link and second (one in, its echo out): what each more link adds
    (`bench/tracker_idle.py`: 1,000 → 4,000 quiet links took a server from 5.5 % to 8.8 % of a
    core; 10,000 took 14.7 %). The rest, ~4 % of a core for the receive task's wake-ups, a busy
    tracker shares with its other work."""
    backlog_s: float = _opt(1.0, NON_NEGATIVE)
    """Work queued ahead (at the tracker process, or the client's front) beyond which a new
    client's first packet is lost: what the socket's receive buffer holds of QUIC Initials
    (`meshcast.service.TRACKER_RECEIVE_BUFFER`)."""


@dataclass(frozen=True)
class ChannelsConfig:
    count: int = _opt(1, POSITIVE_INT)
    zipf_s: float = _opt(1.0, NON_NEGATIVE)


@dataclass(frozen=True)
class RunConfig:
    seed: int = _opt(1)
    strategy: str = _opt("tree", NON_EMPTY)


@dataclass(frozen=True)
class Scenario:
    name: str = field(default="", metadata={"toml": False})
    """The file's stem (not a TOML key)."""
    description: str = ""
    stream: StreamConfig = field(default_factory=StreamConfig)
    seed: SeedConfig = field(default_factory=SeedConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    channels: ChannelsConfig = field(default_factory=ChannelsConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    run: RunConfig = field(default_factory=RunConfig)


def resource_index(scenario: Scenario) -> float:
    """(seed upload + E[peer upload]·n) / (n·bitrate): ≥ 1 means peers can carry the stream."""
    n = scenario.peers.count
    mean_up = sum(u.share * u.kbps for u in scenario.peers.upload)
    return (scenario.seed.upload_kbps + mean_up * n) / (n * scenario.stream.bitrate_kbps)


# --- validation -------------------------------------------------------------------------------

_TYPE_NAMES = {float: "a number", int: "an integer", str: "a string", bool: "a boolean"}


def _fail(path: str, expected: str, value: Any) -> ScenarioError:
    return ScenarioError(f"{path}: expected {expected}, got {value!r}")


def _scalar(tp: type, value: Any, path: str, expected: str | None = None) -> Any:
    # bool is an int in Python, but `count = true` is a mistake, not a 1.
    wrong = (isinstance(value, bool) and tp is not bool) or not isinstance(
        value, (int, float) if tp is float else tp)
    if wrong:
        raise _fail(path, expected or _TYPE_NAMES[tp], value)
    return float(value) if tp is float else value


def _value(tp: Any, value: Any, path: str, expected: str | None = None) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    origin = get_origin(tp)
    if origin is tuple:  # tuple[Item, ...]: an array of tables
        if not isinstance(value, list):
            raise _fail(path, "an array of tables", value)
        item = get_args(tp)[0]
        return tuple(_value(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:  # dict[str, float]
        if not isinstance(value, dict):
            raise _fail(path, "a table", value)
        return {k: _scalar(float, v, f"{path}.{k}") for k, v in value.items()}
    return _scalar(tp, value, path, expected)


def _build(cls: Any, table: Any, path: str) -> Any:
    if not isinstance(table, dict):
        raise _fail(path or "scenario", "a table", table)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("toml", True)}
    allowed = set(fields)
    if issubclass(cls, _Tagged):
        tag = table.get(cls.TAG, fields[cls.TAG].default)
        tag_path = f"{path}.{cls.TAG}" if path else cls.TAG
        _check(fields[cls.TAG], _scalar(str, tag, tag_path, "a string"), tag_path)
        allowed = {cls.TAG} | cls.COMMON | cls.KEYS[tag]
    kwargs = {}
    for key, value in table.items():
        key_path = f"{path}.{key}" if path else key
        if key not in allowed:
            if key in fields:
                what = f"not a parameter of {cls.TAG} {tag!r}"
            else:
                what = "unknown key"
            expected = ", ".join(sorted(allowed))
            raise ScenarioError(f"{key_path}: {what} (expected one of: {expected})")
        check = fields[key].metadata.get("check")
        v = _value(hints[key], value, key_path, check[0] if check else None)
        _check(fields[key], v, key_path)
        kwargs[key] = v
    return cls(**kwargs)


def _check(f: dataclasses.Field, value: Any, path: str) -> None:
    check = f.metadata.get("check")
    if check is not None and not check[1](value):
        raise _fail(path, check[0], value)


def _apply_override(raw: dict, dotted: str, value: Any) -> None:
    if isinstance(value, str):
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            pass  # a bare word: keep it as a string
    *parents, leaf = dotted.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ScenarioError(f"{'.'.join(parents[: i + 1])}: expected a table, got {child!r}")
        node = child
    node[leaf] = value


def parse_scenario(
    raw: Mapping[str, Any], *, overrides: Mapping[str, Any] | None = None, name: str = ""
) -> Scenario:
    """Validate an already-parsed TOML document (plus dotted overrides) into a `Scenario`."""
    data = _deep_copy(raw)
    for dotted, value in (overrides or {}).items():
        _apply_override(data, dotted, value)
    scenario = dataclasses.replace(_build(Scenario, data, ""), name=name)
    _check_consistency(scenario)
    return scenario


def load_scenario(
    path: str | Path, overrides: Mapping[str, Any] | None = None
) -> Scenario:
    """Read and validate a scenario file; relative paths inside it are resolved next to it."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: invalid TOML: {e}") from None
    scenario = parse_scenario(raw, overrides=overrides, name=path.stem)
    net = scenario.network
    if net.model == "matrix" and not Path(net.path).is_absolute():
        net = dataclasses.replace(net, path=str(path.parent / net.path))
        scenario = dataclasses.replace(scenario, network=net)
    return scenario


def _deep_copy(raw: Mapping[str, Any]) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def _check_consistency(s: Scenario) -> None:
    """Rules that span several keys."""
    total = sum(u.share for u in s.peers.upload)
    if abs(total - 1.0) > 1e-6:
        raise ScenarioError(f"peers.upload: expected shares summing to 1, got {total:g}")
    net = s.network
    for lo, hi in (("rtt_min_ms", "rtt_max_ms"), ("access_min_ms", "access_max_ms")):
        if getattr(net, hi) < getattr(net, lo):
            expected = f"a number >= {lo} ({getattr(net, lo):g})"
            raise _fail(f"network.{hi}", expected, getattr(net, hi))
    if net.model == "matrix" and not net.path:
        raise ScenarioError("network.path: expected a CSV file path for model 'matrix', got none")
